"""Folding math, as pure numpy functions (no graph, no onnx).

Inference-mode BatchNormalization is a per-channel affine map::

    y = gamma * (x - mean) / sqrt(var + eps) + beta = scale * x + shift
    scale = gamma / sqrt(var + eps),   shift = beta - mean * scale

A layer computing ``x = W * a + b`` (linear in ``a``, channel c produced by the slice W[c] along
the weight's output-channel axis) followed by BN therefore equals the layer with::

    W'[c] = W[c] * scale[c],   b'[c] = b[c] * scale[c] + shift[c]

(:func:`scale_output_channels`, :func:`fold_bias`; the output-channel axis is 0 for Conv, 1 for
ConvTranspose (per group) and MatMul, 1 or 0 for Gemm by ``transB``, whose ``beta * C`` is the bias).
A constant ``a`` added between the layer and the BN is one more bias term (:func:`channel_vector`);
a BN *before* a layer scales the layer's input channels instead (:func:`fold_conv_input`,
:func:`fold_gemm_input`, :func:`fold_matmul_input`); a quantized weight ``(q - zp) * q_scale`` takes
the factor in its scale (:func:`fold_quantized_scale`, :func:`mirror_quantized_channels`).

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


# --------------------------------------------------------------------------------------------
# A constant added between the layer and the BN
# --------------------------------------------------------------------------------------------


def channel_vector(value, channels: int, *, rank: int, axis: int) -> Optional[np.ndarray]:
    """``value`` as a float64 (channels,) vector, when adding it to a rank-``rank`` tensor whose
    channels run along ``axis`` adds one number per channel and broadcasts nothing else.

    Numpy broadcasting aligns ``value``'s dims to the right; every aligned dim must be 1 except
    the channel dim, which may be ``channels`` or 1 (one number for all channels). Returns None
    when ``value`` has more dims than the tensor or varies along another axis.
    """
    value = np.asarray(value, dtype=np.float64)
    if value.ndim > rank:
        return None
    offset = rank - value.ndim
    for position, size in enumerate(value.shape):
        if size != 1 and not (position + offset == axis and size == channels):
            return None
    return np.broadcast_to(value.reshape(-1), (channels,)).copy()


# --------------------------------------------------------------------------------------------
# BN before the layer: scale the layer's input channels
# --------------------------------------------------------------------------------------------
#
# A layer reading ``BN(x) = scale * x + shift`` (per input channel c) computes
#     sum_c W[., c] * (scale[c] x[c] + shift[c]) + b = sum_c (W[., c] scale[c]) x[c] + (b + sum_c W[., c] shift[c])
# so W'[., c] = W[., c] * scale[c] and b' = b + W . shift. For a Conv this holds at every output
# position only when no window reads zero padding (a padded zero of BN(x) would have to be -shift/scale
# in x): the caller checks there is none.


def fold_conv_input(weight, bias, scale, shift, *, group: int = 1):
    """Conv weight (C_out, C_in/group, k...) after BN on its input: ``(W', b')`` in float64.

    Output channel o belongs to group g = o // (C_out/group) and reads input channels
    g * (C_in/group) + j, j < C_in/group; so W'[o, j] = W[o, j] * scale[g*C_in/group + j] and
    b'[o] = b[o] + sum_{j, k} W[o, j, k] * shift[g*C_in/group + j].
    """
    weight = np.asarray(weight, dtype=np.float64)
    out_channels, in_per_group = weight.shape[:2]
    kernel = weight.shape[2:]
    grouped = weight.reshape((group, out_channels // group, in_per_group) + kernel)
    shape = (group, 1, in_per_group) + (1,) * len(kernel)
    new_weight = (grouped * scale.reshape(shape)).reshape(weight.shape)
    extra = (grouped * shift.reshape(shape)).sum(axis=tuple(range(2, grouped.ndim))).reshape(out_channels)
    return new_weight, extra if bias is None else np.asarray(bias, dtype=np.float64) + extra


def fold_gemm_input(b_matrix, c, scale, shift, *, trans_b: bool, alpha: float, beta: float):
    """Gemm ``Y = alpha * A B' + beta * C`` (transA = 0) after BN over A's columns (the K axis).

    Returns ``(B_new, C_new)`` for a Gemm with the same ``alpha`` and ``beta = 1``:
    B_new scales row k of B' by scale[k] (B's axis 0, or 1 when ``trans_b``), and
    ``C_new = beta * C + alpha * (shift @ B')``, of C's shape broadcast with (N,).
    """
    b_matrix = np.asarray(b_matrix, dtype=np.float64)
    b_new = scale_output_channels(b_matrix, scale, axis=1 if trans_b else 0)
    b_kn = b_matrix.T if trans_b else b_matrix
    extra = np.float64(alpha) * (shift @ b_kn)
    if c is None:
        return b_new, extra
    return b_new, np.asarray(c, dtype=np.float64) * np.float64(beta) + extra


def fold_matmul_input(weight, scale, shift):
    """MatMul ``X W`` with X of rank 2 after BN over X's columns: ``(W', bias)`` for ``X W' + bias``."""
    weight = np.asarray(weight, dtype=np.float64)
    return scale_output_channels(weight, scale, axis=0), shift @ weight


# --------------------------------------------------------------------------------------------
# Quantized weights: DequantizeLinear(q, q_scale, zero_point) = (q - zero_point) * q_scale
# --------------------------------------------------------------------------------------------
#
# Scaling output channel c of the dequantized weight by scale[c] is exact in q_scale alone:
#     (q - zp) * q_scale * scale[c] = (q - zp) * q_scale'[c],   q_scale'[c] = q_scale[c] * scale[c]
# A negative scale[c] would flip the sign of q_scale'[c]; runtimes such as TensorRT refuse
# non-positive scales, so such a channel instead mirrors its integers around the zero point:
#     (q' - zp) = -(q - zp),  q' = 2 zp - q,   q_scale'[c] = q_scale[c] * |scale[c]|
# which is exact when every mirrored value fits the integer type.


def fold_quantized_scale(q_scale, scale) -> np.ndarray:
    """Per-channel scale after BN: ``q_scale * |scale|`` (float64; q_scale scalar or (C,))."""
    return np.asarray(q_scale, dtype=np.float64).reshape(-1) * np.abs(scale)


def mirror_quantized_channels(quantized: np.ndarray, zero_point, mirror: np.ndarray, *, axis: int):
    """``q' = 2 * zero_point - q`` on the channels (along ``axis``) where ``mirror`` is True.

    ``zero_point`` is a scalar or one value per channel. Returns ``(q', overflowing)``: ``q'`` in
    ``quantized``'s dtype (None when some value does not fit it) and the indices of the channels
    whose mirrored values fall outside the dtype's range.
    """
    info = np.iinfo(quantized.dtype)
    channels = quantized.shape[axis]
    zero_point = np.broadcast_to(np.asarray(zero_point, dtype=np.int64).reshape(-1), (channels,))
    wide = np.moveaxis(quantized.astype(np.int64), axis, 0)
    shape = (channels,) + (1,) * (wide.ndim - 1)
    mirrored = np.where(mirror.reshape(shape), 2 * zero_point.reshape(shape) - wide, wide)
    outside = (mirrored < info.min) | (mirrored > info.max)
    overflowing = np.flatnonzero(outside.reshape(channels, -1).any(axis=1))
    if overflowing.size:
        return None, overflowing
    return np.moveaxis(mirrored, 0, axis).astype(quantized.dtype), overflowing
