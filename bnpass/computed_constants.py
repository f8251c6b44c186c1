"""Computed constants: values an exporter computes at run time from constants alone.

Exporters write some constants as small computations. torch's dynamo exporter (the default of
``torch.onnx.export`` since torch 2.9), with ``optimize=False``, gives a bias-free Conv the zero
bias ``Expand(CastLike(Constant 0, x), Expand(Shape(W, end=1), [1]))`` and spells a flatten at the
export's batch as ``Reshape(x, Concat(Constant [2], Constant [128]))``; the legacy exporter with
constant folding off writes a bias-free Linear's weight as ``Transpose(W)``, the same flatten as
``Concat(Unsqueeze(Constant 2), ...)`` and a pruned weight as ``Mul(Cast(mask), W)``;
``weight_norm`` becomes ``Mul(g, Div(v, ReduceL2(v)))``. Each value depends only on initializers,
Constant nodes, the static shapes of constants and the element *type* of an activation, so it is a
constant, and :meth:`bnpass.graph.GraphIndex.constant` reports it like an initializer: the fold
reads such a bias or weight, and the calibration copy frees such a fixed batch.

What is a constant here: the output of a node whose op is in :data:`COMPUTABLE_OPS` (default
domain, one output) when every input is a constant, except that

* ``Shape`` reads only its input's shape, which must be that of a constant: an initializer's dims
  (its payload is never read) or a computed constant's shape. The shape of an activation is never
  a constant, even when declared static: the calibration copy frees the batch dimension;
* ``CastLike`` reads only the element type of its second input: a constant's dtype, else its
  declared type (graph input, value_info, graph output), else onnx type inference.

Initializers that are also graph inputs from IR 4 on are defaults a caller may override, so they
are not constants (:class:`~bnpass.graph.GraphIndex`), and neither is anything computed from them,
their shape included.

Each node is evaluated alone by ``onnx.reference`` at the model's opset (the operator's reference
semantics, opset differences included), in the value's own dtype, as the runtime would compute it.
BatchNormalization is not in the list (onnx.reference evaluates it wrongly for opsets 9-13).

Bounds. A value of more elements than the largest tensor the model stores (initializers and
Constant nodes, at least :data:`MIN_ELEMENT_CAP`) is not treated as a constant, and the ops that
can grow a value (Expand, broadcasting arithmetic, Gather) are checked before they run: computed
weights (``Transpose(W)``, ``Mul(mask, W)``) are never larger than what the model stores and stay
foldable, while an activation-sized broadcast, which no fold or Reshape target needs, costs no
memory. Results, values and "not a constant" alike, are cached per :class:`GraphIndex`; the index
calls :meth:`ComputedConstants.forget` when an edit changes a node, an initializer or a graph input.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
import onnx

from .protos import DEFAULT_DOMAINS, attribute, default_opset, inferred_value_infos, weightless_copy

logger = logging.getLogger(__name__)

# The ops exporters use in such chains (see the module docstring for where each comes from).
COMPUTABLE_OPS = frozenset({
    "Shape", "Slice", "Gather", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Transpose",  # shapes, layouts
    "Cast", "CastLike", "Expand",                                                          # dtype, broadcast
    "Add", "Sub", "Mul", "Div", "ReduceL2",                                                # weight transforms
})
BROADCASTING_OPS = frozenset({"Add", "Sub", "Mul", "Div"})
MIN_ELEMENT_CAP = 1 << 16


def is_computable(node: onnx.NodeProto) -> bool:
    return node.op_type in COMPUTABLE_OPS and node.domain in DEFAULT_DOMAINS and len(node.output) == 1


class ComputedConstants:
    """Evaluates and caches the computed constants of one :class:`~bnpass.graph.GraphIndex`."""

    def __init__(self, index):
        self.index = index
        self._values: dict = {}          # output name -> value, valid until the next edit
        self._not_constant: set = set()  # output names known not to be constants
        self._in_progress: set = set()   # ids of nodes being evaluated (a cyclic graph stops here)
        self._cap: Optional[int] = None
        self._declared_types: Optional[dict] = None
        self._inferred_types: Optional[dict] = None

    def forget(self, names) -> None:
        """The producer, initializer or graph input of ``names`` changed.

        Every cached value goes (any may depend on ``names`` through a chain; values are few and
        small), and so does what is known about ``names`` themselves. Other "not a constant" entries
        stay: an edit rewrites constants and rewires layers, so it never makes a value that was
        computed from an activation constant, and a stale "not a constant" would only cost a fold.
        """
        if self._values:
            self._values.clear()
        self._not_constant.difference_update(names)

    def value(self, node: onnx.NodeProto) -> Optional[np.ndarray]:
        """The value of ``node``'s output when it is a computed constant, else None."""
        if not is_computable(node):
            return None
        name = node.output[0]
        if name in self._values:
            return self._values[name]
        if name in self._not_constant or id(node) in self._in_progress:
            return None
        # Evaluate the computable ancestors first, so each evaluation finds its inputs cached and
        # no chain, however long, recurses deeper than one node.
        for pending in self._unevaluated_ancestors(node):
            self._evaluate(pending)
        return self._values.get(name)

    # --- evaluation -----------------------------------------------------------------------
    def _unevaluated_ancestors(self, node: onnx.NodeProto) -> list:
        """``node`` and the computable nodes it reads that are not evaluated yet, inputs first."""
        order, seen = [], set()
        stack = [(node, False)]
        while stack:
            current, inputs_done = stack.pop()
            if inputs_done:
                order.append(current)
                continue
            if id(current) in seen:
                continue
            seen.add(id(current))
            stack.append((current, True))
            for position, name in enumerate(current.input):
                if not name or (current.op_type == "CastLike" and position == 1):  # only its type is read
                    continue
                producer = self._computable_producer(name)
                if producer is not None and id(producer) not in seen and not self._known(producer):
                    stack.append((producer, False))
        return order

    def _computable_producer(self, name: str) -> Optional[onnx.NodeProto]:
        """The computable node whose value ``name`` follows (through Identity hops and the shape
        input of ConstantOfShape), or None."""
        producers = self.index.producers
        while True:
            node = producers.get(name)
            if node is None or node.domain not in DEFAULT_DOMAINS:
                return None
            if node.op_type in ("Identity", "ConstantOfShape") and node.input:
                name = node.input[0]
                continue
            return node if is_computable(node) else None

    def _known(self, node: onnx.NodeProto) -> bool:
        name = node.output[0]
        return name in self._values or name in self._not_constant

    def _evaluate(self, node: onnx.NodeProto) -> None:
        if self._known(node):
            return
        self._in_progress.add(id(node))
        try:
            value = self._compute(node)
        finally:
            self._in_progress.discard(id(node))
        if value is None:
            self._not_constant.add(node.output[0])
        else:
            self._values[node.output[0]] = value

    def _compute(self, node: onnx.NodeProto) -> Optional[np.ndarray]:
        feeds = {}
        for position, name in enumerate(node.input):
            if not name:
                continue
            if node.op_type == "Shape" and position == 0:
                value = self._shape_stand_in(name)
            elif node.op_type == "CastLike" and position == 1:
                value = self._type_stand_in(name)
            else:
                constant = self.index.constant(name)
                value = None if constant is None else constant.value
            if value is None:
                return None
            feeds[name] = value
        inputs = [feeds.get(name) for name in node.input]
        if _output_elements(node, inputs) > self.cap:
            return None
        from onnx.reference import ReferenceEvaluator  # imported on first need: it loads every op

        # A one-node graph: given a bare NodeProto, ReferenceEvaluator ignores ``opsets`` and runs
        # the latest version of the op (Unsqueeze-13 refuses opset 11's axes attribute).
        graph = onnx.helper.make_graph([node], "computed_constant", [onnx.ValueInfoProto(name=name) for name in feeds],
                                       [onnx.ValueInfoProto(name=node.output[0])])
        try:
            evaluator = ReferenceEvaluator(graph, opsets={"": default_opset(self.index.model)})
            value = np.asarray(evaluator.run(None, feeds)[0])
        except Exception as error:  # the runtime would fail on it as well: not a constant
            logger.debug("cannot evaluate %s '%s' at load time: %s", node.op_type, node.name, error)
            return None
        return value if value.size <= self.cap else None

    def _shape_stand_in(self, name: str) -> Optional[np.ndarray]:
        """An array with the shape and dtype of constant ``name``, without reading its payload."""
        source = name
        while source in self.index.producers and self.index.producers[source].op_type == "Identity":
            source = self.index.producers[source].input[0]
        tensor = self.index.initializers.get(source)
        if tensor is not None and source not in self.index.producers:
            if self.index.is_overridable_input(source):
                return None
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            return np.broadcast_to(np.zeros((), dtype), tuple(tensor.dims))  # no memory per element
        constant = self.index.constant(name)
        return None if constant is None else constant.value

    def _type_stand_in(self, name: str) -> Optional[np.ndarray]:
        """A zero of the element type of ``name`` (CastLike reads nothing else)."""
        elem_type = self._element_type(name)
        return None if not elem_type else np.zeros((), onnx.helper.tensor_dtype_to_np_dtype(elem_type))

    def _element_type(self, name: str) -> int:
        index = self.index
        if name in index.initializers:
            return index.initializers[name].data_type
        if self._declared_types is None:
            graph = index.graph
            self._declared_types = {value.name: value.type.tensor_type.elem_type
                                    for value in [*graph.input, *graph.value_info, *graph.output]
                                    if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type}
        if name in self._declared_types:
            return self._declared_types[name]
        producer = index.producers.get(name)
        if producer is not None and producer.op_type == "Constant":
            constant = index.constant(name)
            if constant is not None:
                return onnx.helper.np_dtype_to_tensor_dtype(constant.value.dtype)
        if self._inferred_types is None:
            self._inferred_types = self._infer_types()
        return self._inferred_types.get(name, 0)

    def _infer_types(self) -> dict:
        """Element types by onnx shape inference on the index's nodes (an editor may not have
        flushed removed nodes from the protobuf list yet: those are left out)."""
        index = self.index
        live = [node for node in index.graph.node
                if any(name and index.producers.get(name) is node for name in node.output)]
        skeleton = weightless_copy(index.model)
        del skeleton.graph.node[:]
        skeleton.graph.node.extend(live)
        return {name: value.type.tensor_type.elem_type for name, value in inferred_value_infos(skeleton).items()
                if value.type.HasField("tensor_type")}

    @property
    def cap(self) -> int:
        """The most elements a computed constant may have: the largest stored tensor's count."""
        if self._cap is None:
            sizes = [int(np.prod(tensor.dims, dtype=np.int64)) for tensor in self.index.initializers.values()]
            for node in self.index.graph.node:
                if node.op_type == "Constant":
                    sizes.extend(int(np.prod(attr.t.dims, dtype=np.int64)) for attr in node.attribute
                                 if attr.type == onnx.AttributeProto.TENSOR)
            self._cap = max([MIN_ELEMENT_CAP, *sizes])
        return self._cap


def _output_elements(node: onnx.NodeProto, inputs: list) -> int:
    """The output's element count, for the ops that can make a value larger than their inputs
    (0 for the others: their output is checked once computed)."""
    op = node.op_type
    try:
        if op == "Expand":
            return math.prod(np.broadcast_shapes(inputs[0].shape, tuple(int(d) for d in inputs[1].reshape(-1))))
        if op in BROADCASTING_OPS:
            return math.prod(np.broadcast_shapes(*(value.shape for value in inputs)))
        if op == "Gather":
            data, indices = inputs[0], inputs[1]
            rows = data.shape[attribute(node, "axis", 0)] if data.ndim else 0
            return data.size // rows * indices.size if rows else 0
    except (ValueError, IndexError):  # shapes that do not fit: evaluation fails and says so
        return 0
    return 0
