"""Folding a BN into a layer whose weight is ``DequantizeLinear(q, q_scale, zero_point)`` of constants.

The fold is exact in the scale alone, q_scale'[c] = q_scale[c] * |scale[c]|, along the weight's
output-channel axis (0 for Conv, 1 for ConvTranspose with group 1, 1 or 0 for Gemm by transB, 1 for
MatMul); a per-tensor scale (and zero point) becomes per-axis, which needs opset 13. Integers are
kept, except that a channel with a negative factor is mirrored around its zero point (q' = 2 zp - q)
so every scale keeps its sign (TensorRT refuses non-positive scales); when a mirrored value would
not fit the integer type, the BN stays. A bias behind DequantizeLinear is folded in float (it cannot
stay an exact int32 multiple of its scale).

:func:`read_dequantize` reads such a weight (or bias), :func:`fold_quantized_weight` plans the new
DequantizeLinear inputs, :func:`write_quantized_weight` writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx

from .. import folding
from ..graph import GraphIndex, node_label
from ..protos import DEFAULT_DOMAINS, attribute
from ..rewrite import GraphEditor
from .fold_reasons import CannotFold, cast_finite, few

QUANTIZED_WEIGHT_TYPES = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32))
PER_AXIS_DEQUANTIZE_OPSET = 13


@dataclass
class QuantizedWeight:
    """``DequantizeLinear(q, q_scale, zero_point)`` of constants feeding a layer's weight (or its bias)."""

    dequantize: onnx.NodeProto
    quantized: np.ndarray
    q_scale: np.ndarray
    zero_point: Optional[np.ndarray]
    axis: Optional[int]      # the per-axis quantization axis (normalized), None when per-tensor
    dtype: np.dtype          # the DequantizeLinear output type

    @property
    def shape(self):
        return self.quantized.shape

    def dequantized(self) -> np.ndarray:
        """``(q - zero_point) * q_scale``, exact in float64, cast once to the output type."""
        shape = [1] * self.quantized.ndim
        if self.axis is not None:
            if not 0 <= self.axis < self.quantized.ndim or self.quantized.shape[self.axis] != self.q_scale.size:
                raise CannotFold(f"DequantizeLinear '{node_label(self.dequantize)}' has {self.q_scale.size} "
                                 f"scales along axis {self.axis} of a {list(self.quantized.shape)} tensor")
            shape[self.axis] = -1
        zero_point = np.zeros(1) if self.zero_point is None else self.zero_point
        value = ((self.quantized.astype(np.float64) - zero_point.astype(np.float64).reshape(shape))
                 * self.q_scale.astype(np.float64).reshape(shape))
        return value.astype(self.dtype)


@dataclass
class QuantizedUpdate:
    """New DequantizeLinear inputs: per-axis scale and zero point, mirrored integers if any."""

    q_scale: np.ndarray
    zero_point: Optional[np.ndarray]
    quantized: Optional[np.ndarray]  # None: the integers stay as they are
    axis: int


def is_dequantize(node) -> bool:
    return node is not None and node.op_type == "DequantizeLinear" and node.domain in DEFAULT_DOMAINS


def read_dequantize(dequantize, index: GraphIndex, *, reader: str) -> QuantizedWeight:
    """``DequantizeLinear(q, q_scale, zero_point)`` of constants, per tensor or per axis (``reader``
    names the tensor it makes, in messages)."""
    dq_label = f"DequantizeLinear '{node_label(dequantize)}'"
    if attribute(dequantize, "block_size", 0):
        raise CannotFold(f"{dq_label} uses blocked quantization")
    inputs = list(dequantize.input) + [""] * (3 - len(dequantize.input))
    constants = [index.constant(n) if n else None for n in inputs]
    if constants[0] is None or constants[1] is None or (inputs[2] and constants[2] is None):
        raise CannotFold(f"the inputs of {dq_label}, which makes {reader}, are not all constants")
    quantized, q_scale, zero_point = (None if c is None else c.value for c in constants)
    if quantized.dtype not in QUANTIZED_WEIGHT_TYPES:
        raise CannotFold(f"{dq_label} dequantizes {quantized.dtype} (bnpass folds int8/uint8/int16/uint16/int32 "
                         "weights)")
    if not np.issubdtype(q_scale.dtype, np.floating):
        raise CannotFold(f"the scale of {dq_label} is {q_scale.dtype}")
    if q_scale.size == 1 and q_scale.ndim <= 1:
        axis = None
    elif q_scale.ndim == 1:
        axis = attribute(dequantize, "axis", 1)
        axis = axis + quantized.ndim if axis < 0 else axis
    else:
        raise CannotFold(f"the scale of {dq_label} has shape {list(q_scale.shape)}")
    if zero_point is not None and zero_point.shape != q_scale.shape and not zero_point.size == q_scale.size == 1:
        raise CannotFold(f"the zero point and scale of {dq_label} have different shapes")
    output_type = attribute(dequantize, "output_dtype", 0)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(output_type) if output_type else q_scale.dtype
    return QuantizedWeight(dequantize=dequantize, quantized=quantized, q_scale=q_scale, zero_point=zero_point,
                            axis=axis, dtype=np.dtype(dtype))


