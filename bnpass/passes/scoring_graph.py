"""One model that computes several models' outputs from the same inputs, every common part once.

``--reference`` scores the reference, the model as given and two to four candidates on every batch
(:mod:`bnpass.passes.candidates`). The candidates are copies of one model that differ in a few
tensors (the BN statistics, the corrected layers' weights; "matched" and "matched-except-logits"
only in the last layer), so one session running :func:`merge_models`'s result computes their common
part once, where separate sessions compute it once each. On tools/bench.py's networks (batch 32,
CPU, ``python tools/measure_scoring_graph.py``) one merged session took 0.72-0.81x the time per
batch of the separate sessions with a compressed model (20-25% of the nodes shared: the candidates
"matched" and "matched-except-logits"), 0.25-0.60x with the model as its own reference as the bench
runs it, and about half the peak memory, with every output bit-identical.

**Sharing (value numbering).** Every tensor gets a value: a graph input its name; an initializer
its content (type, dims, bytes) and whether it is also a graph input (an overridable initializer,
which onnxruntime neither folds nor fuses, stays one); a node output the node's value and output
position. A node's value is its domain, op_type, attributes (serialized; a tensor attribute by
content, not by name) and its inputs' values. Nodes of different models with the same value are one
node in the merged model; the others are copied, their outputs renamed per model. Two nodes of the
same model are never merged into one (the k-th node of a value in one model pairs with the k-th in
another), so each model keeps its own structure, and nodes of random operators are never shared.

**Exact, not close.** The merged model's outputs are bit for bit those of each model in its own
session, made with the same options, because onnxruntime sees around every node of a model what it
sees in that model alone. Its fusions (Conv + BatchNormalization folded into the weights, Conv + Add
+ Relu, MatMul + Add into Gemm, an int8 QuantizeLinear -> DequantizeLinear pair made uint8 for the
x86 kernels) each take a node together with its consumer only where that consumer is its only one.
A shared node whose output feeds different consumers in different models (the first Conv of two
candidates that differ in the BN after it) would lose such a fusion and compute in another order:
measured, MobileNet's logits moved by up to 3e-5, an int8 QDQ model's by whole quantization steps.
So such a node is copied per model (partition refinement, until no shared node's consumers differ
between the models sharing it), unless :data:`BRANCHES_EXACTLY` lets its op feed those consumers:
pairs after which the models measured branch with bit-identical outputs (the bench networks and
every example, tests/test_scoring_graph.py), such as the ReduceMean before the logits layer. Graph
inputs and initializers may always feed different consumers; a tensor one model reads as a graph
output is shared only with models that read it as one too.

**Copies kept apart.** onnxruntime runs its own common subexpression elimination on the merged model
(after sharing single-value float and int32/int64 initializers by value), which would merge the
copies back: a node copied per model reads its own copy of its smallest other initializer; a node
without one makes the nodes it reads copied too, and one that reads only graph inputs and such
constants (``Relu(input)`` in two models that use it differently) cannot be kept apart: refused.

**Refused** (:class:`MergeRefused`, the caller runs separate sessions instead): models with other
inputs (name, element type, rank, fixed dims), another version of an operator set, subgraphs (If,
Loop, Scan: refused rather than renaming what they read from the outer graph), model-local
functions, sparse initializers, tensors stored outside the model (external data: merge models loaded
in memory), or nodes out of topological order. ``value_info`` is kept, renamed with its tensor; the
IR version is the highest of the models'.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from ..protos import DEFAULT_DOMAINS, unique_name

# Where the models may branch: ``{op: the ops that may read its output}``, read by different
# consumers in different models with outputs still bit for bit those of separate sessions. No
# onnxruntime fusion takes such an op together with such a consumer; each pair was measured on the
# bench networks and the examples (tests/test_scoring_graph.py). Everything else is copied per model.
BRANCHES_EXACTLY = {
    "ReduceMean": {"Gemm", "MatMul", "Flatten", "Reshape"},  # global average pooling before the logits layer
    "GlobalAveragePool": {"Gemm", "MatMul", "Flatten", "Reshape"},
    "Flatten": {"Gemm", "MatMul"},  # the features before the logits layer
    "Relu": {"Gemm", "MatMul", "Conv", "ReduceMean", "GlobalAveragePool", "Flatten", "MaxPool"},
    # onnxruntime gives every quantized consumer its own copy of a DequantizeLinear (EnsureUniqueDQForNodeUnit);
    # only of uint8 values (_branches_exactly): an int8 QuantizeLinear -> DequantizeLinear pair is made uint8
    # for the x86 kernels (QDQS8ToU8Transformer) only where the QuantizeLinear has one consumer
    "DequantizeLinear": {"Gemm", "MatMul", "Conv"},
}
QUANTIZATION_DOMAINS = ("", "com.microsoft")  # com.microsoft: its QuantizeLinear/DequantizeLinear (int4)
# onnxruntime's ConstantSharing merges single-value initializers of these types by value
SHARED_BY_VALUE = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                             onnx.TensorProto.INT32, onnx.TensorProto.INT64})
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                        "Bernoulli"})


class MergeRefused(Exception):
    """The models cannot be merged into one exact model; the message says why (one line)."""


@dataclass
class MergeStatistics:
    """How much :func:`merge_models` shared: nodes in all the models together, nodes in the merged model
    (outputs' Identity nodes not counted), initializers likewise."""

    nodes: int = 0
    merged_nodes: int = 0
    initializers: int = 0
    merged_initializers: int = 0
    branches: dict = field(default_factory=dict)  # op_type -> how many shared nodes branch after it

    @property
    def shared_fraction(self) -> float:
        """The fraction of the models' nodes that the merged model does not compute again."""
        return 1 - self.merged_nodes / self.nodes if self.nodes else 0.0


def merge_models(models: dict) -> tuple:
    """``(merged, outputs)``: one ModelProto computing every model's outputs from their common inputs,
    and ``{model name: [its outputs' names in the merged model, in the model's output order]}``.

    ``models``: ``{name: ModelProto}``, all with the same graph inputs. The models are not changed.
    Raises :class:`MergeRefused` where the result could not be exact (module docstring)."""
    merged, outputs, _ = merge_models_with_statistics(models)
    return merged, outputs


def merge_models_with_statistics(models: dict) -> tuple:
    """:func:`merge_models`, plus a :class:`MergeStatistics`."""
    if not models:
        raise MergeRefused("no model to merge")
    for name, model in models.items():
        _check_mergeable(name, model)
    opsets = _common_opsets(models)
    _check_same_inputs(models)
    numbering = _Numbering(models)
    numbering.refine()
    return numbering.build(opsets)


def _check_mergeable(name: str, model: onnx.ModelProto) -> None:
    graph = model.graph
    if model.functions:
        raise MergeRefused(f"model '{name}' defines local functions")
    if graph.sparse_initializer:
        raise MergeRefused(f"model '{name}' has sparse initializers")
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise MergeRefused(f"model '{name}': initializer '{tensor.name}' is stored outside the model")
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise MergeRefused(f"model '{name}': node '{node.name or node.op_type}' ({node.op_type}) holds a "
                                   "subgraph")
            if attribute.type in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS):
                raise MergeRefused(f"model '{name}': node '{node.name or node.op_type}' has a sparse tensor attribute")
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_location == onnx.TensorProto.EXTERNAL:
                raise MergeRefused(f"model '{name}': node '{node.name or node.op_type}' reads a tensor stored outside "
                                   "the model")


