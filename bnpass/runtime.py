"""The one door to onnxruntime: execution providers and sessions.

``--device auto`` uses CUDA only when the CUDA provider really loads: onnxruntime-gpu lists
CUDAExecutionProvider as available even where the CUDA libraries are missing, and then logs a
page of errors while falling back to CPU. bnpass probes the provider once with onnxruntime's
logging silenced and says what it found in one line.

Sessions run with all of onnxruntime's graph optimizations (``ORT_ENABLE_ALL``): on CPU its
NCHWc layout is what makes convolutions fast, and none of its fusions touches the statistics
nodes of a calibration graph (checked in tests/test_calibration_graph.py).

**TF32.** onnxruntime's CUDA provider runs float32 convolutions and matrix products in TF32
(10-bit mantissa) unless its provider option ``use_tf32`` is 0. bnpass's sessions turn it off
unless ``tf32=True`` is asked for (:func:`session_providers`): with it, statistics measured on an
H200 differed from the CPU's by up to 7.5e-3 (relative variance, ResNet-50; figure from issue 12).

:class:`BatchRunner` runs one session over many batches; on CUDA it feeds them through an I/O
binding, so each batch is copied once into a device buffer that is reused, and only the outputs
(per-channel vectors) are copied back to the host.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from typing import Optional, Union

import numpy as np
import onnx

from .errors import RuntimeUnavailableError
from .model_io import exceeds_protobuf_limit, write_with_external_data

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

# onnxruntime severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
_QUIET = 3


def _onnxruntime():
    import onnxruntime

    onnxruntime.set_default_logger_severity(_QUIET)
    return onnxruntime


@functools.lru_cache(maxsize=None)
def cuda_unavailable_reason() -> Optional[str]:
    """None when the CUDA provider loads and runs a node, else why it does not."""
    ort = _onnxruntime()
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime build ({ort.__version__}) has no CUDA provider"
    if hasattr(ort, "preload_dlls"):
        # Finds the CUDA/cuDNN libraries a PyTorch or nvidia-* wheel install brings; it prints
        # each library it misses, which is noise here: the probe below decides.
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            try:
                ort.preload_dlls()
            except Exception:
                pass
    probe = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])], "cuda_probe",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
        opset_imports=[onnx.helper.make_opsetid("", 13)])
    probe.ir_version = 7
    options = ort.SessionOptions()
    options.log_severity_level = 4
    ort.set_default_logger_severity(4)  # the failed provider load is logged at error level
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=[CUDA, CPU])
    except Exception as error:  # onnxruntime raises its own exception types
        return f"the CUDA provider failed to start ({str(error).splitlines()[0]})"
    finally:
        ort.set_default_logger_severity(_QUIET)
    if CUDA not in session.get_providers():
        return "the CUDA provider could not be loaded (CUDA or cuDNN libraries not found)"
    return None


def select_providers(device: str) -> list:
    """The provider list for ``device`` (auto, cpu or cuda), after checking CUDA really works."""
    if device not in DEVICES:
        raise RuntimeUnavailableError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return [CPU]
    reason = cuda_unavailable_reason()
    if reason is None:
        return [CUDA, CPU]
    if device == "cuda":
        raise RuntimeUnavailableError(f"--device cuda: {reason}")
    _say_once(f"using CPU: {reason}")
    return [CPU]


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    logger.info("%s", message)


def session_providers(providers: list, *, tf32: bool = False) -> list:
    """What ``onnxruntime.InferenceSession`` gets for ``providers`` (names from
    :func:`select_providers`): the CUDA provider with ``use_tf32`` set ("0" unless ``tf32``)."""
    return [(name, {"use_tf32": "1" if tf32 else "0"}) if name == CUDA else name for name in providers]


def create_session(model: Union[onnx.ModelProto, bytes], providers: list, *, optimize: bool = True,
                   threads: Optional[int] = None, memory_pattern: bool = True,
                   profile_prefix: Optional[str] = None, tf32: bool = False):
    """An InferenceSession for ``model`` (a ModelProto, or one already serialized).

    ``providers`` are provider names (:func:`select_providers`). ``optimize=False`` disables
    graph optimizations; ``threads`` sets onnxruntime's intra-op thread count (None: onnxruntime's
    default, one per physical core); ``memory_pattern=False`` turns off onnxruntime's pre-planned
    activation block (calibration graphs keep more tensors alive than the model, and the planned
    block then costs ~160 MB more peak memory on the MobileNet benchmark, for no speed);
    ``profile_prefix`` turns on onnxruntime's profiler (``session.end_profiling()`` returns the
    JSON file); ``tf32=True`` lets the CUDA provider compute float32 convolutions and matrix
    products in TF32 (off by default; no effect on CPU). Two sessions whose outputs are compared
    (``--verify``) should be made with the same ``providers``, ``optimize`` and ``tf32``.
    """
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = _QUIET
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be positive, not {threads}")
        options.intra_op_num_threads = threads
    if not memory_pattern:
        options.enable_mem_pattern = False
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers = session_providers(providers, tf32=tf32)
    if isinstance(model, onnx.ModelProto) and exceeds_protobuf_limit(model):
        # Over 2 GiB a model cannot be passed as one protobuf: onnxruntime reads it from files.
        with tempfile.TemporaryDirectory(prefix="bnpass-session-") as folder:
            path = os.path.join(folder, "model.onnx")
            write_with_external_data(model, path, "model.onnx.data")
            return ort.InferenceSession(path, options, providers=providers)
    serialized = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(serialized, options, providers=providers)


class BatchRunner:
    """Runs ``session`` on one feed after another and returns ``output_names`` as numpy arrays.

    On CPU this is ``session.run``. When the session runs on CUDA (or when ``device`` names a
    device explicitly: ``"cpu"`` exercises the same path in tests), inputs go through an I/O binding: each input gets a device buffer that is
    refilled in place while the batch shape stays the same (one host-to-device copy per batch,
    no allocation), and the outputs are bound to host memory, so what crosses back is only the
    small tensors the caller asked for.
    """

    def __init__(self, session, output_names: list, *, device: Optional[str] = None):
        self.session = session
        self.output_names = list(output_names)
        if device is None:
            device = "cuda" if CUDA in session.get_providers() else None
        self.device = device
        self._binding = None
        self._buffers: dict = {}
        if device is not None:
            self._binding = session.io_binding()
            for name in self.output_names:
                self._binding.bind_output(name, "cpu")

    def run(self, feed: dict) -> list:
        if self._binding is None:
            return self.session.run(self.output_names, feed)
        ort = _onnxruntime()
        for name, array in feed.items():
            array = np.ascontiguousarray(array)
            key = (array.shape, array.dtype)
            buffer = self._buffers.get(name)
            if buffer is not None and buffer[0] == key:
                buffer[1].update_inplace(array)
            else:  # first batch, or a new shape (the short last batch): a new device buffer
                # A CPU OrtValue would share the caller's array, which update_inplace would then
                # overwrite: own a copy. (Production CPU runs use session.run; this is for tests.)
                source = array.copy() if self.device == "cpu" else array
                value = ort.OrtValue.ortvalue_from_numpy(source, self.device, 0)
                self._buffers[name] = (key, value)
                self._binding.bind_ortvalue_input(name, value)
        self._binding.synchronize_inputs()
        self.session.run_with_iobinding(self._binding)
        self._binding.synchronize_outputs()
        return self._binding.copy_outputs_to_cpu()


def session_device(session) -> str:
    return "CUDA" if CUDA in session.get_providers() else "CPU"
