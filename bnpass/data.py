"""Calibration data, whatever its source: samples ``{input name: array without the batch axis}``
(labels, where the data carry them, under :data:`LABELS`), checked against the model's inputs and
stacked into feeds ``{input name: batch}``.

The sources: :mod:`bnpass.arrays` (``.npy``/``.npz`` files), :mod:`bnpass.images` (image files),
:mod:`bnpass.loaders` (Python loaders, iterables, ``CalibrationDataReader``), opened by
:mod:`bnpass.sources`. Every array is checked by :func:`fit_array`: floating-point arrays are cast
to the input's floating-point type (numpy writes float64 by default); any other dtype mismatch is an
error, and so is an array of Python objects (bnpass never unpickles: :func:`python_objects_error`).
Labels are class indices (:func:`are_class_indices`). Samples are batched in order (:func:`batched`);
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

LABELS = "\x00bnpass labels"  # the key of a sample's or batch's labels, beside the inputs (no input is named so)


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


# The names under which a file or a dict batch may hold a single-input model's input, beside the input's
# own name, and the names of its labels: what users' files are likely to have (np.savez(f, x=..., y=...),
# an "images"/"labels" test set, a dataset's "inputs"/"targets").
INPUT_NAMES = ("x", "images", "inputs", "input", "data")
LABEL_NAMES = ("labels", "y", "targets", "label", "target")


def input_keys(keys, specs: list, where: str, holder: str, *, more: tuple = ()) -> dict:
    """``{input name: key}``: which of ``keys`` (the arrays of a file, the keys of a dict batch) holds
    each model input. Each input's own name first; a single-input model also takes one of ``more``
    (``arr_0`` for ``.npz``) or :data:`INPUT_NAMES`. Else a DataError naming what ``holder`` ("the
    file", "the batch") has and what to rename."""
    keys = list(keys)
    found = {spec.name: spec.name for spec in specs if spec.name in keys}
    missing = [spec.name for spec in specs if spec.name not in found]
    if not missing:
        return found
    if len(specs) == 1:
        accepted = [name for name in (*more, *INPUT_NAMES) if name not in LABEL_NAMES]
        present = [key for key in keys if key in accepted]
        if len(present) == 1:
            return {specs[0].name: present[0]}
        if len(present) > 1:
            raise DataError(f"{where}: arrays {' and '.join(repr(k) for k in present)} could each be model input "
                            f"'{specs[0].name}': rename the one to use to '{specs[0].name}'")
        others = [key for key in keys if key not in LABEL_NAMES]
        hint = f"rename '{others[0]}' to '{specs[0].name}'" if len(others) == 1 else f"name it '{specs[0].name}'"
        raise DataError(f"{where}: no array for model input '{specs[0].name}' ({holder} has: "
                        f"{', '.join(map(str, keys)) or 'nothing'}); {hint} (accepted: '{specs[0].name}', "
                        f"{', '.join(accepted)}; labels: {', '.join(LABEL_NAMES)})")
    raise DataError(f"{where}: no array for model input '{missing[0]}' ({holder} has: "
                    f"{', '.join(map(str, keys)) or 'nothing'}); name each array after its model input "
                    f"({', '.join(spec.name for spec in specs)})")


def label_key(keys, taken) -> Optional[str]:
    """The first of :data:`LABEL_NAMES` among ``keys`` that is not an input (``taken``), or None."""
    return next((name for name in LABEL_NAMES if name in keys and name not in taken), None)


def are_class_indices(labels: np.ndarray) -> bool:
    """The one rule for labels: class indices are whole numbers, integers or finite floats with integer
    values (``3.0``, as a float tensor of targets holds them; ``inf`` rounds to itself but is no class)."""
    return bool(np.issubdtype(labels.dtype, np.integer) or (
        np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels))
        and np.all(labels == np.round(labels))))


def class_indices(labels: np.ndarray, count: int) -> bool:
    """Whether ``labels`` hold one class index per sample (:func:`are_class_indices`)."""
    return labels.size == count and are_class_indices(labels)


def as_class_indices(labels: np.ndarray, where: str) -> np.ndarray:
    """``labels`` as integers, or a DataError naming ``where`` when they are no class indices."""
    if np.issubdtype(labels.dtype, np.integer):
        return labels
    if not are_class_indices(labels):
        raise DataError(f"{where}: labels must be class indices (whole numbers), got {labels.dtype} values that "
                        "are not (fractions, infinities or NaN)")
    return labels.astype(np.int64)


def python_objects_error(where: str, array: Optional[str] = None) -> DataError:
    """The error for data that hold Python objects (pickles) in the file or batch ``where`` (in its array
    named ``array``, where it has named arrays): bnpass never unpickles."""
    subject = f"{where}: array '{array}'" if array is not None else f"{where}:"
    return DataError(f"{subject} holds Python objects (dtype object), not numbers; bnpass never unpickles data: "
                     "save a numeric array")


def planned_sample_count(num_samples: int, batch_size: int) -> int:
    """NNCF's rule: ``ceil(num_samples / batch_size)`` whole batches."""
    return math.ceil(num_samples / batch_size) * batch_size


def plural(count: int, noun: str, many: Optional[str] = None, *, counted: bool = True) -> str:
    """``1 sample``, ``2 samples``; ``1 batch``, ``2 batches``: every count bnpass writes goes through here.

    ``many`` is the plural where adding -s or -es is wrong (``plural(n, "file that is", "files that
    are")``); ``counted=False`` leaves the number out, for a verb that agrees with a count
    (``plural(len(flags), "applies", "apply", counted=False)``).
    """
    if count == 1:
        word = noun
    elif many is not None:
        word = many
    else:
        word = f"{noun}es" if noun.endswith(("ch", "sh", "s", "x")) else f"{noun}s"
    return f"{count} {word}" if counted else word


def fit_array(array: np.ndarray, spec: InputSpec, where: str) -> tuple:
    """Check ``array`` against ``spec``; return (is_batch, target dtype) or raise DataError."""
    if array.dtype.hasobject:
        raise python_objects_error(where)
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


def finite(array: np.ndarray, where: str) -> np.ndarray:
    """``array``, or a DataError naming ``where`` when it holds NaN or Inf."""
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
