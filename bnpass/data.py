"""Calibration data: a folder of arrays (or any iterable) -> a stream of feeds ``{input name: batch}``.

Folder format (``--data DIR``), files read in sorted order:

* ``.npy``: one sample (the model input's rank minus one) or a batch of samples (the input's
  rank, samples along axis 0). Only for single-input models.
* ``.npz``: one array per model input, named like the input; each a sample or a batch, the same
  number of samples for every input.

Every file's shape and dtype is checked against the model inputs before any compute (headers
only for ``.npy``). Floating-point arrays are cast to the input's floating-point type (numpy
writes float64 by default); any other dtype mismatch is an error. Samples are batched in order;
samples of different shapes (models with dynamic spatial dimensions) never share a batch.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import onnx

from .errors import DataError

logger = logging.getLogger(__name__)

ARRAY_SUFFIXES = (".npy", ".npz")
READ_CHUNK = 256  # samples read from a batch file at a time


@dataclass(frozen=True)
class InputSpec:
    """A model input the caller feeds: name, numpy dtype, dims (int, or None when free)."""

    name: str
    dtype: np.dtype
    shape: tuple

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"'{self.name}' {self.dtype}[{dims}]"


def model_input_specs(model: onnx.ModelProto) -> list:
    initializers = {tensor.name for tensor in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def planned_sample_count(num_samples: int, batch_size: int) -> int:
    """NNCF's rule: ``ceil(num_samples / batch_size)`` whole batches."""
    return math.ceil(num_samples / batch_size) * batch_size


def _fit(array: np.ndarray, spec: InputSpec, where: str) -> tuple:
    """Check ``array`` against ``spec``; return (is_batch, target dtype) or raise DataError."""
    rank = len(spec.shape)
    if array.ndim == rank:
        is_batch, sample_shape = True, array.shape[1:]
    elif array.ndim == rank - 1:
        is_batch, sample_shape = False, array.shape
    else:
        raise DataError(f"{where}: array of shape {list(array.shape)} does not fit input {spec.describe()} "
                        f"(expected rank {rank - 1} for one sample or {rank} for a batch)")
    for axis, (got, expected) in enumerate(zip(sample_shape, spec.shape[1:]), start=1):
        if expected is not None and got != expected:
            raise DataError(f"{where}: array of shape {list(array.shape)} does not fit input {spec.describe()} "
                            f"(axis {axis} is {got}, the model expects {expected})")
    if array.dtype != spec.dtype:
        same_kind = (np.issubdtype(array.dtype, np.floating) and np.issubdtype(spec.dtype, np.floating)) or (
            np.issubdtype(array.dtype, np.integer) and np.issubdtype(spec.dtype, np.integer))
        if not same_kind:
            raise DataError(f"{where}: array of dtype {array.dtype} does not fit input {spec.describe()}")
    return is_batch, spec.dtype


def open_folder(folder, specs: list, image_options=None):
    """The sample source for ``--data DIR``: an :class:`ArrayFolder` or an image folder.

    Files of other types are skipped with a warning; a folder mixing arrays and images is an error.
    """
    from .images import ImageFolder, ImageOptions, is_image

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        what = "does not exist" if not os.path.exists(folder) else "is not a folder"
        raise DataError(f"calibration data folder '{folder}' {what}")
    names = sorted(name for name in os.listdir(folder) if not name.startswith("."))
    arrays = [os.path.join(folder, n) for n in names if n.lower().endswith(ARRAY_SUFFIXES)]
    images = [os.path.join(folder, n) for n in names if is_image(n)]
    ignored = [n for n in names if not n.lower().endswith(ARRAY_SUFFIXES) and not is_image(n)]
    if ignored:
        logger.warning("ignoring %d file(s) in '%s' that are neither arrays (.npy/.npz) nor images (first: %s)",
                       len(ignored), folder, ignored[0])
    if arrays and images:
        raise DataError(f"calibration data folder '{folder}' mixes arrays ({os.path.basename(arrays[0])}) and "
                        f"images ({os.path.basename(images[0])}); keep one kind")
    if images:
        return ImageFolder(folder, images, specs, image_options or ImageOptions())
    if not arrays:
        raise DataError(f"calibration data folder '{folder}' has no .npy, .npz or image files")
    return ArrayFolder(folder, arrays, specs)


