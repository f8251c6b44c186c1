"""Folding math, as pure numpy functions (no graph, no onnx).

Inference-mode BatchNormalization is a per-channel affine map::

    y = gamma * (x - mean) / sqrt(var + eps) + beta = scale * x + shift
    scale = gamma / sqrt(var + eps),   shift = beta - mean * scale

A layer computing ``x = W * a + b`` (linear in ``a``, channel c produced by the slice W[c] along
the weight's output-channel axis) followed by BN therefore equals the layer with::

    W'[c] = W[c] * scale[c],   b'[c] = b[c] * scale[c] + shift[c]

Everything is computed in float64 and cast once, to the dtype of the tensor being replaced.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def batchnorm_affine(gamma, beta, mean, var, epsilon: float):
    """``(scale, shift)`` in float64 such that BN(x) = scale * x + shift per channel."""
    gamma, beta, mean, var = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + np.float64(epsilon))
    shift = beta - mean * scale
    return scale, shift


def scale_output_channels(weight: np.ndarray, scale: np.ndarray, *, axis: int, group: int = 1) -> np.ndarray:
    """Multiply output channel c of ``weight`` by ``scale[c]`` (float64 result).

    ``axis`` is the weight axis that enumerates output channels *within one group*; with
    ``group`` > 1 the output channel of group g and in-group index j is ``g * per_group + j``
    and the groups are laid out along axis 0 (ConvTranspose: weight (C_in, C_out/group, k...),
    C_in being group-major).
    """
    weight = np.asarray(weight, dtype=np.float64)
    if group == 1 or axis == 0:
        shape = [1] * weight.ndim
        shape[axis] = -1
        return weight * scale.reshape(shape)
    per_group_out = weight.shape[axis]
    grouped = weight.reshape((group, weight.shape[0] // group) + weight.shape[1:])
    shape = [1] * grouped.ndim
    shape[0], shape[axis + 1] = group, per_group_out
    return (grouped * scale.reshape(shape)).reshape(weight.shape)


def fold_bias(bias: Optional[np.ndarray], scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The bias after BN: ``bias * scale + shift`` (a missing bias counts as zero)."""
    if bias is None:
        return shift.copy()
    return np.asarray(bias, dtype=np.float64) * scale + shift


def fold_conv(weight, bias, scale, shift):
    """Conv weight (C_out, C_in/group, k...): output channels on axis 0 whatever the group."""
    return scale_output_channels(weight, scale, axis=0), fold_bias(bias, scale, shift)


def fold_conv_transpose(weight, bias, scale, shift, *, group: int = 1):
    """ConvTranspose weight (C_in, C_out/group, k...): output channels on axis 1, per group."""
    return scale_output_channels(weight, scale, axis=1, group=group), fold_bias(bias, scale, shift)


def fold_gemm(b_matrix, c, scale, shift, *, trans_b: bool, beta: float):
    """Gemm ``Y = alpha * A' B' + beta * C`` followed by BN over Y's columns.

    Returns ``(B_new, C_new)`` for a Gemm with the same ``alpha`` and ``beta = 1``:
    B's output axis is 1 (or 0 when ``trans_b``), and
    ``C_new = beta * C * scale + shift``, broadcast to at least (N,). A C of shape (M, N) or
    (M, 1) keeps its rows.
    """
    b_new = scale_output_channels(b_matrix, scale, axis=0 if trans_b else 1)
    if c is None:
        return b_new, shift.copy()
    c = np.asarray(c, dtype=np.float64) * np.float64(beta)
    return b_new, c * scale + shift


def fold_matmul(weight, scale, shift):
    """MatMul with a 2-D weight (K, N) followed by BN over the N columns: (W', bias)."""
    return scale_output_channels(weight, scale, axis=1), shift.copy()
