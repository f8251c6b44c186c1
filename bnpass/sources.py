"""Opening calibration data: a folder or file (arrays or images), a ``--loader``, or an iterable."""

from __future__ import annotations

import logging
import os

from .arrays import ARRAY_SUFFIXES, ArrayFolder
from .data import list_folder, plural
from .errors import DataError
from .images import ImageFolder, ImageOptions, is_image
from .loaders import IterableSource

logger = logging.getLogger(__name__)


class ImageOptionsNotApplicable(DataError):
    """Image options given for data that are not images (arrays, batches from Python): a DataError to
    the API; the command line says it as a bad command line (exit 2)."""


def open_source(data, specs: list, image_options=None, *, shuffle: bool = False, seed: int = 0):
    """The samples of ``data`` for a model with inputs ``specs``: a folder or one array file
    (:func:`open_folder`), else an iterable of samples or batches or a ``CalibrationDataReader``
    (:class:`~bnpass.loaders.IterableSource`). ``image_options`` apply to image files only: given
    for arrays, they are a DataError."""
    if isinstance(data, (str, os.PathLike)):
        return open_folder(data, specs, image_options, shuffle=shuffle, seed=seed)
    if image_options is not None and image_options.given():
        given = image_options.given()
        verb = plural(len(given), "applies", "apply", counted=False)
        raise ImageOptionsNotApplicable(f"image_options ({', '.join(given)}) {verb} to image folders; batches given "
                                        "in Python are fed as they are")
    return IterableSource(data, specs)


def open_folder(folder, specs: list, image_options=None, *, shuffle: bool = False, seed: int = 0):
    """The sample source for ``--data DIR``: an :class:`ArrayFolder` or an image folder; for
    ``--data FILE.npy`` / ``FILE.npz``, an :class:`ArrayFolder` of that one file.

    Files of other types are skipped with a warning; a folder mixing arrays and images is an error,
    and so are image options for arrays (they would be ignored).
    """
    folder = os.fspath(folder)
    if os.path.isfile(folder) and folder.lower().endswith(ARRAY_SUFFIXES):
        _refuse_image_options(image_options, folder)
        source = ArrayFolder(os.path.dirname(folder), [folder], specs, shuffle=shuffle, seed=seed)
        logger.info("data: %s from '%s'%s", plural(source.sample_count, "sample"), folder,
                    f", shuffled (seed {seed})" if shuffle else "")
        return source
    if not os.path.isdir(folder):
        if not os.path.exists(folder):
            raise DataError(f"calibration data folder '{folder}' does not exist")
        raise DataError(f"calibration data '{folder}' is neither a folder nor a .npy or .npz file")
    paths = list_folder(folder)
    arrays = [path for path in paths if path.lower().endswith(ARRAY_SUFFIXES)]
    images = [path for path in paths if is_image(path)]
    ignored = [os.path.relpath(path, folder) for path in paths
               if not path.lower().endswith(ARRAY_SUFFIXES) and not is_image(path)]
    if ignored:
        logger.warning("ignoring %s neither an array (.npy/.npz) nor an image in '%s' (first: %s)",
                       plural(len(ignored), "file that is", "files that are"), folder, ignored[0])
    if arrays and images:
        raise DataError(f"calibration data folder '{folder}' mixes arrays ({os.path.relpath(arrays[0], folder)}) "
                        f"and images ({os.path.relpath(images[0], folder)}); keep one kind")
    if images:
        source = ImageFolder(folder, images, specs, image_options or ImageOptions(), shuffle=shuffle, seed=seed)
    elif arrays:
        _refuse_image_options(image_options, folder)
        source = ArrayFolder(folder, arrays, specs, shuffle=shuffle, seed=seed)
    else:
        raise DataError(f"calibration data folder '{folder}' has no .npy, .npz or image files")
    subfolders = len({os.path.dirname(path) for path in source.files})
    logger.info("data: %s in %s from %s of '%s'%s", plural(source.sample_count, "sample"),
                plural(len(source.files), "file"), plural(subfolders, "folder"), folder,
                f", shuffled (seed {seed})" if shuffle else "")
    return source


def _refuse_image_options(image_options, where: str) -> None:
    """Image options given for arrays are a mistake: arrays are fed as they are."""
    if image_options is not None and image_options.given():
        raise ImageOptionsNotApplicable(image_options.refused(f"'{where}' holds arrays (.npy/.npz), fed as they are"))
