"""Calibration data: a folder of arrays (or any iterable) -> a stream of feeds ``{input name: batch}``.

Folder format (``--data DIR``): the folder and its subfolders (an ImageNet-style
``calib/<class>/*.jpg`` layout), files in sorted order of their relative paths, hidden files and
folders skipped:

* ``.npy``: one sample (the model input's rank minus one) or a batch of samples (the input's
  rank, samples along axis 0). Only for single-input models.
* ``.npz``: one array per model input, named like the input; each a sample or a batch, the same
  number of samples for every input. A single-input model also takes ``arr_0`` (``np.savez(f, x)``).
  An array named ``labels`` beside them (one class index per sample; in every file or in none)
  gives the samples' labels, which ``--reference`` chooses by (:data:`LABELS` carries them).

Every file's shape and dtype is checked against the model inputs before any compute (headers
only for ``.npy``). Floating-point arrays are cast to the input's floating-point type (numpy
writes float64 by default); any other dtype mismatch is an error, and so is an array of Python
objects (bnpass never unpickles). Samples are batched in order; samples of different shapes
(models with dynamic spatial dimensions) never share a batch.

``shuffle=True`` draws the samples in a random order fixed by ``seed``, so that the first N of
them are a uniform random subset and each batch mixes the folder's classes: the order of the
samples of every ``.npy`` file and single-sample ``.npz`` file is one permutation; batch ``.npz``
files (which numpy can only read whole) are shuffled in two levels, the files and then the
samples within each.

Python loaders (``--loader``) and API iterables yield samples or batches: arrays (single-input
models), dicts ``{input name: array}``, or ``(inputs, labels...)`` tuples and lists whose first
element is one of those (what PyTorch datasets and DataLoaders yield; the rest is ignored, as
``torch.optim.swa_utils.update_bn`` does). An onnxruntime ``CalibrationDataReader`` (anything
with ``get_next()`` returning a dict, then None) works too.
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
SAVEZ_DEFAULT_NAME = "arr_0"  # the name np.savez gives a positional array
LABELS = "\x00bnpass labels"  # the key of a sample's or batch's labels, beside the inputs (no input is named so)
LABELS_ARRAY = "labels"  # an .npz array of that name beside the inputs holds their labels


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


def plural(count: int, noun: str) -> str:
    """``1 sample``, ``2 samples``; ``1 batch``, ``2 batches``."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {noun}es" if noun.endswith(("ch", "sh", "s", "x")) else f"{count} {noun}s"


def _fit(array: np.ndarray, spec: InputSpec, where: str) -> tuple:
    """Check ``array`` against ``spec``; return (is_batch, target dtype) or raise DataError."""
    if array.dtype.hasobject:
        raise DataError(f"{where}: holds Python objects (dtype object), not numbers; bnpass never unpickles "
                        "data: save a numeric array")
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


def list_folder(folder: str) -> list:
    """Every file below ``folder`` (subfolders included, hidden files and folders skipped), as paths,
    sorted by their path relative to ``folder`` (component by component, so the order is the same on
    every machine)."""
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        relative = os.path.relpath(root, folder)
        parts = () if relative == os.curdir else tuple(relative.split(os.sep))
        found.extend(parts + (name,) for name in files if not name.startswith("."))
    return [os.path.join(folder, *parts) for parts in sorted(found)]


def open_folder(folder, specs: list, image_options=None, *, shuffle: bool = False, seed: int = 0):
    """The sample source for ``--data DIR``: an :class:`ArrayFolder` or an image folder; for
    ``--data FILE.npy`` / ``FILE.npz``, an :class:`ArrayFolder` of that one file.

    Files of other types are skipped with a warning; a folder mixing arrays and images is an error,
    and so are image options for arrays (they would be ignored).
    """
    from .images import ImageFolder, ImageOptions, is_image

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
        logger.warning("ignoring %s in '%s' that are neither arrays (.npy/.npz) nor images (first: %s)",
                       plural(len(ignored), "file"), folder, ignored[0])
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
    given = image_options.given() if image_options is not None else []
    if given:
        raise DataError(f"{', '.join(given)} apply to image files; '{where}' holds arrays (.npy/.npz), fed as they "
                        "are")


