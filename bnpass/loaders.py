"""Samples from Python: ``--loader FILE.py:FUNCTION``, and the API's iterables.

Loaders and iterables yield samples or batches: arrays (single-input models), dicts ``{input name:
array}`` (a single-input model's array may also come under one of :data:`bnpass.data.INPUT_NAMES`,
its labels under one of :data:`bnpass.data.LABEL_NAMES`), or ``(inputs, labels...)`` tuples and
lists whose first element is one of those (what PyTorch datasets and DataLoaders yield, as
``torch.optim.swa_utils.update_bn`` takes them); the second element, when it holds one number per
sample, gives their labels (:data:`bnpass.data.LABELS`), anything else there is ignored. An
onnxruntime ``CalibrationDataReader`` (anything with ``get_next()`` returning a dict, then None)
works too.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Optional

import numpy as np

from .data import LABELS, class_indices, finite, fit_array, input_keys, label_key
from .errors import DataError


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
        rewinds = callable(getattr(batches, "rewind", None))
        self.one_shot = (isinstance(batches, Iterator) or is_calibration_data_reader(batches)) and not rewinds

    def __iter__(self) -> Iterator[dict]:
        rewind = getattr(self.batches, "rewind", None)
        if callable(rewind):
            rewind()
        return feeds_from_batches(self.batches, self.specs)


def _labels_of(item, count: int, dict_labels: Optional[str]) -> Optional[np.ndarray]:
    """The labels of an ``(inputs, labels...)`` item, or of a dict batch under ``dict_labels`` (one of
    :data:`bnpass.data.LABEL_NAMES`): one class index per sample (:func:`bnpass.data.class_indices`), or
    None where the item carries none (targets of another kind, such as one-hot rows, masks
    or real-valued targets, are ignored)."""
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        value = item[1]
    elif dict_labels is not None:
        value = _inputs_of(item)[dict_labels]
    else:
        return None
    try:
        labels = _as_array(value, "labels")
    except DataError:
        return None
    return labels.reshape(count) if class_indices(labels, count) else None


def feeds_from_batches(batches: Iterable, specs: list) -> Iterator[dict]:
    """Normalise user batches (dicts, or arrays for single-input models, each maybe the first element
    of an ``(inputs, labels...)`` tuple) to checked samples; labels travel under :data:`LABELS`."""
    for number, item in enumerate(iterate_source(batches)):
        batch = _inputs_of(item)
        if not isinstance(batch, dict):
            if len(specs) != 1:
                raise DataError(f"batch {number}: the model has {len(specs)} inputs; give dicts by input name")
            batch = {specs[0].name: batch}
        keys = input_keys(batch, specs, f"batch {number}", "the batch")
        dict_labels = label_key(batch, {*keys.values(), *keys})
        fitted = {}
        for spec in specs:
            array = _as_array(batch[keys[spec.name]], f"batch {number}, input '{spec.name}'")
            is_batch, dtype = fit_array(array, spec, f"batch {number}")
            fitted[spec.name] = finite(np.asarray(array if is_batch else array[None], dtype=dtype), f"batch {number}")
        batch = fitted
        count = batch[specs[0].name].shape[0]
        labels = _labels_of(item, count, dict_labels)
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
