"""Calibration images: a folder of .jpg/.jpeg/.png/.bmp/.webp/.tif/.tiff files -> samples for an image model.

The preprocessing is that of classification pipelines (torchvision's ``Resize`` +
``CenterCrop`` + ``ToTensor`` + ``Normalize``), each step an explicit option:

1. decode with Pillow and convert to RGB, or to grayscale (``L``) for 1-channel models; 16-bit
   grayscale images (PNG, TIFF) keep their 16 bits: they are resized in floating point and scaled
   by 65535 instead of 255 (a gray image feeding a 3-channel model fills all three channels);
   32-bit float images are refused (give those as ``.npy`` arrays);
2. resize so the *shorter* side is ``resize`` pixels (bilinear), keeping the aspect ratio;
   default: the crop size / 0.875 (256 for a 224 crop), the usual ImageNet ratio;
3. center-crop to the model's input height x width (``crop`` when the model's are dynamic);
4. optionally reverse the channels to BGR;
5. scale 0..255 to 0..1 (unless ``scale=False``), then ``(x - mean) / std`` per channel;
6. lay out as CHW or HWC (default: from the model input, whichever axis holds 1 or 3 channels).

One image is one sample; files are read in sorted order, or shuffled with a seed.

Images over Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS`` pixels, twice that
for the hard error; ~179 Mpx by default, large scans) are read safely when they are JPEG files:
libjpeg decodes them at a reduced scale (``Image.draft``) that still covers the resize target.
Other formats that large are refused with an error naming the file. Every file's header (format
and size) is read before calibration starts; the pixels are decoded when the file's turn comes,
and a file that fails to decode then (a truncated JPEG) stops the run with an error naming it,
before anything is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from .data import plural
from .errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 16-bit PNGs in older Pillow
COLORS = ("rgb", "bgr", "gray")
LAYOUTS = ("nchw", "nhwc")


@dataclass(frozen=True)
class ImageOptions:
    """Preprocessing options; None means "decide from the model" (see module docstring)."""

    resize: Optional[int] = None
    crop: Optional[tuple] = None      # (height, width)
    color: Optional[str] = None
    scale: bool = True
    mean: Optional[tuple] = None
    std: Optional[tuple] = None
    layout: Optional[str] = None

    def given(self) -> list:
        """The command-line flags of the options set (not left at their default), in field order."""
        flags = [("--resize", self.resize is not None), ("--crop", self.crop is not None),
                 ("--color", self.color is not None), ("--no-scale", not self.scale),
                 ("--mean", self.mean is not None), ("--std", self.std is not None),
                 ("--layout", self.layout is not None)]
        return [flag for flag, set_ in flags if set_]

    def refused(self, why: str) -> str:
        """``--mean, --std apply to image files; <why>``: what is said where these options were given
        for data that are not image files."""
        given = self.given()
        return f"{', '.join(given)} {plural(len(given), 'applies', 'apply', counted=False)} to image files; {why}"


@dataclass(frozen=True)
class Preprocessing:
    """Options resolved against one model input."""

    resize: int
    crop: tuple
    color: str
    scale: bool
    mean: np.ndarray
    std: np.ndarray
    layout: str
    dtype: np.dtype


def resolve(options: ImageOptions, spec) -> Preprocessing:
    """Fill the options left open from the model input ``spec`` (an image input of rank 4)."""
    if len(spec.shape) != 4:
        raise DataError(f"images need a model input of rank 4 (N, C, H, W or N, H, W, C); "
                        f"input {spec.describe()} has rank {len(spec.shape)}")
    if not np.issubdtype(spec.dtype, np.floating):
        raise DataError(f"images are fed as floating point; input {spec.describe()} is not")
    layout = options.layout
    if layout is None:
        if spec.shape[1] in (1, 3):
            layout = "nchw"
        elif spec.shape[3] in (1, 3):
            layout = "nhwc"
        else:
            raise DataError(f"cannot tell the channel axis of input {spec.describe()}: give --layout nchw or nhwc")
    channels, height, width = (spec.shape[1], spec.shape[2], spec.shape[3]) if layout == "nchw" else (
        spec.shape[3], spec.shape[1], spec.shape[2])
    if channels not in (1, 3):
        raise DataError(f"input {spec.describe()} has {plural(channels, 'channel')} in {layout} layout; images give "
                        "1 or 3")
    crop = options.crop
    if crop is None:
        if height is None or width is None:
            raise DataError(f"input {spec.describe()} has a dynamic image size: give --crop HEIGHTxWIDTH")
        crop = (height, width)
    elif (height is not None and crop[0] != height) or (width is not None and crop[1] != width):
        raise DataError(f"--crop {crop[0]}x{crop[1]} does not fit input {spec.describe()}")
    color = options.color or ("gray" if channels == 1 else "rgb")
    if (color == "gray") != (channels == 1):
        raise DataError(f"--color {color} gives {plural(1 if color == 'gray' else 3, 'channel')}; "
                        f"input {spec.describe()} takes {channels}")
    resize = options.resize or math.ceil(max(crop) / 0.875)
    if resize < min(crop):
        raise DataError(f"--resize {resize} is smaller than the crop {crop[0]}x{crop[1]}")
    mean = np.asarray(options.mean if options.mean is not None else [0.0] * channels, dtype=np.float64)
    std = np.asarray(options.std if options.std is not None else [1.0] * channels, dtype=np.float64)
    for name, values in (("--mean", mean), ("--std", std)):
        if values.size not in (1, channels):
            raise DataError(f"{name} has {plural(values.size, 'value')}; the model takes {plural(channels, 'channel')}")
    if not np.all(std > 0):
        raise DataError(f"--std values must be positive, got {_numbers(std)}")
    return Preprocessing(resize=resize, crop=tuple(crop), color=color, scale=options.scale,
                         mean=np.broadcast_to(mean, (channels,)), std=np.broadcast_to(std, (channels,)),
                         layout=layout, dtype=spec.dtype)


def _open_image(path: str, target: Optional[int] = None):
    """The Pillow image at ``path``, header read, pixels not yet decoded.

    Over Pillow's hard decompression-bomb limit a JPEG is opened anyway and decoded at a reduced
    scale (``draft``) whose shorter side stays at least ``target`` pixels (the resize target);
    any other format that large is a DataError.
    """
    from PIL import Image, JpegImagePlugin, UnidentifiedImageError

    try:
        return Image.open(path)
    except Image.DecompressionBombError as error:
        too_large = str(error).splitlines()[0]
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read as an image ({str(error).splitlines()[0]})") from None
    try:  # the plugin class does not check the size (Image.open does)
        image = JpegImagePlugin.JpegImageFile(path)
    except (SyntaxError, OSError, ValueError):
        raise DataError(f"{path}: too large to read safely ({too_large}); downscale it (JPEG files this "
                        "large are read at a reduced scale)") from None
    if target is not None:
        width, height = image.size
        factor = target / min(width, height)
        image.draft(image.mode, (math.ceil(width * factor), math.ceil(height * factor)))
    return image


def load_image(path: str, prep: Preprocessing) -> np.ndarray:
    """One preprocessed sample (C, H, W) or (H, W, C) in the input's dtype."""
    from PIL import UnidentifiedImageError

    try:
        with _open_image(path, prep.resize) as image:
            pixels, full_scale = _resized_crop(image, prep, path)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read as an image ({str(error).splitlines()[0]})") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    channels = len(prep.mean)
    if pixels.shape[2] != channels:  # a 16-bit gray image feeding a 3-channel model
        pixels = np.repeat(pixels, channels, axis=2)
    if prep.color == "bgr":
        pixels = pixels[:, :, ::-1]
    if prep.scale:
        pixels = pixels / full_scale
    pixels = (pixels - prep.mean) / prep.std
    if prep.layout == "nchw":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels, dtype=prep.dtype)


