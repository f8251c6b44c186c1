"""The door to onnxruntime: provider options (TF32 off unless asked).

CUDA cannot load on the machines most tests run on, so what onnxruntime is handed is checked
(its ``InferenceSession`` replaced by a recorder that then builds a real CPU session).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest

import bnpass
from bnpass import runtime
from bnpass.calibration import FORM_FOR_PROVIDER
from bnpass.cli import main
from bnpass.runtime import CPU, CUDA, create_session, session_providers
from test_calibration_graph import direct_bn_model

FORM_OPERATOR = {"reduce": "ReduceMean", "pooling": "GlobalAveragePool", "layernorm": "LayerNormalization"}


def test_cuda_gets_tf32_off_unless_asked_and_cpu_gets_no_options():
    assert session_providers([CUDA, CPU]) == [(CUDA, {"use_tf32": "0"}), CPU]
    assert session_providers([CUDA, CPU], tf32=False) == [(CUDA, {"use_tf32": "0"}), CPU]
    assert session_providers([CUDA, CPU], tf32=True) == [(CUDA, {"use_tf32": "1"}), CPU]
    assert session_providers([CPU], tf32=True) == [CPU]


class RecordedSessions:
    """Stands in for ``onnxruntime.InferenceSession``: records what each session was given, then
    builds a real session on the CPU provider."""

    def __init__(self, real):
        self.real = real
        self.calls = []

    def __call__(self, model, options=None, providers=None, **kwargs):
        self.calls.append({"model": model, "providers": providers})
        return self.real(model, options, providers=[CPU], **kwargs)


@pytest.fixture
def recorded(monkeypatch):
    """Sessions recorded, and CUDA reported as working (it is not: the recorder runs on CPU)."""
    sessions = RecordedSessions(onnxruntime.InferenceSession)
    monkeypatch.setattr(onnxruntime, "InferenceSession", sessions)
    monkeypatch.setattr(runtime, "cuda_unavailable_reason", lambda: None)
    return sessions


def test_create_session_hands_onnxruntime_the_provider_options(recorded):
    model = direct_bn_model(3)
    for tf32, expected in ((False, "0"), (True, "1")):
        create_session(model, runtime.select_providers("cuda"), tf32=tf32)
        assert recorded.calls[-1]["providers"] == [(CUDA, {"use_tf32": expected}), CPU]
    create_session(model, [CPU], tf32=True)
    assert recorded.calls[-1]["providers"] == [CPU]


def calibration_operators(call) -> set:
    return {node.op_type for node in onnx.load_from_string(call["model"]).graph.node}


@pytest.mark.parametrize("tf32", [False, True])
def test_the_pass_on_cuda_gets_its_form_and_tf32_setting(recorded, tf32):
    data = np.random.default_rng(0).standard_normal((16, 3, 5, 4)).astype(np.float32)
    result = bnpass.reestimate_batchnorms(direct_bn_model(3), [data], batch_size=8, device="cuda", tf32=tf32)
    (call,) = recorded.calls
    assert call["providers"] == [(CUDA, {"use_tf32": "1" if tf32 else "0"}), CPU]
    assert FORM_OPERATOR[FORM_FOR_PROVIDER[CUDA]] in calibration_operators(call)
    np.testing.assert_allclose(result.stats["bn"].var, data.astype(np.float64).var((0, 2, 3)), rtol=1e-6)


def test_the_cli_tf32_flag_reaches_the_calibration_session(recorded, tmp_path):
    onnx.save(direct_bn_model(3), tmp_path / "model.onnx")
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "a.npy", np.random.default_rng(0).standard_normal((16, 3, 5, 4)).astype(np.float32))
    for flags, expected in (([], "0"), (["--tf32"], "1")):
        recorded.calls.clear()
        assert main([str(tmp_path / "model.onnx"), str(tmp_path / "out.onnx"), "--data", str(tmp_path / "calib"),
                     "--batch-size", "8", "--device", "cuda", "--no-fold", "-q", *flags]) == 0
        assert recorded.calls[0]["providers"] == [(CUDA, {"use_tf32": expected}), CPU]


def test_the_cpu_provider_gets_the_cpu_form(recorded):
    data = np.random.default_rng(0).standard_normal((16, 3, 5, 4)).astype(np.float32)
    bnpass.reestimate_batchnorms(direct_bn_model(3), [data], batch_size=8, device="cpu")
    (call,) = recorded.calls
    assert call["providers"] == [CPU]
    operators = calibration_operators(call)
    assert FORM_OPERATOR[FORM_FOR_PROVIDER[CPU]] in operators
    assert not {op for form, op in FORM_OPERATOR.items() if form != FORM_FOR_PROVIDER[CPU]} & operators
