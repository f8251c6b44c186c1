"""The matched statistics as ONNX nodes (bnpass.matching_graph, run by onnxruntime) against the numpy
formula they transcribe (bnpass.matching.match_batch_statistics), on the same inputs.

The inputs are built to tell every term apart: a large epsilon (a dropped or altered ``e`` term
shows), constant channels in either model and both, a clamped channel, and channels 10 % either
side of the constant-channel threshold, with either term of its ``max`` the larger (a changed
threshold or a dropped term flips one of them).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from bnpass.matching import DEFAULT_CONSTANT_TOLERANCE, match_batch_statistics
from bnpass.matching_graph import matched_statistics_nodes
from bnpass.protos import unique_name
from builders import run_onnxruntime

EPSILON = 10.0
MOMENTS = ("reference_mean", "reference_var", "compressed_mean", "compressed_var")


def edge_case_inputs():
    """Stored (mu_r, v_r) and one batch's moments of both models, one channel per case."""
    rng = np.random.default_rng(0)
    stored_mean = rng.standard_normal(11)
    stored_var = rng.uniform(0.5, 2.0, 11)
    scale_squared = stored_var + EPSILON
    threshold = DEFAULT_CONSTANT_TOLERANCE ** 2
    reference_mean, compressed_mean = rng.standard_normal(11), rng.standard_normal(11)
    reference_var, compressed_var = rng.uniform(0.5, 2.0, 11), rng.uniform(0.5, 2.0, 11)
    # channels 0-2: the formula applies
    reference_var[3] = 0.0                                   # constant in the reference
    compressed_var[4] = 0.0                                  # constant in the compressed model
    reference_var[5] = compressed_var[5] = 0.0               # constant in both
    compressed_var[6], reference_var[6] = 0.01, 1.0          # clamped: v' = 0 (the e term dominates)
    reference_mean[7:9] = 1e3                                # the mean term of the threshold's max wins ...
    reference_var[7] = 0.9 * threshold * reference_mean[7] ** 2   # ... just under the threshold: constant
    reference_var[8] = 1.1 * threshold * reference_mean[8] ** 2   # ... just over: not constant
    compressed_mean[9:11] = 1e-3                             # the stored scale wins the max ...
    compressed_var[9] = 0.9 * threshold * scale_squared[9]   # ... under
    compressed_var[10] = 1.1 * threshold * scale_squared[10]  # ... over
    return stored_mean, stored_var, dict(zip(MOMENTS, (reference_mean, reference_var, compressed_mean,
                                                        compressed_var)))


def matched_statistics_model(stored_mean, stored_var, dtype, opset: int) -> onnx.ModelProto:
    """A model whose inputs are the four moments and whose outputs are the matched (mean, var)."""
    taken = set(MOMENTS)
    shape = [stored_mean.size]
    mean, var, nodes, initializers = matched_statistics_nodes(
        stored_mean, stored_var, EPSILON, **{name: name for name in MOMENTS}, shape=shape, dtype=np.dtype(dtype),
        opset=opset, out=lambda suffix: unique_name(f"matched/{suffix}", taken))
    elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        nodes, "matched", [helper.make_tensor_value_info(name, elem_type, shape) for name in MOMENTS],
        [helper.make_tensor_value_info(name, elem_type, shape) for name in (mean, var)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("opset", [11, 13], ids=["not-greater", "less-or-equal"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_onnx_nodes_compute_the_numpy_formula(dtype, opset):
    stored_mean, stored_var, moments = edge_case_inputs()
    feeds = {name: value.astype(dtype) for name, value in moments.items()}
    graph_mean, graph_var = run_onnxruntime(matched_statistics_model(stored_mean, stored_var, dtype, opset), feeds)
    numpy_mean, numpy_var = match_batch_statistics(stored_mean.astype(dtype), stored_var.astype(dtype), EPSILON,
                                                   *(feeds[name] for name in MOMENTS))
    assert graph_mean.dtype == numpy_mean.dtype == dtype
    # The cases do what their comments say (else the test would not guard the terms it names).
    stored = stored_var.astype(dtype)
    assert numpy_var[6] == 0
    constant, not_constant = [3, 4, 5, 7, 9], [0, 1, 2, 8, 10]
    np.testing.assert_array_equal(numpy_var[constant], stored[constant])  # ratio 1: the stored variance
    assert np.all(numpy_var[not_constant] != stored[not_constant])
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(graph_var, numpy_var, rtol=rtol, atol=0)
    np.testing.assert_allclose(graph_mean, numpy_mean, rtol=rtol, atol=rtol * np.abs(numpy_mean).max())
