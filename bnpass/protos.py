"""Protobuf utilities for ONNX messages: node attributes and opsets, partial and weightless model
copies, inferred value infos, tensor ranks and types, fresh names.

Nothing here knows what a BatchNormalization is; :mod:`bnpass.graph` answers questions about the
graph (producers, consumers, constants) and :mod:`bnpass.rewrite` edits it.

Copies are built field by field instead of ``CopyFrom`` + delete: protobuf's upb backend keeps a
deleted payload until the whole message is freed, so copying weights only to drop them would cost
their full size in memory.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx

SMALL_INT64_ELEMENTS = 64  # int64 initializers up to this size keep their values in a weightless copy
DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX operator set the model imports."""
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return entry.version
    raise ValueError("model imports no default ONNX opset")


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of a node attribute, or ``default`` when the node does not set it."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def copy_fields(source, target, *, skip=()) -> None:
    """Copy every set field of protobuf message ``source`` into ``target``, but those in ``skip``."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        destination = getattr(target, field.name)
        if hasattr(destination, "extend"):        # repeated field
            destination.extend(value)
        elif hasattr(destination, "CopyFrom"):    # message field
            destination.CopyFrom(value)
        else:                                     # scalar field
            setattr(target, field.name, value)


def model_without(model: onnx.ModelProto, graph_fields: tuple) -> onnx.ModelProto:
    """A new model holding everything of ``model`` (IR version, opsets, metadata, the graph's name,
    inputs, nodes...) except the graph fields named in ``graph_fields``, which the caller fills.

    Nothing skipped is ever copied, so leaving out ``initializer`` costs nothing on a model of any
    size.
    """
    copy = onnx.ModelProto()
    copy_fields(model, copy, skip=("graph",))
    copy_fields(model.graph, copy.graph, skip=graph_fields)
    return copy


def add_tensor_stub(container, tensor: onnx.TensorProto) -> onnx.TensorProto:
    """Append to ``container`` (a repeated TensorProto field) a tensor with ``tensor``'s name, type
    and dims but no values; return it."""
    stub = container.add()
    stub.name, stub.data_type = tensor.name, tensor.data_type
    stub.dims.extend(tensor.dims)
    return stub


def weightless_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without its initializers' payloads: what shape inference reads, cheaply.

    Initializers keep name, type and dims; small int64 ones (shapes, Reshape targets) keep their
    values too. Nothing large is copied, so this costs little on a model of any size.
    """
    skeleton = model_without(model, ("initializer",))
    for tensor in model.graph.initializer:
        if (tensor.data_type == onnx.TensorProto.INT64
                and np.prod(tensor.dims, dtype=np.int64) <= SMALL_INT64_ELEMENTS):
            skeleton.graph.initializer.append(tensor)
        else:
            add_tensor_stub(skeleton.graph.initializer, tensor)
    return skeleton


def inferred_value_infos(model: onnx.ModelProto) -> dict:
    """Value infos of every tensor onnx shape inference can type, by name (graph I/O included).

    Inference runs on a :func:`weightless_copy`, so it costs little on large models.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless_copy(model), strict_mode=False, data_prop=True)
    except Exception:  # inference is a convenience; a model it cannot handle still runs
        inferred = model
    infos = {}
    for value in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        infos[value.name] = value
    for tensor in model.graph.initializer:
        infos.setdefault(tensor.name, onnx.helper.make_tensor_value_info(
            tensor.name, tensor.data_type, list(tensor.dims)))
    return infos


def rank_of(infos: dict, name: str) -> Optional[int]:
    """The rank of tensor ``name`` in value infos ``infos``, or None when they do not give it."""
    value = infos.get(name)
    if value is None or not value.type.HasField("tensor_type"):
        return None
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return len(tensor_type.shape.dim)


def dims_of(value_infos: dict, name: str) -> Optional[list]:
    """Inferred dims of ``name``: an int, a symbol (str) or None (unknown) each; None without a shape."""
    value = value_infos.get(name)
    if value is None or not value.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None
            for d in value.type.tensor_type.shape.dim]


def tensor_dtype(initializers: dict, name: str, inferred: dict) -> Optional[np.dtype]:
    """The numpy dtype of tensor ``name`` from ``initializers`` (TensorProtos by name), graph I/O or
    inferred value infos."""
    if name in initializers:
        return onnx.helper.tensor_dtype_to_np_dtype(initializers[name].data_type)
    value = inferred.get(name)
    if value is not None and value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
        return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    return None


def unique_name(base: str, taken: set) -> str:
    """``base`` itself when free, else ``base_1``, ``base_2``...; the result is added to ``taken``."""
    name, suffix = base, 0
    while name in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    taken.add(name)
    return name