def _common_opsets(models: dict) -> dict:
    """``{domain: version}`` over all models ("" for the default domain); refused where they differ."""
    versions = {}
    for name, model in models.items():
        for entry in model.opset_import:
            domain = "" if entry.domain in DEFAULT_DOMAINS else entry.domain
            if domain in versions and versions[domain][0] != entry.version:
                raise MergeRefused(f"model '{name}' imports {domain or 'the default domain'} version {entry.version}, "
                                   f"model '{versions[domain][1]}' version {versions[domain][0]}")
            versions.setdefault(domain, (entry.version, name))
    return {domain: version for domain, (version, _) in versions.items()}


def _data_inputs(model: onnx.ModelProto) -> list:
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _input_signature(value: onnx.ValueInfoProto) -> tuple:
    """Name, type and fixed dims of a graph input (symbolic dims match any symbol)."""
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return value.name, value.type.SerializeToString(deterministic=True)
    tensor = value.type.tensor_type
    dims = None
    if tensor.HasField("shape"):
        dims = tuple(dim.dim_value if dim.HasField("dim_value") else None for dim in tensor.shape.dim)
    return value.name, tensor.elem_type, dims


def _check_same_inputs(models: dict) -> None:
    (first, model), *others = models.items()
    expected = [_input_signature(value) for value in _data_inputs(model)]
    for name, other in others:
        got = [_input_signature(value) for value in _data_inputs(other)]
        if sorted(got, key=lambda signature: signature[0]) != sorted(expected, key=lambda signature: signature[0]):
            raise MergeRefused(f"model '{name}' has other inputs than model '{first}' ({_described(got)} against "
                               f"{_described(expected)})")


