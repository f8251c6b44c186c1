"""Folding a BN into a layer whose weight (and bias) are quantized, in the quantizer's own format.

**What is read** (:func:`read_quantized`): a ``DequantizeLinear`` of the default domain or of
onnxruntime's ``com.microsoft`` domain (what the domain and the model's opset allow is one
:class:`DequantizeDomain` per domain in :data:`DOMAINS`) whose input is either

* a constant (an initializer or a ``Constant`` node) of a storage type of
  :data:`bnpass.quantized.STORAGE_TYPES`: int8/uint8/int16/uint16/int32, int4/uint4 (native from
  opset 21, or ``com.microsoft``), float8 E4M3FN/E5M2; or
* ``QuantizeLinear`` of a float constant W (a weight quantized at run time), with the same layout
  and zero point as the DequantizeLinear,

with constant scale and zero point laid out per tensor (any shape of one element: ``[]``, ``[1]``),
per axis (``[C]``) or in blocks (opset 21 ``block_size``; :class:`bnpass.quantized.Layout`). A form
that cannot be read raises :class:`CannotFold` with what exactly is not read.

**The fold** (:func:`fold_quantized_weight`) is exact in the scale along the weight's output-channel
axis (0 for Conv, 1 for ConvTranspose with group 1, 1 or 0 for Gemm by transB, 1 for MatMul):
scale'[c] = scale[c] * |s[c]| (:mod:`bnpass.quantized`). Integers are kept; a channel with a
negative factor is mirrored around its zero point (q' = 2 zp - q; float8: -q) so every scale keeps
its sign (TensorRT refuses non-positive scales), and when a mirrored value does not fit the storage
type (int4: [-8, 7]) the BN stays. A per-tensor scale becomes per-axis (default domain: opset 13),
and the fold records it; with ``keep_per_tensor`` the folded values are re-rounded on one scale
chosen as onnxruntime's quantizer chooses it instead (not exact). A run-time quantized weight folds
into W (scaled, negated where mirrored) and into both scales, so QuantizeLinear computes the same
integers (checked by emulating it; a value on a rounding tie is set to its exact grid point).

**The bias** (:func:`plan_quantized_bias`): an int32 ``DequantizeLinear`` bias stays one, at the
quantizer's convention: scale = the scale of the DequantizeLinear feeding the layer's data input x
the folded weight scale per output channel, zero point 0, values round(b' / scale) (so the bias is
within half a step of the exact fold). Where no such input scale exists the folded bias is written
in float, and the fold says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx

from .. import quantized as qmath
from ..graph import GraphIndex, node_label
from ..protos import DEFAULT_DOMAINS, attribute
from ..quantized import BLOCKED, PER_AXIS, PER_TENSOR, STORAGE_TYPES, Layout, QuantizedUpdate, StorageType
from ..rewrite import GraphEditor
from .fold_reasons import CannotFold, cast_finite, few

MICROSOFT_DOMAIN = "com.microsoft"
PER_AXIS_DEQUANTIZE_OPSET = 13


@dataclass(frozen=True)
class DequantizeDomain:
    """What a (De)QuantizeLinear of one domain reads: ``first_opsets`` maps each storage dtype to
    the domain opset that first reads it; ``per_axis_opset`` / ``blocked_opset``: from which opset
    a per-axis scale / a ``block_size`` is allowed (None: never)."""

    first_opsets: dict
    per_axis_opset: int
    blocked_opset: Optional[int]


def _opsets(**by_name) -> dict:
    return {np.dtype(STORAGE_DTYPES[name]): opset for name, opset in by_name.items()}


STORAGE_DTYPES = {storage.name: dtype for dtype, storage in STORAGE_TYPES.items()}
_DEFAULT = DequantizeDomain(
    first_opsets=_opsets(int8=10, uint8=10, int32=10, float8_e4m3fn=19, float8_e5m2=19,
                         int16=21, uint16=21, int4=21, uint4=21),
    per_axis_opset=PER_AXIS_DEQUANTIZE_OPSET, blocked_opset=21)
DOMAINS = {
    "": _DEFAULT,
    "ai.onnx": _DEFAULT,
    MICROSOFT_DOMAIN: DequantizeDomain(  # onnxruntime's contrib Q/DQ: integer types, always per-axis capable
        first_opsets=_opsets(int8=1, uint8=1, int32=1, int16=1, uint16=1, int4=1, uint4=1),
        per_axis_opset=1, blocked_opset=None),
}


@dataclass
class QuantizedWeight(qmath.QuantizedTensor):
    """A weight (or bias) made by ``DequantizeLinear``: the quantized tensor it reads
    (:class:`bnpass.quantized.QuantizedTensor`: ``stored`` holds the constant integers, or float8
    values, or, when ``quantize`` is set, the float constant W that QuantizeLinear quantizes at run time
    with ``quantize_scale``), and where it comes from in the graph."""

    dequantize: onnx.NodeProto
    domain: DequantizeDomain
    opset: int                 # the model's opset of the DequantizeLinear's domain
    quantize: Optional[onnx.NodeProto] = None


@dataclass
class QuantizedBiasUpdate:
    """New inputs of an int32 bias DequantizeLinear: values, scale, zero point (None: it has none)
    and the ``axis`` attribute to set (None: per tensor)."""

    dequantize: onnx.NodeProto
    stored: np.ndarray
    q_scale: np.ndarray
    zero_point: Optional[np.ndarray]
    axis: Optional[int]


def is_dequantize(node) -> bool:
    return node is not None and node.op_type == "DequantizeLinear" and node.domain in DOMAINS


def is_quantize(node) -> bool:
    return node is not None and node.op_type == "QuantizeLinear" and node.domain in DOMAINS


def _domain_opset(model: onnx.ModelProto, domain: str) -> int:
    names = DEFAULT_DOMAINS if domain in DEFAULT_DOMAINS else (domain,)
    return next((entry.version for entry in model.opset_import if entry.domain in names), 0)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def read_quantized(dequantize, index: GraphIndex, *, reader: str) -> QuantizedWeight:
    """The quantized tensor ``dequantize`` makes (``reader`` names it in messages: "the weight of
    Conv 'c'"); raises :class:`CannotFold` naming exactly what cannot be read."""
    try:
        return _read_quantized(dequantize, index, reader)
    except CannotFold as reason:
        raise CannotFold(f"{reader} cannot be read: {reason}") from None


def _read_quantized(dequantize, index: GraphIndex, reader: str) -> QuantizedWeight:
    label = _label(dequantize)
    domain = DOMAINS[dequantize.domain]
    opset = _domain_opset(index.model, dequantize.domain)
    inputs = list(dequantize.input) + [""] * (3 - len(dequantize.input))
    q_scale, zero_point = _scale_and_zero_point(dequantize, inputs, index)
    stored = index.constant(inputs[0])
    quantize = None
    if stored is None:
        quantize = index.producers.get(inputs[0])
        if not is_quantize(quantize):
            raise CannotFold(f"the input '{inputs[0]}' of {label} is neither a constant nor "
                             "QuantizeLinear of a constant")
        return _read_run_time_quantized(dequantize, quantize, index, q_scale, zero_point, domain, opset, reader)
    stored = stored.value
    storage = _storage(stored.dtype, dequantize, domain, opset)
    layout = _layout(dequantize, stored.shape, q_scale, zero_point, domain, opset)
    if not storage.integer and zero_point is not None and np.any(zero_point.astype(np.float32) != 0):
        raise CannotFold(f"{label} has a non-zero {storage.name} zero point")
    return QuantizedWeight(dequantize=dequantize, stored=stored, q_scale=q_scale, zero_point=zero_point,
                           layout=layout, storage=storage, dtype=_output_dtype(dequantize, q_scale),
                           quantize_scale=None, domain=domain, opset=opset)


def _read_run_time_quantized(dequantize, quantize, index: GraphIndex, q_scale, zero_point,
                             domain: DequantizeDomain, opset: int, reader: str) -> QuantizedWeight:
    """``DequantizeLinear(QuantizeLinear(W constant))``: W is folded, QuantizeLinear computes the integers."""
    label, q_label = _label(dequantize), _label(quantize)
    inputs = list(quantize.input) + [""] * (3 - len(quantize.input))
    weight = index.constant(inputs[0])
    if weight is None:
        raise CannotFold(f"the input '{inputs[0]}' of {q_label} is not a constant")
    weight = weight.value
    if not np.issubdtype(weight.dtype, np.floating):
        raise CannotFold(f"{q_label} quantizes a {weight.dtype} constant, not a float one")
    if not index.is_private_to(quantize.output[0], dequantize):
        raise CannotFold(f"the output of {q_label} is also read by other nodes than {label}")
    quantize_scale, quantize_zero_point = _scale_and_zero_point(quantize, inputs, index)
    output_type = attribute(quantize, "output_dtype", 0)
    storage_dtype = (quantize_zero_point.dtype if quantize_zero_point is not None
                     else onnx.helper.tensor_dtype_to_np_dtype(output_type) if output_type else np.dtype(np.uint8))
    storage = _storage(np.dtype(storage_dtype), quantize, domain, opset)
    if not storage.integer:
        raise CannotFold(f"{q_label} quantizes to {storage.name} at run time (bnpass folds run-time quantization "
                         "to integer types)")
    layout = _layout(dequantize, weight.shape, q_scale, zero_point, domain, opset)
    quantize_layout = _layout(quantize, weight.shape, quantize_scale, quantize_zero_point, domain, opset)
    if quantize_layout != layout:
        raise CannotFold(f"{q_label} quantizes {quantize_layout.describe()} but {label} dequantizes "
                         f"{layout.describe()}")
    zero, quantize_zero = (np.zeros(1) if z is None else z.astype(np.float64).reshape(-1)
                           for z in (zero_point, quantize_zero_point))
    if zero.size != quantize_zero.size or np.any(zero != quantize_zero):
        raise CannotFold(f"{q_label} and {label} have different zero points")
    return QuantizedWeight(dequantize=dequantize, stored=weight, q_scale=q_scale, zero_point=zero_point,
                           layout=layout, storage=storage, dtype=_output_dtype(dequantize, q_scale), domain=domain,
                           opset=opset, quantize=quantize, quantize_scale=quantize_scale)


def _scale_and_zero_point(node, inputs: list, index: GraphIndex) -> tuple:
    label = _label(node)
    scale = index.constant(inputs[1]) if inputs[1] else None
    if scale is None:
        raise CannotFold(f"the scale '{inputs[1]}' of {label} is not a constant")
    zero_point = None
    if inputs[2]:
        zero_point = index.constant(inputs[2])
        if zero_point is None:
            raise CannotFold(f"the zero point '{inputs[2]}' of {label} is not a constant")
        zero_point = zero_point.value
    if not np.issubdtype(scale.value.dtype, np.floating):
        raise CannotFold(f"the scale of {label} is {scale.value.dtype}")
    return scale.value, zero_point


def _storage(dtype: np.dtype, node, domain: DequantizeDomain, opset: int) -> StorageType:
    """The storage type, when the node's domain at the model's opset reads it."""
    storage = STORAGE_TYPES.get(np.dtype(dtype))
    if storage is None:
        readable = "/".join(type_.name for type_ in STORAGE_TYPES.values())
        raise CannotFold(f"{_label(node)} reads {np.dtype(dtype).name} values (bnpass reads {readable})")
    first = domain.first_opsets.get(np.dtype(dtype))
    if first is None:
        raise CannotFold(f"{_label(node)} of domain '{node.domain}' does not read {storage.name} values")
    if opset < first:
        raise CannotFold(f"{_label(node)} reads {storage.name} values, which needs opset {first} of its domain "
                         f"(the model imports {opset})")
    return storage


def _layout(node, shape: tuple, scale: np.ndarray, zero_point: Optional[np.ndarray], domain: DequantizeDomain,
            opset: int) -> Layout:
    """How ``scale`` (and ``zero_point``, which must spread alike) cover a tensor of ``shape``."""
    label, rank = _label(node), len(shape)
    block_size = attribute(node, "block_size", 0)
    axis = attribute(node, "axis", 1)
    if block_size:
        if domain.blocked_opset is None or opset < domain.blocked_opset:
            raise CannotFold(f"{label} has block_size={block_size}, which its domain reads "
                             + (f"from opset {domain.blocked_opset} (the model imports {opset})"
                                if domain.blocked_opset else "never"))
        axis = axis + rank if axis < 0 else axis
        expected = list(shape)
        if 0 <= axis < rank:
            expected[axis] = qmath.blocks(shape[axis], block_size)
        if not 0 <= axis < rank or list(scale.shape) != expected:
            raise CannotFold(f"{label} has a scale of shape {list(scale.shape)} for blocks of {block_size} along axis "
                             f"{axis} of a {list(shape)} tensor (expected {expected})")
        layout = Layout(BLOCKED, axis, block_size)
        if zero_point is not None and zero_point.shape != scale.shape:
            raise CannotFold(f"the zero point of {label} has shape {list(zero_point.shape)}, its scale "
                             f"{list(scale.shape)}")
        return layout
    if scale.size == 1 and scale.ndim <= 1:
        if zero_point is not None and not (zero_point.size == 1 and zero_point.ndim <= 1):
            raise CannotFold(f"the zero point of {label} has shape {list(zero_point.shape)} for one scale")
        return Layout(PER_TENSOR)
    if scale.ndim != 1:
        raise CannotFold(f"the scale of {label} has shape {list(scale.shape)} (bnpass reads one number, one per "
                         "index of an axis, or blocks)")
    if opset < domain.per_axis_opset:
        raise CannotFold(f"{label} has {scale.size} scales, which its domain reads from opset "
                         f"{domain.per_axis_opset} (the model imports {opset})")
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis < rank or shape[axis] != scale.size:
        raise CannotFold(f"{label} has {scale.size} scales along axis {axis} of a {list(shape)} tensor")
    if zero_point is not None and zero_point.size != scale.size:
        raise CannotFold(f"the zero point of {label} has {zero_point.size} values for {scale.size} scales")
    return Layout(PER_AXIS, axis)


def _output_dtype(dequantize, q_scale: np.ndarray) -> np.dtype:
    output_type = attribute(dequantize, "output_dtype", 0)
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(output_type) if output_type else q_scale.dtype)


