"""Graph edits shared by the passes: give a node input a new constant value, drop what died.

Rules (STYLE.md, "never mutate a shared tensor"):

* a constant is overwritten where it lives (initializer or Constant node) only when every hop
  from the node being rewritten back to it is read by nothing else;
* otherwise the node gets a fresh initializer with a unique name and the old chain is left to
  its other readers;
* in IR < 4 models every initializer must also be a graph input, so a new initializer is listed
  there too, and a graph input that only served a removed initializer goes with it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import GraphIndex, unique_name


class GraphEditor:
    """Edits one model in place, keeping a :class:`GraphIndex` of it up to date on demand."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self._index = None
        self._detached: set = set()  # names that may have lost their last reader

    @property
    def index(self) -> GraphIndex:
        if self._index is None:
            self._index = GraphIndex(self.model)
        return self._index

    def invalidate(self) -> None:
        self._index = None

    def fresh_name(self, base: str) -> str:
        return unique_name(base, self.index.all_names())

    # --- constants ------------------------------------------------------------------------
    def set_constant_input(self, node: onnx.NodeProto, position: int, value: np.ndarray,
                           name_hint: str) -> None:
        """Make ``node.input[position]`` read ``value`` (already in its final dtype).

        ``position`` may be one past the node's last input, to add an optional input (a bias).
        """
        index = self.index
        if position < len(node.input) and node.input[position]:
            current = index.constant(node.input[position])
            if current is not None and index.constant_chain_is_private(current, node):
                self._overwrite_source(current.source, value)
                return
            self._detached.add(node.input[position])
        name = self.fresh_name(name_hint)
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.graph.initializer.append(tensor)
        if self.model.ir_version < 4:
            self.graph.input.append(onnx.helper.make_tensor_value_info(
                name, tensor.data_type, list(tensor.dims)))
        while len(node.input) <= position:
            node.input.append("")
        node.input[position] = name
        self.invalidate()

    def _overwrite_source(self, source: str, value: np.ndarray) -> None:
        index = self.index
        if source in index.initializers:
            tensor = index.initializers[source]
            tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), source))
            self._retype_declarations(source, tensor)
        else:  # a Constant or ConstantOfShape node: replace it by a Constant of the new value
            producer = index.producers[source]
            tensor = numpy_helper.from_array(np.ascontiguousarray(value), source)
            replacement = onnx.helper.make_node("Constant", [], [source], name=producer.name, value=tensor)
            producer.CopyFrom(replacement)
            self._retype_declarations(source, tensor)
        self.invalidate()

    def _retype_declarations(self, name: str, tensor: onnx.TensorProto) -> None:
        """Keep graph-input and value-info declarations of ``name`` in step with its new value."""
        declared = onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims))
        for value in self.graph.input:
            if value.name == name:
                value.type.CopyFrom(declared.type)
        for value in list(self.graph.value_info):
            if value.name == name:
                self.graph.value_info.remove(value)

    # --- nodes ----------------------------------------------------------------------------
    def remove_node(self, node: onnx.NodeProto) -> None:
        self._detached.update(name for name in node.input if name)
        self.graph.node.remove(node)
        self.invalidate()

    def replace_node(self, old: onnx.NodeProto, new: onnx.NodeProto) -> onnx.NodeProto:
        """Put ``new`` in ``old``'s place in the node list (keeping topological order)."""
        self._detached.update(name for name in old.input if name)
        old.CopyFrom(new)
        self.invalidate()
        return old

    def remove_dead(self) -> None:
        """Remove what the edits left without readers: nodes, initializers, stale declarations.

        Only names detached by this editor are considered, so dead code the model already had is
        left as it was.
        """
        pending = set(self._detached)
        self._detached.clear()
        while pending:
            index = self.index
            name = pending.pop()
            if index.use_count(name):
                continue
            producer = index.producers.get(name)
            if producer is not None:
                if all(index.use_count(out) == 0 for out in producer.output if out):
                    pending.update(inp for inp in producer.input if inp)
                    self.graph.node.remove(producer)
                    self.invalidate()
                continue
            if name in index.initializers and not index.is_overridable_input(name):
                self.graph.initializer.remove(index.initializers[name])
                # In IR < 4 the initializer's graph input is part of how it is stored.
                if self.model.ir_version < 4 and name in index.graph_inputs:
                    self.graph.input.remove(index.graph_inputs[name])
                self.invalidate()
        self.drop_stale_value_info()

    def drop_stale_value_info(self) -> None:
        produced = {name for node in self.graph.node for name in node.output}
        for value in list(self.graph.value_info):
            if value.name not in produced:
                self.graph.value_info.remove(value)
