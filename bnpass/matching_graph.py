"""The matched statistics as ONNX nodes: :func:`bnpass.matching.match_batch_statistics`, op for op.

The one-pass ``--reference`` calibration graph (``matched`` mode of
:func:`bnpass.calibration.build_calibration_model`) computes, per BN and per batch, the matched
(mu', v') of :mod:`bnpass.matching` (see its docstring for the formula and the constant-channel
rule) from the batch moments of both models and the reference BN's stored statistics. The nodes
below and the numpy lines of :func:`bnpass.matching._match` are the same computation, line for
line, in the same order; each comment names the numpy line. tests/test_matching_graph.py runs both
(the nodes through onnxruntime) on the same inputs, with a large epsilon and constant channels on
either side of the threshold, and requires them to agree: change one, change the other.

The graph differs in one place only: a channel whose stored ``v_r + e`` is 0 (the reference
divides by zero there) gets a stored scale of 1, so no NaN spreads through the batch; its final
statistics stay the stored ones (:func:`bnpass.matching.match_statistics`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from .matching import DEFAULT_CONSTANT_TOLERANCE


def matched_statistics_nodes(stored_mean: np.ndarray, stored_var: np.ndarray, epsilon: float, *,
                             reference_mean: str, reference_var: str, compressed_mean: str, compressed_var: str,
                             shape: list, dtype: np.dtype, opset: int,
                             out: Callable[[str], str], min_ratio: float = 0.0) -> tuple[str, str, list, list]:
    """``(mean, var, nodes, initializers)``: the names of the matched (mu', v') and the nodes and
    initializers computing them, in ``dtype``, from the tensors named ``reference_*`` (m_o, v_o)
    and ``compressed_*`` (m_c, v_c), all of ``shape``; the stored (mu_r, v_r) and e become
    initializers. ``out(suffix)`` makes a fresh unique tensor/node name; ``opset`` is the graph's
    (LessOrEqual from 12, Not(Greater) before); ``min_ratio`` > 0 bounds the ratio from below."""
    nodes, inits = [], []

    def constant(value, suffix):
        name = out(suffix)
        inits.append(numpy_helper.from_array(np.broadcast_to(np.asarray(value, np.float64), shape).astype(dtype),
                                             name))
        return name

    def node(op, *inputs):
        name = out(op.lower())
        nodes.append(onnx.helper.make_node(op, list(inputs), [name], name=name))
        return name

    def less_or_equal(a, b):
        if opset >= 12:
            return node("LessOrEqual", a, b)
        return node("Not", node("Greater", a, b))

    stored_mean = np.asarray(stored_mean, np.float64).reshape(shape)
    stored_var = np.asarray(stored_var, np.float64).reshape(shape)
    scale_squared = stored_var + epsilon
    stored_mean_name, stored_var_name = constant(stored_mean, "stored_mean"), constant(stored_var, "stored_var")
    epsilon_name, one, zero = constant(epsilon, "epsilon"), constant(1.0, "one"), constant(0.0, "zero")
    # stored_scale_squared = stored_var + epsilon; stored_scale = sqrt(that)
    scale_squared_name = constant(np.where(scale_squared > 0, scale_squared, 1.0), "stored_scale_squared")
    scale = constant(np.sqrt(np.where(scale_squared > 0, scale_squared, 1.0)), "stored_scale")
    # threshold = tolerance * tolerance
    threshold = constant(DEFAULT_CONSTANT_TOLERANCE ** 2, "threshold")

    def is_constant(mean, var):
        # var <= threshold * max(mean * mean, stored_scale_squared)
        return less_or_equal(var, node("Mul", threshold, node("Max", node("Mul", mean, mean), scale_squared_name)))

    # constant = reference_constant or compressed_constant
    constant_channel = node("Or", is_constant(reference_mean, reference_var),
                            is_constant(compressed_mean, compressed_var))
    # safe_reference_var = where(constant, 1, reference_var)
    safe_reference_var = node("Where", constant_channel, one, reference_var)
    # ratio = where(constant, 1, compressed_var / safe_reference_var)
    ratio = node("Where", constant_channel, one, node("Div", compressed_var, safe_reference_var))
    if min_ratio > 0:
        # ratio = max(ratio, min_ratio)
        ratio = node("Max", ratio, constant(min_ratio, "min_ratio"))
    # unclamped = stored_var * ratio + epsilon * (ratio - 1)
    unclamped = node("Add", node("Mul", stored_var_name, ratio), node("Mul", epsilon_name, node("Sub", ratio, one)))
    # var = max(unclamped, 0)
    var = node("Max", unclamped, zero)
    # scale_ratio = sqrt(var + epsilon) / stored_scale
    scale_ratio = node("Div", node("Sqrt", node("Add", var, epsilon_name)), scale)
    # mean = stored_mean + (compressed_mean - reference_mean) + (1 - scale_ratio) * (reference_mean - stored_mean)
    mean = node("Add", node("Add", stored_mean_name, node("Sub", compressed_mean, reference_mean)),
                node("Mul", node("Sub", one, scale_ratio), node("Sub", reference_mean, stored_mean_name)))
    return mean, var, nodes, inits