def _label(node) -> str:
    return f"{node.op_type} '{node_label(node)}'"


# ------------------------------------------------------------------------------------------------
# Folding the weight
# ------------------------------------------------------------------------------------------------


def fold_quantized_weight(weight: QuantizedWeight, scale: np.ndarray, out_axis: int, layer, *,
                          keep_per_tensor: bool = False) -> QuantizedUpdate:
    """New DequantizeLinear (and QuantizeLinear) inputs for output channels along ``out_axis`` scaled by ``scale``."""
    label, layout = _label(weight.dequantize), weight.layout
    channels = scale.size
    if layout.kind == PER_AXIS and layout.axis != out_axis:
        raise CannotFold(f"{label} quantizes the weight of {layer.op_type} '{node_label(layer)}' per channel "
                         f"along axis {layout.axis}, but its output channels lie along axis {out_axis}")
    if layout.kind == BLOCKED and layout.axis == out_axis:
        raise CannotFold(f"{label} quantizes the weight of {layer.op_type} '{node_label(layer)}' in blocks of "
                         f"{layout.block_size} along its output axis {out_axis}: one scale covers several channels")
    if layout.kind != PER_TENSOR and weight.q_scale.shape[0 if layout.kind == PER_AXIS else out_axis] != channels:
        raise CannotFold(f"the scale of {label} does not have {channels} values along the output axis")
    zero = np.flatnonzero(scale == 0)
    if zero.size:
        raise CannotFold(f"gamma is 0 for channel(s) {few(zero)}: the folded scale would be 0")
    if layout.kind == PER_TENSOR and keep_per_tensor:
        return _fold_kept_per_tensor(weight, scale, out_axis)
    if layout.kind == PER_TENSOR and weight.opset < weight.domain.per_axis_opset:
        raise CannotFold(f"the weight of {layer.op_type} '{node_label(layer)}' comes from {label}, and a per-channel "
                         f"scale needs opset {weight.domain.per_axis_opset} (the model imports opset {weight.opset})")
    magnitude = np.abs(scale)
    q_scale = _folded_scale(weight.q_scale, layout, magnitude, out_axis, label)
    new_layout = Layout(PER_AXIS, out_axis) if layout.kind == PER_TENSOR else layout
    zero_point = None
    if weight.zero_point is not None:
        zero_point = qmath.per_channel(weight.zero_point, layout, channels).astype(weight.zero_point.dtype)
    axis = out_axis if layout.kind == PER_TENSOR else None
    if weight.quantize is not None:
        quantize_scale = _folded_scale(weight.quantize_scale, layout, magnitude, out_axis,
                                       _label(weight.quantize))
        stored = _fold_run_time_weight(weight, scale, out_axis, quantize_scale, zero_point, new_layout)
        return QuantizedUpdate(q_scale=q_scale, zero_point=zero_point, stored=stored, axis=axis,
                               per_channel=layout.kind == PER_TENSOR, quantize_scale=quantize_scale)
    stored = None
    if np.any(scale < 0):
        stored = _mirrored(weight.stored, weight.zero_point_full(zero_point, new_layout), scale, out_axis,
                           weight.storage, label)
    return QuantizedUpdate(q_scale=q_scale, zero_point=zero_point, stored=stored, axis=axis,
                           per_channel=layout.kind == PER_TENSOR)