def order_advice(source, used: Optional[int]) -> str:
    """A warning for a folder read in file order where that biases batches or the subset, else ""."""
    if getattr(source, "shuffle", True) or not getattr(source, "files", None):
        return ""
    folders = len({os.path.dirname(path) for path in source.files})
    if folders > 1:
        return (f"the samples come folder by folder ({folders} folders, in order), so each batch holds one folder's "
                "samples (one class, in a class-per-folder layout), which skews statistics computed in batches: "
                "add --shuffle")
    if used is not None and used < source.sample_count:
        return (f"using the first {used} of {source.sample_count} samples in file order; if the files are sorted by "
                "class, add --shuffle for a random subset")
    return ""


class ArrayFolder:
    """Samples from ``.npy``/``.npz`` files (format in the module docstring)."""

    def __init__(self, folder: str, files: list, specs: list, *, shuffle: bool = False, seed: int = 0):
        self.folder = folder
        self.specs = specs
        self.files = files
        self.shuffle = shuffle
        self.seed = seed
        if any(f.lower().endswith(".npy") for f in self.files) and len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise DataError(f"the model has {len(specs)} inputs ({names}): give .npz files with one array "
                            "per input name, not .npy files")
        checked = [self._check_file(path) for path in self.files]
        self.sample_counts = [count for count, _ in checked]
        labelled = [path for path, (_, has_labels) in zip(self.files, checked) if has_labels]
        if labelled and len(labelled) != len(self.files):
            unlabelled = next(path for path, (_, has_labels) in zip(self.files, checked) if not has_labels)
            raise DataError(f"{labelled[0]} has a '{LABELS_ARRAY}' array and {unlabelled} has none: give labels "
                            "in every file or in none")

    @property
    def sample_count(self) -> int:
        return sum(self.sample_counts)

    def _arrays(self, path: str) -> dict:
        """The file's arrays by input name; ``.npy`` files are memory-mapped, not read."""
        try:
            if path.lower().endswith(".npy"):
                _refuse_objects(path)
                return {self.specs[0].name: np.load(path, mmap_mode="r", allow_pickle=False)}
            with np.load(path, allow_pickle=False) as archive:
                names = {s.name: s.name for s in self.specs}
                if len(self.specs) == 1 and self.specs[0].name not in archive.files and (
                        [name for name in archive.files if name != LABELS_ARRAY] == [SAVEZ_DEFAULT_NAME]):
                    names[self.specs[0].name] = SAVEZ_DEFAULT_NAME
                missing = [s.name for s in self.specs if names[s.name] not in archive.files]
                if missing:
                    raise DataError(f"{path}: no array named '{missing[0]}' for model input '{missing[0]}' "
                                    f"(the file has: {', '.join(archive.files) or 'nothing'})")
                arrays = {s.name: _read_archive_array(archive, names[s.name], path) for s in self.specs}
                if LABELS_ARRAY in archive.files and LABELS_ARRAY not in names:
                    arrays[LABELS] = _read_archive_array(archive, LABELS_ARRAY, path)
                return arrays
        except DataError:
            raise
        except Exception as error:  # numpy raises ValueError, OSError, zipfile errors...
            raise DataError(f"{path}: cannot read as a numpy array file ({error})") from None

    def _check_file(self, path: str) -> tuple:
        """``(samples, whether the file carries labels)``, checked."""
        counts = set()
        arrays = self._arrays(path)
        for spec in self.specs:
            array = arrays[spec.name]
            is_batch, _ = _fit(array, spec, path)
            counts.add(array.shape[0] if is_batch else 1)
        if len(counts) != 1:
            raise DataError(f"{path}: arrays hold different numbers of samples {sorted(counts)}")
        count = counts.pop()
        labelled = LABELS in arrays
        if labelled:
            labels = arrays[LABELS]
            if labels.size != count or not (np.issubdtype(labels.dtype, np.integer) or (
                    np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)))):
                raise DataError(f"{path}: '{LABELS_ARRAY}' must hold one class index per sample ({count}), "
                                f"not {labels.dtype} of shape {list(labels.shape)}")
        return count, labelled

    def _batch_arrays(self, path: str) -> dict:
        """The file's arrays by input name, each with a batch axis, and their target dtypes."""
        in_file, arrays = self._arrays(path), {}
        for spec in self.specs:
            is_batch, dtype = _fit(in_file[spec.name], spec, path)
            arrays[spec.name] = (in_file[spec.name] if is_batch else in_file[spec.name][None], dtype)
        if LABELS in in_file:
            arrays[LABELS] = (in_file[LABELS].reshape(-1), np.dtype(np.int64))
        return arrays

    def __iter__(self) -> Iterator[dict]:
        return self.samples()

    def samples(self) -> Iterator[dict]:
        """Each sample as ``{input name: array without the batch axis}``, in file order (or shuffled).

        Batch files are read ``READ_CHUNK`` samples at a time (``.npy`` straight from the file,
        not mapped: mapped pages would count as resident), so a file of any size streams.
        """
        if self.shuffle:
            yield from self._shuffled_samples()
            return
        for path in self.files:
            arrays = self._batch_arrays(path)
            count = next(iter(arrays.values()))[0].shape[0]
            for start in range(0, count, READ_CHUNK):
                chunk = {name: _finite(np.asarray(_read_rows(array, start, READ_CHUNK), dtype=dtype), path)
                         for name, (array, dtype) in arrays.items()}
                for position in range(len(next(iter(chunk.values())))):
                    yield {name: array[position] for name, array in chunk.items()}

    def _shuffled_samples(self) -> Iterator[dict]:
        """Samples in the seeded random order of the module docstring, each read on its own."""
        generator = np.random.default_rng(self.seed)
        owners = np.repeat(np.arange(len(self.files)), self.sample_counts)
        rows = np.concatenate([np.arange(count) for count in self.sample_counts]) if self.files else owners
        batch_archives = [i for i, path in enumerate(self.files)
                          if path.lower().endswith(".npz") and self.sample_counts[i] > 1]
        if batch_archives:  # two levels: the files, then the samples within each
            order = []
            for file_index in generator.permutation(len(self.files)):
                first = int(np.searchsorted(owners, file_index))
                order.extend(first + generator.permutation(self.sample_counts[file_index]))
            order = np.asarray(order, dtype=np.int64)
        else:
            order = generator.permutation(len(owners))
        cached_index, cached = None, None  # the batch file read last (two-level order reads each once)
        for position in order:
            file_index, row = int(owners[position]), int(rows[position])
            if file_index != cached_index:
                cached_index, cached = file_index, self._batch_arrays(self.files[file_index])
            yield {name: _finite(np.asarray(_read_rows(array, row, 1)[0], dtype=dtype), self.files[file_index])
                   for name, (array, dtype) in cached.items()}


