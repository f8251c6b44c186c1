"""Graph edits shared by the passes: give a node input a new constant value, rewire, drop what died.

Rule: never mutate a shared tensor.

* a constant is overwritten where it lives (initializer or Constant node) only when every hop
  from the node being rewritten back to it is read by nothing else;
* otherwise the node gets a fresh initializer with a unique name and the old chain is left to
  its other readers; so does a node reading a computed constant (:mod:`bnpass.computed_constants`,
  e.g. ``Expand(CastLike(...))``): the node reads a plain initializer and the computation, once
  nothing reads it, goes with :meth:`GraphEditor.remove_dead`;
* in IR < 4 models every initializer must also be a graph input, so a new initializer is listed
  there too, and a graph input that only served a removed initializer goes with it.

Every edit keeps the editor's :class:`~bnpass.graph.GraphIndex` up to date in place (the node
touched is unregistered, changed and registered again), so an edit costs O(size of the node), not
O(size of the graph), and a pass making one edit per BatchNormalization stays linear. Removed nodes,
initializers and graph inputs leave the index at once but the protobuf lists only at
:meth:`GraphEditor.flush` (called by :meth:`GraphEditor.remove_dead`), in one sweep: deleting from a
protobuf list one element at a time costs O(list length) each. Code that reads ``model.graph``
directly between edits must call :meth:`GraphEditor.flush` first; code that changes the graph behind
the editor's back must make a new editor.

Memory: protobuf's upb backend frees nothing inside a message until the whole message is freed,
so overwriting a weight of a copied model keeps the old payload too (measured: ``CopyFrom``,
remove-and-append and assigning ``raw_data`` all grow the copy by the size of what they replace):
copy, then overwrite, holds about 2x the model. :meth:`GraphEditor.on_copy_of` starts instead from a
*weightless* copy (initializers reduced to name, type and dims) while the index reads the input's
values; a new value is written over its stub (a few bytes lost, not a payload) and
:meth:`GraphEditor.build` copies the unchanged values in at the end, so each payload is copied once.
Where the values live is the editor's one difference between the two modes, and it is held by one
object: :class:`_ValuesInGraph` (an editor made with ``GraphEditor(model)``) or
:class:`_ValuesInSource` (made by :meth:`GraphEditor.on_copy_of`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import GraphIndex
from .protos import weightless_copy


class _ValuesInGraph:
    """Initializer values live in the edited graph itself: the index reads them there, and an
    overwrite changes them there."""

    def register(self, index: GraphIndex) -> None:
        """Make ``index`` read initializer values from where they live (the graph: nothing to do)."""

    def added(self, name: str, tensor: onnx.TensorProto) -> None:
        """``tensor``, just appended to the graph as initializer ``name``, holds its value."""

    def overwrite(self, index: GraphIndex, name: str, tensor: onnx.TensorProto) -> None:
        index.initializers[name].CopyFrom(tensor)

    def remove(self, index: GraphIndex, name: str) -> onnx.TensorProto:
        """Forget initializer ``name``; return the message to delete from the graph."""
        return index.initializers[name]

    def fill_in(self, graph: onnx.GraphProto) -> None:
        """Give every initializer of ``graph`` its value (they all have it already)."""


class _ValuesInSource:
    """The edited graph holds stubs (name, type, dims); values are read from the source model's
    initializers until a new value is written over a stub, and :meth:`fill_in` copies the unchanged
    ones into their stubs at the end. The source model is never changed."""

    def __init__(self, source: onnx.ModelProto, graph: onnx.GraphProto):
        # name -> the TensorProto holding the value (the source's, read only, or the stub written
        # over), and name -> its stub in ``graph``.
        self.values = {tensor.name: tensor for tensor in source.graph.initializer}
        self.stubs = {stub.name: stub for stub in graph.initializer}
        self.written: set = set()  # names whose stub holds its (new) value

    def register(self, index: GraphIndex) -> None:
        for tensor in self.values.values():
            index.register_initializer(tensor)

    def added(self, name: str, tensor: onnx.TensorProto) -> None:
        self.stubs[name] = self.values[name] = tensor
        self.written.add(name)

    def overwrite(self, index: GraphIndex, name: str, tensor: onnx.TensorProto) -> None:
        stored = self.stubs[name]  # written over its stub (a few bytes: what upb keeps of it costs nothing)
        stored.CopyFrom(tensor)
        self.added(name, stored)
        index.register_initializer(stored)

    def remove(self, index: GraphIndex, name: str) -> onnx.TensorProto:
        del self.values[name]
        self.written.discard(name)
        return self.stubs.pop(name)

    def fill_in(self, graph: onnx.GraphProto) -> None:
        for stub in graph.initializer:
            if stub.name not in self.written:
                stub.CopyFrom(self.values[stub.name])


class GraphEditor:
    """Edits one model in place, keeping a :class:`GraphIndex` of it up to date.

    Made by :meth:`on_copy_of`, it edits a weightless copy instead, and :meth:`build` returns the
    edited model with its initializers' values.
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self._index: Optional[GraphIndex] = None
        self._values: _ValuesInGraph | _ValuesInSource = _ValuesInGraph()
        self._detached: set = set()  # names that may have lost their last reader
        self._value_info: Optional[dict] = None  # name -> [ValueInfoProto], built on first need
        # Removed from the index, still to delete from the protobuf lists: id(message) -> message.
        self._removed_nodes: dict = {}
        self._removed_initializers: dict = {}
        self._removed_inputs: dict = {}

    @classmethod
    def on_copy_of(cls, model: onnx.ModelProto) -> GraphEditor:
        """An editor of a copy of ``model`` that copies each initializer value once; :meth:`build`
        returns the copy.

        The copy starts weightless (:func:`~bnpass.protos.weightless_copy`); the index reads the
        values of ``model``'s initializers where they are, and ``model`` is never changed. A model
        whose initializer names repeat (invalid ONNX) is copied whole and edited in place instead.
        """
        names = [tensor.name for tensor in model.graph.initializer]
        if len(set(names)) != len(names):
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            return cls(copy)
        editor = cls(weightless_copy(model))
        editor._values = _ValuesInSource(model, editor.graph)
        return editor

    def build(self) -> onnx.ModelProto:
        """The edited model, every initializer with its value (on a copy: the unchanged ones are
        copied in now). The editor then edits that model in place."""
        self.flush()
        self._values.fill_in(self.graph)
        self._values, self._index = _ValuesInGraph(), None  # from now on the values are in the graph
        return self.model

    @property
    def index(self) -> GraphIndex:
        if self._index is None:
            self._index = GraphIndex(self.model)
            self._values.register(self._index)  # on a copy, the index reads values, not the stubs
        return self._index

    def flush(self) -> None:
        """Delete removed nodes, initializers and graph inputs from the protobuf lists (one sweep each)."""
        for container, removed in ((self.graph.node, self._removed_nodes),
                                   (self.graph.initializer, self._removed_initializers),
                                   (self.graph.input, self._removed_inputs)):
            if removed:
                positions = [i for i, item in enumerate(container) if id(item) in removed]
                for position in reversed(positions):
                    del container[position]
                removed.clear()

    def fresh_name(self, base: str) -> str:
        """``base`` or ``base_1``, ``base_2``...: a name nothing in the graph uses; it is reserved."""
        return self.index.reserve_name(base)

    # --- constants ------------------------------------------------------------------------
    def set_constant_input(self, node: onnx.NodeProto, position: int, value: np.ndarray,
                           name_hint: str) -> None:
        """Make ``node.input[position]`` read ``value`` (already in its final dtype).

        ``position`` may be one past the node's last input, to add an optional input (a bias).
        """
        if position < len(node.input) and node.input[position]:
            current = self.index.overwritable_constant(node.input[position], node)
            if current is not None:
                self._overwrite_source(current.source, value)
                return
        self.set_input(node, position, self.add_initializer(value, name_hint))

    def add_initializer(self, value: np.ndarray, name_hint: str) -> str:
        """Store ``value`` as a new initializer with a fresh name (IR < 4: also a graph input)."""
        name = self.fresh_name(name_hint)
        self.graph.initializer.append(numpy_helper.from_array(_contiguous(value), name))
        tensor = self.graph.initializer[-1]  # the stored copy, which later edits must change
        self.index.register_initializer(tensor)
        self._values.added(name, tensor)
        if self.model.ir_version < 4:
            self.graph.input.append(onnx.helper.make_tensor_value_info(
                name, tensor.data_type, list(tensor.dims)))
            self.index.register_graph_input(self.graph.input[-1])
        return name

    def _overwrite_source(self, source: str, value: np.ndarray) -> None:
        index = self.index
        tensor = numpy_helper.from_array(_contiguous(value), source)
        if source in index.initializers:
            self._values.overwrite(index, source, tensor)
        else:  # a Constant or ConstantOfShape node: it becomes a Constant of the new value
            producer = index.producers[source]
            replacement = onnx.helper.make_node("Constant", [], [source], name=producer.name, value=tensor)
            self.replace_node(producer, replacement)
        self._retype_declarations(source, tensor)

    def _retype_declarations(self, name: str, tensor: onnx.TensorProto) -> None:
        """Keep graph-input and value-info declarations of ``name`` in step with its new value."""
        declared = onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims))
        graph_input = self.index.graph_inputs.get(name)
        if graph_input is not None:
            graph_input.type.CopyFrom(declared.type)
        for value in self._value_info_by_name().pop(name, ()):
            self.graph.value_info.remove(value)

    def _value_info_by_name(self) -> dict:
        if self._value_info is None:
            self._value_info = {}
            for value in self.graph.value_info:
                self._value_info.setdefault(value.name, []).append(value)
        return self._value_info

    # --- nodes ----------------------------------------------------------------------------
    def set_input(self, node: onnx.NodeProto, position: int, name: str) -> None:
        """Make ``node.input[position]`` read ``name`` (``position`` may extend the input list)."""
        index = self.index
        old = node.input[position] if position < len(node.input) else ""
        index.unregister_node(node)
        while len(node.input) <= position:
            node.input.append("")
        node.input[position] = name
        index.register_node(node)
        if old and old != name:
            self._detached.add(old)

    def set_output(self, node: onnx.NodeProto, position: int, name: str) -> None:
        """Rename output ``position`` of ``node``; the caller makes sure nothing reads the old name."""
        index = self.index
        index.unregister_node(node)
        node.output[position] = name
        index.register_node(node)

    def insert_node(self, node: onnx.NodeProto, *, after: onnx.NodeProto) -> onnx.NodeProto:
        """Insert a copy of ``node`` right after ``after`` (keeping topological order); return it.

        O(graph size), to find ``after``: fine for the rare edit that adds a node.
        """
        position = next(i for i, existing in enumerate(self.graph.node) if existing is after) + 1
        self.graph.node.insert(position, node)
        stored = self.graph.node[position]
        self.index.register_node(stored)
        return stored

    def insert_on_outputs(self, inserts: list) -> None:
        """Put each ``node`` of ``inserts`` (``(name, node)`` pairs) on tensor ``name``: the node making
        ``name`` makes ``node.input[0]`` (a fresh name) instead, and a copy of ``node``, which makes
        ``name``, goes right after it (several after one node: in the order given), so what read
        ``name`` reads ``node``'s output. One sweep of the node list, which is rebuilt: node messages
        taken from the graph before are not the graph's after, and the index is made again on next use
        (so the renames are not told to this one)."""
        following: dict = {}
        for name, node in inserts:
            producer = self.index.producers[name]
            producer.output[list(producer.output).index(name)] = node.input[0]
            following.setdefault(id(producer), []).append(node)
        if not following:
            return
        self.flush()
        nodes = []
        for existing in self.graph.node:
            nodes.append(existing)
            nodes.extend(following.get(id(existing), ()))
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self._index = None  # the list holds new messages now: the index is made again on next use

    def remove_node(self, node: onnx.NodeProto) -> None:
        self._detached.update(name for name in node.input if name)
        self.index.unregister_node(node)
        self._removed_nodes[id(node)] = node

    def replace_node(self, old: onnx.NodeProto, new: onnx.NodeProto) -> onnx.NodeProto:
        """Put ``new`` in ``old``'s place in the node list (keeping topological order)."""
        self._detached.update(name for name in old.input if name)
        self.index.unregister_node(old)
        old.CopyFrom(new)
        self.index.register_node(old)
        return old

    @staticmethod
    def set_attribute(node: onnx.NodeProto, name: str, value) -> None:
        """Set (add or replace) a non-graph attribute of ``node``."""
        GraphEditor.remove_attribute(node, name)
        node.attribute.append(onnx.helper.make_attribute(name, value))

    @staticmethod
    def remove_attribute(node: onnx.NodeProto, name: str) -> None:
        for attr in node.attribute:
            if attr.name == name:
                node.attribute.remove(attr)
                return

    # --- cleanup --------------------------------------------------------------------------
    def remove_dead(self) -> None:
        """Remove what the edits left without readers: nodes, initializers, stale declarations.

        Only names detached by this editor are considered, so dead code the model already had is
        left as it was.
        """
        index = self.index
        pending = set(self._detached)
        self._detached.clear()
        while pending:
            name = pending.pop()
            if index.use_count(name):
                continue
            producer = index.producers.get(name)
            if producer is not None:
                if all(index.use_count(out) == 0 for out in producer.output if out):
                    pending.update(inp for inp in producer.input if inp)
                    index.unregister_node(producer)
                    self._removed_nodes[id(producer)] = producer
                continue
            if name in index.initializers and not index.is_overridable_input(name):
                tensor = self._values.remove(index, name)
                self._removed_initializers[id(tensor)] = tensor
                index.unregister_initializer(name)
                # In IR < 4 the initializer's graph input is part of how it is stored.
                if self.model.ir_version < 4 and name in index.graph_inputs:
                    value = index.graph_inputs[name]
                    self._removed_inputs[id(value)] = value
                    index.unregister_graph_input(name)
        self.flush()
        self.drop_stale_value_info()

    def drop_stale_value_info(self) -> None:
        produced = {name for node in self.graph.node for name in node.output}
        for value in list(self.graph.value_info):
            if value.name not in produced:
                self.graph.value_info.remove(value)
        self._value_info = None


def _contiguous(value: np.ndarray) -> np.ndarray:
    """``value`` C-contiguous, its shape kept: ``np.ascontiguousarray`` makes a scalar ``[1]``, and a
    quantizer's scalar scale or zero point must stay a scalar."""
    return np.require(value, requirements="C")