def _folded_scale(q_scale: np.ndarray, layout: Layout, magnitude: np.ndarray, out_axis: int, label: str) -> np.ndarray:
    folded = cast_finite(qmath.scale_along(q_scale, layout, magnitude, out_axis), q_scale.dtype,
                         f"the folded scale of {label}")
    if np.any(folded == 0):
        raise CannotFold(f"the folded scale of {label} underflows to 0 in {folded.dtype}")
    return folded


def _mirrored(stored: np.ndarray, zero_point_full: Optional[np.ndarray], scale: np.ndarray, out_axis: int,
              storage: StorageType, label: str) -> np.ndarray:
    """``stored`` with the channels whose factor in ``scale`` is negative mirrored around the zero point
    (:func:`~bnpass.quantized.mirror_channels`), so that every scale stays positive; raises
    :class:`CannotFold` when a mirrored value overflows the storage type."""
    mirrored, overflowing = qmath.mirror_channels(stored, zero_point_full, scale < 0, axis=out_axis, storage=storage)
    if mirrored is None:
        raise CannotFold(f"the BN scale is negative for channel(s) {few(np.flatnonzero(scale < 0))}; keeping the "
                         f"{label} scale positive means mirroring those channels' integers around the zero point, "
                         f"which overflows {storage.name} [{storage.low:g}, {storage.high:g}] in channel(s) "
                         f"{few(overflowing)}")
    return mirrored