def _refuse_objects(path: str) -> None:
    """A DataError when the ``.npy`` file at ``path`` holds Python objects (pickles)."""
    with open(path, "rb") as stream:
        version = np.lib.format.read_magic(stream)
        header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)(stream)
    if header[2].hasobject:
        raise DataError(f"{path}: holds Python objects (dtype object), not numbers; bnpass never unpickles "
                        "data: save a numeric array")


def _read_archive_array(archive, name: str, path: str) -> np.ndarray:
    try:
        return archive[name]
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise DataError(f"{path}: array '{name}' holds Python objects (dtype object), not numbers; bnpass "
                            "never unpickles data: save a numeric array") from None
        raise


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


def _inputs_of(item):
    """The model inputs of one loader item: the first element of an ``(inputs, labels...)`` tuple or
    list (what PyTorch datasets yield; ``update_bn`` takes ``item[0]`` the same way), else the item."""
    if isinstance(item, (tuple, list)):
        if not item:
            raise DataError("an empty tuple or list where a sample or batch was expected")
        return item[0]
    return item


class IterableSource:
    """Samples from an iterable of samples or batches, or a ``CalibrationDataReader`` (the module
    docstring says what they may yield). Read again from the start by each ``iter()`` when the
    iterable can be (a list, a DataLoader; a reader with ``rewind()``); a one-shot iterator or
    generator can be read once (``one_shot``)."""

    def __init__(self, batches, specs: list):
        self.batches = batches
        self.specs = specs
        self.one_shot = isinstance(batches, Iterator) and not callable(getattr(batches, "rewind", None))

    def __iter__(self) -> Iterator[dict]:
        rewind = getattr(self.batches, "rewind", None)
        if callable(rewind):
            rewind()
        return feeds_from_batches(self.batches, self.specs)


