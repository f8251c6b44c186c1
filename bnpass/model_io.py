"""Loading and saving models: clear errors, external data, atomic writes.

A model is saved to a temporary file beside the target and renamed over it only once complete,
so a failure or Ctrl-C never leaves a partial model. Models that came with external data, or
that are too large for one protobuf (2 GiB), are saved with their tensors in ``<output>.data``.
"""

from __future__ import annotations

import os
import tempfile

import google.protobuf.message
import onnx

from .errors import ModelError

PROTOBUF_LIMIT = 2**31 - 1


def load_model(path) -> onnx.ModelProto:
    """Read and check an ONNX model, with its external data."""
    return read_model(path)[0]


def read_model(path) -> tuple:
    """``(model, external)``: the checked model with its tensors loaded, and whether the file
    kept them as external data (so the output can be written the same way)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelError(f"model file '{path}' does not exist")
    if os.path.isdir(path):
        raise ModelError(f"model path '{path}' is a folder, not an ONNX file")
    try:
        model = onnx.load(path, load_external_data=False)
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        if external:
            onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except (google.protobuf.message.DecodeError, ValueError, RuntimeError, TypeError) as error:
        raise ModelError(f"'{path}' is not a readable ONNX model ({_first_line(error)})") from None
    except OSError as error:
        raise ModelError(f"cannot read '{path}' or its external data: {error.strerror or error}") from None
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"'{path}' is not an ONNX model (it holds no graph)")
    try:
        # In memory when it fits one protobuf; a larger model is checked from its files.
        onnx.checker.check_model(model if model.ByteSize() <= PROTOBUF_LIMIT else path)
    except onnx.checker.ValidationError as error:
        raise ModelError(f"'{path}' fails the ONNX checker: {_first_line(error)}") from None
    return model, external


def save_model(model: onnx.ModelProto, path, *, external_data: bool = False, check: bool = True) -> None:
    """Write ``model`` to ``path`` atomically; tensors go to ``<name>.data`` when asked or needed.

    With ``check``, the written file must pass ``onnx.checker`` (full check) before it replaces
    anything: a model bnpass cannot vouch for is never left at ``path``. Saving with external data
    moves ``model``'s tensors out of the proto (onnx's own behaviour): save last.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    external_data = external_data or model.ByteSize() > PROTOBUF_LIMIT
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; the model gets a normal file's mode
    data_name = os.path.basename(path) + ".data"
    try:
        if external_data:
            temporary_data = os.path.basename(temporary) + ".data"
            onnx.save(model, temporary, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=temporary_data, size_threshold=0)
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
            os.replace(os.path.join(folder, temporary_data), os.path.join(folder, data_name))
        else:
            with open(temporary, "wb") as stream:
                stream.write(model.SerializeToString())
            if check:
                onnx.checker.check_model(temporary, full_check=True)
        os.replace(temporary, path)
    except BaseException:
        for leftover in (temporary, temporary + ".data"):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