def _fold_run_time_weight(weight: QuantizedWeight, scale: np.ndarray, out_axis: int, quantize_scale: np.ndarray,
                          zero_point: Optional[np.ndarray], layout: Layout) -> np.ndarray:
    """W' = W * scale along ``out_axis`` (negative channels are the mirror), checked to make
    QuantizeLinear compute the same integers (mirrored) at the folded scale."""
    label, shape = _label(weight.quantize), weight.shape
    along = [1] * len(shape)
    along[out_axis] = -1
    folded = cast_finite(weight.stored.astype(np.float64) * scale.reshape(along), weight.stored.dtype,
                         f"the folded input of {label}")
    zero_full = weight.zero_point_full(zero_point, layout)
    expected = _mirrored(weight.integers(), zero_full, scale, out_axis, weight.storage, label)
    folded = qmath.on_runtime_grid(folded, expected, layout.expand(quantize_scale, shape), zero_full, weight.storage)
    if folded is None:
        raise CannotFold(f"{label} would compute other integers from the folded weight")
    return folded


def _fold_kept_per_tensor(weight: QuantizedWeight, scale: np.ndarray, out_axis: int) -> QuantizedUpdate:
    """The folded weight re-rounded on one scale, as onnxruntime's quantizer chooses it."""
    label = _label(weight.dequantize)
    along = [1] * len(weight.shape)
    along[out_axis] = -1
    values = weight.dequantized().astype(np.float64) * scale.reshape(along)
    storage_dtype = STORAGE_DTYPES[weight.storage.name]
    stored, new_scale, zero_point = qmath.requantize_per_tensor(values, weight.storage, storage_dtype,
                                                                weight.q_scale.dtype)
    if weight.zero_point is None and np.any(zero_point.astype(np.float64) != 0):
        raise CannotFold(f"{label} has no zero point, and re-rounding the folded weight on one {weight.storage.name} "
                         "scale needs one")
    q_scale = _reshaped(new_scale, weight.q_scale)
    zero_point = None if weight.zero_point is None else _reshaped(zero_point, weight.zero_point)
    if weight.quantize is not None:  # QuantizeLinear re-rounds W' at run time
        folded = cast_finite(weight.stored.astype(np.float64) * scale.reshape(along), weight.stored.dtype,
                             f"the folded input of {_label(weight.quantize)}")
        return QuantizedUpdate(q_scale=q_scale, zero_point=zero_point, stored=folded, axis=None,
                               quantize_scale=_reshaped(new_scale, weight.quantize_scale))
    return QuantizedUpdate(q_scale=q_scale, zero_point=zero_point, stored=stored, axis=None)


