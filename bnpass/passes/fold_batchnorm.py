"""FoldBatchNormPass: fold inference-mode BatchNormalization into the layer that produces its input.

Match, check, rewrite. For each BatchNormalization node:

* **match** the producer of its input: Conv (1-3D, any group), ConvTranspose (any group),
  Gemm (any transA/transB, alpha, beta, with or without C) or MatMul with a constant 2-D weight
  and a rank-2 output (the BN channel axis 1 is then the weight's output axis);
* **check** that the fold is exact and safe, or name the reason it is not: the BN runs in
  inference mode with per-channel (``spatial=1``) constant parameters, the producer's output is
  read by the BN alone, and its weight (and bias) are constants with the BN's channel count;
* **rewrite**: the producer's weight and bias are replaced by folded values (math in
  :mod:`bnpass.folding`, float64, cast once to each tensor's own dtype), the producer takes over
  the BN's output name, and the BN is removed. MatMul gets an Add of the folded bias.

A weight or bias read by anything else is never changed in place: the producer gets a private
copy. Parameters no longer read by anything are removed. A BN that cannot fold stays, and the
reason is reported in :attr:`FoldResult.skipped`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import onnx

from .. import folding
from ..graph import GraphIndex, attribute, default_opset, inferred_value_infos, is_batchnorm, node_label, rank_of
from ..rewrite import GraphEditor
from .base import PassResult, copy_model

logger = logging.getLogger(__name__)

FOLDABLE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
PARAM_NAMES = ("scale", "B", "input_mean", "input_var")


@dataclass
class FoldResult(PassResult):
    folded: list = field(default_factory=list)   # (bn name, producer name) per folded BN
    skipped: dict = field(default_factory=dict)  # bn name -> reason it stayed


@dataclass
class _Fold:
    """What a checked fold needs: the two nodes, BN as (scale, shift), the producer's constants."""

    bn: onnx.NodeProto
    producer: onnx.NodeProto
    scale: np.ndarray
    shift: np.ndarray
    weight: np.ndarray
    bias: Optional[np.ndarray]


class FoldBatchNormPass:
    """Fold every BatchNormalization that can be folded exactly; report the others."""

    def call(self, model: onnx.ModelProto) -> FoldResult:
        model = copy_model(model)
        editor = GraphEditor(model)
        opset = default_opset(model)
        # Shape inference is only needed for the rank of MatMul inputs.
        has_matmul = any(node.op_type == "MatMul" for node in model.graph.node)
        value_infos = inferred_value_infos(model) if has_matmul else {}
        folded, skipped = [], {}
        for bn in [node for node in model.graph.node if is_batchnorm(node)]:
            plan = check_fold(bn, editor.index, opset, value_infos)
            if isinstance(plan, str):
                skipped[node_label(bn)] = plan
                logger.debug("left %s: %s", node_label(bn), plan)
                continue
            folded.append((node_label(bn), node_label(plan.producer)))
            rewrite_fold(plan, editor)
        if folded:
            editor.remove_dead()
        return FoldResult(model=model, modified=bool(folded), folded=folded, skipped=skipped)


def check_fold(bn: onnx.NodeProto, index: GraphIndex, opset: int, value_infos: dict) -> Union[_Fold, str]:
    """A :class:`_Fold` when ``bn`` can fold exactly into its input's producer, else the reason."""
    if opset < 7:
        return f"opset {opset} BatchNormalization is not supported (opset 7 or later is)"
    if any(bn.output[1:]):
        return "it computes training outputs (running mean/variance), so it runs in training mode"
    if attribute(bn, "training_mode", 0):
        return "training_mode=1: it normalizes with batch statistics at inference"
    if attribute(bn, "spatial", 1) == 0:
        return "spatial=0: per-activation statistics cannot fold into per-channel weights"

    params = []
    for position, label in enumerate(PARAM_NAMES, start=1):
        constant = index.constant(bn.input[position])
        if constant is None:
            return f"its {label} '{bn.input[position]}' is not a constant"
        params.append(constant.value)
    channels = params[2].size
    if any(p.size != channels for p in params):
        return "its parameters have different sizes " + str([p.size for p in params])

    x = bn.input[0]
    producer = index.producers.get(x)
    if producer is None:
        return f"its input '{x}' is a graph input, not the output of a layer"
    if producer.op_type not in FOLDABLE_PRODUCERS or producer.domain not in ("", "ai.onnx"):
        return (f"its input comes from {producer.op_type} '{node_label(producer)}' "
                "(folds only into Conv, ConvTranspose, Gemm or MatMul)")
    if x in index.graph_outputs:
        return f"'{x}', the output of {node_label(producer)}, is also a graph output"
    if index.use_count(x) != 1:
        return f"'{x}', the output of {node_label(producer)}, is also read by other nodes"

    weight = index.constant(producer.input[1])
    if weight is None:
        return f"the weight '{producer.input[1]}' of {producer.op_type} '{node_label(producer)}' is not a constant"
    weight = weight.value
    if not np.issubdtype(weight.dtype, np.floating):
        return f"the weight of '{node_label(producer)}' is {weight.dtype}, not floating point"
    bias = None
    if len(producer.input) > 2 and producer.input[2]:
        bias = index.constant(producer.input[2])
        if bias is None:
            return f"the bias '{producer.input[2]}' of '{node_label(producer)}' is not a constant"
        bias = bias.value

    out_channels = _output_channels(producer, weight, index, value_infos)
    if isinstance(out_channels, str):
        return out_channels
    if out_channels != channels:
        return f"'{node_label(producer)}' has {out_channels} output channels but the BN has {channels}"
    if producer.op_type in ("Conv", "ConvTranspose") and bias is not None and bias.size != channels:
        return f"the bias of '{node_label(producer)}' has {bias.size} values for {channels} channels"

    scale, shift = folding.batchnorm_affine(*params, attribute(bn, "epsilon", 1e-5))
    return _Fold(bn=bn, producer=producer, scale=scale, shift=shift, weight=weight, bias=bias)