def _described(signatures: list) -> str:
    return ", ".join(f"{signature[0]}: {signature[1:]}" for signature in signatures)


def _tensor_key(tensor: onnx.TensorProto) -> tuple:
    """A tensor's content: type, dims and a digest of its values (however they are stored)."""
    if tensor.HasField("raw_data"):
        payload = tensor.raw_data
    elif tensor.data_type == onnx.TensorProto.STRING:
        payload = b"\0".join(tensor.string_data)
    else:
        payload = np.ascontiguousarray(numpy_helper.to_array(tensor)).tobytes()
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(payload).digest()


def _attribute_key(attribute: onnx.AttributeProto) -> tuple:
    if attribute.type == onnx.AttributeProto.TENSOR:
        return attribute.name, "tensor", _tensor_key(attribute.t)
    if attribute.type == onnx.AttributeProto.TENSORS:
        return attribute.name, "tensors", tuple(_tensor_key(tensor) for tensor in attribute.tensors)
    copy = onnx.AttributeProto()
    copy.CopyFrom(attribute)
    copy.ClearField("doc_string")
    return attribute.name, copy.SerializeToString(deterministic=True)


def _random(node: onnx.NodeProto) -> bool:
    """Whether the node may give another result each run (never shared)."""
    if node.domain not in DEFAULT_DOMAINS:
        return False
    return node.op_type in RANDOM_OPS or (node.op_type == "Dropout" and len(node.input) > 2 and bool(node.input[2]))


