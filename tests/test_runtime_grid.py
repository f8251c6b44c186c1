""":func:`bnpass.quantized.on_runtime_grid`: a folded run-time quantized weight QuantizeLinear rounds back to
the integers expected, checked against onnxruntime's rounding rule written out (rint, half to even)."""

from __future__ import annotations

import numpy as np

from bnpass.quantized import STORAGE_TYPES, on_runtime_grid

INT8 = STORAGE_TYPES[np.dtype(np.int8)]


def test_a_value_on_a_rounding_tie_is_set_to_its_grid_point():
    scale = np.full(3, 0.5)
    values = np.array([0.25, 1.0, -0.5], np.float32)  # 0.25 / 0.5 = 0.5: rint gives 0, the expected integer is 1
    expected = np.array([1, 2, -1], np.int64)
    folded = on_runtime_grid(values, expected, scale, None, INT8)
    assert folded.dtype == np.float32 and folded.tolist() == [0.5, 1.0, -0.5]
    assert np.array_equal(np.rint(folded / np.float32(0.5)), expected)


def test_values_already_on_their_integers_are_returned_as_they_are():
    values = np.array([1.0, -2.0], np.float32)
    assert on_runtime_grid(values, np.array([12, 6]), np.full(2, 0.25), np.array([8, 14]), INT8) is values


def test_a_value_more_than_one_step_off_cannot_be_put_on_the_grid():
    assert on_runtime_grid(np.array([2.0], np.float32), np.array([1]), np.full(1, 0.5), None, INT8) is None