def _output_channels(producer, weight, index, value_infos) -> Union[int, str]:
    label = node_label(producer)
    if producer.op_type == "Conv":
        return weight.shape[0]
    if producer.op_type == "ConvTranspose":
        return weight.shape[1] * attribute(producer, "group", 1)
    if producer.op_type == "Gemm":
        return weight.shape[0] if attribute(producer, "transB", 0) else weight.shape[1]
    # MatMul: BN normalizes axis 1, which is the weight's output axis only for rank-2 outputs.
    if weight.ndim != 2:
        return f"the weight of MatMul '{label}' has rank {weight.ndim}, not 2"
    rank = rank_of(value_infos, producer.input[0])
    if rank is None:
        return f"the rank of '{producer.input[0]}', the input of MatMul '{label}', is unknown"
    if rank != 2:
        return (f"MatMul '{label}' has a rank-{rank} input, so the BN channel axis is not "
                "the weight's output axis")
    return weight.shape[1]


def rewrite_fold(plan: _Fold, editor: GraphEditor) -> None:
    """Replace the producer's weight/bias by the folded values and remove the BN."""
    bn, producer = plan.bn, plan.producer
    weight_dtype = plan.weight.dtype
    bias_dtype = plan.bias.dtype if plan.bias is not None else weight_dtype
    base = producer.name or bn.output[0]
    op = producer.op_type
    if op == "Conv":
        weight, bias = folding.fold_conv(plan.weight, plan.bias, plan.scale, plan.shift)
    elif op == "ConvTranspose":
        weight, bias = folding.fold_conv_transpose(plan.weight, plan.bias, plan.scale, plan.shift,
                                                   group=attribute(producer, "group", 1))
    elif op == "Gemm":
        weight, bias = folding.fold_gemm(plan.weight, plan.bias, plan.scale, plan.shift,
                                         trans_b=bool(attribute(producer, "transB", 0)),
                                         beta=attribute(producer, "beta", 1.0))
        _remove_attribute(producer, "beta")  # the folded C already carries beta: beta = 1
    else:  # MatMul: the folded bias needs an Add, which takes over the BN's place and output
        weight, bias = folding.fold_matmul(plan.weight, plan.scale, plan.shift)
        editor.set_constant_input(producer, 1, weight.astype(weight_dtype), f"{base}.weight_folded")
        add = onnx.helper.make_node("Add", [bn.input[0]], [bn.output[0]],
                                    name=editor.fresh_name(f"{base}.bias_add"))
        add = editor.replace_node(bn, add)
        editor.set_constant_input(add, 1, bias.astype(weight_dtype), f"{base}.bias_folded")
        return
    editor.set_constant_input(producer, 1, weight.astype(weight_dtype), f"{base}.weight_folded")
    editor.set_constant_input(producer, 2, bias.astype(bias_dtype), f"{base}.bias_folded")
    producer.output[0] = bn.output[0]
    editor.remove_node(bn)


def _remove_attribute(node: onnx.NodeProto, name: str) -> None:
    for attr in node.attribute:
        if attr.name == name:
            node.attribute.remove(attr)
            return
