"""Freeing the batch dimension of a calibration copy exported with a fixed batch size.

A model exported with a fixed batch size (say 1) would make calibration use batches of that size.
When shape inference shows that every BN input keeps the batch as its first dimension, the copy's
inputs get a symbolic batch (:data:`FREE_BATCH`) instead, and constant Reshape targets that spell
the batch size out (``[1, -1]`` from ``x.view(1, -1)``, computed ones such as torch's dynamo
exporter writes included, :mod:`bnpass.computed_constants`) become ``0`` ("copy this dimension"),
so calibration can use real batches. Otherwise the copy keeps its fixed batch and the caller feeds
batches of that size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx

from .computed_constants import is_computable
from .errors import ModelError
from .graph import GraphIndex
from .protos import attribute, dims_of, inferred_value_infos, weightless_copy
from .rewrite import GraphEditor

logger = logging.getLogger(__name__)

FREE_BATCH = "bnpass_batch"
SMALL_INTEGER_CONSTANT = 64  # elements; as many as weightless_copy keeps of an int64 initializer


def free_batch_dimension(model: onnx.ModelProto, taps: list, per_channel_inputs: set) -> Optional[int]:
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
        shape = dims_of(infos, sizes[tap.size])
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
