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


class ArrayFolder:
    """Samples from the ``.npy``/``.npz`` files of a folder (format in the module docstring)."""

    def __init__(self, folder, specs: list):
        self.folder = os.fspath(folder)
        self.specs = specs
        if not os.path.isdir(self.folder):
            what = "does not exist" if not os.path.exists(self.folder) else "is not a folder"
            raise DataError(f"calibration data folder '{self.folder}' {what}")
        names = sorted(os.listdir(self.folder))
        self.files = [os.path.join(self.folder, n) for n in names if n.lower().endswith(ARRAY_SUFFIXES)]
        ignored = [n for n in names if not n.lower().endswith(ARRAY_SUFFIXES) and not n.startswith(".")]
        if ignored:
            logger.warning("ignoring %d file(s) in '%s' that are not .npy/.npz (first: %s)",
                           len(ignored), self.folder, ignored[0])
        if not self.files:
            raise DataError(f"calibration data folder '{self.folder}' has no .npy or .npz files")
        if any(f.lower().endswith(".npy") for f in self.files) and len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise DataError(f"the model has {len(specs)} inputs ({names}): give .npz files with one array "
                            "per input name, not .npy files")
        self.sample_counts = [self._check_file(path) for path in self.files]

    @property
    def sample_count(self) -> int:
        return sum(self.sample_counts)

    def _arrays(self, path: str, *, header_only: bool) -> dict:
        try:
            if path.lower().endswith(".npy"):
                return {self.specs[0].name: np.load(path, mmap_mode="r" if header_only else None,
                                                    allow_pickle=False)}
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
        for spec in self.specs:
            array = self._arrays(path, header_only=True)[spec.name]
            is_batch, _ = _fit(array, spec, path)
            counts.add(array.shape[0] if is_batch else 1)
        if len(counts) != 1:
            raise DataError(f"{path}: arrays hold different numbers of samples {sorted(counts)}")
        return counts.pop()

    def __iter__(self) -> Iterator[dict]:
        return self.samples()

    def samples(self) -> Iterator[dict]:
        """Each sample as ``{input name: array without the batch axis}``, in file order."""
        for path in self.files:
            arrays = self._arrays(path, header_only=False)
            fitted = {}
            for spec in self.specs:
                array = arrays[spec.name]
                is_batch, dtype = _fit(array, spec, path)
                array = array if is_batch else array[None]
                fitted[spec.name] = np.asarray(array, dtype=dtype)
            for position in range(next(iter(fitted.values())).shape[0]):
                yield {name: array[position] for name, array in fitted.items()}


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
            batch = {**batch, spec.name: np.asarray(array if is_batch else array[None], dtype=dtype)}
        count = batch[specs[0].name].shape[0]
        for position in range(count):
            yield {spec.name: batch[spec.name][position] for spec in specs}


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