def _labels_of(item, count: int) -> Optional[np.ndarray]:
    """The labels of an ``(inputs, labels...)`` item: one number per sample, or None where the item
    carries none (or something else beside the inputs: targets of another kind are ignored)."""
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        return None
    try:
        labels = _as_array(item[1], "labels")
    except DataError:
        return None
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        return None
    if labels.size != count:
        return None
    return labels.reshape(count)


def feeds_from_batches(batches: Iterable, specs: list) -> Iterator[dict]:
    """Normalise user batches (dicts, or arrays for single-input models, each maybe the first element
    of an ``(inputs, labels...)`` tuple) to checked samples; labels travel under :data:`LABELS`."""
    for number, item in enumerate(iterate_source(batches)):
        batch = _inputs_of(item)
        if not isinstance(batch, dict):
            if len(specs) != 1:
                raise DataError(f"batch {number}: the model has {len(specs)} inputs; give dicts by input name")
            batch = {specs[0].name: batch}
        for spec in specs:
            if spec.name not in batch:
                came = ", ".join(map(str, batch)) or "nothing"
                raise DataError(f"batch {number}: no array for model input '{spec.name}' (the batch has: {came})")
            array = _as_array(batch[spec.name], f"batch {number}, input '{spec.name}'")
            is_batch, dtype = _fit(array, spec, f"batch {number}")
            batch = {**batch, spec.name: _finite(np.asarray(array if is_batch else array[None], dtype=dtype),
                                                 f"batch {number}")}
        count = batch[specs[0].name].shape[0]
        labels = _labels_of(item, count)
        for position in range(count):
            sample = {spec.name: batch[spec.name][position] for spec in specs}
            if labels is not None:
                sample[LABELS] = labels[position]
            yield sample


def _as_array(value, where: str) -> np.ndarray:
    """``value`` as a numpy array: numpy arrays, lists of numbers, PyTorch tensors (detached, on CPU)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as error:
        raise DataError(f"{where}: cannot be read as an array ({type(value).__name__}: {error})") from None


def is_calibration_data_reader(source) -> bool:
    """onnxruntime's ``CalibrationDataReader`` interface: ``get_next()`` until it returns None."""
    return callable(getattr(source, "get_next", None))


def iterate_source(source) -> Iterator:
    """Items of an iterable, or of a ``CalibrationDataReader`` (``get_next()`` until None)."""
    if is_calibration_data_reader(source):
        return iter(source.get_next, None)
    return iter(source)


class LoaderSource:
    """Samples from a user function, ``--loader path/to/file.py:function``.

    The function takes no arguments and returns an iterable of samples or batches (see the module
    docstring) or an onnxruntime ``CalibrationDataReader``. Whatever it raises is reported as a
    data error naming the loader.
    """

    def __init__(self, reference: str, specs: list):
        path, _, function_name = reference.rpartition(":")
        if not path or not function_name:
            raise DataError(f"--loader '{reference}': expected path/to/file.py:function")
        if not os.path.isfile(path):
            raise DataError(f"--loader '{reference}': file '{path}' does not exist")
        self.reference = reference
        self.path = path
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
        source = self._guarded(self.function, "raised")
        iterator = self._guarded(lambda: iterate_source(source), "did not return an iterable or a "
                                 "CalibrationDataReader:")
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