def _resized_crop(image, prep: Preprocessing, path: str) -> tuple:
    """Decode, convert, resize the shorter side to ``prep.resize`` and center-crop.

    Returns the pixels, float64 (H, W[, C]), and the value of full intensity (255, or 65535 for
    16-bit images).
    """
    from PIL import Image

    if image.mode == "F":
        raise DataError(f"{path}: a 32-bit floating-point image; give such data as .npy arrays")
    full_scale = 65535.0 if image.mode in SIXTEEN_BIT_MODES else 255.0
    if image.mode in SIXTEEN_BIT_MODES:
        image = image.convert("F")  # 16-bit values kept exactly; resized in floating point
    else:
        image = image.convert("L" if prep.color == "gray" else "RGB")
    width, height = image.size
    factor = prep.resize / min(width, height)
    size = (max(prep.crop[1], round(width * factor)), max(prep.crop[0], round(height * factor)))
    image = image.resize(size, Image.BILINEAR)
    left = (size[0] - prep.crop[1]) // 2
    top = (size[1] - prep.crop[0]) // 2
    image = image.crop((left, top, left + prep.crop[1], top + prep.crop[0]))
    return np.asarray(image, dtype=np.float64), full_scale


class ImageFolder:
    """Samples from the image files of a folder, preprocessed for the model's only input."""

    def __init__(self, folder: str, files: list, specs: list, options: ImageOptions, *,
                 shuffle: bool = False, seed: int = 0):
        if len(specs) != 1:
            raise DataError(f"images feed single-input models; this model has {len(specs)} inputs")
        self.folder = folder
        self.name = specs[0].name
        self.preprocessing = resolve(options, specs[0])
        for path in files:  # headers only: a broken file is reported before any compute
            with _open_image(path):
                pass
        self.shuffle, self.seed = shuffle, seed
        self.files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))] if shuffle else files

    @property
    def sample_count(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[dict]:
        for path in self.files:
            yield {self.name: load_image(path, self.preprocessing)}


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def describe(prep: Preprocessing) -> str:
    return (f"images: shorter side {prep.resize}, center crop {prep.crop[0]}x{prep.crop[1]}, {prep.color}, "
            f"{'scaled to [0, 1], ' if prep.scale else ''}mean {_numbers(prep.mean)}, std {_numbers(prep.std)}, "
            f"{prep.layout}")



def _numbers(values) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"
