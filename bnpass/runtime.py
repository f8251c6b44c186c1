"""The one door to onnxruntime: execution providers and sessions.

``--device auto`` uses CUDA only when the CUDA provider really loads: onnxruntime-gpu lists
CUDAExecutionProvider as available even where the CUDA libraries are missing, and then logs a
page of errors while falling back to CPU. bnpass probes the provider once with onnxruntime's
logging silenced and says what it found in one line.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Optional

import onnx

from .errors import RuntimeUnavailableError

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


def create_session(model: onnx.ModelProto, providers: list, *, optimize: bool = True):
    """An InferenceSession for ``model``; ``optimize=False`` disables graph optimizations."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = _QUIET
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


def session_device(session) -> str:
    return "CUDA" if CUDA in session.get_providers() else "CPU"
