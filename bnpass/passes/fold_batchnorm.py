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
* a quantized weight, ``DequantizeLinear`` in any form the quantizers write
  (:mod:`bnpass.passes.fold_quantized_weight`): the fold is exact in the scale alone, along the
  weight's output-channel axis, and an int32 bias ``DequantizeLinear`` stays one.

**Activation quantization** (QDQ quantizers: ``Conv -> Q -> DQ -> BN -> Q -> DQ`` when BN was not
folded first, ``MatMul -> Q -> DQ -> Add``): an activation QuantizeLinear -> DequantizeLinear pair
before the BN, or between the layer and its bias Add, is looked through. By default the BN then
folds only when its own output is quantized again (``BN -> Q``, or ``BN -> Relu -> Q``), and the
pair is removed: the fold is exact in float, and what remains is the quantizer's layout for the
folded model (its pair after the BN rounds the folded layer). Elsewhere a per-channel factor cannot
pass the pair's per-tensor rounding exactly, and the BN stays. ``activation_pairs="keep"`` (the layer
correction of ``--reference``) keeps a pair between a MatMul and its Add, the factor going into the
weight before it and the shift into the Add's constant (a DequantizeLinear constant re-quantized in
its own per-tensor format). BN parameters behind DequantizeLinear of constants are read dequantized.

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

What varies by layer type (the weight's output axis, groups, bias slot, Gemm's beta, the forward fold)
is one :class:`LayerSpec` per type in the table :data:`LAYERS`; the checks and rewrites read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import onnx

from .. import folding
from ..graph import GraphIndex, is_batchnorm, node_label
from ..protos import DEFAULT_DOMAINS, attribute, default_opset, inferred_value_infos, rank_of
from ..quantized import PER_TENSOR
from ..rewrite import GraphEditor
from .base import Pass, PassContractError, PassResult, batchnorm_labels, copy_model
from .fold_quantized_weight import (
    BiasPlan,
    QuantizedUpdate,
    QuantizedWeight,
    fold_quantized_weight,
    is_dequantize,
    is_quantize,
    plan_quantized_bias,
    read_quantized,
    write_quantized_bias,
    write_quantized_weight,
)
from .fold_reasons import CannotFold, cast_finite, few

PARAM_NAMES = ("scale", "B", "input_mean", "input_var")


@dataclass
class FoldResult(PassResult):
    folded: list[tuple[str, str]] = field(default_factory=list)  # (bn name, layer name) per folded BN
    skipped: dict[str, str] = field(default_factory=dict)  # bn name -> reason it stayed
    patterns: dict[str, str] = field(default_factory=dict)  # bn name -> what it folded as: "Conv->Add->BN", "BN->Gemm"
    per_channel: list[str] = field(default_factory=list)  # layers whose per-tensor weight scale became per-channel
    float_biases: dict[str, str] = field(default_factory=dict)  # layer -> why its int32 bias was written in float
    # bn name -> the activation QuantizeLinear and DequantizeLinear removed with it (module docstring)
    removed_pairs: dict[str, tuple] = field(default_factory=dict)


class FoldBatchNormPass(Pass):
    """Fold every BatchNormalization that can be folded exactly (``only``: those of these node
    names); report the others.

    ``activation_pairs`` says what happens to an activation QuantizeLinear -> DequantizeLinear pair
    on the way from the layer to the BN (module docstring): ``"remove"`` (the default: the BN folds
    only when its own output is quantized again, and the pair goes) or ``"keep"`` (the pair stays,
    for a pair between a MatMul and its bias Add: the layer correction of ``--reference``, whose
    factor then reaches the pair's per-tensor rounding).

    ``keep_per_tensor``: a per-tensor quantized weight stays per-tensor, its folded values re-rounded
    on one scale (:mod:`~bnpass.passes.fold_quantized_weight`), instead of taking the fold exactly in
    a per-channel scale.
    """

    def __init__(self, only: Optional[set] = None, *, activation_pairs: str = "remove",
                 keep_per_tensor: bool = False):
        if activation_pairs not in ACTIVATION_PAIR_MODES:
            raise ValueError(f"activation_pairs must be one of {ACTIVATION_PAIR_MODES}, not {activation_pairs!r}")
        self.only = only
        self.activation_pairs = activation_pairs
        self.keep_per_tensor = keep_per_tensor

    def call(self, model: onnx.ModelProto) -> FoldResult:
        # A weightless copy is edited, reading values from ``model``; each payload is copied into
        # it once (GraphEditor.on_copy_of, build). Copy-then-overwrite would hold both weights (upb).
        editor = GraphEditor.on_copy_of(model)
        context = _Context(editor, self.activation_pairs, keep_per_tensor=self.keep_per_tensor)
        folded, reasons, patterns, removed_pairs = [], {}, {}, {}
        per_channel, float_biases = [], {}
        pending = [node for node in editor.graph.node
                   if is_batchnorm(node) and (self.only is None or node.name in self.only)]
        while pending:  # a fold can make another possible (BN -> BN -> Conv): repeat until none does
            remaining = []
            for bn in pending:
                try:
                    plan = plan_fold(bn, editor.index, context)
                except CannotFold as reason:
                    reasons[id(bn)] = str(reason)
                    remaining.append(bn)
                    continue
                folded.append((node_label(bn), node_label(plan.layer)))
                patterns[node_label(bn)] = plan.pattern
                if plan.removed_pairs:
                    removed_pairs[node_label(bn)] = tuple(node_label(node) for pair in plan.removed_pairs
                                                          for node in (pair.quantize, pair.dequantize))
                if plan.per_channel:
                    per_channel.append(node_label(plan.layer))
                if plan.bias_plan.why_float:
                    float_biases[node_label(plan.layer)] = plan.bias_plan.why_float
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
        return FoldResult(model=output, modified=bool(folded), folded=folded, skipped=skipped, patterns=patterns,
                          per_channel=per_channel, float_biases=float_biases, removed_pairs=removed_pairs)

    def ensures(self, result: FoldResult, model: onnx.ModelProto) -> None:
        """Every BN reported folded is gone, every other BN is still there, in the same order."""
        folded = {bn for bn, _ in result.folded}
        kept = [label for label in batchnorm_labels(model) if label not in folded]
        if batchnorm_labels(result.model) != kept:
            raise PassContractError(f"the output's BatchNormalization nodes are not the input's less the "
                                    f"{len(folded)} reported folded")
        if set(result.skipped) - set(kept):
            raise PassContractError(f"BatchNormalization '{min(set(result.skipped) - set(kept))}' is reported "
                                    "both folded and skipped")


