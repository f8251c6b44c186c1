"""The door to onnxruntime: provider options (TF32 off unless asked), and the runner that copies
the next batch into the other device buffers while the current one runs.

CUDA cannot load on the machines most tests run on, so what onnxruntime is handed is checked
(its ``InferenceSession`` replaced by a recorder that then builds a real CPU session), and the
double-buffered runner runs on CPU buffers, the same code as on CUDA.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import onnx
import onnxruntime
import pytest

import bnpass
from bnpass import runtime
from bnpass.calibration import build_calibration_model
from bnpass.cli import main
from bnpass.runtime import CPU, CUDA, BatchRunner, create_session, session_providers
from bnpass.statistics_forms import FORM_FOR_PROVIDER
from builders import build_conv_bn_relu_chain_model
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


def test_verify_runs_both_models_with_the_calibrations_tf32_setting(recorded, tmp_path):
    """--verify compares like with like: TF32 on both sides or on neither, as --tf32 says."""
    onnx.save(build_conv_bn_relu_chain_model(), tmp_path / "model.onnx")
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "a.npy", np.random.default_rng(0).standard_normal((16, 4, 6, 6)).astype(np.float32))
    for flags, expected in (([], "0"), (["--tf32"], "1")):
        recorded.calls.clear()
        assert main([str(tmp_path / "model.onnx"), str(tmp_path / "out.onnx"), "--data", str(tmp_path / "calib"),
                     "--batch-size", "8", "--device", "cuda", "--verify", "-q", *flags]) == 0
        assert len(recorded.calls) == 3  # calibration, then the unfolded and the folded model
        assert all(call["providers"] == [(CUDA, {"use_tf32": expected}), CPU] for call in recorded.calls)


def test_the_cpu_provider_gets_the_cpu_form(recorded):
    data = np.random.default_rng(0).standard_normal((16, 3, 5, 4)).astype(np.float32)
    bnpass.reestimate_batchnorms(direct_bn_model(3), [data], batch_size=8, device="cpu")
    (call,) = recorded.calls
    assert call["providers"] == [CPU]
    operators = calibration_operators(call)
    assert FORM_OPERATOR[FORM_FOR_PROVIDER[CPU]] in operators
    assert not {op for form, op in FORM_OPERATOR.items() if form != FORM_FOR_PROVIDER[CPU]} & operators


def runner_and_session():
    calibration = build_calibration_model(direct_bn_model(3))
    session = create_session(calibration.model, [CPU])
    names = [name for tap in calibration.taps for name in (tap.mean, tap.var, tap.size)]
    return session, names


def test_double_buffered_runner_gives_session_runs_results_in_order():
    session, names = runner_and_session()
    rng = np.random.default_rng(2)
    batches = [{"x": rng.standard_normal((n, 3, 5, 4)).astype(np.float32)} for n in (8, 8, 5, 8, 8, 3)]
    copies = [feed["x"].copy() for feed in batches]
    results = list(BatchRunner(session, names, device="cpu").run_all(iter(batches)))
    assert [feed is batch for (feed, _), batch in zip(results, batches)] == [True] * len(batches)
    for (_, got), feed in zip(results, batches):
        for a, b in zip(session.run(names, feed), got):
            np.testing.assert_array_equal(a, b)
    for feed, copy in zip(batches, copies):
        np.testing.assert_array_equal(feed["x"], copy)  # the caller's arrays are never written


class WatchingSession:
    """A session whose each run waits (up to 2 s) to see the next batch arrive in a device buffer
    while it runs: the copy of batch k+1 must overlap the run of batch k."""

    def __init__(self, session, batches):
        self.session, self.batches, self.runner = session, batches, None
        self.runs, self.overlapped = 0, []

    def io_binding(self):
        return self.session.io_binding()

    def get_providers(self):
        return self.session.get_providers()

    def _next_batch_in_a_buffer(self) -> bool:
        following = self.batches[self.runs + 1]["x"]
        for buffers in self.runner._buffers:
            entry = buffers.get("x")
            if entry is not None and entry[0][0] == following.shape and np.array_equal(entry[1].numpy(), following):
                return True
        return False

    def run_with_iobinding(self, binding):
        if self.runs + 1 < len(self.batches):
            deadline = time.monotonic() + 2
            while not self._next_batch_in_a_buffer() and time.monotonic() < deadline:
                time.sleep(0.001)
            self.overlapped.append(self._next_batch_in_a_buffer())
        self.runs += 1
        return self.session.run_with_iobinding(binding)


def test_the_next_batch_is_copied_while_the_current_one_runs():
    session, names = runner_and_session()
    rng = np.random.default_rng(3)
    batches = [{"x": rng.standard_normal((8, 3, 5, 4)).astype(np.float32)} for _ in range(5)]
    watching = WatchingSession(session, batches)
    runner = watching.runner = BatchRunner(watching, names, device="cpu")
    results = list(runner.run_all(batches))
    assert watching.overlapped == [True] * (len(batches) - 1)
    for (_, got), feed in zip(results, batches):
        np.testing.assert_array_equal(got[0], session.run(names, feed)[0])


def test_leaving_the_runner_early_stops_reading_and_its_thread():
    session, names = runner_and_session()
    read = []

    def feeds():
        for number in range(100):
            read.append(number)
            yield {"x": np.full((4, 3, 5, 4), number, np.float32)}

    threads_before = threading.active_count()
    results = BatchRunner(session, names, device="cpu").run_all(feeds())
    for number, (_, values) in enumerate(results):
        assert values[0][0] == number
        if number == 2:
            break
    results.close()
    assert threading.active_count() == threads_before
    assert len(read) <= 4  # the three run and at most the one copied ahead


def test_a_data_error_while_copying_reaches_the_caller():
    session, names = runner_and_session()

    def feeds():
        yield {"x": np.zeros((4, 3, 5, 4), np.float32)}
        raise bnpass.DataError("broken file")

    results = BatchRunner(session, names, device="cpu").run_all(feeds())
    next(results)
    with pytest.raises(bnpass.DataError, match="broken file"):
        next(results)


def test_tests_not_marked_cuda_run_on_the_cpu_even_where_cuda_loads():
    """tests/conftest.py: the probe answers "unavailable" here and CLI subprocesses see no GPU."""
    import os

    assert runtime.select_providers("auto") == [runtime.CPU]
    assert "tests/conftest.py" in runtime.cuda_unavailable_reason()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


@pytest.fixture
def fresh_clash_check():
    runtime._warn_of_a_clash.cache_clear()
    yield
    runtime._warn_of_a_clash.cache_clear()


def test_two_onnxruntime_distributions_get_a_one_line_warning_with_the_fix(monkeypatch, caplog, fresh_clash_check):
    """onnxruntime and onnxruntime-gpu installed together share one module: say so once, with the fix."""
    monkeypatch.setattr(runtime, "installed_runtimes", lambda: {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"})
    with caplog.at_level("WARNING", logger="bnpass"):
        runtime.select_providers("cpu")
        runtime.select_providers("cpu")
    assert [record.getMessage() for record in caplog.records] == [
        "onnxruntime 1.32.0, onnxruntime-gpu 1.31.1 are installed together and share one module, which uninstalling "
        "either breaks: keep one (pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu)"]


@pytest.mark.parametrize("module, installed, words", [
    (None, {}, "error: onnxruntime is not installed: pip install onnxruntime-gpu"),
    ("empty", {"onnxruntime": "1.32.0"}, "error: the onnxruntime module is broken (it has no InferenceSession; "
                                         "installed: onnxruntime 1.32.0)"),
], ids=["missing", "broken"])
def test_a_missing_or_broken_onnxruntime_is_one_line_with_the_fix(tmp_path, monkeypatch, capsys, module, installed,
                                                                   words):
    import sys
    import types

    onnx.save(build_conv_bn_relu_chain_model(), tmp_path / "model.onnx")
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "a.npy", np.zeros((8, 4, 6, 6), np.float32))
    monkeypatch.setitem(sys.modules, "onnxruntime", types.ModuleType("onnxruntime") if module else None)
    monkeypatch.setattr(runtime, "installed_runtimes", lambda: installed)
    assert main([str(tmp_path / "model.onnx"), str(tmp_path / "out.onnx"), "--data", str(tmp_path / "calib"),
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(words) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.onnx").exists()