class ArrayFolder:
    """Samples from ``.npy``/``.npz`` files (format in the module docstring)."""

    def __init__(self, folder: str, files: list, specs: list):
        self.folder = folder
        self.specs = specs
        self.files = files
        if any(f.lower().endswith(".npy") for f in self.files) and len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise DataError(f"the model has {len(specs)} inputs ({names}): give .npz files with one array "
                            "per input name, not .npy files")
        self.sample_counts = [self._check_file(path) for path in self.files]

    @property
    def sample_count(self) -> int:
        return sum(self.sample_counts)

    def _arrays(self, path: str) -> dict:
        """The file's arrays by input name; ``.npy`` files are memory-mapped, not read."""
        try:
            if path.lower().endswith(".npy"):
                return {self.specs[0].name: np.load(path, mmap_mode="r", allow_pickle=False)}
            with np.load(path, allow_pickle=False) as archive:
                missing = [s.name for s in self.specs if s.name not in archive.files]
                if missing:
                    raise DataError(f"{path}: no array named '{missing[0]}' for model input '{missing[0]}' "
                                    f"(the file has: {', '.join(archive.files) or 'nothing'})")
                return {s.name: archive[s.name] for s in self.specs}
        except DataError:
            raise
        except Exception as error:  # numpy raises ValueError, OSError, zipfile errors...
            raise DataError(f"{path}: cannot read as a numpy array file ({error})") from None

    def _check_file(self, path: str) -> int:
        counts = set()
        arrays = self._arrays(path)
        for spec in self.specs:
            array = arrays[spec.name]
            is_batch, _ = _fit(array, spec, path)
            counts.add(array.shape[0] if is_batch else 1)
        if len(counts) != 1:
            raise DataError(f"{path}: arrays hold different numbers of samples {sorted(counts)}")
        return counts.pop()

    def __iter__(self) -> Iterator[dict]:
        return self.samples()

    def samples(self) -> Iterator[dict]:
        """Each sample as ``{input name: array without the batch axis}``, in file order.

        Batch files are read ``READ_CHUNK`` samples at a time (``.npy`` straight from the file,
        not mapped: mapped pages would count as resident), so a file of any size streams.
        """
        for path in self.files:
            in_file, arrays = self._arrays(path), {}
            for spec in self.specs:
                is_batch, dtype = _fit(in_file[spec.name], spec, path)
                arrays[spec.name] = (in_file[spec.name] if is_batch else in_file[spec.name][None], dtype)
            count = next(iter(arrays.values()))[0].shape[0]
            for start in range(0, count, READ_CHUNK):
                chunk = {name: _finite(np.asarray(_read_rows(array, start, READ_CHUNK), dtype=dtype), path)
                         for name, (array, dtype) in arrays.items()}
                for position in range(len(next(iter(chunk.values())))):
                    yield {name: array[position] for name, array in chunk.items()}


def _read_rows(array: np.ndarray, start: int, count: int) -> np.ndarray:
    """Rows ``start:start+count`` of ``array``; read from the file when it is a memory map."""
    if isinstance(array, np.memmap) and array.flags.c_contiguous and array.filename:
        rows = min(count, array.shape[0] - start)
        row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
        with open(array.filename, "rb") as stream:
            stream.seek(array.offset + start * row_bytes)
            data = np.fromfile(stream, dtype=array.dtype, count=rows * row_bytes // array.dtype.itemsize)
        return data.reshape((rows,) + array.shape[1:])
    return array[start:start + count]


def feeds_from_batches(batches: Iterable, specs: list) -> Iterator[dict]:
    """Normalise user batches (dicts, or arrays for single-input models) to checked samples."""
    for number, batch in enumerate(batches):
        if not isinstance(batch, dict):
            if len(specs) != 1:
                raise DataError(f"batch {number}: the model has {len(specs)} inputs; give dicts by input name")
            batch = {specs[0].name: batch}
        for spec in specs:
            if spec.name not in batch:
                raise DataError(f"batch {number}: no array for model input '{spec.name}'")
            array = np.asarray(batch[spec.name])
            is_batch, dtype = _fit(array, spec, f"batch {number}")
            batch = {**batch, spec.name: _finite(np.asarray(array if is_batch else array[None], dtype=dtype),
                                                 f"batch {number}")}
        count = batch[specs[0].name].shape[0]
        for position in range(count):
            yield {spec.name: batch[spec.name][position] for spec in specs}


class LoaderSource:
    """Samples from a user function, ``--loader path/to/file.py:function``.

    The function takes no arguments and returns an iterable of samples or batches: arrays (for
    single-input models) or dicts ``{input name: array}``. Whatever it raises is reported as a
    data error naming the loader.
    """

    def __init__(self, reference: str, specs: list):
        path, _, function_name = reference.rpartition(":")
        if not path or not function_name:
            raise DataError(f"--loader '{reference}': expected path/to/file.py:function")
        if not os.path.isfile(path):
            raise DataError(f"--loader '{reference}': file '{path}' does not exist")
        self.reference = reference
        self.specs = specs
        module = self._guarded(lambda: _import_file(path), "failed to import:")
        function = getattr(module, function_name, None)
        if not callable(function):
            raise DataError(f"--loader '{reference}': '{path}' has no function '{function_name}'")
        self.function = function

    def _guarded(self, action, what: str):
        try:
            return action()
        except DataError:
            raise
        except Exception as error:
            raise DataError(f"--loader '{self.reference}' {what} {type(error).__name__}: {error}") from None

    def _items(self):
        iterable = self._guarded(self.function, "raised")
        iterator = self._guarded(lambda: iter(iterable), "did not return an iterable:")
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except Exception as error:
                raise DataError(f"--loader '{self.reference}' raised {type(error).__name__}: {error}") from None
            yield item

    def __iter__(self) -> Iterator[dict]:
        return feeds_from_batches(self._items(), self.specs)


def _import_file(path: str):
    import importlib.util

    module_spec = importlib.util.spec_from_file_location(f"bnpass_loader_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _finite(array: np.ndarray, where: str) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise DataError(f"{where}: the data contains NaN or Inf")
    return array


def batched(samples: Iterable, batch_size: int, limit: Optional[int]) -> Iterator[dict]:
    """Stack samples into batches of ``batch_size``, at most ``limit`` samples in all.

    A change of sample shape closes the current batch early, so every batch is rectangular.
    """
    pending, shape_key, taken = [], None, 0
    for sample in samples:
        if limit is not None and taken >= limit:
            break
        key = tuple((name, array.shape) for name, array in sample.items())
        if pending and (key != shape_key or len(pending) == batch_size):
            yield _stack(pending)
            pending = []
        shape_key = key
        pending.append(sample)
        taken += 1
    if pending:
        yield _stack(pending)


def _stack(samples: list) -> dict:
    return {name: np.stack([s[name] for s in samples]) for name in samples[0]}
