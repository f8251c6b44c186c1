"""Questions about an ONNX graph: producers, consumers, uses, constant values.

A :class:`GraphIndex` answers them for the top-level graph as it was when built. Edits made through
:class:`bnpass.rewrite.GraphEditor` keep it up to date incrementally (the editor calls
``register_node`` / ``unregister_node`` and friends, each O(inputs + outputs) of the node touched),
so a pass that makes one edit per BatchNormalization stays linear in the graph size; anything else
that edits the graph must build a new index. Names used inside subgraphs (If/Loop/Scan bodies)
that refer to the outer graph count as uses, so that nothing a subgraph reads is ever treated as
private to one node.

Constant values are followed through the places exporters put them: initializers, ``Constant``
nodes, ``Identity`` chains, ``ConstantOfShape`` of a constant shape, and small computations of
constants such as torch's ``Expand(CastLike(Constant 0, x), Shape(W)[0:1])`` zero bias
(:mod:`bnpass.computed_constants`). An initializer that is also a graph input is only a *default*
from IR version 4 on (the caller may feed another value), so it is a constant only in IR-3 models,
where every initializer must be listed as a graph input.

Protobuf utilities (attributes, opsets, copies, value infos, fresh names) live in :mod:`bnpass.protos`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from .computed_constants import ComputedConstants
from .protos import DEFAULT_DOMAINS, attribute, unique_name

BATCHNORM = "BatchNormalization"


def is_batchnorm(node: onnx.NodeProto) -> bool:
    return node.op_type == BATCHNORM and node.domain in DEFAULT_DOMAINS


def node_label(node: onnx.NodeProto) -> str:
    """A name for messages: the node's name, or its op type and first output when unnamed."""
    return node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in ``node``'s attributes (If branches, Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _graph_reads(graph: onnx.GraphProto) -> Iterator[str]:
    """Every name read by nodes of ``graph`` and of its nested subgraphs."""
    for node in graph.node:
        yield from (name for name in node.input if name)
        for subgraph in _subgraphs(node):
            yield from _graph_reads(subgraph)


def subgraph_reads(node: onnx.NodeProto) -> set:
    """Names read inside the subgraphs of ``node`` (If/Loop/Scan bodies), outer scope included."""
    return {name for subgraph in _subgraphs(node) for name in _graph_reads(subgraph)}


@dataclass(frozen=True)
class Constant:
    """A constant value and where it comes from.

    ``source`` is the name of the initializer, the Constant/ConstantOfShape output or the computed
    node's output (:mod:`bnpass.computed_constants`) the chain ends at; ``chain`` lists the names
    from the node input back to ``source`` (Identity hops).
    """

    value: np.ndarray
    source: str
    chain: tuple


