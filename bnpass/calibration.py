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
faster (:func:`batch_moments`; the choice per provider is :data:`FORM_FOR_PROVIDER`, in one
place): ``pooling`` (GlobalAveragePool per (n, c), then a mean over the batch), ``layernorm``
(LayerNormalization's per-(n, c) Mean and InvStdDev, combined by the law of total variance) and
``training`` (BN's own ``training_mode=1``, CPU provider only). A BN a form does not fit gets the
form's fallback (``reduce`` for rank-2 inputs, ``spatial=0`` BNs and, with ``pooling`` and
``layernorm``, float64 models: LayerNormalization's Mean and InvStdDev are float32 only and the
CPU provider has no float64 GlobalAveragePool). ``layernorm`` needs opset 17
and ``training`` opset 14: the copy's opset is raised when the model's is 13 or later and no node
changes meaning on the way (:func:`_opset_raise_refusal`), else the fallback is used.

Why ``reduce`` on CPU (measured with onnxruntime 1.31's CPU provider, see BENCHMARKS.md): the two-pass
centered variance is what keeps the statistics exact when a channel's mean is large against its
spread (pruned channels are often constant); ``Mul`` + ``ReduceMean`` is both faster than
``ReduceSumSquare`` and ~70x more accurate on large tensors (ReduceSumSquare accumulates float32
sequentially: 2e-5 relative error on a 32x96x48x48 tensor, against 3e-7). A one-pass
``E[x^2] - E[x]^2`` would save the ``Sub`` but loses every digit on such channels.

The copy keeps only what the statistics need (the graph after the last BN is dropped) and, when
the model was exported with a fixed batch size, frees the batch dimension where shape inference
shows every BN input keeps it, so calibration can use real batches.

Two more modes serve ``--reference`` (:mod:`bnpass.passes.match_reference`):

- ``observe``: every BN stays as it is (inference mode, stored statistics); the moments of its
  input are computed beside it. Run on the uncompressed model, it measures (m_o, v_o) per batch.
- ``matched``: every BN normalizes with statistics matched to the reference's, batch by batch:
  the copy takes two more inputs per BN, the reference's batch mean and variance of that BN's
  input (``Tap.reference_mean``, ``Tap.reference_var``, fed from the ``observe`` session's outputs
  for the same batch), and computes from them, its own batch moments and the reference BN's stored
  statistics the matched (mu', v') of :func:`bnpass.matching.match_batch_statistics`, op for op.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .computed_constants import is_computable
from .errors import ModelError
from .graph import BATCHNORM, GraphIndex, is_batchnorm, node_label, subgraph_reads
from .protos import (
    DEFAULT_DOMAINS,
    attribute,
    default_opset,
    inferred_value_infos,
    model_without,
    rank_of,
    tensor_dtype,
    unique_name,
    weightless_copy,
)
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


# --- forms of the statistics nodes ----------------------------------------------------------

FORMS = ("reduce", "pooling", "layernorm", "training")

# Which form a session on each provider gets: the only place the choice is made (the pass looks
# it up for the provider its session runs on; tools/bench.py and the pass's ``form`` argument
# override it for measurements). Each entry is exact (two-pass or Welford variance, tested
# against numpy in float64 on CPU).
#
# CPU: measured here with ``python tools/bench.py --forms ...`` (BENCHMARKS.md, "GPU" section).
# CUDA: NOT measured by bnpass's developers (no GPU was at hand). Chosen from the H200 figures of
# the person who filed issue 12 (torchvision ResNet-50 / MobileNetV2 at 224, batch 64, per batch
# against plain CUDA inference): ``reduce`` 2.5-3.0x / 3.3x (cuDNN's reduce_tensor_kernel_free is
# 60 % of the time), ``pooling`` 1.32-1.50x / 1.47-1.48x, ``layernorm`` 1.18x / 1.66x. ``pooling``
# wins on MobileNetV2 and loses on ResNet-50, about even in sum; it is taken because it needs no
# opset change (``layernorm`` needs opset 17 and falls back to ``pooling`` where the copy's
# opset cannot be raised). tools/gpu_check.sh measures every form on CUDA to settle it.
FORM_FOR_PROVIDER = {
    "CPUExecutionProvider": "reduce",
    "CUDAExecutionProvider": "pooling",
}

# Opset a form needs; where the model's is lower, the calibration copy's opset is raised when
# that cannot change what any node of the model means (:func:`_opset_raise_refusal`), else the
# BNs get the form's fallback.
_FORM_OPSET = {"layernorm": 17, "training": 14}
_FALLBACK = {"layernorm": "pooling", "training": "reduce", "pooling": "reduce"}
# Raising the default opset from 13 (or later) to 17: every operator that got a new version at
# 14-17 only gained types, optional inputs or attributes whose defaults keep the old meaning
# (Add/Sub/Mul/Div/Relu/Reshape/Identity 14, Shape/Pow 15, Where/If/Loop/Scan/Scatter* 16...),
# or is new, except these, whose meaning changed (RoiAlign 16: default coordinate_transformation_mode
# half_pixel instead of output_half_pixel). BatchNormalization (14, 15) counts only when the copy
# keeps one (in a subgraph): the copy's own BNs are all rewritten. Before 13 many operators moved
# attributes to inputs (Squeeze, Unsqueeze, Split, ReduceSum...): no raise from there.
_RAISE_FROM = 13
_MEANING_CHANGED = {14: {"BatchNormalization"}, 15: {"BatchNormalization"}, 16: {"RoiAlign"}}


def form_for_providers(providers: list) -> str:
    """The statistics form for a session on ``providers`` (the first one runs the graph)."""
    first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    return FORM_FOR_PROVIDER.get(first, "reduce")


@dataclass(frozen=True)
class _Site:
    """What the statistics nodes of one BN need to know about it."""

    bn: onnx.NodeProto
    data: str               # the BN input X, cast to ``compute`` where it is not already
    compute: np.dtype       # float32, or float64 for float64 models
    x_dtype: np.dtype       # X's own dtype
    rank: Optional[int]     # X's rank when shape inference knows it
    param_shape: list       # shape of the BN's mean and variance
    per_activation: bool    # opset-7 ``spatial=0``: statistics per (C, H, W...) position
    opset: int              # the calibration copy's default opset


@dataclass
class Moments:
    """Nodes computing one BN's batch moments, and the names of what they return.

    ``mean`` and ``var`` have the BN's parameter shape and the compute dtype; ``var`` is the
    biased batch variance; ``size`` is Size(X) (int64 scalar). When ``normalizes`` is set the
    nodes also compute the BN's output (train-mode BN); otherwise the caller adds an
    inference-mode BN fed ``mean`` and ``var``.
    """

    form: str
    mean: str
    var: str
    size: str
    nodes: list
    initializers: list
    normalizes: bool = False


def resolved_form(form: str, site: _Site) -> str:
    """The form one BN gets: ``form``, or its fallback where it does not apply to this BN."""
    while True:
        if site.per_activation or form == "reduce":
            return "reduce"  # per-activation statistics: a reduction over the batch only
        needed = _FORM_OPSET.get(form, 0)
        unfit = (site.opset < needed
                 or (form in ("pooling", "layernorm") and site.rank == 2)   # no spatial axis to pool over
                 # LayerNormalization's Mean/InvStdDev are float32 only; the CPU provider has no
                 # float64 GlobalAveragePool
                 or (form in ("pooling", "layernorm") and site.compute == np.float64))
        if not unfit:
            return form
        form = _FALLBACK[form]


def batch_moments(form: str, site: _Site, out) -> Moments:
    """The nodes of ``form`` computing the batch mean and biased variance of ``site.data``.

    ``out(suffix)`` makes a fresh unique tensor/node name. Forms (all exact: the variance is
    centred on the mean before squaring, or computed by Welford's method):

    - ``reduce``: X3 = Reshape(X, [0, C, -1]); mean = ReduceMean(X3, [0, 2]); var =
      ReduceMean((X3 - mean)^2, [0, 2]).
    - ``pooling``: per-(n, c) means by GlobalAveragePool, mean = ReduceMean over the batch;
      var = ReduceMean over the batch of GlobalAveragePool((X - mean)^2).
    - ``layernorm``: LayerNormalization(X, axis=2, epsilon=0) gives per-(n, c) Mean m_nc and
      InvStdDev 1/sqrt(v_nc); mean = E_n[m_nc], var = E_n[v_nc] + E_n[(m_nc - mean)^2] (law of
      total variance). The normalized output is computed and dropped.
    - ``training``: BatchNormalization(training_mode=1, momentum=0) fed zeros and ones as running
      statistics returns the batch mean and biased variance as its running ones, and normalizes.
    """
    nodes, inits = [], []
    opset = site.opset
    size = out("size")
    nodes.append(onnx.helper.make_node("Size", [site.bn.input[0]], [size], name=size))
    channels = int(np.prod(site.param_shape))
    param_shape = out("param_shape")
    inits.append(numpy_helper.from_array(np.array(site.param_shape, dtype=np.int64), param_shape))

    def node(op, inputs, **attributes):
        name = out(op.lower())
        nodes.append(onnx.helper.make_node(op, inputs, [name], name=name, **attributes))
        return name

    def reduce(data, axes, keepdims):
        name = out("mean" if keepdims else "reduced")
        _reduce("ReduceMean", name, data, axes, keepdims, opset, nodes, inits)
        return name

    def per_channel(name):
        return node("Reshape", [name, param_shape])

    def as_3d(data):
        target = out("shape3d")
        inits.append(numpy_helper.from_array(
            np.array([0, -1] if site.per_activation else [0, channels, -1], dtype=np.int64), target))
        return node("Reshape", [data, target])

    if form == "reduce":
        flat = as_3d(site.data)
        axes = [0] if site.per_activation else [0, 2]
        mean_kept = reduce(flat, axes, 1)
        centered = node("Sub", [flat, mean_kept])
        variance = reduce(node("Mul", [centered, centered]), axes, 0)
        return Moments(form, per_channel(mean_kept), per_channel(variance), size, nodes, inits)

    data = site.data if site.rank is not None and site.rank >= 3 else as_3d(site.data)
    if form == "pooling":
        mean_kept = reduce(node("GlobalAveragePool", [data]), [0], 1)
        centered = node("Sub", [data, mean_kept])
        variance = reduce(node("GlobalAveragePool", [node("Mul", [centered, centered])]), [0], 0)
        return Moments(form, per_channel(mean_kept), per_channel(variance), size, nodes, inits)

    if form == "layernorm":
        scale = out("ones")
        inits.append(numpy_helper.from_array(np.ones(1, dtype=site.compute), scale))
        normalized, group_mean, group_inverse_std = out("normalized"), out("group_mean"), out("group_inv_std")
        nodes.append(onnx.helper.make_node("LayerNormalization", [data, scale],
                                           [normalized, group_mean, group_inverse_std],
                                           name=normalized, axis=2, epsilon=0.0))
        group_std = node("Reciprocal", [group_inverse_std])  # 1/inf = 0 for a constant group
        within = reduce(node("Mul", [group_std, group_std]), [0], 0)
        mean_kept = reduce(group_mean, [0], 1)
        spread = node("Sub", [group_mean, mean_kept])
        between = reduce(node("Mul", [spread, spread]), [0], 0)
        variance = node("Add", [within, between])
        return Moments(form, per_channel(mean_kept), per_channel(variance), size, nodes, inits)

    if form == "training":
        bn = site.bn
        inputs = [site.data]
        for position in (1, 2):  # scale and B in the compute dtype (opset 14 wants one type)
            inputs.append(node("Cast", [bn.input[position]], to=onnx.helper.np_dtype_to_tensor_dtype(site.compute)))
        for value, suffix in ((0.0, "zeros"), (1.0, "ones")):
            name = out(suffix)
            inits.append(numpy_helper.from_array(np.full(site.param_shape, value, dtype=site.compute), name))
            inputs.append(name)
        normalized = out("normalized") if site.x_dtype != site.compute else bn.output[0]
        mean, variance = out("mean"), out("variance")
        nodes.append(onnx.helper.make_node(BATCHNORM, inputs, [normalized, mean, variance], name=bn.name,
                                           epsilon=attribute(bn, "epsilon", 1e-5), momentum=0.0, training_mode=1))
        if normalized != bn.output[0]:
            nodes.append(onnx.helper.make_node("Cast", [normalized], [bn.output[0]], name=out("cast_back"),
                                               to=onnx.helper.np_dtype_to_tensor_dtype(site.x_dtype)))
        return Moments(form, mean, variance, size, nodes, inits, normalizes=True)

    raise ValueError(f"unknown statistics form {form!r}; expected one of {FORMS}")


def _opset_raise_refusal(model: onnx.ModelProto, opset: int, target: int) -> Optional[str]:
    """Why the calibration copy of ``model`` cannot import opset ``target`` instead of ``opset``
    (None when it can: no node it keeps changes meaning between the two)."""
    if opset < _RAISE_FROM:
        return f"opset {opset} is below {_RAISE_FROM}"
    if model.functions:
        return "the model has local functions, which import their own opsets"
    changed = set().union(*(ops for version, ops in _MEANING_CHANGED.items() if opset < version <= target))

    def kept_nodes(graph, nested):
        for node in graph.node:
            if nested or not is_batchnorm(node):  # top-level BNs are all rewritten in the copy
                yield node
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                            attr.graphs if attr.type == onnx.AttributeProto.GRAPHS else []):
                    yield from kept_nodes(sub, True)

    for node in kept_nodes(model.graph, False):
        if node.domain in DEFAULT_DOMAINS and node.op_type in changed:
            return f"its {node.op_type} node '{node_label(node)}' means something else at opset {target}"
    return None


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
    if opset < _FORM_OPSET.get(form, 0):
        refusal = _opset_raise_refusal(model, opset, _FORM_OPSET[form])
        if refusal is None:
            copy_opset = _FORM_OPSET[form]
            logger.debug("the calibration copy imports opset %d (the model: %d) for the %s form",
                         copy_opset, opset, form)
        else:
            logger.debug("the %s form needs opset %d; the model's %d stays (%s): BNs get the %s form",
                         form, _FORM_OPSET[form], opset, refusal, _FALLBACK[form])
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
            param_shape = _dims(value_infos, mean_name)
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
        site = _Site(bn=bn, data=data, compute=compute, x_dtype=x_dtype, rank=rank_of(value_infos, x),
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
                bn_mean, bn_variance = _matched_statistics_nodes(
                    targets[position], site, moments, reference_mean, reference_var, out, nodes, new_inits)
            if param_dtype != compute:
                to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(param_dtype))
                bn_mean, bn_variance = out("mean_cast"), out("variance_cast")
                nodes.append(onnx.helper.make_node("Cast", [moments.mean], [bn_mean], name=bn_mean, to=to))
                nodes.append(onnx.helper.make_node("Cast", [moments.var], [bn_variance], name=bn_variance, to=to))
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
    fixed_batch = _free_batch_dimension(calibration, taps, {value.name for value in reference_inputs})
    return CalibrationModel(model=calibration, taps=taps, fixed_batch=fixed_batch, forms=forms)


def _matched_statistics_nodes(target: MatchTarget, site: _Site, moments: Moments, reference_mean: str,
                              reference_var: str, out, nodes: list, inits: list) -> tuple:
    """The nodes of :func:`bnpass.matching.match_batch_statistics`, in the compute dtype: the matched
    (mean, var) of one batch from its moments in both models and the reference BN's stored statistics.

    A channel whose stored ``v_r + e`` is 0 (the reference divides by zero there) gets a stored scale
    of 1 in the graph, so no NaN spreads through the batch; its final statistics stay the stored ones
    (:func:`bnpass.matching.match_statistics`).
    """
    from .matching import DEFAULT_CONSTANT_TOLERANCE

    shape = site.param_shape

    def constant(value, suffix):
        name = out(suffix)
        inits.append(numpy_helper.from_array(np.broadcast_to(np.asarray(value, np.float64), shape)
                                             .astype(site.compute), name))
        return name

    def node(op, *inputs):
        name = out(op.lower())
        nodes.append(onnx.helper.make_node(op, list(inputs), [name], name=name))
        return name

    def less_or_equal(a, b):
        if site.opset >= 12:
            return node("LessOrEqual", a, b)
        return node("Not", node("Greater", a, b))

    stored_mean = np.asarray(target.mean, np.float64).reshape(shape)
    stored_var = np.asarray(target.var, np.float64).reshape(shape)
    scale_squared = stored_var + target.epsilon
    stored_mean_name, stored_var_name = constant(stored_mean, "stored_mean"), constant(stored_var, "stored_var")
    epsilon, one, zero = constant(target.epsilon, "epsilon"), constant(1.0, "one"), constant(0.0, "zero")
    scale_squared_name = constant(np.where(scale_squared > 0, scale_squared, 1.0), "stored_scale_squared")
    scale = constant(np.sqrt(np.where(scale_squared > 0, scale_squared, 1.0)), "stored_scale")
    threshold = constant(DEFAULT_CONSTANT_TOLERANCE ** 2, "threshold")

    def is_constant(mean, var):
        return less_or_equal(var, node("Mul", threshold, node("Max", node("Mul", mean, mean), scale_squared_name)))

    constant_channel = node("Or", is_constant(reference_mean, reference_var), is_constant(moments.mean, moments.var))
    safe_reference_var = node("Where", constant_channel, one, reference_var)
    ratio = node("Where", constant_channel, one, node("Div", moments.var, safe_reference_var))
    unclamped = node("Add", node("Mul", stored_var_name, ratio), node("Mul", epsilon, node("Sub", ratio, one)))
    var = node("Max", unclamped, zero)
    scale_ratio = node("Div", node("Sqrt", node("Add", var, epsilon)), scale)
    mean = node("Add", node("Add", stored_mean_name, node("Sub", moments.mean, reference_mean)),
                node("Mul", node("Sub", one, scale_ratio), node("Sub", reference_mean, stored_mean_name)))
    return mean, var


def _import_opset(model: onnx.ModelProto, opset: int) -> None:
    """Make ``model`` import default opset ``opset``, with an IR version that allows it."""
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            entry.version = opset
    model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(
        [onnx.helper.make_opsetid("", opset)]))


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