def fold_quantized_weight(weight: QuantizedWeight, scale: np.ndarray, out_axis: int,
                          layer) -> QuantizedUpdate:
    """New DequantizeLinear scale, zero point (and mirrored integers) for output channels along ``out_axis``."""
    dq_label = f"DequantizeLinear '{node_label(weight.dequantize)}'"
    channels = scale.size
    if weight.axis is not None and weight.axis != out_axis:
        raise CannotFold(f"{dq_label} quantizes the weight of {layer.op_type} '{node_label(layer)}' per channel "
                         f"along axis {weight.axis}, but its output channels lie along axis {out_axis}")
    if weight.axis is not None and weight.q_scale.size != channels:
        raise CannotFold(f"{dq_label} has {weight.q_scale.size} scales for {channels} channels")
    zero = np.flatnonzero(scale == 0)
    if zero.size:
        raise CannotFold(f"gamma is 0 for channel(s) {few(zero)}: the folded scale would be 0")
    q_scale = cast_finite(folding.fold_quantized_scale(weight.q_scale, scale), weight.q_scale.dtype,
                          f"the folded scale of {dq_label}")
    if np.any(q_scale == 0):
        raise CannotFold(f"the folded scale of {dq_label} underflows to 0 in {q_scale.dtype}")
    zero_point = None
    if weight.zero_point is not None:
        zero_point = np.broadcast_to(weight.zero_point.reshape(-1), (channels,)).astype(weight.zero_point.dtype)
    mirror = scale < 0
    quantized = None
    if mirror.any():
        quantized, overflowing = folding.mirror_quantized_channels(
            weight.quantized, 0 if zero_point is None else zero_point, mirror, axis=out_axis)
        if quantized is None:
            raise CannotFold(f"the BN scale is negative for channel(s) {few(np.flatnonzero(mirror))}; keeping the "
                             f"{dq_label} scale positive means mirroring those channels' integers around the zero "
                             f"point, which overflows {weight.quantized.dtype} in channel(s) {few(overflowing)}")
    return QuantizedUpdate(q_scale=q_scale, zero_point=zero_point, quantized=quantized, axis=out_axis)


def write_quantized_weight(editor: GraphEditor, layer, dequantize, update: QuantizedUpdate, base: str) -> None:
    index = editor.index
    if not index.is_private_to(dequantize.output[0], layer):
        # Another node reads the dequantized weight: give this layer its own DequantizeLinear.
        copy = onnx.NodeProto()
        copy.CopyFrom(dequantize)
        copy.name = editor.fresh_name(f"{dequantize.name or 'DequantizeLinear'}.{base}")
        copy.output[0] = editor.fresh_name(f"{dequantize.output[0]}.{base}")
        dequantize = editor.insert_node(copy, after=dequantize)
        editor.set_input(layer, 1, dequantize.output[0])
    editor.set_constant_input(dequantize, 1, update.q_scale, f"{base}.weight_scale_folded")
    if update.zero_point is not None:
        editor.set_constant_input(dequantize, 2, update.zero_point, f"{base}.weight_zero_point_folded")
    if update.quantized is not None:
        editor.set_constant_input(dequantize, 0, update.quantized, f"{base}.weight_quantized_folded")
    editor.set_attribute(dequantize, "axis", update.axis)