class _Numbering:
    """Value numbers of every tensor and node of every model (module docstring), refined until no shared
    node feeds different consumers in different models, then written out as one model."""

    def __init__(self, models: dict):
        self.models = models
        self.interned: dict = {}        # key -> value number (stable across refinements)
        self.tags: dict = {}            # (model, node position) -> tag separating it from nodes it was shared with
        self.statics: dict = {}         # model -> {tensor name: value number} for inputs and initializers
        self.node_keys: dict = {}       # model -> [static part of each node's key]
        self.first_initializer: dict = {}  # initializer value -> (model, TensorProto)
        self.outputs_of: dict = {}      # model -> {tensor name: (node position, output position)}
        self.overridable: dict = {}     # model -> names of its initializers also listed as graph inputs
        self.own_copy: dict = {}        # class -> position of the input it reads from its own initializer copy
        for name, model in models.items():
            self._number_statics(name, model)

    def _intern(self, key) -> int:
        return self.interned.setdefault(key, len(self.interned))

    def _number_statics(self, name: str, model: onnx.ModelProto) -> None:
        graph = model.graph
        listed = {value.name for value in graph.input}
        self.overridable[name] = listed & {tensor.name for tensor in graph.initializer}
        statics = {}
        for tensor in graph.initializer:
            number = self._intern(("initializer", _tensor_key(tensor), tensor.name in listed))
            statics[tensor.name] = number
            self.first_initializer.setdefault(number, (name, tensor))
        for value in graph.input:
            if value.name not in statics:
                statics[value.name] = self._intern(("input", value.name))
        self.statics[name] = statics
        keys, produced = [], {}
        for position, node in enumerate(graph.node):
            for number, output in enumerate(node.output):
                if output:
                    produced[output] = (position, number)
            keys.append((node.domain if node.domain not in DEFAULT_DOMAINS else "", node.op_type,
                         tuple(sorted(_attribute_key(attribute) for attribute in node.attribute)),
                         tuple(bool(output) for output in node.output)))
        self.node_keys[name] = keys
        self.outputs_of[name] = produced

    def classes(self) -> dict:
        """``{model: [value number of each node]}`` under the current tags; also the tensors' values."""
        self.values, self.node_outputs, self.op_of, self.untagged, self.tag_of = {}, set(), {}, {}, {}
        result = {}
        for name, model in self.models.items():
            values = dict(self.statics[name])
            numbers, seen = [], {}
            for position, node in enumerate(model.graph.node):
                inputs = []
                for tensor in node.input:
                    if not tensor:
                        inputs.append(None)
                    elif tensor in values:
                        inputs.append(values[tensor])
                    else:
                        raise MergeRefused(f"model '{name}': node '{node.name or node.op_type}' reads '{tensor}' "
                                           "before any node makes it (not in topological order, or undefined)")
                tag = name if _random(node) else self.tags.get((name, position))
                key = (self.node_keys[name][position], tuple(inputs), tag)
                occurrence = seen.get(key, 0)
                seen[key] = occurrence + 1
                number = self._intern(("node", key, occurrence))
                self.untagged[number] = self._intern(("untagged", key[:2]))
                self.tag_of[number] = None if _random(node) else tag  # onnxruntime merges no random node
                self.op_of[number] = (node.op_type if node.domain in DEFAULT_DOMAINS + QUANTIZATION_DOMAINS
                                      else f"{node.domain}:{node.op_type}")
                numbers.append(number)
                for index, output in enumerate(node.output):
                    if output:
                        values[output] = self._intern(("output", number, index))
                        self.node_outputs.add(values[output])
            self.values[name] = values
            result[name] = numbers
        return result

    def _signatures(self, classes: dict) -> dict:
        """``{model: {tensor value: (sorted (consumer value, input position)..., graph output or not)}}``."""
        signatures = {}
        for name, model in self.models.items():
            values = self.values[name]
            readers: dict = {}
            for position, node in enumerate(model.graph.node):
                for index, tensor in enumerate(node.input):
                    if tensor:
                        readers.setdefault(values[tensor], []).append((classes[name][position], index))
            outputs = {values[value.name] for value in model.graph.output}
            signatures[name] = {value: (tuple(sorted(found)), value in outputs) for value, found in readers.items()}
            for value in outputs:
                signatures[name].setdefault(value, ((), True))
        return signatures

    def refine(self) -> None:
        """Copy per model (by tags) every shared node whose outputs feed different consumers in the models
        sharing it, unless its op branches exactly; until none is left."""
        while True:
            self.branch_points = set()
            classes = self.classes()
            signatures = self._signatures(classes)
            members: dict = {}
            for name, numbers in classes.items():
                for position, number in enumerate(numbers):
                    members.setdefault(number, []).append((name, position))
            changed = False
            for number, sharing in members.items():
                if len(sharing) < 2:
                    continue
                name, position = sharing[0]
                node = self.models[name].graph.node[position]
                seen = {}
                for model, place in sharing:
                    produced = self.models[model].graph.node[place].output
                    seen[(model, place)] = tuple(signatures[model].get(self.values[model][tensor], ((), False))
                                                 if tensor else None for tensor in produced)
                if len(set(seen.values())) == 1:
                    continue
                if self._branches_exactly(name, node, list(seen.values())):
                    self.branch_points.add(number)
                    continue
                for (model, place), signature in seen.items():
                    self.tags[(model, place)] = (self.tags.get((model, place)), self._intern(("consumers", signature)))
                changed = True
            if not changed and not self._distinguish(members):
                self.classes_now = classes
                return

    def _distinguish(self, members: dict) -> bool:
        """Give every node copied per model an input of its own, so that onnxruntime's own common
        subexpression elimination does not merge the copies back (it merges nodes reading the same
        tensors, after sharing single-value float and int32/int64 constants): its smallest other
        initializer input is copied (:attr:`own_copy`). A copy with none makes the nodes it reads
        copied per model too (True: refine again); one reading only graph inputs and such constants
        cannot be kept apart, and the merge is refused."""
        groups: dict = {}
        for number in members:
            groups.setdefault(self.untagged[number], []).append(number)
        self.own_copy, changed = {}, False
        for group in groups.values():
            if len(group) < 2:
                continue
            for number in group:
                if self.tag_of[number] is None:
                    continue
                model, place = members[number][0]
                node = self.models[model].graph.node[place]
                position = self._distinguishing_input(model, node)
                if position is not None:
                    self.own_copy[number] = position
                    continue
                producers = [(model, self.outputs_of[model][tensor][0]) for model, place in members[number]
                             for tensor in self.models[model].graph.node[place].input
                             if tensor in self.outputs_of[model]]
                if not producers:
                    raise MergeRefused(f"node '{node.name or node.op_type}' ({node.op_type}) of model '{model}' reads "
                                       "the same tensors in several models that use its output differently, and "
                                       "onnxruntime would compute it once for them")
                for producer in producers:
                    self.tags[producer] = (self.tags.get(producer), self._intern(("under", self.tag_of[number])))
                changed = True
        return changed

    def _quantized_type(self, model: str, node: onnx.NodeProto) -> Optional[int]:
        """The element type a DequantizeLinear of ``model`` reads, from its zero point (uint8 without one)."""
        if len(node.input) < 3 or not node.input[2]:
            return onnx.TensorProto.UINT8
        number = self.statics[model].get(node.input[2])
        return self.first_initializer[number][1].data_type if number in self.first_initializer else None

    def _distinguishing_input(self, model: str, node: onnx.NodeProto) -> Optional[int]:
        """The position of the smallest initializer input that onnxruntime would not share by value, or None."""
        best = None
        for position, tensor in enumerate(node.input):
            number = self.statics[model].get(tensor)
            if number is None or number not in self.first_initializer:
                continue
            _, proto = self.first_initializer[number]
            if proto.name in self.overridable[model]:
                continue
            size = int(np.prod(proto.dims, dtype=np.int64))
            if (len(proto.dims) == 0 or list(proto.dims) == [1]) and proto.data_type in SHARED_BY_VALUE:
                continue
            if best is None or size < best[0]:
                best = (size, position)
        return None if best is None else best[1]

    def _branches_exactly(self, model: str, node: onnx.NodeProto, signatures: list) -> bool:
        """Whether the models may read ``node``'s outputs differently (:data:`BRANCHES_EXACTLY`): its op
        allows every consumer they read it with, and no model reads an output as a graph output where
        another does not."""
        domain = node.domain if node.domain not in DEFAULT_DOMAINS else ""
        readers = BRANCHES_EXACTLY.get(node.op_type) if domain in QUANTIZATION_DOMAINS else None
        if readers is None:
            return False
        if node.op_type == "DequantizeLinear" and self._quantized_type(model, node) != onnx.TensorProto.UINT8:
            return False
        for found in zip(*signatures):  # per output: what each model does with it
            if None in found:
                continue
            if len({graph_output for _, graph_output in found}) > 1:
                return False
            if any(self.op_of[consumer] not in readers for consumers, _ in found for consumer, _ in consumers):
                return False
        return True

    def build(self, opsets: dict) -> tuple:
        classes = self.classes_now
        models = self.models
        first_model = next(iter(models.values()))
        merged = onnx.ModelProto()
        merged.ir_version = max(model.ir_version for model in models.values())
        merged.producer_name = "bnpass scoring graph"
        merged.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items())
        graph = merged.graph
        graph.name = "merged"
        taken: set = set()
        names: dict = {}  # value number -> name in the merged model
        listed_initializers = set()
        statistics = MergeStatistics()
        for value in _data_inputs(first_model):
            graph.input.append(value)
            taken.add(value.name)
            names[self.statics[next(iter(models))][value.name]] = value.name
        for name, model in models.items():
            statistics.initializers += len(model.graph.initializer)
            inputs = {value.name: value for value in model.graph.input}
            for tensor in model.graph.initializer:
                number = self.statics[name][tensor.name]
                if number in names:
                    continue
                new = unique_name(tensor.name if tensor.name not in taken else f"{name}/{tensor.name}", taken)
                names[number] = new
                copy = graph.initializer.add()
                copy.CopyFrom(tensor)
                copy.name = new
                statistics.merged_initializers += 1
                if tensor.name in inputs and number not in listed_initializers:  # overridable: stays an input
                    listed_initializers.add(number)
                    declared = graph.input.add()
                    declared.CopyFrom(inputs[tensor.name])
                    declared.name = new
        sharing: dict = {}
        for name, numbers in classes.items():
            for number in numbers:
                sharing.setdefault(number, set()).add(name)
        emitted = set()
        for name, model in models.items():
            statistics.nodes += len(model.graph.node)
            values = self.values[name]
            for position, node in enumerate(model.graph.node):
                number = classes[name][position]
                if number in emitted:
                    continue
                emitted.add(number)
                statistics.merged_nodes += 1
                shared = len(sharing[number]) > 1
                copy = graph.node.add()
                copy.CopyFrom(node)
                del copy.input[:]
                copy.input.extend(names[values[tensor]] if tensor else "" for tensor in node.input)
                if number in self.own_copy:  # kept apart from its copies in other models (_distinguish)
                    index = self.own_copy[number]
                    tensor = graph.initializer.add()
                    tensor.CopyFrom(self.first_initializer[values[node.input[index]]][1])
                    tensor.name = unique_name(f"{name}/{node.input[index]}", taken)
                    copy.input[index] = tensor.name
                    statistics.merged_initializers += 1
                del copy.output[:]
                for tensor in node.output:
                    if not tensor:
                        copy.output.append("")
                        continue
                    new = unique_name(tensor if shared and tensor not in taken else f"{name}/{tensor}", taken)
                    names[values[tensor]] = new
                    copy.output.append(new)
                if node.name:
                    copy.name = unique_name(node.name if node.name not in taken else f"{name}/{node.name}", taken)
                if number in self.branch_points:
                    statistics.branches[node.op_type] = statistics.branches.get(node.op_type, 0) + 1
        typed = set()
        for name, model in models.items():
            for value in model.graph.value_info:
                number = self.values[name].get(value.name)
                if number is None or number not in names or names[number] in typed:
                    continue
                typed.add(names[number])
                info = graph.value_info.add()
                info.CopyFrom(value)
                info.name = names[number]
        in_models: dict = {}  # value number -> the models it is a tensor of
        for name in models:
            for number in self.values[name].values():
                in_models.setdefault(number, set()).add(name)
        outputs, used_as_output = {}, set()
        for name, model in models.items():
            outputs[name] = []
            for value in model.graph.output:
                number = self.values[name][value.name]
                source = names[number]
                if in_models[number] == {name} and number not in used_as_output and number in self.node_outputs:
                    target = source  # made by a node of this model alone: that node's output is the output
                else:
                    target = unique_name(f"{name}/{value.name}", taken)
                    graph.node.add().CopyFrom(onnx.helper.make_node(
                        "Identity", [source], [target], name=unique_name(f"{name}/output/{value.name}", taken)))
                used_as_output.add(number)
                declared = graph.output.add()
                declared.CopyFrom(value)
                declared.name = target
                outputs[name].append(target)
        return merged, outputs, statistics


def describe(statistics: Optional[MergeStatistics]) -> str:
    """One line: how many nodes and initializers the merged model shares."""
    if statistics is None:
        return "not merged"
    return (f"{statistics.merged_nodes} of {statistics.nodes} nodes computed ({100 * statistics.shared_fraction:.0f}% "
            f"shared), {statistics.merged_initializers} of {statistics.initializers} initializers")