class _Context:
    """Model-wide facts the checks need: the opset, tensor ranks from shape inference (lazily:
    only MatMul folds need them), what happens to activation Q/DQ pairs, and whether per-tensor
    quantized weights stay per-tensor."""

    def __init__(self, editor: GraphEditor, activation_pairs: str = "remove", *, keep_per_tensor: bool = False):
        self.editor = editor
        self.activation_pairs = activation_pairs
        self.keep_per_tensor = keep_per_tensor
        self.opset = default_opset(editor.model)
        self._value_infos: Optional[dict] = None

    def rank(self, name: str) -> Optional[int]:
        """The rank of tensor ``name`` (folds keep every tensor's shape, so one inference serves)."""
        if self._value_infos is None:
            self.editor.flush()  # shape inference reads the protobuf graph
            self._value_infos = inferred_value_infos(self.editor.model)
        return rank_of(self._value_infos, name)


# ------------------------------------------------------------------------------------------------
# Activation quantization: the QuantizeLinear -> DequantizeLinear pairs quantizers put after layers
# ------------------------------------------------------------------------------------------------

ACTIVATION_PAIR_MODES = ("remove", "keep")


@dataclass(frozen=True)
class ActivationPair:
    """``QuantizeLinear -> DequantizeLinear`` of an activation, as a QDQ quantizer writes it after a
    layer (``Conv -> Q -> DQ -> next``); the QuantizeLinear's output is read by its DequantizeLinear only."""

    quantize: onnx.NodeProto
    dequantize: onnx.NodeProto

    @property
    def input(self) -> str:
        return self.quantize.input[0]

    @property
    def output(self) -> str:
        return self.dequantize.output[0]

    @property
    def label(self) -> str:
        return f"QuantizeLinear '{node_label(self.quantize)}' -> DequantizeLinear '{node_label(self.dequantize)}'"

    def bypass(self, editor: GraphEditor) -> None:
        """Remove the pair: the one node reading its output reads its input instead."""
        index = editor.index
        reader, = index.consumers[self.output]
        editor.set_input(reader, list(reader.input).index(self.output), self.input)
        editor.remove_node(self.dequantize)
        editor.remove_node(self.quantize)


def activation_pair(name: str, index: GraphIndex) -> Optional[ActivationPair]:
    """The activation pair whose DequantizeLinear makes ``name``, None when ``name`` is not made so
    (a QuantizeLinear of a constant is a weight quantized at run time, not an activation)."""
    dequantize = index.producers.get(name)
    if not is_dequantize(dequantize) or not dequantize.input:
        return None
    quantize = index.producers.get(dequantize.input[0])
    if (not is_quantize(quantize) or index.sole_reader(quantize.output[0]) is not dequantize
            or index.constant(quantize.input[0]) is not None):
        return None
    return ActivationPair(quantize, dequantize)


def activation_pair_after(name: str, index: GraphIndex) -> Optional[ActivationPair]:
    """The activation pair that is the one reader of ``name`` (``layer -> Q -> DQ``), else None."""
    quantize = index.sole_reader(name)
    if not is_quantize(quantize):
        return None
    dequantize = index.sole_reader(quantize.output[0])
    pair = activation_pair(dequantize.output[0], index) if dequantize is not None else None
    return pair if pair is not None and pair.quantize is quantize else None


def _quantized_again(bn, pair: ActivationPair, layer, index: GraphIndex) -> None:
    """Removing ``pair`` is right only where the BN's output is quantized again (``BN -> Q`` or
    ``BN -> Relu -> Q``, as a quantizer writes for a model whose BN was folded first): the folded
    layer's output is then rounded by the quantizer's own pair for the folded model."""
    after = index.sole_reader(bn.output[0])
    if after is not None and after.op_type == "Relu" and after.domain in DEFAULT_DOMAINS:
        after = index.sole_reader(after.output[0])
    if is_quantize(after):
        return
    raise CannotFold(f"its input passes through the activation quantization {pair.label} after "
                     f"{layer.op_type} '{node_label(layer)}', and its own output is not quantized again: a per-channel "
                     "factor cannot pass that per-tensor rounding exactly, and removing it would leave the layer's "
                     "output unquantized")


# ------------------------------------------------------------------------------------------------
# Plans: what a checked fold writes. Values are final (folded, cast to their tensor's dtype).
# ------------------------------------------------------------------------------------------------