def _reshaped(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    return np.asarray(value).astype(like.dtype).reshape(like.shape)


# ------------------------------------------------------------------------------------------------
# The bias
# ------------------------------------------------------------------------------------------------


@dataclass
class BiasPlan:
    """How the folded bias is written: ``quantized`` (an int32 DequantizeLinear kept), else in float,
    with ``why_float`` saying why a quantized bias could not stay quantized ("" when it was float)."""

    quantized: Optional[QuantizedBiasUpdate] = None
    why_float: str = ""


def plan_quantized_bias(layer, source: Optional[QuantizedWeight], index: GraphIndex, bias: np.ndarray,
                        weight: Optional[QuantizedUpdate], channels: int) -> BiasPlan:
    """The folded float64 ``bias`` re-quantized in the layer's int32 bias DequantizeLinear, when it has one
    (``source``, its quantized tensor as the fold read it; None when the bias is not quantized)."""
    if source is None:
        return BiasPlan()
    if source.quantize is not None:
        return BiasPlan(why_float=f"its bias is quantized at run time by {_label(source.quantize)}")
    if source.storage is not STORAGE_TYPES[np.dtype(np.int32)]:
        return BiasPlan(why_float=f"its bias is stored as {source.storage.name}, not int32")
    if source.stored.shape != (channels,):
        return BiasPlan(why_float=f"its int32 bias has shape {list(source.stored.shape)}, not [{channels}]")
    input_scale = _input_scale(layer, index)
    if isinstance(input_scale, str):
        return BiasPlan(why_float=input_scale)
    weight_scale = None if weight is None else weight.channel_scale(channels)
    if weight_scale is None:
        return BiasPlan(why_float="its weight is not quantized with one scale per output channel"
                        if weight is not None else "its weight is not quantized")
    scale_dtype = source.q_scale.dtype
    bias_scale = (input_scale.astype(np.float32) * weight_scale.astype(np.float32)).astype(scale_dtype)
    per_tensor = weight.q_scale.size == 1
    if per_tensor:
        bias_scale = bias_scale[:1]
    values, overflowing = qmath.quantize_bias(bias, np.broadcast_to(bias_scale.astype(np.float64), (channels,)))
    if values is None:
        return BiasPlan(why_float=f"the folded bias overflows int32 at scale input scale x weight scale in "
                        f"channel(s) {few(overflowing)}")
    zero_point = None
    if source.zero_point is not None:
        zero_point = np.zeros(source.zero_point.shape if per_tensor else (channels,), source.zero_point.dtype)
    return BiasPlan(quantized=QuantizedBiasUpdate(
        dequantize=source.dequantize, stored=values, q_scale=_reshaped(bias_scale, source.q_scale) if per_tensor
        else bias_scale, zero_point=zero_point, axis=None if per_tensor else 0))


def _input_scale(layer, index: GraphIndex) -> np.ndarray | str:
    """The per-tensor scale of the DequantizeLinear feeding the layer's data input, or why there is none."""
    producer = index.producers.get(layer.input[0])
    if not is_dequantize(producer):
        return "its input does not come from a DequantizeLinear, so no input scale gives the int32 bias its scale"
    scale = index.constant(producer.input[1]) if len(producer.input) > 1 else None
    if scale is None or scale.value.size != 1:
        return (f"the scale of {_label(producer)}, its input, is not one constant, so no input scale gives the "
                "int32 bias its scale")
    return scale.value.reshape(-1)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def write_quantized_weight(editor: GraphEditor, layer, weight: QuantizedWeight, update: QuantizedUpdate,
                           base: str) -> None:
    dequantize = _private_dequantize(editor, layer, 1, weight.dequantize, base)
    quantize = weight.quantize
    scale_readers = [(dequantize, 1)]
    if quantize is not None:
        if quantize.input[1] == dequantize.input[1] and np.array_equal(update.quantize_scale, update.q_scale):
            scale_readers.append((quantize, 1))
        else:
            editor.set_constant_input(quantize, 1, update.quantize_scale, f"{base}.weight_quantize_scale_folded")
    _set_constant(editor, scale_readers, update.q_scale, f"{base}.weight_scale_folded")
    if update.zero_point is not None:
        zero_readers = [(dequantize, 2)]
        if quantize is not None:
            zero_readers.append((quantize, 2))
        _set_constant(editor, zero_readers, update.zero_point, f"{base}.weight_zero_point_folded")
    if update.stored is not None:
        if quantize is not None:
            editor.set_constant_input(quantize, 0, update.stored, f"{base}.weight_folded")
        else:
            editor.set_constant_input(dequantize, 0, update.stored, f"{base}.weight_quantized_folded")
    if update.axis is not None:
        editor.set_attribute(dequantize, "axis", update.axis)
        if quantize is not None:
            editor.set_attribute(quantize, "axis", update.axis)


def write_quantized_bias(editor: GraphEditor, layer, update: QuantizedBiasUpdate, base: str) -> None:
    dequantize = _private_dequantize(editor, layer, 2, update.dequantize, base)
    editor.set_constant_input(dequantize, 0, update.stored, f"{base}.bias_quantized_folded")
    editor.set_constant_input(dequantize, 1, update.q_scale, f"{base}.bias_scale_folded")
    if update.zero_point is not None:
        editor.set_constant_input(dequantize, 2, update.zero_point, f"{base}.bias_zero_point_folded")
    if update.axis is not None:
        editor.set_attribute(dequantize, "axis", update.axis)


def _private_dequantize(editor: GraphEditor, layer, position: int, dequantize, base: str) -> onnx.NodeProto:
    """``dequantize``, or, when another node reads its output too, a copy only ``layer`` reads."""
    if editor.index.is_private_to(dequantize.output[0], layer):
        return dequantize
    copy = onnx.NodeProto()
    copy.CopyFrom(dequantize)
    copy.name = editor.fresh_name(f"{dequantize.name or 'DequantizeLinear'}.{base}")
    copy.output[0] = editor.fresh_name(f"{dequantize.output[0]}.{base}")
    copy = editor.insert_node(copy, after=dequantize)
    editor.set_input(layer, position, copy.output[0])
    return copy


def _set_constant(editor: GraphEditor, readers: list, value: np.ndarray, hint: str) -> None:
    """Make every ``(node, position)`` of ``readers`` read ``value``: in place when one node reads
    it, else one new initializer they share (QuantizeLinear and DequantizeLinear reading one scale)."""
    if len(readers) == 1:
        editor.set_constant_input(*readers[0], value, hint)
        return
    name = editor.add_initializer(value, hint)
    for node, position in readers:
        editor.set_input(node, position, name)
