"""FoldBatchNormPass: fold inference-mode BatchNormalization into a neighbouring layer.

Inference-mode BN is the per-channel affine map ``BN(x) = scale * x + shift`` with
``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale`` (:mod:`bnpass.folding`).
Match, check, rewrite. For each BatchNormalization node:

**Backward** (the usual fold), into the layer producing its input:

* Conv (1-3D, any group), ConvTranspose (any group), Gemm (any transA/transB, alpha, beta, with or
  without C), or MatMul with a constant 2-D weight and a rank-2 output (BN's channel axis 1 is then
  the weight's output axis): W'[c] = W[c] * scale[c], b'[c] = b[c] * scale[c] + shift[c];
* the same layer followed by an ``Add`` of a constant that broadcasts along the channel axis only
  ((C,1,1) or (1,C,1,1) after a 2-D Conv, (C,) or (1,C) after a rank-2 MatMul/Gemm, or one number):
  the constant joins the bias before folding, b' = (b + a) * scale + shift. Conv/ConvTranspose/Gemm
  absorb the Add into their bias; after a MatMul the Add stays, with the folded bias as its constant;
* a weight that is ``DequantizeLinear(q, q_scale, zero_point)`` of constants: the fold is exact in the
  scale alone, q_scale'[c] = q_scale[c] * |scale[c]|, along the weight's output-channel axis (0 for
  Conv, 1 for ConvTranspose with group 1, 1 or 0 for Gemm by transB, 1 for MatMul); a per-tensor
  scale (and zero point) becomes per-axis, which needs opset 13. Integers are kept, except that a
  channel with a negative factor is mirrored around its zero point (q' = 2 zp - q) so every scale
  keeps its sign (TensorRT refuses non-positive scales); when a mirrored value would not fit the
  integer type, the BN stays. A bias behind DequantizeLinear is folded in float (it cannot stay an
  exact int32 multiple of its scale).

**Forward**, when it cannot fold backward, into the one layer reading its output (as data input):

* Conv without padding (pads all 0, auto_pad NOTSET/VALID, or SAME with a 1x1 kernel), any group:
  W'[o, j] = W[o, j] * scale[c], b'[o] = b[o] + sum_{j,k} W[o, j, k] * shift[c], c the input channel
  g(o) * C_in/group + j; padding is excluded because a padded zero of BN(x) is not a zero of x;
* Gemm with transA = 0: rows of B' scaled, C' = beta * C + alpha * shift @ B';
* MatMul with a rank-2 input and a constant 2-D weight: rows of W scaled, plus an Add of shift @ W.

**Checks**: the BN runs in inference mode with per-channel (``spatial=1``) constant parameters and
a positive ``var + eps``; the tensors between the BN and the layer are read by nothing else; the
weight (and bias) are constants with matching channel counts; every folded value is finite in its
dtype. Otherwise the BN stays and the reason is reported in :attr:`FoldResult.skipped`.

**Rewrite**: values are computed in float64 and cast once to the dtype of the tensor they replace.
A constant read by anything else is never changed in place: the layer (or a private copy of its
DequantizeLinear) gets its own. The folded BN (and absorbed Add) are removed, the layer takes over
the BN's output name, and parameters nothing reads any more are removed. Folds repeat until none
applies, so the pass is idempotent: run again on its output it reports ``modified=False``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx

from .. import folding
from ..graph import GraphIndex, is_batchnorm, node_label
from ..protos import DEFAULT_DOMAINS, attribute, default_opset, inferred_value_infos, rank_of
from ..rewrite import GraphEditor
from .base import PassResult, copy_model

FOLDABLE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FORWARD_LAYERS = ("Conv", "Gemm", "MatMul")
PARAM_NAMES = ("scale", "B", "input_mean", "input_var")
QUANTIZED_WEIGHT_TYPES = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32))
PER_AXIS_DEQUANTIZE_OPSET = 13


@dataclass
class FoldResult(PassResult):
    folded: list[tuple[str, str]] = field(default_factory=list)  # (bn name, layer name) per folded BN
    skipped: dict[str, str] = field(default_factory=dict)  # bn name -> reason it stayed
    patterns: dict[str, str] = field(default_factory=dict)  # bn name -> what it folded as: "Conv->Add->BN", "BN->Gemm"


class FoldBatchNormPass:
    """Fold every BatchNormalization that can be folded exactly; report the others."""

    def call(self, model: onnx.ModelProto) -> FoldResult:
        # A weightless copy is edited, reading values from ``model``; each payload is copied into
        # it once (GraphEditor.on_copy_of, build). Copy-then-overwrite would hold both weights (upb).
        editor = GraphEditor.on_copy_of(model)
        context = _Context(editor)
        folded, reasons, patterns = [], {}, {}
        pending = [node for node in editor.graph.node if is_batchnorm(node)]
        while pending:  # a fold can make another possible (BN -> BN -> Conv): repeat until none does
            remaining = []
            for bn in pending:
                try:
                    plan = plan_fold(bn, editor.index, context)
                except _CannotFold as reason:
                    reasons[id(bn)] = str(reason)
                    remaining.append(bn)
                    continue
                folded.append((node_label(bn), node_label(plan.layer)))
                patterns[node_label(bn)] = plan.pattern
                plan.apply(editor)
            if len(remaining) == len(pending):
                break
            pending = remaining
        skipped = {node_label(bn): reasons[id(bn)] for bn in pending}  # the caller reports them
        if folded:
            editor.remove_dead()
            output = editor.build()
        else:
            output = copy_model(model)  # byte for byte the input
        return FoldResult(model=output, modified=bool(folded), folded=folded, skipped=skipped, patterns=patterns)


class _Context:
    """Model-wide facts the checks need: the opset, and tensor ranks from shape inference (lazily:
    only MatMul folds need them)."""

    def __init__(self, editor: GraphEditor):
        self.editor = editor
        self.opset = default_opset(editor.model)
        self._value_infos: Optional[dict] = None

    def rank(self, name: str) -> Optional[int]:
        """The rank of tensor ``name`` (folds keep every tensor's shape, so one inference serves)."""
        if self._value_infos is None:
            self.editor.flush()  # shape inference reads the protobuf graph
            self._value_infos = inferred_value_infos(self.editor.model)
        return rank_of(self._value_infos, name)


# ------------------------------------------------------------------------------------------------
# Plans: what a checked fold writes. Values are final (folded, cast to their tensor's dtype).
# ------------------------------------------------------------------------------------------------


@dataclass
class _QuantizedWeight:
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
                raise _CannotFold(f"DequantizeLinear '{node_label(self.dequantize)}' has {self.q_scale.size} "
                                  f"scales along axis {self.axis} of a {list(self.quantized.shape)} tensor")
            shape[self.axis] = -1
        zero_point = np.zeros(1) if self.zero_point is None else self.zero_point
        value = ((self.quantized.astype(np.float64) - zero_point.astype(np.float64).reshape(shape))
                 * self.q_scale.astype(np.float64).reshape(shape))
        return value.astype(self.dtype)


@dataclass
class _QuantizedUpdate:
    """New DequantizeLinear inputs: per-axis scale and zero point, mirrored integers if any."""

    q_scale: np.ndarray
    zero_point: Optional[np.ndarray]
    quantized: Optional[np.ndarray]  # None: the integers stay as they are
    axis: int


@dataclass
class _BackwardFold:
    """BN folded into the layer before it (through an optional bias Add)."""

    bn: onnx.NodeProto
    layer: onnx.NodeProto
    weight: np.ndarray | _QuantizedUpdate
    dequantize: Optional[onnx.NodeProto]
    bias: np.ndarray
    add: Optional[onnx.NodeProto] = None
    add_constant_position: int = 1

    @property
    def pattern(self) -> str:
        weight = "DequantizeLinear->" if self.dequantize is not None else ""
        add = "->Add" if self.add is not None else ""
        return f"{weight}{self.layer.op_type}{add}->BN"

    def apply(self, editor: GraphEditor) -> None:
        bn, layer = self.bn, self.layer
        output = bn.output[0]
        base = layer.name or output
        if isinstance(self.weight, _QuantizedUpdate):
            _write_quantized_weight(editor, layer, self.dequantize, self.weight, base)
        else:
            editor.set_constant_input(layer, 1, self.weight, f"{base}.weight_folded")
        if layer.op_type == "MatMul":
            if self.add is None:  # a new Add of the folded bias takes over the BN's place and output
                add = onnx.helper.make_node("Add", [bn.input[0]], [output],
                                            name=editor.fresh_name(f"{base}.bias_add"))
                add = editor.replace_node(bn, add)
                editor.set_constant_input(add, 1, self.bias, f"{base}.bias_folded")
                return
            editor.set_constant_input(self.add, self.add_constant_position, self.bias, f"{base}.bias_folded")
            editor.remove_node(bn)
            editor.set_output(self.add, 0, output)
            return
        editor.set_constant_input(layer, 2, self.bias, f"{base}.bias_folded")
        if layer.op_type == "Gemm":
            editor.remove_attribute(layer, "beta")  # the folded C already carries beta: beta = 1
        if self.add is not None:
            editor.remove_node(self.add)
        editor.remove_node(bn)
        editor.set_output(layer, 0, output)


@dataclass
class _ForwardFold:
    """BN folded into the one layer that reads its output."""

    bn: onnx.NodeProto
    layer: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray

    @property
    def pattern(self) -> str:
        return f"BN->{self.layer.op_type}"

    def apply(self, editor: GraphEditor) -> None:
        bn, layer = self.bn, self.layer
        base = layer.name or layer.output[0]
        editor.set_constant_input(layer, 1, self.weight, f"{base}.weight_folded")
        if layer.op_type == "MatMul":  # MatMul has no bias: an Add of the folded bias follows it
            output = layer.output[0]
            editor.set_output(layer, 0, editor.fresh_name(f"{base}.unbiased"))
            bias = editor.add_initializer(self.bias, f"{base}.bias_folded")
            add = onnx.helper.make_node("Add", [layer.output[0], bias], [output],
                                        name=editor.fresh_name(f"{base}.bias_add"))
            editor.insert_node(add, after=layer)
        else:
            editor.set_constant_input(layer, 2, self.bias, f"{base}.bias_folded")
            if layer.op_type == "Gemm":
                editor.remove_attribute(layer, "beta")
        editor.set_input(layer, 0, bn.input[0])  # before removing the BN, whose input it reads
        editor.remove_node(bn)


def _write_quantized_weight(editor: GraphEditor, layer, dequantize, update: _QuantizedUpdate, base: str) -> None:
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


# ------------------------------------------------------------------------------------------------
# Checks: each returns what it found or raises _CannotFold with the reason, where it is found
# ------------------------------------------------------------------------------------------------


class _CannotFold(Exception):
    """Why a BN cannot fold (in one direction), in words for the user. Raised by the checks where
    the reason is found; :meth:`FoldBatchNormPass.call` catches it once, from :func:`plan_fold`."""


def plan_fold(bn: onnx.NodeProto, index: GraphIndex, context: _Context) -> _BackwardFold | _ForwardFold:
    """How ``bn`` folds: backward when it can, else forward; raises :class:`_CannotFold` with both
    reasons when it can do neither."""
    affine = check_batchnorm(bn, index, context.opset)
    try:
        return check_backward_fold(bn, affine, index, context)
    except _CannotFold as backward:
        try:
            return check_forward_fold(bn, affine, index, context)
        except _CannotFold as forward:
            raise _CannotFold(f"{backward}; nor can it fold into the layer after it: {forward}") from None


def check_batchnorm(bn: onnx.NodeProto, index: GraphIndex, opset: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` (float64, per channel) of an inference-mode per-channel BN."""
    if opset < 7:
        raise _CannotFold(f"opset {opset} BatchNormalization is not supported (opset 7 or later is)")
    if any(bn.output[1:]):
        raise _CannotFold("it computes training outputs (running mean/variance), so it runs in training mode")
    if attribute(bn, "training_mode", 0):
        raise _CannotFold("training_mode=1: it normalizes with batch statistics at inference")
    if attribute(bn, "spatial", 1) == 0:
        raise _CannotFold("spatial=0: per-activation statistics cannot fold into per-channel weights")
    params = []
    for position, label in enumerate(PARAM_NAMES, start=1):
        value = _float_constant(bn.input[position], f"its {label} '{bn.input[position]}'", index)
        if value is None:
            raise _CannotFold(f"its {label} '{bn.input[position]}' is not a constant")
        params.append(value)
    channels = params[2].size
    if any(p.size != channels for p in params):
        raise _CannotFold("its parameters have different sizes " + str([p.size for p in params]))
    epsilon = attribute(bn, "epsilon", 1e-5)
    with np.errstate(all="ignore"):
        scale, shift = folding.batchnorm_affine(*params, epsilon)
    bad = np.flatnonzero(~(np.isfinite(scale) & np.isfinite(shift)))
    if bad.size:
        raise _CannotFold(f"var + epsilon is not positive (or a parameter is not finite) for channel(s) {_few(bad)}")
    return scale, shift


# --- backward: into the layer producing the BN's input --------------------------------------------


def check_backward_fold(bn, affine, index: GraphIndex, context: _Context) -> _BackwardFold:
    """A plan to fold ``bn`` into the layer producing its input (maybe through a bias Add)."""
    scale, shift = affine
    layer, add, add_position, add_value = _backward_layer(bn, index)
    weight = _layer_weight(layer, index, context)
    bias = _layer_bias(layer, index)
    _check_output_channels(layer, weight.shape, bias, scale.size, context)
    total_bias = _bias_before_batchnorm(layer, weight, bias, add, add_position, add_value, scale.size)
    new_weight = _fold_backward_weight(layer, weight, scale)
    op, label = layer.op_type, node_label(layer)
    if op == "MatMul":  # its Add (the one there, or the one the fold writes) carries the bias
        bias_dtype = add_value.dtype if add is not None else weight.dtype
    else:
        bias_dtype = bias.dtype if bias is not None else add_value.dtype if add is not None else weight.dtype
    new_bias = _cast_finite(folding.fold_bias(total_bias, scale, shift), bias_dtype,
                            f"the folded bias of {op} '{label}'")
    if op == "MatMul" and add is not None and add_value.size == scale.size:
        new_bias = new_bias.reshape(add_value.shape)  # keep the Add's constant shape: (C,) or (1, C)
    return _BackwardFold(bn=bn, layer=layer, weight=new_weight,
                         dequantize=weight.dequantize if isinstance(weight, _QuantizedWeight) else None,
                         bias=new_bias, add=add, add_constant_position=add_position)


def _backward_layer(bn, index: GraphIndex) -> tuple[onnx.NodeProto, Optional[onnx.NodeProto], int,
                                                    Optional[np.ndarray]]:
    """``(layer, add, add constant position, add constant)``: the foldable layer producing the BN's
    input, directly (``add`` None) or through an Add of a constant, each intermediate read only once."""
    x = bn.input[0]
    producer = index.producers.get(x)
    if producer is None:
        if x in index.initializers and not index.is_overridable_input(x):
            raise _CannotFold(f"its input '{x}' is a constant, not the output of a layer")
        raise _CannotFold(f"its input '{x}' is a graph input, not the output of a layer")
    if producer.domain not in DEFAULT_DOMAINS:
        raise _CannotFold(f"its input comes from {producer.domain}.{producer.op_type} '{node_label(producer)}'")
    add, add_position, add_value = None, 1, None
    layer = producer
    if producer.op_type == "Add":
        add = producer
        layer, add_position, add_value = _match_bias_add(add, index)
    elif _is_dequantize(producer):
        raise _CannotFold(f"its input comes from DequantizeLinear '{node_label(producer)}': an activation quantized "
                          "after its layer cannot take a per-channel factor exactly; re-estimate and fold with "
                          "bnpass before quantizing activations")
    elif producer.op_type not in FOLDABLE_PRODUCERS:
        raise _CannotFold(f"its input comes from {producer.op_type} '{node_label(producer)}' "
                          "(folds only into Conv, ConvTranspose, Gemm or MatMul, or their output plus a constant)")
    if index.use_count(x) != 1:
        _raise_shared(x, producer, index)
    if add is not None and index.use_count(layer.output[0]) != 1:
        _raise_shared(layer.output[0], layer, index)
    return layer, add, add_position, add_value


def _raise_shared(name: str, producer, index: GraphIndex) -> None:
    if name in index.graph_outputs:
        raise _CannotFold(f"'{name}', the output of {node_label(producer)}, is also a graph output")
    raise _CannotFold(f"'{name}', the output of {node_label(producer)}, is also read by other nodes")


def _match_bias_add(add: onnx.NodeProto, index: GraphIndex) -> tuple[onnx.NodeProto, int, np.ndarray]:
    """``(layer, constant position, constant value)`` of an ``add`` that adds a float constant to
    the output of a foldable layer."""
    if len(add.input) == 2:
        for position in (1, 0):
            constant = index.constant(add.input[position])
            layer = index.producers.get(add.input[1 - position])
            if (constant is not None and layer is not None and layer.op_type in FOLDABLE_PRODUCERS
                    and layer.domain in DEFAULT_DOMAINS and np.issubdtype(constant.value.dtype, np.floating)):
                return layer, position, constant.value
    raise _CannotFold(f"its input comes from Add '{node_label(add)}', which does not add a constant to the output "
                      "of a Conv, ConvTranspose, Gemm or MatMul")


def _check_output_channels(layer, weight_shape, bias: Optional[np.ndarray], channels: int,
                           context: _Context) -> None:
    """The layer makes ``channels`` output channels along the BN's channel axis (and a Conv or
    ConvTranspose bias has one value each)."""
    op, label = layer.op_type, node_label(layer)
    if op == "Conv":
        out_channels = weight_shape[0]
    elif op == "ConvTranspose":
        out_channels = weight_shape[1] * attribute(layer, "group", 1)
    elif op == "Gemm":
        out_channels = weight_shape[0] if attribute(layer, "transB", 0) else weight_shape[1]
    else:
        _check_matmul_ranks(layer, weight_shape, layer.input[0], context, backward=True)
        out_channels = weight_shape[1]
    if out_channels != channels:
        raise _CannotFold(f"{op} '{label}' has {out_channels} output channels but the BN has {channels}")
    if op in ("Conv", "ConvTranspose") and bias is not None and bias.size != channels:
        raise _CannotFold(f"the bias of {op} '{label}' has {bias.size} values for {channels} channels")


def _bias_before_batchnorm(layer, weight, bias: Optional[np.ndarray], add, add_position: int,
                           add_value: Optional[np.ndarray], channels: int) -> Optional[np.ndarray]:
    """What the layer (and the Add) add per channel before the BN, in float64: the layer's own bias
    (Gemm: beta * C) plus the Add's constant; None when neither adds anything."""
    op = layer.op_type
    total_bias = None if bias is None else bias.astype(np.float64)
    if op == "Gemm" and total_bias is not None:
        total_bias = total_bias * np.float64(attribute(layer, "beta", 1.0))
    if add is None:
        return total_bias
    rank = len(weight.shape) if op in ("Conv", "ConvTranspose") else 2
    per_channel = folding.channel_vector(add_value, channels, rank=rank, axis=1)
    if per_channel is None:
        raise _CannotFold(f"the constant '{add.input[add_position]}' of shape {list(add_value.shape)} added by "
                          f"'{node_label(add)}' is not one value per channel of {op} '{node_label(layer)}''s "
                          f"rank-{rank} output")
    return per_channel if total_bias is None else total_bias + per_channel


def _fold_backward_weight(layer, weight: np.ndarray | _QuantizedWeight,
                          scale: np.ndarray) -> np.ndarray | _QuantizedUpdate:
    """The layer's weight with output channel c scaled by ``scale[c]``, in its own dtype (a
    quantized weight: new DequantizeLinear inputs)."""
    op, label = layer.op_type, node_label(layer)
    group = attribute(layer, "group", 1) if op == "ConvTranspose" else 1
    out_axis = _output_axis(layer)
    if isinstance(weight, _QuantizedWeight):
        if op == "ConvTranspose" and group != 1:
            raise _CannotFold(f"the weight of ConvTranspose '{label}' (group {group}) is quantized: its output "
                              "channels do not lie along one weight axis, so no per-axis scale can express the fold")
        return _fold_quantized_weight(weight, scale, out_axis, layer)
    return _cast_finite(folding.scale_output_channels(weight, scale, axis=out_axis, group=group),
                        weight.dtype, f"the folded weight of {op} '{label}'")


def _output_axis(layer) -> int:
    """The weight axis enumerating output channels (within a group, for ConvTranspose)."""
    if layer.op_type == "Conv":
        return 0
    if layer.op_type == "Gemm":
        return 0 if attribute(layer, "transB", 0) else 1
    return 1  # ConvTranspose (C_in, C_out/group, k...) and MatMul (K, N)


# --- forward: into the one layer reading the BN's output -------------------------------------------


def check_forward_fold(bn, affine, index: GraphIndex, context: _Context) -> _ForwardFold:
    """A plan to fold ``bn`` into the one layer reading its output."""
    scale, shift = affine
    layer = _forward_layer(bn, index)
    weight = _forward_weight(layer, index)
    bias = _layer_bias(layer, index)
    if layer.op_type == "Conv":
        new_weight, new_bias = _fold_into_following_conv(layer, weight, bias, scale, shift)
    elif layer.op_type == "Gemm":
        new_weight, new_bias = _fold_into_following_gemm(layer, weight, bias, scale, shift)
    else:
        _check_matmul_ranks(layer, weight.shape, bn.input[0], context, backward=False)
        if weight.shape[0] != scale.size:
            raise _CannotFold(f"MatMul '{node_label(layer)}' has {weight.shape[0]} input features but the BN "
                              f"has {scale.size}")
        new_weight, new_bias = folding.fold_matmul_input(weight, scale, shift)
    op, label = layer.op_type, node_label(layer)
    new_weight = _cast_finite(new_weight, weight.dtype, f"the folded weight of {op} '{label}'")
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    new_bias = _cast_finite(new_bias, bias_dtype, f"the folded bias of {op} '{label}'")
    return _ForwardFold(bn=bn, layer=layer, weight=new_weight, bias=new_bias)


def _forward_layer(bn, index: GraphIndex) -> onnx.NodeProto:
    """The one Conv, Gemm or MatMul reading the BN's output, as its data input."""
    y = bn.output[0]
    if y in index.graph_outputs:
        raise _CannotFold(f"its output '{y}' is a graph output")
    readers = index.consumers.get(y, [])
    if not readers:
        raise _CannotFold(f"nothing reads its output '{y}'")
    if index.use_count(y) != 1:
        raise _CannotFold(f"its output '{y}' is read by {index.use_count(y)} nodes or subgraph uses")
    layer = readers[0]
    op, label = layer.op_type, node_label(layer)
    if op not in FORWARD_LAYERS or layer.domain not in DEFAULT_DOMAINS:
        raise _CannotFold(f"its output goes to {op} '{label}' (folds forward only into Conv, Gemm or MatMul)")
    if layer.input[0] != y:
        raise _CannotFold(f"{op} '{label}' reads its output as a parameter, not as data")
    return layer


def _forward_weight(layer, index: GraphIndex) -> np.ndarray:
    """The float constant weight of a layer a BN folds forward into (a quantized one cannot take it)."""
    op, label, name = layer.op_type, node_label(layer), layer.input[1]
    weight = _float_constant(name, f"the weight of {op} '{label}'", index)
    if weight is not None:
        return weight
    if _is_dequantize(index.producers.get(name)):
        raise _CannotFold(f"the weight of {op} '{label}' is quantized: scaling its input channels cannot be "
                          "expressed in a per-output-channel DequantizeLinear scale")
    raise _CannotFold(f"the weight '{name}' of {op} '{label}' is not a constant")


def _fold_into_following_conv(conv, weight: np.ndarray, bias: Optional[np.ndarray], scale: np.ndarray,
                              shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    label, channels = node_label(conv), scale.size
    padding = _conv_padding(conv, weight)
    if padding:
        raise _CannotFold(f"Conv '{label}' pads its input ({padding}): a padded zero after the BN is not a zero "
                          "before it, so the fold would be wrong at the borders")
    group = attribute(conv, "group", 1)
    in_channels = weight.shape[1] * group
    if in_channels != channels:
        raise _CannotFold(f"Conv '{label}' has {in_channels} input channels but the BN has {channels}")
    return folding.fold_conv_input(weight, bias, scale, shift, group=group)


def _fold_into_following_gemm(gemm, weight: np.ndarray, bias: Optional[np.ndarray], scale: np.ndarray,
                              shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    label, channels = node_label(gemm), scale.size
    if attribute(gemm, "transA", 0):
        raise _CannotFold(f"Gemm '{label}' has transA=1: the BN channels become rows of the output, not weights")
    trans_b = bool(attribute(gemm, "transB", 0))
    in_channels = weight.shape[1] if trans_b else weight.shape[0]
    if in_channels != channels:
        raise _CannotFold(f"Gemm '{label}' has {in_channels} input features but the BN has {channels}")
    return folding.fold_gemm_input(weight, bias, scale, shift, trans_b=trans_b,
                                   alpha=attribute(gemm, "alpha", 1.0), beta=attribute(gemm, "beta", 1.0))


def _conv_padding(conv, weight: np.ndarray) -> str:
    """A description of the zero padding ``conv`` applies, or "" when it applies none."""
    auto_pad = attribute(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        kernel = attribute(conv, "kernel_shape", None) or list(weight.shape[2:])
        return "" if all(k == 1 for k in kernel) else f"auto_pad={auto_pad}"
    if auto_pad == "VALID":
        return ""
    pads = attribute(conv, "pads", None) or []
    return f"pads={list(pads)}" if any(pads) else ""


# --- shared by both directions --------------------------------------------------------------------


def _check_matmul_ranks(matmul, weight_shape, data: str, context: _Context, *, backward: bool) -> None:
    """A BN folds into a MatMul only with a 2-D weight and a rank-2 data input ``data``: then BN's
    channel axis 1 is the weight's output axis (BN after it) or its contracted axis (BN before)."""
    label = node_label(matmul)
    if len(weight_shape) != 2:
        raise _CannotFold(f"the weight of MatMul '{label}' has rank {len(weight_shape)}, not 2")
    rank = context.rank(data)
    if rank == 2:
        return
    if not backward:
        raise _CannotFold(f"MatMul '{label}' reads a rank-{rank if rank is not None else '?'} input, so the BN "
                          "channel axis is not the contracted axis")
    if rank is None:
        raise _CannotFold(f"the rank of '{data}', the input of MatMul '{label}', is unknown")
    raise _CannotFold(f"MatMul '{label}' has a rank-{rank} input, so the BN channel axis is not the weight's "
                      "output axis")


def _is_dequantize(node) -> bool:
    return node is not None and node.op_type == "DequantizeLinear" and node.domain in DEFAULT_DOMAINS


def _float_constant(name: str, what: str, index: GraphIndex) -> Optional[np.ndarray]:
    """The value of constant ``name`` (``what`` names it in messages), None when it is not a constant;
    a constant of another type than floating point cannot fold."""
    constant = index.constant(name)
    if constant is None:
        return None
    if not np.issubdtype(constant.value.dtype, np.floating):
        raise _CannotFold(f"{what} is {constant.value.dtype}, not floating point")
    return constant.value


def _layer_weight(layer, index: GraphIndex, context: _Context) -> np.ndarray | _QuantizedWeight:
    """The weight of a layer a BN folds backward into: a float constant, or a DequantizeLinear of constants."""
    op, label, name = layer.op_type, node_label(layer), layer.input[1]
    value = _float_constant(name, f"the weight of {op} '{label}'", index)
    if value is not None:
        return value
    dequantize = index.producers.get(name)
    if not _is_dequantize(dequantize):
        raise _CannotFold(f"the weight '{name}' of {op} '{label}' is not a constant")
    if context.opset < PER_AXIS_DEQUANTIZE_OPSET:
        raise _CannotFold(f"the weight of {op} '{label}' comes from DequantizeLinear '{node_label(dequantize)}', "
                          f"and a per-channel scale needs opset {PER_AXIS_DEQUANTIZE_OPSET} (the model imports "
                          f"opset {context.opset})")
    return _read_dequantize(dequantize, index, reader=f"the weight of {op} '{label}'")


def _layer_bias(layer, index: GraphIndex) -> Optional[np.ndarray]:
    """The layer's bias (Conv/ConvTranspose B, Gemm C) as a float constant, None when absent.

    A bias made by DequantizeLinear of constants is dequantized (exactly, in float64) and returned
    in the DequantizeLinear's output type: the folded bias is written in float.
    """
    if len(layer.input) < 3 or not layer.input[2]:
        return None
    name, label = layer.input[2], node_label(layer)
    value = _float_constant(name, f"the bias of '{label}'", index)
    if value is not None:
        return value
    dequantize = index.producers.get(name)
    if _is_dequantize(dequantize):
        try:
            return _read_dequantize(dequantize, index, reader=f"the bias of '{label}'").dequantized()
        except _CannotFold:
            pass  # whatever keeps it from being a constant, the user needs to know only that
    raise _CannotFold(f"the bias '{name}' of '{label}' is not a constant")


def _read_dequantize(dequantize, index: GraphIndex, *, reader: str) -> _QuantizedWeight:
    """``DequantizeLinear(q, q_scale, zero_point)`` of constants, per tensor or per axis (``reader``
    names the tensor it makes, in messages)."""
    dq_label = f"DequantizeLinear '{node_label(dequantize)}'"
    if attribute(dequantize, "block_size", 0):
        raise _CannotFold(f"{dq_label} uses blocked quantization")
    inputs = list(dequantize.input) + [""] * (3 - len(dequantize.input))
    constants = [index.constant(n) if n else None for n in inputs]
    if constants[0] is None or constants[1] is None or (inputs[2] and constants[2] is None):
        raise _CannotFold(f"the inputs of {dq_label}, which makes {reader}, are not all constants")
    quantized, q_scale, zero_point = (None if c is None else c.value for c in constants)
    if quantized.dtype not in QUANTIZED_WEIGHT_TYPES:
        raise _CannotFold(f"{dq_label} dequantizes {quantized.dtype} (bnpass folds int8/uint8/int16/uint16/int32 "
                          "weights)")
    if not np.issubdtype(q_scale.dtype, np.floating):
        raise _CannotFold(f"the scale of {dq_label} is {q_scale.dtype}")
    if q_scale.size == 1 and q_scale.ndim <= 1:
        axis = None
    elif q_scale.ndim == 1:
        axis = attribute(dequantize, "axis", 1)
        axis = axis + quantized.ndim if axis < 0 else axis
    else:
        raise _CannotFold(f"the scale of {dq_label} has shape {list(q_scale.shape)}")
    if zero_point is not None and zero_point.shape != q_scale.shape:
        raise _CannotFold(f"the zero point and scale of {dq_label} have different shapes")
    output_type = attribute(dequantize, "output_dtype", 0)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(output_type) if output_type else q_scale.dtype
    return _QuantizedWeight(dequantize=dequantize, quantized=quantized, q_scale=q_scale, zero_point=zero_point,
                            axis=axis, dtype=np.dtype(dtype))


def _fold_quantized_weight(weight: _QuantizedWeight, scale: np.ndarray, out_axis: int,
                           layer) -> _QuantizedUpdate:
    """New DequantizeLinear scale, zero point (and mirrored integers) for output channels along ``out_axis``."""
    dq_label = f"DequantizeLinear '{node_label(weight.dequantize)}'"
    channels = scale.size
    if weight.axis is not None and weight.axis != out_axis:
        raise _CannotFold(f"{dq_label} quantizes the weight of {layer.op_type} '{node_label(layer)}' per channel "
                          f"along axis {weight.axis}, but its output channels lie along axis {out_axis}")
    if weight.axis is not None and weight.q_scale.size != channels:
        raise _CannotFold(f"{dq_label} has {weight.q_scale.size} scales for {channels} channels")
    zero = np.flatnonzero(scale == 0)
    if zero.size:
        raise _CannotFold(f"gamma is 0 for channel(s) {_few(zero)}: the folded scale would be 0")
    q_scale = _cast_finite(folding.fold_quantized_scale(weight.q_scale, scale), weight.q_scale.dtype,
                           f"the folded scale of {dq_label}")
    if np.any(q_scale == 0):
        raise _CannotFold(f"the folded scale of {dq_label} underflows to 0 in {q_scale.dtype}")
    zero_point = None
    if weight.zero_point is not None:
        zero_point = np.broadcast_to(weight.zero_point.reshape(-1), (channels,)).astype(weight.zero_point.dtype)
    mirror = scale < 0
    quantized = None
    if mirror.any():
        quantized, overflowing = folding.mirror_quantized_channels(
            weight.quantized, 0 if zero_point is None else zero_point, mirror, axis=out_axis)
        if quantized is None:
            raise _CannotFold(f"the BN scale is negative for channel(s) {_few(np.flatnonzero(mirror))}; keeping the "
                              f"{dq_label} scale positive means mirroring those channels' integers around the zero "
                              f"point, which overflows {weight.quantized.dtype} in channel(s) {_few(overflowing)}")
    return _QuantizedUpdate(q_scale=q_scale, zero_point=zero_point, quantized=quantized, axis=out_axis)


def _cast_finite(value: np.ndarray, dtype, what: str) -> np.ndarray:
    """``value`` cast once to ``dtype``; the fold cannot be written when that is not finite (overflow)."""
    with np.errstate(all="ignore"):
        cast = np.asarray(value).astype(dtype)
    if not np.all(np.isfinite(cast)):
        raise _CannotFold(f"{what} is not finite in {np.dtype(dtype)} (overflow)")
    return cast


def _few(indices) -> str:
    indices = [int(i) for i in indices]
    return ", ".join(map(str, indices[:8])) + (f" ... ({len(indices)} in all)" if len(indices) > 8 else "")
