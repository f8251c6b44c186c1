"""Layer correction for ``--reference``: layers without BN matched to the uncompressed model too.

Most exported models have no BN left (torch's default exporter and TensorFlow's converters fold it
into the layer before it), so compression shifts each layer's output with nothing to re-estimate.
Given the uncompressed model, each such layer output x (per channel c) is corrected to have, on the
calibration data, the mean m_o and variance v_o the uncompressed layer's output has::

    y = (x - m_c) * sqrt(v_o / v_c) + m_o

with (m_c, v_c) the compressed output's moments measured with every earlier layer already corrected.
That is a BN matched to the reference (:mod:`bnpass.matching`) whose reference BN is the identity:
for every Conv, ConvTranspose, Gemm or MatMul output that no BN reads, both models get an inserted
BatchNormalization with gamma 1, beta 0, mean 0, var 1 - e (y = x up to rounding), and the BN
matching of :class:`~bnpass.passes.match_reference.MatchReferencePass` matches those BNs with the
model's own, in the same pass over the data. The inserted BNs are then folded into their layers
(:class:`~bnpass.passes.FoldBatchNormPass`, quantized weights as that pass folds them), so the
output has exactly the input's nodes; only weights and biases change (a Conv or Gemm without bias
gains one). A MatMul is corrected where a constant bias Add follows it (the BN goes after the Add);
a layer whose BN could not fold backward is left out, with the reason.

**Near-dead channels.** Compression can all but kill a channel (coarse per-tensor grids, heavy
pruning): v_c is then tiny and the gain sqrt(v_o / v_c) amplifies what is left, mostly noise. The
inserted BNs cap that gain at :data:`MAX_GAIN` (the BOUNDED rule of :mod:`bnpass.matching`: the
ratio v_c / v_o is taken as at least 1 / MAX_GAIN^2); the channel's mean is still matched exactly.
The README's "Models without BatchNormalization" section gives the measurements behind the value.

**Pairing.** Layers correspond as BNs do (:func:`pair_by_name`: by node name when both
models name every such layer, uniquely, with the same set of names; else by order). Paired layers
must have the same operator and weight shape (a quantized weight: the shape of its
DequantizeLinear's input), so a QDQ model pairs with its float original; the first difference is a
ModelError naming both layers. A layer whose weight cannot be read (on either side) pairs by
operator alone and is left uncorrected with the reason: only a difference of architecture (operator,
readable weight shape, count) stops the run.

**Activation quantization.** QDQ quantizers write ``layer -> Q -> DQ -> next`` and, for a MatMul,
``MatMul -> Q -> DQ -> Add(bias)``. The correction point is the layer's output before its Q (the
inserted BN then sits between the layer and the Q), or the bias Add's output; the correction folds
into the layer's weight (before the Q) and its bias or the Add's constant, and the pair stays
(:class:`~bnpass.passes.FoldBatchNormPass` with ``activation_pairs="keep"``), with the range the
quantizer calibrated on the uncompressed model, whose output moments the correction restores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx

from ..errors import ModelError
from ..graph import GraphIndex, is_batchnorm, node_label
from ..protos import DEFAULT_DOMAINS
from ..rewrite import GraphEditor
from .base import copy_model
from .fold_batchnorm import (
    LAYERS,
    activation_pair_after,
    add_constant,
    backward_fold_refusal,
    layer_weight_refusal,
)
from .fold_quantized_weight import is_dequantize, is_quantize

LAYER_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
EPSILON = 1e-5
MAX_GAIN = 4.0  # the near-dead-channel bound (module docstring)
PREFIX = "bnpass_correction"


@dataclass(frozen=True)
class Layer:
    """A layer output to correct: the layer's label, its operator and weight shape, and the tensor
    the inserted BN reads (the layer's output, or a MatMul's bias Add's)."""

    label: str
    op_type: str
    weight_shape: Optional[tuple]
    point: str
    channels: Optional[int]
    dtype: np.dtype
    unreadable: str = ""  # why its weight cannot be read, when it cannot ("" when it can)


def layers_without_batchnorm(model: onnx.ModelProto) -> list:
    """Every Conv, ConvTranspose, Gemm or MatMul whose output (or bias Add's) no BN reads, in node order."""
    index = GraphIndex(model)
    layers = []
    for node in model.graph.node:
        if node.op_type not in LAYER_TYPES or node.domain not in DEFAULT_DOMAINS:
            continue
        point = node.output[0]
        readers = _readers(point, index)
        if node.op_type == "MatMul" and len(readers) == 1 and readers[0].op_type == "Add" and (
                any(add_constant(name, index) is not None for name in readers[0].input)):
            point = readers[0].output[0]  # MatMul [-> Q -> DQ] -> Add(bias): the BN goes after the Add
        if any(is_batchnorm(reader) for reader in _readers(point, index)) or any(
                reader.op_type == "Add" and any(is_batchnorm(after) for after in _readers(reader.output[0], index))
                for reader in readers):
            continue
        shape, dtype = _weight(node, index)
        channels = None
        if shape is not None:
            spec = LAYERS[node.op_type]
            axis = spec.output_axis(node)
            channels = shape[axis] * spec.output_groups(node) if axis < len(shape) else None
        unreadable = "" if channels else (layer_weight_refusal(node, index) or "its weight is not a constant")
        layers.append(Layer(node_label(node), node.op_type, shape, point, channels, dtype, unreadable))
    return layers


def _readers(name: str, index: GraphIndex) -> list:
    """The nodes reading ``name``, or, where an activation Q/DQ pair is its one reader (as QDQ
    quantizers write after a layer), the nodes reading the pair's output."""
    pair = activation_pair_after(name, index)
    return index.consumers.get(pair.output if pair is not None else name, [])


def _weight(layer: onnx.NodeProto, index: GraphIndex) -> tuple:
    """(shape, dtype) of a layer's weight, quantized or not; (None, float32) when not a constant.

    A quantized weight has the shape of what its DequantizeLinear reads, whatever the storage (int8,
    int4, float8, either domain), or, quantized at run time, of the float constant its QuantizeLinear
    reads; its dtype is the scale's.
    """
    if len(layer.input) < 2:
        return None, np.dtype(np.float32)
    constant = index.constant(layer.input[1])
    if constant is not None:
        return tuple(constant.value.shape), constant.value.dtype
    producer = index.producers.get(layer.input[1])
    if is_dequantize(producer):
        stored = index.constant(producer.input[0])
        quantize = index.producers.get(producer.input[0])
        if stored is None and is_quantize(quantize):
            stored = index.constant(quantize.input[0])
        scale = index.constant(producer.input[1]) if len(producer.input) > 1 else None
        if stored is not None:
            return tuple(stored.value.shape), (scale.value.dtype if scale is not None else np.dtype(np.float32))
    return None, np.dtype(np.float32)


def pair_by_name(names: list, reference_names: list) -> list:
    """For each of ``names`` (a model's nodes), the position of its partner in ``reference_names`` (the
    reference's): by name when both name every node, uniquely, with the same set of names; otherwise by
    order, the i-th with the i-th (as many as the shorter list holds)."""
    if all(names) and len(set(names)) == len(names) and set(names) == set(reference_names):
        where = {name: position for position, name in enumerate(reference_names)}
        return [where[name] for name in names]
    return list(range(min(len(names), len(reference_names))))


def pair_layers(mine: list, theirs: list) -> list:
    """``[(layer of the model, layer of the reference)]`` (module docstring); a ModelError names the first
    difference."""
    prefix = "the reference does not correspond to the model:"
    partners = pair_by_name([layer.label for layer in mine], [layer.label for layer in theirs])
    pairs = [(mine[position], theirs[partner]) for position, partner in enumerate(partners)]
    for position, (layer, other) in enumerate(pairs):
        readable = layer.weight_shape is not None and other.weight_shape is not None
        if layer.op_type != other.op_type or (readable and layer.weight_shape != other.weight_shape):
            raise ModelError(f"{prefix} layer #{position + 1} without BatchNormalization is {layer.op_type} "
                             f"'{layer.label}' with weight {_shape(layer)} in the model, {other.op_type} "
                             f"'{other.label}' with weight {_shape(other)} in the reference")
    if len(mine) != len(theirs):
        longer, which = (mine, "model") if len(mine) > len(theirs) else (theirs, "reference")
        extra = longer[min(len(mine), len(theirs))]
        raise ModelError(f"{prefix} the model has {len(mine)} Conv/ConvTranspose/Gemm/MatMul layers without "
                         f"BatchNormalization, the reference {len(theirs)}; the first without a partner is "
                         f"{extra.op_type} '{extra.label}' in the {which}")
    return pairs


def _shape(layer: Layer) -> str:
    return "not a constant" if layer.weight_shape is None else str(list(layer.weight_shape))


@dataclass(frozen=True)
class BatchNormSite:
    """A BN of the model itself, by its position among the model's BNs (node order)."""

    position: int


@dataclass(frozen=True)
class LayerSite:
    """The identity BN inserted after a layer without BN, by the layer's label."""

    label: str


@dataclass
class Augmented:
    """A copy of a model with an identity BN after each layer to correct (:func:`insert_identity_batchnorms`).

    ``sites``: one per BN of ``model``, in node order, a :class:`BatchNormSite` or a :class:`LayerSite`;
    ``inserted``: ``{layer label: name of its inserted BN}``."""

    model: onnx.ModelProto
    sites: list
    inserted: dict

    def position_of(self) -> dict:
        """``{site: position among the copy's BNs}``."""
        return {site: position for position, site in enumerate(self.sites)}


def insert_identity_batchnorms(model: onnx.ModelProto, layers: list) -> Augmented:
    """A copy of ``model`` with an identity BN after each of ``layers`` (module docstring), made through
    a :class:`~bnpass.rewrite.GraphEditor` of the copy. The inserted BNs are named
    ``bnpass_correction/<layer>``."""
    copy = copy_model(model)  # nothing stored is overwritten: one copy of each weight either way
    editor = GraphEditor(copy)
    inserts = []
    for layer in layers:
        inner = editor.fresh_name(f"{layer.point}.uncorrected")
        channels = layer.channels
        parameters = [np.ones(channels), np.zeros(channels), np.zeros(channels), np.full(channels, 1 - EPSILON)]
        inputs = [inner] + [editor.add_initializer(value.astype(layer.dtype), f"{PREFIX}/{layer.label}.{what}")
                            for value, what in zip(parameters, ("scale", "B", "mean", "var"))]
        bn = onnx.helper.make_node("BatchNormalization", inputs, [layer.point],
                                   name=editor.fresh_name(f"{PREFIX}/{layer.label}"), epsilon=EPSILON)
        inserts.append((layer.point, bn))
    editor.insert_on_outputs(inserts)
    inserted = {layer.label: bn.name for layer, (_, bn) in zip(layers, inserts)}
    label_of = {name: label for label, name in inserted.items()}
    sites, position = [], 0
    for node in copy.graph.node:
        if node.name in label_of:
            sites.append(LayerSite(label_of[node.name]))
        elif is_batchnorm(node):
            sites.append(BatchNormSite(position))
            position += 1
    return Augmented(copy, sites, inserted)


def foldable_layers(model: onnx.ModelProto, layers: list) -> tuple:
    """``(kept, refused)``: the layers whose inserted BN folds backward leaving every other node as it
    is, and ``{label: reason}`` for the others (a layer whose weight cannot be read: why)."""
    readable = [layer for layer in layers if layer.channels]
    augmented = insert_identity_batchnorms(model, readable)
    editor = GraphEditor(augmented.model)
    bns = {node.name: node for node in augmented.model.graph.node if is_batchnorm(node)}
    kept, refused = [], {}
    for layer in layers:
        reason = (backward_fold_refusal(bns[augmented.inserted[layer.label]], editor) if layer.channels
                  else layer.unreadable)
        if reason:
            refused[layer.label] = reason
        else:
            kept.append(layer)
    return kept, refused


def logits_layer(model: onnx.ModelProto, layers: list) -> Optional[str]:
    """The label of the last of ``layers`` when no other Conv/ConvTranspose/Gemm/MatMul or BN comes
    after it in node order (the model's logits layer), else None."""
    if not layers:
        return None
    for node in reversed(model.graph.node):
        if node.op_type in LAYER_TYPES or is_batchnorm(node):
            return node_label(node) if node_label(node) == layers[-1].label else None
    return None
