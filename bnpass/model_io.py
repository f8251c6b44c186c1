"""Loading and saving models: clear errors, external data, atomic writes.

A model is saved to a temporary file beside the target and renamed over it only once complete,
so a failure or Ctrl-C never leaves a partial model. Models that came with external data, or
that are too large for one protobuf (2 GiB), are saved with their tensors in ``<output>.data``.
"""

from __future__ import annotations

import os
import tempfile

import google.protobuf.message
import numpy as np
import onnx
from onnx import numpy_helper

from .errors import ModelError
from .protos import add_tensor_stub, model_without

PROTOBUF_LIMIT = 2**31 - 1


def load_model(path) -> onnx.ModelProto:
    """Read and check an ONNX model, with its external data."""
    return read_model(path)[0]


def as_model(model) -> onnx.ModelProto:
    """``model`` itself when it is a ModelProto; read (and checked) when it is a path."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, bytes, os.PathLike)):
        return load_model(os.fsdecode(model))
    raise ModelError(f"expected an onnx.ModelProto or the path of an .onnx file, not {type(model).__name__}")


def read_model(path) -> tuple:
    """``(model, external_files)``: the checked model with its tensors loaded, and the absolute
    paths of the external data files it was read from (empty when it kept its tensors inline; the
    output is then written the same way)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelError(f"model file '{path}' does not exist")
    if os.path.isdir(path):
        raise ModelError(f"model path '{path}' is a folder, not an ONNX file")
    try:
        model = onnx.load(path, load_external_data=False)
        folder = os.path.dirname(os.path.abspath(path))
        external = sorted({os.path.join(folder, entry.value) for tensor in model.graph.initializer
                           if tensor.data_location == onnx.TensorProto.EXTERNAL
                           for entry in tensor.external_data if entry.key == "location"})
        if external:
            onnx.load_external_data_for_model(model, folder)
    except (google.protobuf.message.DecodeError, ValueError, RuntimeError, TypeError) as error:
        raise ModelError(f"'{path}' is not a readable ONNX model ({_first_line(error)})") from None
    except OSError as error:
        raise ModelError(f"cannot read '{path}' or its external data: {error.strerror or error}") from None
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"'{path}' is not an ONNX model (it holds no graph)")
    try:
        # In memory when it fits one protobuf; a larger model is checked from its files.
        onnx.checker.check_model(path if exceeds_protobuf_limit(model) else model)
    except onnx.checker.ValidationError as error:
        raise ModelError(f"'{path}' fails the ONNX checker: {_first_line(error)}") from None
    return model, external


def exceeds_protobuf_limit(model: onnx.ModelProto) -> bool:
    """True when ``model`` cannot be serialized as one protobuf (2 GiB).

    Sums the initializer payloads first: ``ByteSize()`` serializes the whole model to count it,
    so it is only asked when the payloads alone come near the limit.
    """
    payload = sum(_payload_bytes(tensor) for tensor in model.graph.initializer)
    if payload < PROTOBUF_LIMIT - 2**26:
        return False
    return model.ByteSize() > PROTOBUF_LIMIT


def _payload_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type == onnx.TensorProto.STRING:
        return len(tensor.raw_data)
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


EXTERNAL_THRESHOLD = 1024  # bytes; smaller tensors (shapes, scalars) stay inline, as onnx does


def write_with_external_data(model: onnx.ModelProto, path: str, data_name: str) -> None:
    """Write ``model`` to ``path`` with each initializer payload of 1 KiB or more in
    ``<folder>/<data_name>`` (no data file when there is none).

    Unlike ``onnx.save(..., save_as_external_data=True)`` this leaves ``model`` unchanged, and
    it never holds a second copy of the weights: the protobuf written holds only references.
    Small tensors stay inline, where shape inference can read them (Reshape targets).
    """
    folder = os.path.dirname(os.path.abspath(path))
    skeleton = model_without(model, ("initializer",))
    data_path = os.path.join(folder, data_name)
    with open(data_path, "wb") as data:
        for tensor in model.graph.initializer:
            # Strings cannot be stored externally; small tensors are not worth it.
            if tensor.data_type == onnx.TensorProto.STRING or _payload_bytes(tensor) < EXTERNAL_THRESHOLD:
                skeleton.graph.initializer.append(tensor)
                continue
            payload = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
            offset = data.tell()
            data.write(payload)
            stored = add_tensor_stub(skeleton.graph.initializer, tensor)
            stored.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(payload)))):
                entry = stored.external_data.add()
                entry.key, entry.value = key, value
    if os.path.getsize(data_path) == 0:
        os.remove(data_path)
    with open(path, "wb") as stream:
        stream.write(skeleton.SerializeToString())


def save_model(model: onnx.ModelProto, path, *, external_data: bool = False, check: bool = True) -> None:
    """Write ``model`` to ``path`` atomically; tensors go to ``<name>.data`` when asked or needed.

    With ``check``, the written file must pass ``onnx.checker`` (full check) before it replaces
    anything: a model bnpass cannot vouch for is never left at ``path``. ``model`` is not changed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    external_data = external_data or exceeds_protobuf_limit(model)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; the model gets a normal file's mode
    data_name = os.path.basename(path) + ".data"
    temporary_data = temporary + ".data"
    try:
        if external_data:
            write_with_external_data(model, temporary, os.path.basename(temporary_data))
            if check:
                onnx.checker.check_model(temporary, full_check=True)
            # The model names its data file; point it at the final name, then move both.
            saved = onnx.load(temporary, load_external_data=False)
            for tensor in saved.graph.initializer:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            with open(temporary, "wb") as stream:
                stream.write(saved.SerializeToString())
            if os.path.exists(temporary_data):
                os.replace(temporary_data, os.path.join(folder, data_name))
        else:
            with open(temporary, "wb") as stream:
                stream.write(model.SerializeToString())
            if check:
                onnx.checker.check_model(temporary, full_check=True)
        os.replace(temporary, path)
    except BaseException:
        for leftover in (temporary, temporary_data):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise


def write_bytes_atomically(path, content: bytes) -> None:
    """Write ``content`` to ``path`` through a temporary file renamed over it: all or nothing."""
    path = os.fspath(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                         dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(content)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def set_metadata(model: onnx.ModelProto, entries: dict) -> None:
    """Set ``metadata_props`` ``entries`` (str -> str) on ``model`` in place; entries with other
    keys, the model's own, stay as they are, in their order."""
    kept = [prop for prop in model.metadata_props if prop.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, str(value)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
