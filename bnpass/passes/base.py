"""The pass contract, checked: ``pass_(model) -> PassResult``.

A pass is a :class:`Pass` whose :meth:`~Pass.call` does the work; calling the pass itself
(``FoldBatchNormPass()(model)``) runs ``call`` inside the checks, as onnx-ir's ``PassBase`` does:

1. ``requires(model)``: the pass's own preconditions on what it is given;
2. the input is not changed (``changes_input = False``): a :func:`fingerprint` taken before
   ``call`` must equal one taken after;
3. the output is a new model (``in_place = False``), and ``modified`` is exact: False exactly when
   the output's fingerprint equals the input's (running a pass on its own output reports False);
4. the output passes ``onnx.checker.check_model(full_check=True)`` (shape inference included), with
   large weights stood in for by their declarations (:func:`checked_skeleton`), so the check costs
   no copy of the weights;
5. the output keeps the input's interface: the same graph outputs, and the same graph inputs fed
   at run time (an initializer listed as an input, as IR < 4 requires, may come or go);
6. ``ensures(result, model)``: the pass's own postconditions, given the result and the input.

A broken rule is a bug in the pass, not a problem with the user's input: it raises
:class:`PassContractError` (not a :class:`~bnpass.errors.BnpassError`, so the command line shows its
traceback), naming the pass and what broke. An error the pass raises on purpose (a
``BnpassError``: bad data, a refused model) goes through untouched.

**Fingerprint.** One crc32 per top-level item of the model (each initializer, node, input, output,
opset, metadata entry, ...), each serialized alone, so that no more than one tensor is copied at a
time and a difference names what changed (``graph.initializer 'conv1.weight'``). A call takes
three (the input before and after, the output). On the 108 MiB model of tests/test_fold_memory.py
(``python tools/measure_pass_contract.py``) one fingerprint took 0.095 s and the checker 0.003 s;
the checked fold took 0.63 s against 0.41 s unchecked, and peaked at 1.42x the model's size over
the loaded model against 1.41x.

:class:`Sequential` runs passes one after another, each through its checks; its result carries
each pass's own result (``results``). As onnx-ir's, it adds no check of its own.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx

from ..errors import BnpassError
from ..graph import is_batchnorm, node_label

SKELETON_ELEMENTS = 1 << 16  # an initializer with more elements is declared, not copied, for the checker


class PassContractError(RuntimeError):
    """A pass broke its contract (module docstring): a bug in bnpass, named by pass and rule."""


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


class Pass:
    """Base of every bnpass pass: subclasses write :meth:`call` and, where they have any, the
    :meth:`requires` and :meth:`ensures` hooks; callers call the pass itself, which checks the
    contract around ``call`` (module docstring).

    ``in_place`` (the output is the input object) and ``changes_input`` (the input is changed) are
    False for every bnpass pass: the input model is never touched and the output is a new model.
    """

    in_place = False
    changes_input = False

    def call(self, model: onnx.ModelProto) -> PassResult:
        raise NotImplementedError

    def requires(self, model: onnx.ModelProto) -> None:
        """Preconditions on ``model``: raise :class:`PassContractError` (or any error) when one fails."""

    def ensures(self, result: PassResult, model: onnx.ModelProto) -> None:
        """Postconditions on ``result``, given the input ``model``: raise when one fails."""

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        name = type(self).__name__
        _checked_hook(name, "its precondition", self.requires, model)
        before = fingerprint(model)
        result = self.call(model)
        if not isinstance(result, PassResult):
            raise PassContractError(f"{name}.call returned {type(result).__name__}, not a PassResult")
        if not self.changes_input:
            changed = difference(before, fingerprint(model))
            if changed:
                raise PassContractError(f"{name} changed the model it was given: {changed}")
        if (result.model is model) != self.in_place:
            returned = "the model it was given" if result.model is model else "a new model"
            raise PassContractError(f"{name} returned {returned}, but it is declared in_place={self.in_place}")
        changed = difference(before, fingerprint(result.model))
        if result.modified and not changed:
            raise PassContractError(f"{name} reported modified=True, but its output equals its input")
        if not result.modified and changed:
            raise PassContractError(f"{name} reported modified=False, but its output differs from its input: "
                                    f"{changed}")
        failure = checker_failure(result.model)
        if failure and not checker_failure(model):  # a model that failed as given is not this pass's doing
            raise PassContractError(f"{name} wrote a model that fails onnx.checker, though its input passes: "
                                    f"{failure}")
        changed = difference(interface(model), interface(result.model))
        if changed:
            raise PassContractError(f"{name} changed the model's interface: {changed}")
        _checked_hook(name, "its postcondition", self.ensures, result, model)
        return result


def _checked_hook(name: str, what: str, hook, *arguments) -> None:
    """Run a ``requires`` or ``ensures`` hook; whatever it raises, but an error meant for the user (a
    BnpassError), becomes a PassContractError naming the pass."""
    try:
        hook(*arguments)
    except BnpassError:
        raise
    except Exception as error:
        raise PassContractError(f"{name}: {what} failed: {error}") from error


def checker_failure(model: onnx.ModelProto) -> str:
    """What ``onnx.checker.check_model(full_check=True)`` says against ``model`` (on its
    :func:`checked_skeleton`), "" when it passes."""
    try:
        onnx.checker.check_model(checked_skeleton(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ""


@dataclass
class SequentialResult(PassResult):
    """The last pass's model; ``modified`` when any pass modified; ``results``: ``(pass, its result)``
    in the order they ran."""

    results: list = field(default_factory=list)

    def result_of(self, pass_: Optional[Pass]) -> Optional[PassResult]:
        """What ``pass_`` returned (its last run), None when it did not run."""
        return next((result for ran, result in reversed(self.results) if ran is pass_), None)


class Sequential(Pass):
    """Run ``passes`` in order, each on the previous one's output and through its own checks.

    The sequence adds no check of its own (each pass was checked as it ran, so its input is
    unchanged and its output checked); ``modified`` is any pass's, as in onnx-ir's ``Sequential``.
    No passes: the model as given, unmodified.
    """

    def __init__(self, *passes: Pass):
        self.passes = passes

    def call(self, model: onnx.ModelProto) -> SequentialResult:
        done = SequentialResult(model=model, modified=False)
        for pass_ in self.passes:
            result = pass_(done.model)
            done.results.append((pass_, result))
            done.model, done.modified = result.model, done.modified or result.modified
        return done

    __call__ = call  # the passes' own checks ran


def fingerprint(model: onnx.ModelProto) -> list:
    """``[(what, crc32), ...]``: one entry per top-level item of ``model`` and of its graph, each
    serialized alone (module docstring). Equal fingerprints: equal models, up to crc32 collisions."""
    entries = []
    for descriptor, value in model.ListFields():
        if descriptor.name == "graph":
            entries += _field_entries(value, "graph.")
        else:
            entries += _field_entries_of(descriptor, value, "")
    return entries


def _field_entries(message, prefix: str) -> list:
    entries = []
    for descriptor, value in message.ListFields():
        entries += _field_entries_of(descriptor, value, prefix)
    return entries


def _field_entries_of(descriptor, value, prefix: str) -> list:
    items = value if descriptor.is_repeated else [value]
    entries = []
    for position, item in enumerate(items):
        label = getattr(item, "name", "") or getattr(item, "key", "") or f"#{position}"
        data = item.SerializeToString(deterministic=True) if descriptor.message_type else repr(item).encode()
        entries.append((f"{prefix}{descriptor.name} '{label}'", zlib.crc32(data)))
    return entries


def difference(before: list, after: list) -> str:
    """What differs between two fingerprints, in words ("" when nothing does)."""
    for (what, crc), (what_after, crc_after) in zip(before, after):
        if what != what_after:
            break
        if crc != crc_after:
            return f"{what} changed"
    old, new = dict(before), dict(after)
    removed = [what for what in old if what not in new]
    added = [what for what in new if what not in old]
    if removed or added:
        return f"{removed[0]} removed" if removed else f"{added[0]} added"
    return "" if before == after else "its items changed order"


def interface(model: onnx.ModelProto) -> list:
    """The :func:`fingerprint` entries of the graph inputs fed at run time and of the graph outputs."""
    stored = {tensor.name for tensor in model.graph.initializer}
    fed = [value for value in model.graph.input if value.name not in stored]
    descriptors = model.graph.DESCRIPTOR.fields_by_name
    return _field_entries_of(descriptors["input"], fed, "graph.") + _field_entries_of(
        descriptors["output"], model.graph.output, "graph.")


def batchnorm_labels(model: onnx.ModelProto) -> list:
    """The labels of ``model``'s BatchNormalization nodes, in node order (for the passes' ``ensures``)."""
    return [node_label(node) for node in model.graph.node if is_batchnorm(node)]


def checked_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """What :class:`Pass` runs ``onnx.checker`` on: ``model`` with every initializer of more than
    :data:`SKELETON_ELEMENTS` elements (or with its data in an external file) replaced by its
    declaration as a graph input (name, type, shape), so that checking copies no large payload; the
    checker and shape inference still see every node, type and shape. A model of small tensors is
    checked as it is."""
    large = [tensor for tensor in model.graph.initializer
             if int(np.prod(tensor.dims, dtype=np.int64)) > SKELETON_ELEMENTS
             or tensor.data_location == onnx.TensorProto.EXTERNAL]
    if not large:
        return model
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    names = {tensor.name for tensor in large}
    skeleton.graph.initializer.extend(tensor for tensor in model.graph.initializer if tensor.name not in names)
    inputs = {value.name for value in model.graph.input}
    skeleton.graph.input.extend(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
                                for tensor in large if tensor.name not in inputs)
    return skeleton


def _copy_fields(source, target, *, skip: Optional[str]) -> None:
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        if descriptor.is_repeated:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.message_type:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)
