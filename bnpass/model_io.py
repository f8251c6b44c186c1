"""Loading and saving models: clear errors, external data, all-or-nothing writes.

Every file is written to a temporary name beside its target (``.<name>.<random>.tmp``) and renamed
over the target only once complete. :class:`StagedFiles` does that for all the files of one run
together (the model, its ``.data`` file, the report, the plot): nothing is renamed until every one
of them is written, and a failure (a full disk, Ctrl-C) removes the temporaries, so a run either
writes all its files or none. Only the renames themselves, done last, could fail part-way (on a
folder made read-only in between). Models that came with external data, or that are too large for
one protobuf (2 GiB), are saved with their tensors in ``<output>.data``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import google.protobuf.message
import numpy as np
import onnx
from onnx import numpy_helper

from .errors import BnpassError, ModelError
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

    Sums the initializer payloads first: ``ByteSize()`` serializes the whole model to count it
    (upb: a transient copy of the whole model), so it is only asked when the payloads alone come
    near the limit without passing it. Past the limit upb cannot count at all and raises
    ``EncodeError``: that too means over the limit.
    """
    payload = sum(_payload_bytes(tensor) for tensor in model.graph.initializer)
    if payload < PROTOBUF_LIMIT - 2**26:
        return False
    if payload > PROTOBUF_LIMIT:
        return True
    try:
        return model.ByteSize() > PROTOBUF_LIMIT
    except google.protobuf.message.EncodeError:
        return True


def _payload_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type == onnx.TensorProto.STRING:
        return len(tensor.raw_data)
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


EXTERNAL_THRESHOLD = 1024  # bytes; smaller tensors (shapes, scalars) stay inline, as onnx does


def _write_all(stream, content: bytes) -> None:
    """Every byte bnpass writes to a file goes through here (the tests simulate a full disk on it)."""
    stream.write(content)


@contextlib.contextmanager
def _writing(path: str):
    """``open(path, "wb")``; an OSError inside (a write, or the flush on close) names ``path``."""
    try:
        with open(path, "wb") as stream:
            yield stream
    except OSError as error:
        if error.filename is None:
            error.filename = path
        raise


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
    with _writing(data_path) as data:
        for tensor in model.graph.initializer:
            # Strings cannot be stored externally; small tensors are not worth it.
            if tensor.data_type == onnx.TensorProto.STRING or _payload_bytes(tensor) < EXTERNAL_THRESHOLD:
                skeleton.graph.initializer.append(tensor)
                continue
            payload = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
            offset = data.tell()
            _write_all(data, payload)
            stored = add_tensor_stub(skeleton.graph.initializer, tensor)
            stored.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(payload)))):
                entry = stored.external_data.add()
                entry.key, entry.value = key, value
    if os.path.getsize(data_path) == 0:
        os.remove(data_path)
    with _writing(path) as stream:
        _write_all(stream, skeleton.SerializeToString())


class StagedFiles:
    """The files of one run, written under temporary names beside their targets and renamed into
    place together by :meth:`commit`. Leaving the ``with`` block without committing (an error,
    Ctrl-C) removes every temporary. A failed write is a one-line BnpassError naming the target::

        with StagedFiles() as staged:
            staged.write_model(model, "out.onnx", what="the output")
            staged.write_bytes("report.json", content, what="the report")
            staged.commit()
    """

    def __init__(self):
        self._pending: list = []   # [temporary, target, what]

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, *exception) -> None:
        self.discard()

    def write_bytes(self, path, content: bytes, *, what: str = "the file") -> None:
        path = os.fspath(path)
        with self._reporting():
            temporary = self._temporary(path, what)
            with _writing(temporary) as stream:
                _write_all(stream, content)

    def write_model(self, model: onnx.ModelProto, path, *, external_data: bool = False, check: bool = True,
                    what: str = "the model") -> None:
        """Stage ``model`` at ``path`` (tensors in ``<name>.data`` when asked or needed); with ``check``,
        the written file must pass ``onnx.checker`` (full) first. ``model`` is not changed."""
        path = os.fspath(path)
        external_data = external_data or exceeds_protobuf_limit(model)
        with self._reporting():
            temporary = self._temporary(path, what)
            if not external_data:
                with _writing(temporary) as stream:
                    _write_all(stream, model.SerializeToString())
                if check:
                    onnx.checker.check_model(temporary, full_check=True)
                return
            data_name = os.path.basename(path) + ".data"
            temporary_data = self._temporary(path + ".data", f"{what}'s external data")
            write_with_external_data(model, temporary, os.path.basename(temporary_data))
            if check:
                onnx.checker.check_model(temporary, full_check=True)
            if not os.path.exists(temporary_data):  # every tensor was small: no data file
                self._pending = [entry for entry in self._pending if entry[0] != temporary_data]
            # The model names its data file; point it at the final name, which it has once committed.
            saved = onnx.load(temporary, load_external_data=False)
            for tensor in saved.graph.initializer:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            with _writing(temporary) as stream:
                _write_all(stream, saved.SerializeToString())

    def commit(self) -> None:
        """Rename every staged file over its target."""
        with self._reporting():
            while self._pending:
                temporary, target, _ = self._pending[0]
                os.replace(temporary, target)
                self._pending.pop(0)

    def discard(self) -> None:
        """Remove every temporary not committed."""
        for temporary, _, _ in self._pending:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)
        self._pending = []

    def _temporary(self, path: str, what: str) -> str:
        try:
            handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                                 dir=os.path.dirname(os.path.abspath(path)))
        except OSError as error:
            raise BnpassError(f"cannot write {what} '{path}': {error.strerror or error}") from None
        os.close(handle)
        self._pending.append([temporary, path, what])
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give a normal file's mode
        return temporary

    @contextlib.contextmanager
    def _reporting(self):
        """An OSError on a staged file becomes a BnpassError naming its target and the reason."""
        try:
            yield
        except OSError as error:
            for temporary, target, what in self._pending:
                if error.filename in (temporary, target):
                    raise BnpassError(f"cannot write {what} '{target}': {error.strerror or error}") from None
            raise


def save_model(model: onnx.ModelProto, path, *, external_data: bool = False, check: bool = True) -> None:
    """Write ``model`` to ``path`` atomically; tensors go to ``<name>.data`` when asked or needed.

    With ``check``, the written file must pass ``onnx.checker`` (full check) before it replaces
    anything: a model bnpass cannot vouch for is never left at ``path``. ``model`` is not changed.
    """
    with StagedFiles() as staged:
        staged.write_model(model, path, external_data=external_data, check=check)
        staged.commit()


def write_bytes_atomically(path, content: bytes, *, what: str = "the file") -> None:
    """Write ``content`` to ``path`` through a temporary file renamed over it: all or nothing."""
    with StagedFiles() as staged:
        staged.write_bytes(path, content, what=what)
        staged.commit()


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
