"""The calibration copy of a model: every BN normalizes with its batch statistics, as in training.

Each BatchNormalization ``Y = BN(X, gamma, beta, mean, var)`` is replaced by::

    Xc   = Cast(X, F)                      F = float64 for float64 X, else float32
    X3   = Reshape(Xc, [0, C, -1])          (N, C, L): any rank (N,C), (N,C,L), (N,C,H,W), ...
    mu   = ReduceMean(X3, axes=[0, 2])      per-channel batch mean                  -> output
    D    = X3 - mu                          centered: the variance is exact however far mu is from 0
    var  = ReduceMean(D * D, axes=[0, 2])   per-channel biased batch variance       -> output
    n    = Size(X)                          elements; n / C values per channel      -> output
    Y    = BN(X, gamma, beta, mu, var)      inference-mode BN fed the batch statistics

so ``Y`` is exactly what a train-mode BN computes, without BN's ``training_mode`` attribute
(onnxruntime's CUDA provider refuses it). Only per-channel vectors and one scalar per BN leave
the session; the caller turns ``var`` back into a sum of squared deviations ``var * n / C`` in
float64. Opset-7 BNs with ``spatial=0`` keep per-activation statistics: X is reshaped to
(N, C*H*W...) and reduced over the batch axis only.

Why this form (measured with onnxruntime 1.31's CPU provider, see BENCHMARKS.md): the two-pass
centered variance is what keeps the statistics exact when a channel's mean is large against its
spread (pruned channels are often constant); ``Mul`` + ``ReduceMean`` is both faster than
``ReduceSumSquare`` and ~70x more accurate on large tensors (ReduceSumSquare accumulates float32
sequentially: 2e-5 relative error on a 32x96x48x48 tensor, against 3e-7). A one-pass
``E[x^2] - E[x]^2`` would save the ``Sub`` but loses every digit on such channels.

The copy keeps only what the statistics need (the graph after the last BN is dropped) and, when
the model was exported with a fixed batch size, frees the batch dimension where shape inference
shows every BN input keeps it, so calibration can use real batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .computed_constants import is_computable
from .errors import ModelError
from .graph import BATCHNORM, GraphIndex, attribute, default_opset, is_batchnorm, node_label, subgraph_reads
from .protos import inferred_value_infos, model_without, tensor_dtype, unique_name, weightless_copy
from .rewrite import GraphEditor

logger = logging.getLogger(__name__)

FREE_BATCH = "bnpass_batch"
SMALL_INTEGER_CONSTANT = 64  # elements; as many as weightless_copy keeps of an int64 initializer


@dataclass(frozen=True)
class Tap:
    """Where the statistics of one BN come out of the calibration session."""

    bn: str            # label of the BN node
    position: int      # index of the BN among the model's BN nodes, in node order
    mean: str          # output: per-channel batch mean
    var: str           # output: per-channel biased batch variance
    size: str          # output: number of elements of X
    channels: int      # number of statistics (C, or C*H*W... for spatial=0)


@dataclass
class CalibrationModel:
    model: Optional[onnx.ModelProto]  # None once a StatisticsSession took it (release_model=True)
    taps: list
    fixed_batch: Optional[int]  # the batch size the data must have, None when free


def batchnorm_nodes(model: onnx.ModelProto) -> list:
    return [node for node in model.graph.node if is_batchnorm(node)]


def _reduce(op: str, name: str, data: str, axes: list, keepdims: int, opset: int, nodes: list, inits: list):
    # Reduce* ops take axes as an attribute before opset 18, as an input from 18.
    if opset >= 18:
        axes_name = f"{name}/axes"
        inits.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), axes_name))
        nodes.append(onnx.helper.make_node(op, [data, axes_name], [name], name=name, keepdims=keepdims))
    else:
        nodes.append(onnx.helper.make_node(op, [data], [name], name=name, axes=axes, keepdims=keepdims))


def build_calibration_model(model: onnx.ModelProto) -> CalibrationModel:
    """The calibration copy of ``model`` (see the module docstring); ``model`` is not changed."""
    opset = default_opset(model)
    if opset < 7:
        raise ModelError(f"opset {opset} is not supported: BatchNormalization needs opset 7 or later")
    index = GraphIndex(model)  # read only: the calibration copy is assembled at the end, once
    value_infos = inferred_value_infos(model)
    taken = index.all_names()
    taps, compute_types, new_inits = [], [], []
    new_nodes: list = []

    for position, bn in enumerate(batchnorm_nodes(model)):
        label = node_label(bn)
        for extra in bn.output[1:]:
            if extra and index.use_count(extra):
                raise ModelError(f"BatchNormalization '{label}' is in training mode and its output '{extra}' "
                                 "is used by the graph; bnpass cannot calibrate such a model")
        x, mean_name = bn.input[0], bn.input[3]
        param_dtype = tensor_dtype(index, mean_name, value_infos)
        mean_constant = index.constant(mean_name)
        if mean_constant is not None:
            param_dtype, param_shape = mean_constant.value.dtype, list(mean_constant.value.shape)
        else:
            param_shape = _dims(value_infos, mean_name)
        if param_dtype is None or param_shape is None or not all(isinstance(d, int) for d in param_shape):
            raise ModelError(f"cannot tell the shape and type of the running mean of BatchNormalization '{label}'")
        x_dtype = tensor_dtype(index, x, value_infos) or param_dtype
        compute = np.dtype(np.float64) if x_dtype == np.float64 else np.dtype(np.float32)
        per_activation = attribute(bn, "spatial", 1) == 0
        channels = int(np.prod(param_shape))
        prefix = unique_name(f"bnpass_calibration/{position}", taken)
        nodes: list = []

        def out(suffix):
            return unique_name(f"{prefix}/{suffix}", taken)

        data = x
        if x_dtype != compute:
            data = out("cast")
            nodes.append(onnx.helper.make_node("Cast", [x], [data], name=data,
                                               to=onnx.helper.np_dtype_to_tensor_dtype(compute)))
        target = out("shape3d")
        new_inits.append(numpy_helper.from_array(
            np.array([0, -1] if per_activation else [0, channels, -1], dtype=np.int64), target))
        flat = out("flat")
        nodes.append(onnx.helper.make_node("Reshape", [data, target], [flat], name=flat))
        axes = [0] if per_activation else [0, 2]
        mean_kept = out("mean_kept")
        _reduce("ReduceMean", mean_kept, flat, axes, 1, opset, nodes, new_inits)
        centered = out("centered")
        nodes.append(onnx.helper.make_node("Sub", [flat, mean_kept], [centered], name=centered))
        squared = out("squared")
        nodes.append(onnx.helper.make_node("Mul", [centered, centered], [squared], name=squared))
        variance_flat = out("variance_flat")
        _reduce("ReduceMean", variance_flat, squared, axes, 0, opset, nodes, new_inits)
        param_shape_name = out("param_shape")
        new_inits.append(numpy_helper.from_array(np.array(param_shape, dtype=np.int64), param_shape_name))
        mean = out("mean")
        nodes.append(onnx.helper.make_node("Reshape", [mean_kept, param_shape_name], [mean], name=mean))
        variance = out("variance")
        nodes.append(onnx.helper.make_node("Reshape", [variance_flat, param_shape_name], [variance], name=variance))
        size = out("size")
        nodes.append(onnx.helper.make_node("Size", [x], [size], name=size))
        bn_mean, bn_variance = mean, variance
        if param_dtype != compute:
            to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(param_dtype))
            bn_mean, bn_variance = out("mean_cast"), out("variance_cast")
            nodes.append(onnx.helper.make_node("Cast", [mean], [bn_mean], name=bn_mean, to=to))
            nodes.append(onnx.helper.make_node("Cast", [variance], [bn_variance], name=bn_variance, to=to))
        batch_norm = onnx.helper.make_node(
            BATCHNORM, [x, bn.input[1], bn.input[2], bn_mean, bn_variance], [bn.output[0]],
            name=bn.name, epsilon=attribute(bn, "epsilon", 1e-5))
        if opset < 9:
            batch_norm.attribute.append(onnx.helper.make_attribute("spatial", int(not per_activation)))
        nodes.append(batch_norm)
        new_nodes.append((bn, nodes))
        compute_types.append(onnx.helper.np_dtype_to_tensor_dtype(compute))
        taps.append(Tap(bn=label, position=position, mean=mean, var=variance_flat, size=size, channels=channels))

    # Each BN replaced by its nodes, in place, so the node list stays topologically sorted; then
    # only what the statistics need is copied into the calibration model.
    replacement = {id(bn): nodes for bn, nodes in new_nodes}
    ordered = []
    for node in model.graph.node:
        ordered.extend(replacement.get(id(node), [node]))
    outputs = []
    for tap, compute_type in zip(taps, compute_types):
        outputs.append(onnx.helper.make_tensor_value_info(tap.mean, compute_type, None))
        outputs.append(onnx.helper.make_tensor_value_info(tap.var, compute_type, None))
        outputs.append(onnx.helper.make_tensor_value_info(tap.size, TensorProto.INT64, []))
    calibration = _assemble(model, ordered, list(model.graph.initializer) + new_inits, outputs)
    fixed_batch = _free_batch_dimension(calibration, taps)
    return CalibrationModel(model=calibration, taps=taps, fixed_batch=fixed_batch)


def _dims(value_infos: dict, name: str) -> Optional[list]:
    """Inferred dims of ``name``: an int, a symbol (str) or None (unknown) each; None without a shape."""
    value = value_infos.get(name)
    if value is None or not value.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None
            for d in value.type.tensor_type.shape.dim]


def _assemble(model: onnx.ModelProto, nodes: list, initializers: list, outputs: list) -> onnx.ModelProto:
    """A new model: ``model``'s metadata and inputs, the ``nodes`` and ``initializers`` that
    ``outputs`` depend on, and those outputs (no value_info: shapes may change with a free batch).

    Each kept tensor is copied once; nothing is copied and then deleted (protobuf's arena would
    keep deleted payloads until the whole model goes). Every graph input the caller feeds stays,
    so feeds built for the model are accepted.
    """
    needed = {value.name for value in outputs}
    kept = []
    for node in reversed(nodes):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
            needed.update(subgraph_reads(node))
    kept.reverse()
    dropped = {tensor.name for tensor in initializers if tensor.name not in needed}
    result = model_without(model, ("node", "initializer", "input", "output", "value_info"))
    result.graph.input.extend(value for value in model.graph.input if value.name not in dropped)
    result.graph.node.extend(kept)
    result.graph.initializer.extend(tensor for tensor in initializers if tensor.name not in dropped)
    result.graph.output.extend(outputs)
    return result


def _free_batch_dimension(model: onnx.ModelProto, taps: list) -> Optional[int]:
    """Make a fixed batch dimension of the inputs symbolic where the graph allows it.

    Returns None when the batch is (now) free, or the fixed batch size data must be fed in.
    Constant Reshape targets that spell the batch size out (``[1, -1]`` from ``x.view(1, -1)``)
    become ``0`` ("copy this dimension"); then shape inference must show every BN input still
    carrying the symbolic batch as its first dimension, or the copy keeps its fixed batch.
    """
    index = GraphIndex(model)
    fixed = set()
    for value in index.real_inputs():
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            fixed.add(dims[0].dim_value)
    if not fixed:
        return None
    if len(fixed) > 1:
        raise ModelError(f"the model inputs have different fixed batch sizes {sorted(fixed)}")
    batch = fixed.pop()
    edits = _batch_free_edits(index, batch)
    del index  # it may hold computed values

    # Try the edits on a copy without weights; make them on the real copy only if they hold.
    candidate = weightless_copy(model)
    _spell_batch_free(candidate, edits)
    infos = inferred_value_infos(candidate)
    sizes = {node.output[0]: node.input[0] for node in candidate.graph.node if node.op_type == "Size"}
    for tap in taps:
        shape = _dims(infos, sizes[tap.size])
        if not shape or shape[0] != FREE_BATCH:
            advice = " (batch statistics of single samples are poor)" if batch == 1 else ""
            logger.warning("the model's batch dimension is fixed at %d and its graph depends on it; "
                           "calibrating with batches of %d%s", batch, batch, advice)
            return batch
    _spell_batch_free(model, edits)
    logger.debug("freed the fixed batch dimension (%d) of the calibration copy", batch)
    return None


@dataclass(frozen=True)
class _InputEdit:
    node: int          # position of the node in the graph's node list
    slot: int          # position of the input
    value: np.ndarray
    drop_allowzero: bool = False


def _batch_free_edits(index: GraphIndex, batch: int) -> list:
    """The input edits that free the batch: a Reshape target ``[batch, ...]`` becomes ``[0, ...]``.

    Targets may be computed (torch's dynamo exporter writes ``Concat(Constant [2], Constant [128])``,
    :mod:`bnpass.computed_constants`); ``allowzero=1`` (also the dynamo exporter's) makes a 0 a
    real zero-sized dimension, so it is dropped, which changes nothing else, when the target holds
    no 0. Other small computed integer constants are written out as they are: shape inference
    evaluates only a few shape ops, and the axes of a ReduceL2 computed by ``Reshape(Constant)``
    (torch's weight_norm) would otherwise leave every shape after it unknown.
    """
    edits = []
    for position, node in enumerate(index.graph.node):
        for slot, name in enumerate(node.input):
            producer = index.producers.get(name) if name else None
            is_target = node.op_type == "Reshape" and slot == 1
            if not is_target and (producer is None or not is_computable(producer)):
                continue  # weights and activations are never read here
            constant = index.constant(name)
            if constant is None or constant.value.dtype.kind not in "iu":
                continue
            value = constant.value.reshape(-1)
            if is_target and value.size and int(value[0]) == batch:
                allowzero = bool(attribute(node, "allowzero", 0))
                if allowzero and np.any(value == 0):
                    continue
                spelled_out = value.copy()
                spelled_out[0] = 0
                edits.append(_InputEdit(position, slot, spelled_out.reshape(constant.value.shape), allowzero))
            elif producer is not None and is_computable(producer) and value.size <= SMALL_INTEGER_CONSTANT:
                edits.append(_InputEdit(position, slot, constant.value))
    return edits


def _spell_batch_free(model: onnx.ModelProto, edits: list) -> None:
    """Make fixed batch dimensions of the inputs symbolic and apply ``edits``, in place (each
    input reads a new initializer; what nothing reads any more is removed)."""
    editor = GraphEditor(model)
    for value in editor.index.real_inputs():
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_param = FREE_BATCH
    nodes = list(model.graph.node)
    for edit in edits:
        node = nodes[edit.node]
        if edit.drop_allowzero:
            editor.remove_attribute(node, "allowzero")
        editor.set_input(node, edit.slot, editor.add_initializer(edit.value, f"{node.input[edit.slot]}_batch_free"))
    editor.remove_dead()