def _free_batch_dimension(model: onnx.ModelProto, taps: list, per_channel_inputs: set) -> Optional[int]:
    """Make a fixed batch dimension of the inputs symbolic where the graph allows it.

    ``per_channel_inputs`` (the reference moments of ``matched`` mode) have no batch dimension.

    Returns None when the batch is (now) free, or the fixed batch size data must be fed in.
    Constant Reshape targets that spell the batch size out (``[1, -1]`` from ``x.view(1, -1)``)
    become ``0`` ("copy this dimension"); then shape inference must show every BN input still
    carrying the symbolic batch as its first dimension, or the copy keeps its fixed batch.
    """
    index = GraphIndex(model)
    fixed = set()
    for value in index.real_inputs():
        dims = value.type.tensor_type.shape.dim
        if value.name not in per_channel_inputs and dims and dims[0].HasField("dim_value"):
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
    _spell_batch_free(candidate, edits, per_channel_inputs)
    infos = inferred_value_infos(candidate)
    sizes = {node.output[0]: node.input[0] for node in candidate.graph.node if node.op_type == "Size"}
    for tap in taps:
        shape = _dims(infos, sizes[tap.size])
        if not shape or shape[0] != FREE_BATCH:
            advice = " (batch statistics of single samples are poor)" if batch == 1 else ""
            logger.warning("the model's batch dimension is fixed at %d and its graph depends on it; "
                           "calibrating with batches of %d%s", batch, batch, advice)
            return batch
    _spell_batch_free(model, edits, per_channel_inputs)
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


def _spell_batch_free(model: onnx.ModelProto, edits: list, per_channel_inputs: set) -> None:
    """Make fixed batch dimensions of the inputs (but ``per_channel_inputs``) symbolic and apply
    ``edits``, in place (each input reads a new initializer; what nothing reads any more is removed)."""
    editor = GraphEditor(model)
    for value in editor.index.real_inputs():
        dims = value.type.tensor_type.shape.dim
        if value.name not in per_channel_inputs and dims and dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_param = FREE_BATCH
    nodes = list(model.graph.node)
    for edit in edits:
        node = nodes[edit.node]
        if edit.drop_allowzero:
            editor.remove_attribute(node, "allowzero")
        editor.set_input(node, edit.slot, editor.add_initializer(edit.value, f"{node.input[edit.slot]}_batch_free"))
    editor.remove_dead()
