"""The statistics forms: the nodes that compute one BN's batch mean and biased variance.

Every form computes the same two moments of the BN input X per channel (over the batch and the
spatial axes), exactly: the variance is centred on the mean before squaring, or computed by
Welford's method. They differ in the operators they use, for providers on which those run faster
(the choice per provider is :data:`FORM_FOR_PROVIDER`, in one place). One builder per form, in
the table :data:`_BUILDERS`; :data:`FORMS` lists them:

- ``reduce``: X3 = Reshape(X, [0, C, -1]); mean = ReduceMean(X3, [0, 2]); var =
  ReduceMean((X3 - mean)^2, [0, 2]). Opset-7 BNs with ``spatial=0`` keep per-activation
  statistics: X is reshaped to (N, C*H*W...) and reduced over the batch axis only.
- ``pooling``: per-(n, c) means by GlobalAveragePool, mean = ReduceMean over the batch;
  var = ReduceMean over the batch of GlobalAveragePool((X - mean)^2).
- ``layernorm``: LayerNormalization(X, axis=2, epsilon=0) gives per-(n, c) Mean m_nc and
  InvStdDev 1/sqrt(v_nc); mean = E_n[m_nc], var = E_n[v_nc] + E_n[(m_nc - mean)^2] (law of
  total variance). The normalized output is computed and dropped.
- ``training``: BatchNormalization(training_mode=1, momentum=0) fed zeros and ones as running
  statistics returns the batch mean and biased variance as its running ones, and normalizes
  (CPU provider only).

A BN a form does not fit gets the form's fallback (:func:`resolved_form`: ``reduce`` for rank-2
inputs, ``spatial=0`` BNs and, with ``pooling`` and ``layernorm``, float64 models:
LayerNormalization's Mean and InvStdDev are float32 only and the CPU provider has no float64
GlobalAveragePool). ``layernorm`` needs opset 17 and ``training`` opset 14: the calibration copy's
opset is raised when the model's is 13 or later and no node changes meaning on the way
(:func:`opset_raise_refusal`), else the fallback is used.

Why ``reduce`` on CPU (measured with onnxruntime 1.31's CPU provider, see BENCHMARKS.md): the two-pass
centered variance is what keeps the statistics exact when a channel's mean is large against its
spread (pruned channels are often constant); ``Mul`` + ``ReduceMean`` is both faster than
``ReduceSumSquare`` and ~70x more accurate on large tensors (ReduceSumSquare accumulates float32
sequentially: 2e-5 relative error on a 32x96x48x48 tensor, against 3e-7). A one-pass
``E[x^2] - E[x]^2`` would save the ``Sub`` but loses every digit on such channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import BATCHNORM, is_batchnorm, node_label
from .protos import DEFAULT_DOMAINS, attribute

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
# that cannot change what any node of the model means (:func:`opset_raise_refusal`), else the
# BNs get the form's fallback.
FORM_OPSET = {"layernorm": 17, "training": 14}
FALLBACK = {"layernorm": "pooling", "training": "reduce", "pooling": "reduce"}
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
class Site:
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


def resolved_form(form: str, site: Site) -> str:
    """The form one BN gets: ``form``, or its fallback where it does not apply to this BN."""
    while True:
        if site.per_activation or form == "reduce":
            return "reduce"  # per-activation statistics: a reduction over the batch only
        needed = FORM_OPSET.get(form, 0)
        unfit = (site.opset < needed
                 or (form in ("pooling", "layernorm") and site.rank == 2)   # no spatial axis to pool over
                 # LayerNormalization's Mean/InvStdDev are float32 only; the CPU provider has no
                 # float64 GlobalAveragePool
                 or (form in ("pooling", "layernorm") and site.compute == np.float64))
        if not unfit:
            return form
        form = FALLBACK[form]


def reduce_node(op: str, name: str, data: str, axes: list, keepdims: int, opset: int, nodes: list, inits: list):
    """Append a Reduce* node ``name``: axes are an attribute before opset 18, an input from 18."""
    if opset >= 18:
        axes_name = f"{name}/axes"
        inits.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), axes_name))
        nodes.append(onnx.helper.make_node(op, [data, axes_name], [name], name=name, keepdims=keepdims))
    else:
        nodes.append(onnx.helper.make_node(op, [data], [name], name=name, axes=axes, keepdims=keepdims))


class _Nodes:
    """The nodes and initializers one form's builder appends, with the small steps they share.

    ``out(suffix)`` makes a fresh unique tensor/node name.
    """

    def __init__(self, site: Site, out: Callable[[str], str]):
        self.site, self.out = site, out
        self.nodes: list = []
        self.inits: list = []
        self.size = out("size")
        self.nodes.append(onnx.helper.make_node("Size", [site.bn.input[0]], [self.size], name=self.size))
        self.channels = int(np.prod(site.param_shape))
        self.param_shape = out("param_shape")
        self.inits.append(numpy_helper.from_array(np.array(site.param_shape, dtype=np.int64), self.param_shape))

    def node(self, op: str, inputs: list, **attributes) -> str:
        name = self.out(op.lower())
        self.nodes.append(onnx.helper.make_node(op, inputs, [name], name=name, **attributes))
        return name

    def reduce_mean(self, data: str, axes: list, keepdims: int) -> str:
        name = self.out("mean" if keepdims else "reduced")
        reduce_node("ReduceMean", name, data, axes, keepdims, self.site.opset, self.nodes, self.inits)
        return name

    def per_channel(self, name: str) -> str:
        """``name`` reshaped to the BN's parameter shape."""
        return self.node("Reshape", [name, self.param_shape])

    def as_3d(self, data: str) -> str:
        """(N, C, L) (per-activation: (N, C*L))."""
        target = self.out("shape3d")
        self.inits.append(numpy_helper.from_array(
            np.array([0, -1] if self.site.per_activation else [0, self.channels, -1], dtype=np.int64), target))
        return self.node("Reshape", [data, target])

    def spatial(self) -> str:
        """X with at least one spatial axis: as it is from rank 3, else (N, C, 1)."""
        site = self.site
        return site.data if site.rank is not None and site.rank >= 3 else self.as_3d(site.data)

    def moments(self, form: str, mean: str, var: str, normalizes: bool = False) -> Moments:
        return Moments(form, mean, var, self.size, self.nodes, self.inits, normalizes)