@dataclass
class _BackwardFold:
    """BN folded into the layer before it (through an optional bias Add)."""

    bn: onnx.NodeProto
    layer: onnx.NodeProto
    weight: np.ndarray | QuantizedUpdate
    quantized_weight: Optional[QuantizedWeight]
    bias: np.ndarray
    add: Optional[onnx.NodeProto] = None
    add_constant_position: int = 1
    bias_plan: BiasPlan = field(default_factory=BiasPlan)
    add_dequantize: Optional[QuantizedWeight] = None  # the Add's constant is DequantizeLinear of constants
    pair_after_layer: Optional[ActivationPair] = None  # layer -> Q -> DQ -> Add
    pair_before_batchnorm: Optional[ActivationPair] = None  # ... -> Q -> DQ -> BN
    remove_pairs: bool = False  # False: the pairs stay (activation_pairs="keep")

    @property
    def removed_pairs(self) -> tuple:
        if not self.remove_pairs:
            return ()
        return tuple(pair for pair in (self.pair_after_layer, self.pair_before_batchnorm) if pair is not None)

    @property
    def per_channel(self) -> bool:
        """A per-tensor weight scale became per-channel."""
        return isinstance(self.weight, QuantizedUpdate) and self.weight.per_channel

    @property
    def pattern(self) -> str:
        weight = "DequantizeLinear->" if self.quantized_weight is not None else ""
        after_layer = "->Q/DQ" if self.pair_after_layer is not None else ""
        add = "->Add" if self.add is not None else ""
        before = "->Q/DQ" if self.pair_before_batchnorm is not None else ""
        return f"{weight}{self.layer.op_type}{after_layer}{add}{before}->BN"

    def apply(self, editor: GraphEditor) -> None:
        for pair in self.removed_pairs:  # first: the rest then reads as a fold without them
            pair.bypass(editor)
        bn, layer = self.bn, self.layer
        output = bn.output[0]
        base = layer.name or output
        if isinstance(self.weight, QuantizedUpdate):
            write_quantized_weight(editor, layer, self.quantized_weight, self.weight, base)
        else:
            editor.set_constant_input(layer, 1, self.weight, f"{base}.weight_folded")
        spec = LAYERS[layer.op_type]
        if not spec.bias_slot:
            if self.add is None:  # a new Add of the folded bias takes over the BN's place and output
                add = onnx.helper.make_node("Add", [bn.input[0]], [output],
                                            name=editor.fresh_name(f"{base}.bias_add"))
                add = editor.replace_node(bn, add)
                editor.set_constant_input(add, 1, self.bias, f"{base}.bias_folded")
                return
            if self.add_dequantize is not None:  # re-quantized in the quantizer's own format
                integers, scale = requantized_constant(self.add_dequantize, self.bias, "the folded bias")
                dequantize = self.add_dequantize.dequantize
                editor.set_constant_input(dequantize, 0, integers, f"{base}.bias_quantized_folded")
                editor.set_constant_input(dequantize, 1, scale, f"{base}.bias_scale_folded")
            else:
                editor.set_constant_input(self.add, self.add_constant_position, self.bias, f"{base}.bias_folded")
            editor.remove_node(bn)
            editor.set_output(self.add, 0, output)
            return
        if self.bias_plan.quantized is not None:
            write_quantized_bias(editor, layer, self.bias_plan.quantized, base)
        else:
            editor.set_constant_input(layer, 2, self.bias, f"{base}.bias_folded")
        if spec.bias_scale:
            editor.remove_attribute(layer, spec.bias_scale)  # the folded C already carries beta: beta = 1
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
    per_channel = False  # a float weight: no quantization scheme to change
    bias_plan = BiasPlan()
    removed_pairs = ()

    @property
    def pattern(self) -> str:
        return f"BN->{self.layer.op_type}"

    def apply(self, editor: GraphEditor) -> None:
        bn, layer = self.bn, self.layer
        base = layer.name or layer.output[0]
        editor.set_constant_input(layer, 1, self.weight, f"{base}.weight_folded")
        spec = LAYERS[layer.op_type]
        if not spec.bias_slot:  # MatMul has no bias: an Add of the folded bias follows it
            output = layer.output[0]
            editor.set_output(layer, 0, editor.fresh_name(f"{base}.unbiased"))
            bias = editor.add_initializer(self.bias, f"{base}.bias_folded")
            add = onnx.helper.make_node("Add", [layer.output[0], bias], [output],
                                        name=editor.fresh_name(f"{base}.bias_add"))
            editor.insert_node(add, after=layer)
        else:
            editor.set_constant_input(layer, 2, self.bias, f"{base}.bias_folded")
            if spec.bias_scale:
                editor.remove_attribute(layer, spec.bias_scale)
        editor.set_input(layer, 0, bn.input[0])  # before removing the BN, whose input it reads
        editor.remove_node(bn)


# ------------------------------------------------------------------------------------------------
# Checks: each returns what it found or raises CannotFold with the reason, where it is found
# ------------------------------------------------------------------------------------------------


def plan_fold(bn: onnx.NodeProto, index: GraphIndex, context: _Context) -> _BackwardFold | _ForwardFold:
    """How ``bn`` folds: backward when it can, else forward; raises :class:`CannotFold` with both
    reasons when it can do neither."""
    affine = check_batchnorm(bn, index, context.opset)
    try:
        return check_backward_fold(bn, affine, index, context)
    except CannotFold as backward:
        try:
            return check_forward_fold(bn, affine, index, context)
        except CannotFold as forward:
            raise CannotFold(f"{backward}; nor can it fold into the layer after it: {forward}") from None


