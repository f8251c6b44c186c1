"""Samples from ``.npy`` and ``.npz`` files (``--data DIR`` or ``--data FILE``).

Folder format: the folder and its subfolders (an ImageNet-style ``calib/<class>/*`` layout), files
in sorted order of their relative paths, hidden files and folders skipped:

* ``.npy``: one sample (the model input's rank minus one) or a batch of samples (the input's
  rank, samples along axis 0). Only for single-input models.
* ``.npz``: one array per model input, named like the input; each a sample or a batch, the same
  number of samples for every input. A single-input model also takes one array named ``arr_0``
  (``np.savez(f, x)``) or one of :data:`bnpass.data.INPUT_NAMES` (``x``, ``images``, ``inputs``,
  ``input``, ``data``). An array named ``labels`` beside them (one class index per sample; in every
  file or in none) gives the samples' labels, which ``--reference`` chooses by
  (:data:`bnpass.data.LABELS` carries them); so does one named ``y``, ``targets``, ``label`` or
  ``target`` (:data:`bnpass.data.LABEL_NAMES`), which is used only where it holds one class index per
  sample (targets of another kind, such as masks, are left out, with a note).

Every file's shape and dtype is checked against the model inputs before any compute (headers
only for ``.npy``).

``shuffle=True`` draws the samples in a random order fixed by ``seed``, so that the first N of
them are a uniform random subset and each batch mixes the folder's classes: the order of the
samples of every ``.npy`` file and single-sample ``.npz`` file is one permutation; batch ``.npz``
files (which numpy can only read whole) are shuffled in two levels, the files and then the
samples within each.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from .data import LABELS, class_indices, finite, fit_array, input_keys, label_key, python_objects_error
from .errors import DataError

logger = logging.getLogger(__name__)

ARRAY_SUFFIXES = (".npy", ".npz")
READ_CHUNK = 256  # samples read from a batch file at a time
SAVEZ_DEFAULT_NAME = "arr_0"  # the name np.savez gives a positional array
LABELS_ARRAY = "labels"  # an .npz array of that name beside the inputs holds their labels


class ArrayFolder:
    """Samples from ``.npy``/``.npz`` files (format in the module docstring)."""

    def __init__(self, folder: str, files: list, specs: list, *, shuffle: bool = False, seed: int = 0):
        self.folder = folder
        self.specs = specs
        self.files = files
        self.shuffle = shuffle
        self.seed = seed
        self.label_names = {}  # file -> the name its labels came under
        self.not_labels = set()  # files whose array under a label name other than 'labels' holds no class indices
        if any(f.lower().endswith(".npy") for f in self.files) and len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise DataError(f"the model has {len(specs)} inputs ({names}): give .npz files with one array "
                            "per input name, not .npy files")
        checked = [self._check_file(path) for path in self.files]
        self.sample_counts = [count for count, _ in checked]
        labelled = [path for path, (_, has_labels) in zip(self.files, checked) if has_labels]
        if labelled and len(labelled) != len(self.files):
            unlabelled = next(path for path, (_, has_labels) in zip(self.files, checked) if not has_labels)
            raise DataError(f"{labelled[0]} has a '{self.label_names[labelled[0]]}' array and {unlabelled} has "
                            "none: give labels in every file or in none")

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
                names = input_keys(archive.files, self.specs, path, "the file", more=(SAVEZ_DEFAULT_NAME,))
                arrays = {s.name: _read_archive_array(archive, names[s.name], path) for s in self.specs}
                labels = label_key(archive.files, {*names.values(), *(s.name for s in self.specs)})
                if labels is not None and path not in self.not_labels:
                    arrays[LABELS] = _read_archive_array(archive, labels, path)
                    self.label_names[path] = labels
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
            is_batch, _ = fit_array(array, spec, path)
            counts.add(array.shape[0] if is_batch else 1)
        if len(counts) != 1:
            raise DataError(f"{path}: arrays hold different numbers of samples {sorted(counts)}")
        count = counts.pop()
        labelled = LABELS in arrays
        if labelled and not class_indices(arrays[LABELS], count):
            name, labels = self.label_names[path], arrays[LABELS]
            if name == LABELS_ARRAY:
                raise DataError(f"{path}: '{LABELS_ARRAY}' must hold one class index per sample ({count}), "
                                f"not {labels.dtype} of shape {list(labels.shape)}")
            if not self.not_labels:
                logger.info("%s: '%s' (%s of shape %s) is not one class index per sample: not used as labels",
                            path, name, labels.dtype, list(labels.shape))
            self.not_labels.add(path)
            labelled = False
        return count, labelled

    def _batch_arrays(self, path: str) -> dict:
        """The file's arrays by input name, each with a batch axis, and their target dtypes."""
        in_file, arrays = self._arrays(path), {}
        for spec in self.specs:
            is_batch, dtype = fit_array(in_file[spec.name], spec, path)
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
                chunk = {name: finite(np.asarray(_read_rows(array, start, READ_CHUNK), dtype=dtype), path)
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
            yield {name: finite(np.asarray(_read_rows(array, row, 1)[0], dtype=dtype), self.files[file_index])
                   for name, (array, dtype) in cached.items()}


def _refuse_objects(path: str) -> None:
    """A DataError when the ``.npy`` file at ``path`` holds Python objects (pickles)."""
    with open(path, "rb") as stream:
        version = np.lib.format.read_magic(stream)
        header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)(stream)
    if header[2].hasobject:
        raise python_objects_error(path)


def _read_archive_array(archive, name: str, path: str) -> np.ndarray:
    try:
        return archive[name]
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise python_objects_error(path, name) from None
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