def _reduce_form(n: _Nodes) -> Moments:
    flat = n.as_3d(n.site.data)
    axes = [0] if n.site.per_activation else [0, 2]
    mean_kept = n.reduce_mean(flat, axes, 1)
    centered = n.node("Sub", [flat, mean_kept])
    variance = n.reduce_mean(n.node("Mul", [centered, centered]), axes, 0)
    return n.moments("reduce", n.per_channel(mean_kept), n.per_channel(variance))


def _pooling_form(n: _Nodes) -> Moments:
    data = n.spatial()
    mean_kept = n.reduce_mean(n.node("GlobalAveragePool", [data]), [0], 1)
    centered = n.node("Sub", [data, mean_kept])
    variance = n.reduce_mean(n.node("GlobalAveragePool", [n.node("Mul", [centered, centered])]), [0], 0)
    return n.moments("pooling", n.per_channel(mean_kept), n.per_channel(variance))


def _layernorm_form(n: _Nodes) -> Moments:
    data = n.spatial()
    scale = n.out("ones")
    n.inits.append(numpy_helper.from_array(np.ones(1, dtype=n.site.compute), scale))
    normalized, group_mean, group_inverse_std = n.out("normalized"), n.out("group_mean"), n.out("group_inv_std")
    n.nodes.append(onnx.helper.make_node("LayerNormalization", [data, scale],
                                         [normalized, group_mean, group_inverse_std],
                                         name=normalized, axis=2, epsilon=0.0))
    group_std = n.node("Reciprocal", [group_inverse_std])  # 1/inf = 0 for a constant group
    within = n.reduce_mean(n.node("Mul", [group_std, group_std]), [0], 0)
    mean_kept = n.reduce_mean(group_mean, [0], 1)
    spread = n.node("Sub", [group_mean, mean_kept])
    between = n.reduce_mean(n.node("Mul", [spread, spread]), [0], 0)
    variance = n.node("Add", [within, between])
    return n.moments("layernorm", n.per_channel(mean_kept), n.per_channel(variance))


def _training_form(n: _Nodes) -> Moments:
    site, bn = n.site, n.site.bn
    compute_type = onnx.helper.np_dtype_to_tensor_dtype(site.compute)
    inputs = [site.data]
    for position in (1, 2):  # scale and B in the compute dtype (opset 14 wants one type)
        inputs.append(n.node("Cast", [bn.input[position]], to=compute_type))
    for value, suffix in ((0.0, "zeros"), (1.0, "ones")):
        name = n.out(suffix)
        n.inits.append(numpy_helper.from_array(np.full(site.param_shape, value, dtype=site.compute), name))
        inputs.append(name)
    normalized = n.out("normalized") if site.x_dtype != site.compute else bn.output[0]
    mean, variance = n.out("mean"), n.out("variance")
    n.nodes.append(onnx.helper.make_node(BATCHNORM, inputs, [normalized, mean, variance], name=bn.name,
                                         epsilon=attribute(bn, "epsilon", 1e-5), momentum=0.0, training_mode=1))
    if normalized != bn.output[0]:
        n.nodes.append(onnx.helper.make_node("Cast", [normalized], [bn.output[0]], name=n.out("cast_back"),
                                             to=onnx.helper.np_dtype_to_tensor_dtype(site.x_dtype)))
    return n.moments("training", mean, variance, normalizes=True)


# One builder per form (see the module docstring).
_BUILDERS: dict[str, Callable[[_Nodes], Moments]] = {
    "reduce": _reduce_form,
    "pooling": _pooling_form,
    "layernorm": _layernorm_form,
    "training": _training_form,
}
FORMS = tuple(_BUILDERS)


def batch_moments(form: str, site: Site, out: Callable[[str], str]) -> Moments:
    """The nodes of ``form`` (see the module docstring) computing the batch mean and biased variance
    of ``site.data``; ``out(suffix)`` makes a fresh unique tensor/node name."""
    if form not in _BUILDERS:
        raise ValueError(f"unknown statistics form {form!r}; expected one of {FORMS}")
    return _BUILDERS[form](_Nodes(site, out))


def opset_raise_refusal(model: onnx.ModelProto, opset: int, target: int) -> Optional[str]:
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