def backward_fold_refusal(bn: onnx.NodeProto, editor: GraphEditor) -> str:
    """Why ``bn`` cannot fold backward into the layer before it leaving every node but the BN as
    it is (a bias-less MatMul would need a new Add), or "" when it can."""
    context = _Context(editor, "keep")
    try:
        affine = check_batchnorm(bn, editor.index, context.opset)
        plan = check_backward_fold(bn, affine, editor.index, context)
    except CannotFold as reason:
        return str(reason)
    if not LAYERS[plan.layer.op_type].bias_slot and plan.add is None:
        return f"{plan.layer.op_type} '{node_label(plan.layer)}' has no bias Add to take the correction's bias"
    return ""


def layer_weight_refusal(layer: onnx.NodeProto, index: GraphIndex) -> str:
    """Why the weight of ``layer`` cannot be read for a fold, "" when it can."""
    try:
        _layer_weight(layer, index, _Context(GraphEditor(index.model)))
    except CannotFold as reason:
        return str(reason)
    return ""


def check_batchnorm(bn: onnx.NodeProto, index: GraphIndex, opset: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` (float64, per channel) of an inference-mode per-channel BN."""
    if opset < 7:
        raise CannotFold(f"opset {opset} BatchNormalization is not supported (opset 7 or later is)")
    if any(bn.output[1:]):
        raise CannotFold("it computes training outputs (running mean/variance), so it runs in training mode")
    if attribute(bn, "training_mode", 0):
        raise CannotFold("training_mode=1: it normalizes with batch statistics at inference")
    if attribute(bn, "spatial", 1) == 0:
        raise CannotFold("spatial=0: per-activation statistics cannot fold into per-channel weights")
    params = [batchnorm_parameter(bn, position, index) for position in range(1, 5)]
    channels = params[2].size
    if any(p.size != channels for p in params):
        raise CannotFold("its parameters have different sizes " + str([p.size for p in params]))
    epsilon = attribute(bn, "epsilon", 1e-5)
    with np.errstate(all="ignore"):
        scale, shift = folding.batchnorm_affine(*params, epsilon)
    bad = np.flatnonzero(~(np.isfinite(scale) & np.isfinite(shift)))
    if bad.size:
        raise CannotFold(f"var + epsilon is not positive (or a parameter is not finite) for channel(s) {few(bad)}")
    return scale, shift


def batchnorm_parameter(bn: onnx.NodeProto, position: int, index: GraphIndex) -> np.ndarray:
    """The value of BN parameter ``position`` (1 scale, 2 B, 3 mean, 4 var): a float constant, or
    ``DequantizeLinear`` of constants (as quantizers write a BN's scale and B) dequantized exactly in
    float64 and rounded once to the DequantizeLinear's output type, the value the BN reads. Raises
    :class:`CannotFold` with the reason when it is neither."""
    name = bn.input[position]
    what = f"its {PARAM_NAMES[position - 1]} '{name}'"
    value = _stored_operand(name, what, index) if activation_pair(name, index) is None else None
    if value is None:
        raise CannotFold(f"{what} is not a constant")
    return _values(value)


# --- backward: into the layer producing the BN's input --------------------------------------------


def check_backward_fold(bn, affine, index: GraphIndex, context: _Context) -> _BackwardFold:
    """A plan to fold ``bn`` into the layer producing its input (maybe through a bias Add)."""
    scale, shift = affine
    path = _backward_layer(bn, index, context)
    layer, add, add_position, add_value = path.layer, path.add, path.add_position, path.add_value
    weight = _layer_weight(layer, index, context)
    stored_bias = _layer_bias(layer, index)  # a quantized bias: its int32 DequantizeLinear may stay one
    bias = _values(stored_bias)
    _check_output_channels(layer, weight.shape, bias, scale.size, context)
    total_bias = _bias_before_batchnorm(layer, weight, bias, add, add_position, add_value, scale.size)
    new_weight = _fold_backward_weight(layer, weight, scale, keep_per_tensor=context.keep_per_tensor)
    op, label, spec = layer.op_type, node_label(layer), LAYERS[layer.op_type]
    if not spec.bias_slot:  # its Add (the one there, or the one the fold writes) carries the bias
        bias_dtype = add_value.dtype if add is not None else weight.dtype
    else:
        bias_dtype = bias.dtype if bias is not None else add_value.dtype if add is not None else weight.dtype
    exact_bias = folding.fold_bias(total_bias, scale, shift)
    new_bias = cast_finite(exact_bias, bias_dtype, f"the folded bias of {op} '{label}'")
    if not spec.bias_slot and add is not None and add_value.size == scale.size:
        new_bias = new_bias.reshape(add_value.shape)  # keep the Add's constant shape: (C,) or (1, C)
    bias_plan = BiasPlan()
    if spec.bias_slot:  # an int32 bias DequantizeLinear stays one, re-quantized
        bias_plan = plan_quantized_bias(layer, stored_bias if isinstance(stored_bias, QuantizedWeight) else None,
                                        index, exact_bias,
                                        new_weight if isinstance(new_weight, QuantizedUpdate) else None, scale.size)
    return _BackwardFold(bn=bn, layer=layer, weight=new_weight,
                         quantized_weight=weight if isinstance(weight, QuantizedWeight) else None,
                         bias=new_bias, add=add, add_constant_position=add_position, bias_plan=bias_plan,
                         add_dequantize=path.add_dequantize,
                         pair_after_layer=path.pair_after_layer, pair_before_batchnorm=path.pair_before_batchnorm,
                         remove_pairs=context.activation_pairs == "remove")


def _backward_layer(bn, index: GraphIndex, context: _Context) -> _BackwardPath:
    """The foldable layer producing the BN's input, directly or through an Add of a constant, each
    intermediate read only once; an activation Q/DQ pair may sit before the BN or between the layer
    and its Add (``context.activation_pairs`` says what the fold does with it)."""
    x = bn.input[0]
    producer = index.producers.get(x)
    if producer is None:
        if x in index.initializers and not index.is_overridable_input(x):
            raise CannotFold(f"its input '{x}' is a constant, not the output of a layer")
        raise CannotFold(f"its input '{x}' is a graph input, not the output of a layer")
    if producer.domain not in DEFAULT_DOMAINS and not is_dequantize(producer):  # onnxruntime's Q/DQ domain too
        raise CannotFold(f"its input comes from {producer.domain}.{producer.op_type} '{node_label(producer)}'")
    path = _BackwardPath(layer=producer)
    if is_dequantize(producer):
        path.pair_before_batchnorm = activation_pair(x, index)
        if path.pair_before_batchnorm is None:
            raise CannotFold(f"its input comes from DequantizeLinear '{node_label(producer)}', which does not "
                             "dequantize the output of a QuantizeLinear read by it alone")
        x = path.pair_before_batchnorm.input
        producer = index.producers.get(x)
        if producer is None or producer.domain not in DEFAULT_DOMAINS:
            raise CannotFold(f"its input is quantized by {path.pair_before_batchnorm.label} from '{x}', which is "
                             "not the output of a layer")
        path.layer = producer
    if producer.op_type == "Add":
        path.add = producer
        path.layer, path.add_position, constant, path.pair_after_layer = _match_bias_add(producer, index)
        path.add_value, path.add_dequantize = constant.value, constant.dequantize
    elif producer.op_type not in FOLDABLE_PRODUCERS:
        raise CannotFold(f"its input comes from {producer.op_type} '{node_label(producer)}' "
                         "(folds only into Conv, ConvTranspose, Gemm or MatMul, or their output plus a constant)")
    intermediates = [bn.input[0], x]  # x: the pair's input, when there is one
    if path.add is not None:
        intermediates.append(path.layer.output[0])
    shared = index.first_shared(intermediates)
    if shared is not None:
        also = "also a graph output" if shared in index.graph_outputs else "also read by other nodes"
        raise CannotFold(f"'{shared}', the output of {node_label(index.producers[shared])}, is {also}")
    _check_activation_pairs(bn, path, index, context)
    return path


@dataclass
class _BackwardPath:
    """How a BN's input comes from its layer: ``layer [-> Q -> DQ] [-> Add(constant)] [-> Q -> DQ] -> BN``."""

    layer: onnx.NodeProto
    add: Optional[onnx.NodeProto] = None
    add_position: int = 1
    add_value: Optional[np.ndarray] = None
    add_dequantize: Optional[QuantizedWeight] = None  # the Add's constant is DequantizeLinear of these
    pair_after_layer: Optional[ActivationPair] = None
    pair_before_batchnorm: Optional[ActivationPair] = None


def _check_activation_pairs(bn, path: _BackwardPath, index: GraphIndex, context: _Context) -> None:
    """Whether the fold can deal with the activation pairs on ``path`` in ``context``'s mode."""
    pairs = [pair for pair in (path.pair_after_layer, path.pair_before_batchnorm) if pair is not None]
    if not pairs:
        return
    if context.activation_pairs == "remove":
        _quantized_again(bn, pairs[-1], path.layer, index)
        return
    layer = path.layer
    if path.pair_before_batchnorm is not None:
        raise CannotFold(f"its input passes through the activation quantization {path.pair_before_batchnorm.label}: "
                         "a per-channel factor cannot pass that per-tensor rounding exactly")
    if LAYERS[layer.op_type].bias_slot and len(layer.input) > 2 and layer.input[2]:
        raise CannotFold(f"{layer.op_type} '{node_label(layer)}' has a bias before the activation quantization "
                         f"{path.pair_after_layer.label} and another in Add '{node_label(path.add)}' after it")


def _match_bias_add(add: onnx.NodeProto, index: GraphIndex) -> tuple[onnx.NodeProto, int, _AddConstant,
                                                                     Optional[ActivationPair]]:
    """``(layer, constant position, constant, activation pair)`` of an ``add`` that adds a float
    constant (or a dequantized one) to the output of a foldable layer, directly or through an activation Q/DQ pair
    (``MatMul -> Q -> DQ -> Add``, as onnxruntime's quantizer writes a MatMul and its bias)."""
    if len(add.input) == 2:
        for position in (1, 0):
            constant = add_constant(add.input[position], index)
            other = add.input[1 - position]
            pair = activation_pair(other, index)
            if pair is not None:
                if index.use_count(other) != 1:
                    continue
                other = pair.input
            layer = index.producers.get(other)
            if (constant is not None and layer is not None and layer.op_type in FOLDABLE_PRODUCERS
                    and layer.domain in DEFAULT_DOMAINS and np.issubdtype(constant.value.dtype, np.floating)):
                return layer, position, constant, pair
    raise CannotFold(f"its input comes from Add '{node_label(add)}', which does not add a constant to the output "
                     "of a Conv, ConvTranspose, Gemm or MatMul")


@dataclass(frozen=True)
class _AddConstant:
    """The constant an Add adds: a float constant, or ``DequantizeLinear`` of constants with a per-tensor
    scale (as onnxruntime's quantizer writes a MatMul's bias: int8, like a weight), dequantized."""

    value: np.ndarray
    dequantize: Optional[QuantizedWeight] = None


def add_constant(name: str, index: GraphIndex) -> Optional[_AddConstant]:
    """What ``name`` holds as an Add's constant operand, None when it is neither form."""
    constant = index.constant(name)
    if constant is not None:
        return _AddConstant(constant.value)
    dequantize = index.producers.get(name)
    if not is_dequantize(dequantize) or index.use_count(name) != 1 or activation_pair(name, index) is not None:
        return None
    try:
        quantized = read_quantized(dequantize, index, reader=f"the constant '{name}'")
    except CannotFold:
        return None
    if quantized.layout.kind != PER_TENSOR or quantized.quantize is not None or not quantized.storage.integer:
        return None
    return _AddConstant(quantized.dequantized(), quantized)


def requantized_constant(quantized: QuantizedWeight, value: np.ndarray, what: str) -> tuple:
    """``(integers, scale)`` for ``value`` in the per-tensor format of ``quantized`` (its integer type
    and zero point kept): the smallest scale whose grid holds every value, as a quantizer's min/max
    calibration gives it; each value then moves by at most half that scale."""
    low, high = int(quantized.storage.low), int(quantized.storage.high)
    zero_point = 0 if quantized.zero_point is None else int(np.asarray(quantized.zero_point).reshape(-1)[0])
    value = np.asarray(value, dtype=np.float64)
    largest, smallest = float(value.max(initial=0.0)), float(value.min(initial=0.0))
    bounds = [largest / (high - zero_point) if high > zero_point else 0.0,
              smallest / (low - zero_point) if low < zero_point else 0.0]
    scale = max(bounds)
    if scale == 0:
        scale = float(np.asarray(quantized.q_scale).reshape(-1)[0])
    scale = cast_finite(np.asarray(scale).reshape(quantized.q_scale.shape), quantized.q_scale.dtype, what)
    integers = np.clip(np.round(value / np.float64(scale.reshape(-1)[0])) + zero_point, low, high)
    return integers.astype(quantized.stored.dtype).reshape(quantized.stored.shape), scale


def _check_output_channels(layer, weight_shape, bias: Optional[np.ndarray], channels: int,
                           context: _Context) -> None:
    """The layer makes ``channels`` output channels along the BN's channel axis (and a Conv or
    ConvTranspose bias has one value each)."""
    op, label, spec = layer.op_type, node_label(layer), LAYERS[layer.op_type]
    if spec.rank_2_data:
        _check_matmul_ranks(layer, weight_shape, layer.input[0], context, backward=True)
    out_channels = weight_shape[spec.output_axis(layer)] * spec.output_groups(layer)
    if out_channels != channels:
        raise CannotFold(f"{op} '{label}' has {out_channels} output channels but the BN has {channels}")
    if spec.per_channel_bias and bias is not None and bias.size != channels:
        raise CannotFold(f"the bias of {op} '{label}' has {bias.size} values for {channels} channels")


def _bias_before_batchnorm(layer, weight, bias: Optional[np.ndarray], add, add_position: int,
                           add_value: Optional[np.ndarray], channels: int) -> Optional[np.ndarray]:
    """What the layer (and the Add) add per channel before the BN, in float64: the layer's own bias
    (Gemm: beta * C) plus the Add's constant; None when neither adds anything."""
    op, spec = layer.op_type, LAYERS[layer.op_type]
    total_bias = None if bias is None else bias.astype(np.float64)
    if spec.bias_scale and total_bias is not None:
        total_bias = total_bias * np.float64(attribute(layer, spec.bias_scale, 1.0))
    if add is None:
        return total_bias
    rank = len(weight.shape) if spec.spatial else 2
    per_channel = folding.channel_vector(add_value, channels, rank=rank, axis=1)
    if per_channel is None:
        raise CannotFold(f"the constant '{add.input[add_position]}' of shape {list(add_value.shape)} added by "
                         f"'{node_label(add)}' is not one value per channel of {op} '{node_label(layer)}''s "
                         f"rank-{rank} output")
    return per_channel if total_bias is None else total_bias + per_channel


def _fold_backward_weight(layer, weight: np.ndarray | QuantizedWeight, scale: np.ndarray, *,
                          keep_per_tensor: bool = False) -> np.ndarray | QuantizedUpdate:
    """The layer's weight with output channel c scaled by ``scale[c]``, in its own dtype (a
    quantized weight: new DequantizeLinear inputs)."""
    op, label, spec = layer.op_type, node_label(layer), LAYERS[layer.op_type]
    group = spec.output_groups(layer)
    out_axis = spec.output_axis(layer)
    if isinstance(weight, QuantizedWeight):
        if group != 1:
            raise CannotFold(f"the weight of {op} '{label}' (group {group}) is quantized: its output "
                             "channels do not lie along one weight axis, so no per-axis scale can express the fold")
        return fold_quantized_weight(weight, scale, out_axis, layer, keep_per_tensor=keep_per_tensor)
    return cast_finite(folding.scale_output_channels(weight, scale, axis=out_axis, group=group),
                       weight.dtype, f"the folded weight of {op} '{label}'")


# --- forward: into the one layer reading the BN's output -------------------------------------------


def check_forward_fold(bn, affine, index: GraphIndex, context: _Context) -> _ForwardFold:
    """A plan to fold ``bn`` into the one layer reading its output."""
    scale, shift = affine
    layer = _forward_layer(bn, index)
    weight = _forward_weight(layer, index)
    stored_bias = _layer_bias(layer, index)
    bias = _values(stored_bias)
    new_weight, new_bias = LAYERS[layer.op_type].fold_input(layer, weight, bias, scale, shift,
                                                            data=bn.input[0], context=context)
    op, label = layer.op_type, node_label(layer)
    new_weight = cast_finite(new_weight, weight.dtype, f"the folded weight of {op} '{label}'")
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    new_bias = cast_finite(new_bias, bias_dtype, f"the folded bias of {op} '{label}'")
    return _ForwardFold(bn=bn, layer=layer, weight=new_weight, bias=new_bias)


def _forward_layer(bn, index: GraphIndex) -> onnx.NodeProto:
    """The one Conv, Gemm or MatMul reading the BN's output, as its data input."""
    y = bn.output[0]
    if y in index.graph_outputs:
        raise CannotFold(f"its output '{y}' is a graph output")
    readers = index.consumers.get(y, [])
    if not readers:
        raise CannotFold(f"nothing reads its output '{y}'")
    if index.use_count(y) != 1:
        raise CannotFold(f"its output '{y}' is read by {index.use_count(y)} nodes or subgraph uses")
    layer = readers[0]
    op, label = layer.op_type, node_label(layer)
    if op not in FORWARD_LAYERS or layer.domain not in DEFAULT_DOMAINS:
        raise CannotFold(f"its output goes to {op} '{label}' (folds forward only into Conv, Gemm or MatMul)")
    if layer.input[0] != y:
        raise CannotFold(f"{op} '{label}' reads its output as a parameter, not as data")
    return layer


def _forward_weight(layer, index: GraphIndex) -> np.ndarray:
    """The float constant weight of a layer a BN folds forward into (a quantized one cannot take it)."""
    op, label, name = layer.op_type, node_label(layer), layer.input[1]
    weight = _float_constant(name, f"the weight of {op} '{label}'", index)
    if weight is not None:
        return weight
    if is_dequantize(index.producers.get(name)):
        raise CannotFold(f"the weight of {op} '{label}' is quantized: scaling its input channels cannot be "
                         "expressed in a per-output-channel DequantizeLinear scale")
    raise CannotFold(f"the weight '{name}' of {op} '{label}' is not a constant")


def _fold_into_following_conv(conv, weight: np.ndarray, bias: Optional[np.ndarray], scale: np.ndarray,
                              shift: np.ndarray, **_) -> tuple[np.ndarray, np.ndarray]:
    label, channels = node_label(conv), scale.size
    padding = _conv_padding(conv, weight)
    if padding:
        raise CannotFold(f"Conv '{label}' pads its input ({padding}): a padded zero after the BN is not a zero "
                         "before it, so the fold would be wrong at the borders")
    group = attribute(conv, "group", 1)
    in_channels = weight.shape[1] * group
    if in_channels != channels:
        raise CannotFold(f"Conv '{label}' has {in_channels} input channels but the BN has {channels}")
    return folding.fold_conv_input(weight, bias, scale, shift, group=group)


def _fold_into_following_gemm(gemm, weight: np.ndarray, bias: Optional[np.ndarray], scale: np.ndarray,
                              shift: np.ndarray, **_) -> tuple[np.ndarray, np.ndarray]:
    label, channels = node_label(gemm), scale.size
    if attribute(gemm, "transA", 0):
        raise CannotFold(f"Gemm '{label}' has transA=1: the BN channels become rows of the output, not weights")
    trans_b = bool(attribute(gemm, "transB", 0))
    in_channels = weight.shape[1] if trans_b else weight.shape[0]
    if in_channels != channels:
        raise CannotFold(f"Gemm '{label}' has {in_channels} input features but the BN has {channels}")
    return folding.fold_gemm_input(weight, bias, scale, shift, trans_b=trans_b,
                                   alpha=attribute(gemm, "alpha", 1.0), beta=attribute(gemm, "beta", 1.0))


def _fold_into_following_matmul(matmul, weight: np.ndarray, bias: None, scale: np.ndarray, shift: np.ndarray, *,
                                data: str, context: _Context) -> tuple[np.ndarray, np.ndarray]:
    _check_matmul_ranks(matmul, weight.shape, data, context, backward=False)
    if weight.shape[0] != scale.size:
        raise CannotFold(f"MatMul '{node_label(matmul)}' has {weight.shape[0]} input features but the BN "
                         f"has {scale.size}")
    return folding.fold_matmul_input(weight, scale, shift)


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
        raise CannotFold(f"the weight of MatMul '{label}' has rank {len(weight_shape)}, not 2")
    rank = context.rank(data)
    if rank == 2:
        return
    if not backward:
        raise CannotFold(f"MatMul '{label}' reads a rank-{rank if rank is not None else '?'} input, so the BN "
                         "channel axis is not the contracted axis")
    if rank is None:
        raise CannotFold(f"the rank of '{data}', the input of MatMul '{label}', is unknown")
    raise CannotFold(f"MatMul '{label}' has a rank-{rank} input, so the BN channel axis is not the weight's "
                     "output axis")


def _float_constant(name: str, what: str, index: GraphIndex) -> Optional[np.ndarray]:
    """The value of constant ``name`` (``what`` names it in messages), None when it is not a constant;
    a constant of another type than floating point cannot fold."""
    constant = index.constant(name)
    if constant is None:
        return None
    if not np.issubdtype(constant.value.dtype, np.floating):
        raise CannotFold(f"{what} is {constant.value.dtype}, not floating point")
    return constant.value


def _stored_operand(name: str, what: str, index: GraphIndex) -> np.ndarray | QuantizedWeight | None:
    """What input ``name`` holds when it is stored: a float constant's value, or the quantized tensor
    its DequantizeLinear makes (:func:`~bnpass.passes.fold_quantized_weight.read_quantized`, which raises
    what cannot be read); None when it is neither. ``what`` names it in messages."""
    value = _float_constant(name, what, index)
    if value is not None:
        return value
    dequantize = index.producers.get(name)
    return read_quantized(dequantize, index, reader=what) if is_dequantize(dequantize) else None


def _values(stored: np.ndarray | QuantizedWeight | None) -> Optional[np.ndarray]:
    """What a stored operand (:func:`_stored_operand`) computes: a quantized tensor dequantized (exactly,
    in its DequantizeLinear's output type), a float constant as it is."""
    return stored.dequantized() if isinstance(stored, QuantizedWeight) else stored


def _layer_weight(layer, index: GraphIndex, context: _Context) -> np.ndarray | QuantizedWeight:
    """The weight of a layer a BN folds backward into: a float constant, or a quantized tensor
    (:func:`~bnpass.passes.fold_quantized_weight.read_quantized`)."""
    op, label, name = layer.op_type, node_label(layer), layer.input[1]
    weight = _stored_operand(name, f"the weight of {op} '{label}'", index)
    if weight is None:
        raise CannotFold(f"the weight '{name}' of {op} '{label}' is not a constant")
    if (isinstance(weight, QuantizedWeight) and weight.quantize is not None
            and not index.is_private_to(weight.dequantize.output[0], layer)):
        raise CannotFold(f"the weight of {op} '{label}' is quantized at run time by QuantizeLinear "
                         f"'{node_label(weight.quantize)}', whose DequantizeLinear is also read by other nodes")
    return weight


def _layer_bias(layer, index: GraphIndex) -> np.ndarray | QuantizedWeight | None:
    """The layer's bias (Conv/ConvTranspose B, Gemm C) as stored: a float constant, or a quantized tensor
    (:func:`~bnpass.passes.fold_quantized_weight.read_quantized`, which raises the reason one cannot be
    read); None when absent."""
    if len(layer.input) < 3 or not layer.input[2]:
        return None
    name, label = layer.input[2], node_label(layer)
    value = _stored_operand(name, f"the bias of '{label}'", index)
    if value is None:
        raise CannotFold(f"the bias '{name}' of '{label}' is not a constant")
    return value


# ------------------------------------------------------------------------------------------------
# Layer types: what the fold needs to know about each, in one table
# ------------------------------------------------------------------------------------------------


def _no_groups(layer) -> int:
    return 1


@dataclass(frozen=True)
class LayerSpec:
    """One layer type a BN folds into.

    ``output_axis(layer)``: the weight axis enumerating output channels (within a group);
    ``output_groups(layer)``: how many groups of output channels that axis holds (ConvTranspose's
    weight is (C_in, C_out/group, k...)), so that C_out = weight.shape[output_axis] * output_groups;
    ``bias_slot``: input 2 is the bias (False: MatMul, whose bias is an Add after it);
    ``per_channel_bias``: that bias has one value per output channel (Gemm's C broadcasts);
    ``bias_scale``: the attribute that scales the bias (Gemm's beta), dropped once the folded bias carries it;
    ``spatial``: the output has the weight's rank (N, C, D1...), else rank 2;
    ``rank_2_data``: the fold needs a rank-2 data input (MatMul: then BN's channel axis 1 is the weight's);
    ``fold_input``: folds a BN *before* the layer (forward), None when the layer cannot take one.
    """

    output_axis: Callable[[onnx.NodeProto], int]
    output_groups: Callable[[onnx.NodeProto], int] = _no_groups
    bias_slot: bool = True
    per_channel_bias: bool = False
    bias_scale: Optional[str] = None
    spatial: bool = False
    rank_2_data: bool = False
    fold_input: Optional[Callable] = None


LAYERS = {
    "Conv": LayerSpec(output_axis=lambda layer: 0, per_channel_bias=True, spatial=True,
                      fold_input=_fold_into_following_conv),
    "ConvTranspose": LayerSpec(output_axis=lambda layer: 1, output_groups=lambda layer: attribute(layer, "group", 1),
                               per_channel_bias=True, spatial=True),
    "Gemm": LayerSpec(output_axis=lambda layer: 0 if attribute(layer, "transB", 0) else 1, bias_scale="beta",
                      fold_input=_fold_into_following_gemm),
    "MatMul": LayerSpec(output_axis=lambda layer: 1, bias_slot=False, rank_2_data=True,
                        fold_input=_fold_into_following_matmul),
}
FOLDABLE_PRODUCERS = tuple(LAYERS)
FORWARD_LAYERS = tuple(op for op, spec in LAYERS.items() if spec.fold_input is not None)