class GraphIndex:
    """Producers, consumers and constants of the top-level graph of a model."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.ir_version = model.ir_version
        self.initializers = {tensor.name: tensor for tensor in self.graph.initializer}
        self.graph_inputs = {value.name: value for value in self.graph.input}
        self.graph_outputs = {value.name for value in self.graph.output}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list] = defaultdict(list)
        # name -> number of nodes whose subgraphs read it (a multiset, so removals can be undone)
        self.subgraph_reads: Counter = Counter()
        self._taken: Optional[set] = None  # every name in use, built on first need
        self._computed = None  # ComputedConstants: made on first need, told of every edit
        for node in self.graph.node:
            self.register_node(node)

    # --- incremental updates (GraphEditor calls these around each edit) --------------------
    def register_node(self, node: onnx.NodeProto) -> None:
        """Record ``node`` (already in the graph, or about to be) as producer and consumer."""
        for name in node.output:
            if name:
                self.producers[name] = node
        for name in node.input:
            if name:
                self.consumers[name].append(node)
        reads = subgraph_reads(node)
        self.subgraph_reads.update(reads)
        self._forget_computed(node.output)
        if self._taken is not None:
            self._taken.update(node.output)
            self._taken.add(node.name)
            self._taken.update(reads)

    def unregister_node(self, node: onnx.NodeProto) -> None:
        """Forget ``node`` as producer and consumer (before removing or rewriting it).

        Names stay reserved in :meth:`reserve_name`'s set: a name once used is never handed out
        again by this index, which is all uniqueness needs.
        """
        for name in node.output:
            if name and self.producers.get(name) is node:
                del self.producers[name]
        for name in set(node.input):
            if name and name in self.consumers:
                remaining = [user for user in self.consumers[name] if user is not node]
                if remaining:
                    self.consumers[name] = remaining
                else:
                    del self.consumers[name]
        reads = subgraph_reads(node)
        if reads:
            self.subgraph_reads.subtract(reads)
            for name in reads:
                if self.subgraph_reads[name] <= 0:
                    del self.subgraph_reads[name]
        self._forget_computed(node.output)

    def register_initializer(self, tensor: onnx.TensorProto) -> None:
        self.initializers[tensor.name] = tensor
        self._forget_computed((tensor.name,))
        if self._taken is not None:
            self._taken.add(tensor.name)

    def unregister_initializer(self, name: str) -> None:
        self.initializers.pop(name, None)
        self._forget_computed((name,))

    def register_graph_input(self, value: onnx.ValueInfoProto) -> None:
        self.graph_inputs[value.name] = value
        self._forget_computed((value.name,))
        if self._taken is not None:
            self._taken.add(value.name)

    def unregister_graph_input(self, name: str) -> None:
        self.graph_inputs.pop(name, None)
        self._forget_computed((name,))

    def _forget_computed(self, names) -> None:
        if self._computed is not None:
            self._computed.forget(names)

    def reserve_name(self, base: str) -> str:
        """A name no tensor, node or graph I/O of this graph uses (see :func:`unique_name`); it is
        reserved, so later calls never return it again."""
        if self._taken is None:
            self._taken = self.all_names()
        return unique_name(base, self._taken)

    # --- uses -----------------------------------------------------------------------------
    def use_count(self, name: str) -> int:
        """How many times ``name`` is read: node inputs (with repeats), graph outputs, subgraphs."""
        count = len(self.consumers.get(name, ()))
        count += name in self.graph_outputs
        count += name in self.subgraph_reads
        return count

    def first_shared(self, names) -> Optional[str]:
        """The first of ``names`` not read exactly once (by one node, or one graph output or subgraph use),
        None when each is: where a chain of tensors stops being private to the nodes along it."""
        return next((name for name in names if self.use_count(name) != 1), None)

    def sole_reader(self, name: str) -> Optional[onnx.NodeProto]:
        """The one node that reads ``name``, once, when nothing else reads it (no other node, graph
        output or subgraph); else None."""
        users = self.consumers.get(name, ())
        if len(users) != 1 or name in self.graph_outputs or name in self.subgraph_reads:
            return None
        return users[0]

    def is_private_to(self, name: str, node: onnx.NodeProto) -> bool:
        """True when ``node`` is the only reader of ``name``, and reads it once."""
        return self.sole_reader(name) is node

    def is_overridable_input(self, name: str) -> bool:
        """An initializer listed as a graph input in IR >= 4: a default the caller may replace."""
        return name in self.graph_inputs and self.ir_version >= 4

    def real_inputs(self) -> list:
        """Graph inputs the caller must feed (those without an initializer)."""
        return [value for value in self.graph.input if value.name not in self.initializers]

    # --- constants ------------------------------------------------------------------------
    def constant(self, name: str) -> Optional[Constant]:
        """The constant value of tensor ``name``, or None when it depends on what is fed at run time."""
        chain = [name]
        while name in self.producers and self.producers[name].op_type == "Identity":
            name = self.producers[name].input[0]
            chain.append(name)
        value = self._source_value(name)
        if value is None:
            return None
        return Constant(value=value, source=name, chain=tuple(chain))

    def _source_value(self, name: str) -> Optional[np.ndarray]:
        if name in self.initializers:
            if self.is_overridable_input(name):
                return None
            return numpy_helper.to_array(self.initializers[name])
        if name in self.graph_inputs:
            return None
        node = self.producers.get(name)
        if node is None or node.domain not in DEFAULT_DOMAINS:
            return None
        if node.op_type == "Constant":
            return _constant_node_value(node)
        if node.op_type == "ConstantOfShape":
            shape = self.constant(node.input[0])
            if shape is None:
                return None
            fill = attribute(node, "value")
            fill_value = numpy_helper.to_array(fill) if fill is not None else np.zeros(1, np.float32)
            return np.full(tuple(int(d) for d in shape.value.reshape(-1)), fill_value.reshape(-1)[0],
                           dtype=fill_value.dtype)
        if self._computed is None:
            self._computed = ComputedConstants(self)
        return self._computed.value(node)

    def overwritable_constant(self, name: str, node: onnx.NodeProto) -> Optional[Constant]:
        """The constant ``node`` reads as ``name`` where it can be overwritten in place, else None: it is
        stored (an initializer, a Constant or ConstantOfShape node, not computed) and every hop from
        ``node`` back to it is read by nothing else."""
        constant = self.constant(name)
        if constant is None:
            return None
        producer = self.producers.get(constant.source)
        if producer is not None and producer.op_type not in ("Constant", "ConstantOfShape"):
            return None
        return constant if self.constant_chain_is_private(constant, node) else None

    def constant_chain_is_private(self, constant: Constant, node: onnx.NodeProto) -> bool:
        """True when every hop from ``node``'s input back to the source is read only once."""
        reader = node
        for name in constant.chain:
            if not self.is_private_to(name, reader):
                return False
            reader = self.producers.get(name)
        return True

    # --- names ----------------------------------------------------------------------------
    def all_names(self) -> set:
        names = set(self.initializers) | set(self.graph_inputs) | set(self.graph_outputs)
        names.update(value.name for value in self.graph.value_info)
        for node in self.graph.node:
            names.update(node.output)
            names.add(node.name)
        names.update(self.subgraph_reads)
        return names


def _constant_node_value(node: onnx.NodeProto) -> Optional[np.ndarray]:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse_value and string constants are never BN or weight parameters
