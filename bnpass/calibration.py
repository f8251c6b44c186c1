"""The calibration copy of a model: every BN normalizes with its batch statistics, as in training.

Each BatchNormalization ``Y = BN(X, gamma, beta, mean, var)`` is replaced by statistics nodes
and an inference-mode BN fed their result. In the default (``reduce``) form::

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

Other forms compute the same two moments with other operators, for providers on which they run
faster (``pooling``, ``layernorm``, ``training``): :mod:`bnpass.statistics_forms` holds them, one
builder per form, with the choice per provider (:data:`FORM_FOR_PROVIDER`) and each form's
fallback and opset.

The copy keeps only what the statistics need (the graph after the last BN is dropped) and, when
the model was exported with a fixed batch size, frees the batch dimension where shape inference
shows every BN input keeps it, so calibration can use real batches (:mod:`bnpass.batch_dimension`).

Two more modes serve ``--reference`` (:mod:`bnpass.passes.match_reference`):

- ``observe``: every BN stays as it is (inference mode, stored statistics); the moments of its
  input are computed beside it. Run on the uncompressed model, it measures (m_o, v_o) per batch.
- ``matched``: every BN normalizes with statistics matched to the reference's, batch by batch:
  the copy takes two more inputs per BN, the reference's batch mean and variance of that BN's
  input (``Tap.reference_mean``, ``Tap.reference_var``, fed from the ``observe`` session's outputs
  for the same batch), and computes from them, its own batch moments and the reference BN's stored
  statistics the matched (mu', v') of :func:`bnpass.matching.match_batch_statistics`, op for op
  (:mod:`bnpass.matching_graph`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto

from .batch_dimension import free_batch_dimension
from .errors import ModelError
from .graph import BATCHNORM, GraphIndex, is_batchnorm, node_label, subgraph_reads
from .matching_graph import matched_statistics_nodes
from .protos import (
    DEFAULT_DOMAINS,
    attribute,
    default_opset,
    dims_of,
    inferred_value_infos,
    model_without,
    rank_of,
    tensor_dtype,
    unique_name,
)
from .statistics_forms import (
    FALLBACK,
    FORM_OPSET,
    FORMS,
    Site,
    batch_moments,
    opset_raise_refusal,
    resolved_form,
)

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Tap:
    """Where the statistics of one BN come out of the calibration session."""

    bn: str            # label of the BN node
    position: int      # index of the BN among the model's BN nodes, in node order
    mean: str          # output: per-channel batch mean
    var: str           # output: per-channel biased batch variance
    size: str          # output: number of elements of X
    channels: int      # number of statistics (C, or C*H*W... for spatial=0)
    reference_mean: Optional[str] = None  # "matched" mode: input fed the reference's batch mean
    reference_var: Optional[str] = None   # ... and its biased batch variance


@dataclass
class CalibrationModel:
    model: Optional[onnx.ModelProto]  # None once a StatisticsSession took it (release_model=True)
    taps: list
    fixed_batch: Optional[int]  # the batch size the data must have, None when free
    forms: list = field(default_factory=list)  # the statistics form each BN got, in tap order


MODES = ("train", "observe", "matched")


@dataclass(frozen=True)
class MatchTarget:
    """What a BN of the compressed model is matched to (``matched`` mode): the stored statistics
    (mu_r, v_r) of the corresponding BN of the reference model, and their epsilon."""

    mean: np.ndarray
    var: np.ndarray
    epsilon: float
    min_ratio: float = 0.0  # the BOUNDED rule of :mod:`bnpass.matching` (0: none)


def batchnorm_nodes(model: onnx.ModelProto) -> list:
    return [node for node in model.graph.node if is_batchnorm(node)]


def build_calibration_model(model: onnx.ModelProto, form: str = "reduce", *, mode: str = "train",
                            targets: Optional[list] = None) -> CalibrationModel:
    """The calibration copy of ``model`` (see the module docstring); ``model`` is not changed.

    ``form`` names the statistics nodes (:data:`FORMS`); a BN the form does not fit gets its
    fallback (:func:`resolved_form`), and ``CalibrationModel.forms`` says what each BN got.
    ``mode`` (:data:`MODES`): ``train`` (every BN normalizes with its batch statistics),
    ``observe`` or ``matched`` (see the module docstring); ``matched`` takes ``targets``, one
    :class:`MatchTarget` per BN in node order. The ``training`` form normalizes by itself, so the
    other modes use ``reduce`` instead.
    """
    if form not in FORMS:
        raise ValueError(f"unknown statistics form {form!r}; expected one of {FORMS}")
    if mode not in MODES:
        raise ValueError(f"unknown calibration mode {mode!r}; expected one of {MODES}")
    if mode == "matched" and (targets is None or len(targets) != len(batchnorm_nodes(model))):
        raise ValueError("matched mode needs one MatchTarget per BatchNormalization node")
    if mode != "train" and form == "training":
        form = "reduce"
    opset = default_opset(model)
    if opset < 7:
        raise ModelError(f"opset {opset} is not supported: BatchNormalization needs opset 7 or later")
    copy_opset = opset
    if opset < FORM_OPSET.get(form, 0):
        refusal = opset_raise_refusal(model, opset, FORM_OPSET[form])
        if refusal is None:
            copy_opset = FORM_OPSET[form]
            logger.debug("the calibration copy imports opset %d (the model: %d) for the %s form",
                         copy_opset, opset, form)
        else:
            logger.debug("the %s form needs opset %d; the model's %d stays (%s): BNs get the %s form",
                         form, FORM_OPSET[form], opset, refusal, FALLBACK[form])
    index = GraphIndex(model)  # read only: the calibration copy is assembled at the end, once
    value_infos = inferred_value_infos(model)
    taken = index.all_names()
    taps, compute_types, new_inits, forms = [], [], [], []
    new_nodes: list = []
    reference_inputs: list = []  # "matched" mode: the inputs fed the reference's batch moments

    for position, bn in enumerate(batchnorm_nodes(model)):
        label = node_label(bn)
        for extra in bn.output[1:]:
            if extra and index.use_count(extra):
                raise ModelError(f"BatchNormalization '{label}' is in training mode and its output '{extra}' "
                                 "is used by the graph; bnpass cannot calibrate such a model")
        x, mean_name = bn.input[0], bn.input[3]
        param_dtype = tensor_dtype(index.initializers, mean_name, value_infos)
        mean_constant = index.constant(mean_name)
        if mean_constant is not None:
            param_dtype, param_shape = mean_constant.value.dtype, list(mean_constant.value.shape)
        else:
            param_shape = dims_of(value_infos, mean_name)
        if param_dtype is None or param_shape is None or not all(isinstance(d, int) for d in param_shape):
            raise ModelError(f"cannot tell the shape and type of the running mean of BatchNormalization '{label}'")
        x_dtype = np.dtype(tensor_dtype(index.initializers, x, value_infos) or param_dtype)
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
        site = Site(bn=bn, data=data, compute=compute, x_dtype=x_dtype, rank=rank_of(value_infos, x),
                     param_shape=param_shape, per_activation=per_activation, opset=copy_opset)
        moments = batch_moments(resolved_form(form, site), site, out)
        nodes.extend(moments.nodes)
        new_inits.extend(moments.initializers)
        reference_mean = reference_var = None
        if mode == "observe":
            nodes.append(bn)  # the BN as it is, beside the statistics of its input
        elif not moments.normalizes:
            bn_mean, bn_variance = moments.mean, moments.var
            if mode == "matched":
                reference_mean, reference_var = out("reference_mean"), out("reference_var")
                reference_inputs.extend(onnx.helper.make_tensor_value_info(
                    name, onnx.helper.np_dtype_to_tensor_dtype(compute), param_shape)
                    for name in (reference_mean, reference_var))
                target = targets[position]
                bn_mean, bn_variance, matched_nodes, matched_inits = matched_statistics_nodes(
                    target.mean, target.var, target.epsilon, reference_mean=reference_mean,
                    reference_var=reference_var, compressed_mean=moments.mean, compressed_var=moments.var,
                    shape=param_shape, dtype=compute, opset=copy_opset, out=out, min_ratio=target.min_ratio)
                nodes.extend(matched_nodes)
                new_inits.extend(matched_inits)
            if param_dtype != compute:  # the BN's parameters are float16: it reads what it normalizes with, cast
                to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(param_dtype))
                mean_cast, variance_cast = out("mean_cast"), out("variance_cast")
                nodes.append(onnx.helper.make_node("Cast", [bn_mean], [mean_cast], name=mean_cast, to=to))
                nodes.append(onnx.helper.make_node("Cast", [bn_variance], [variance_cast], name=variance_cast, to=to))
                bn_mean, bn_variance = mean_cast, variance_cast
            batch_norm = onnx.helper.make_node(
                BATCHNORM, [x, bn.input[1], bn.input[2], bn_mean, bn_variance], [bn.output[0]],
                name=bn.name, epsilon=attribute(bn, "epsilon", 1e-5))
            if copy_opset < 9:
                batch_norm.attribute.append(onnx.helper.make_attribute("spatial", int(not per_activation)))
            nodes.append(batch_norm)
        new_nodes.append((bn, nodes))
        compute_types.append(onnx.helper.np_dtype_to_tensor_dtype(compute))
        forms.append(moments.form)
        taps.append(Tap(bn=label, position=position, mean=moments.mean, var=moments.var, size=moments.size,
                        channels=channels, reference_mean=reference_mean, reference_var=reference_var))

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
    calibration.graph.input.extend(reference_inputs)
    if copy_opset != opset:
        _import_opset(calibration, copy_opset)
    fixed_batch = free_batch_dimension(calibration, taps, {value.name for value in reference_inputs})
    return CalibrationModel(model=calibration, taps=taps, fixed_batch=fixed_batch, forms=forms)


def _import_opset(model: onnx.ModelProto, opset: int) -> None:
    """Make ``model`` import default opset ``opset``, with an IR version that allows it."""
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            entry.version = opset
    model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(
        [onnx.helper.make_opsetid("", opset)]))


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
