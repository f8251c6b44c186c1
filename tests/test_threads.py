"""Threads and sessions (issue 23): bnpass's onnxruntime sessions do not spin between runs (several take
turns on every batch, and the data-loading thread needs a core too), and the calibration sessions of
``--reference`` are gone before its scoring sessions open. Timing is measured in tools/bench.py, not here."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

import bnpass
from bnpass.passes import match_reference, statistics_session
from bnpass.runtime import NO_SPINNING

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "reference"


def _data() -> np.ndarray:
    return np.random.default_rng(23).standard_normal((128, 1, 8, 8)).astype(np.float32)


@pytest.fixture
def spinning(monkeypatch) -> list:
    """The spinning setting of every onnxruntime session opened: "0", or None for onnxruntime's default."""
    seen = []
    real = onnxruntime.InferenceSession

    def recording(model, options=None, *args, **kwargs):
        try:
            seen.append(options.get_session_config_entry(NO_SPINNING[0]) if options is not None else None)
        except Exception:  # onnxruntime raises for an entry never set
            seen.append(None)
        return real(model, options, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    return seen


def test_sessions_that_take_turns_on_every_batch_do_not_spin(spinning):
    """Regression (issue 23): --reference opened 3 calibration sessions, then 5 scoring sessions, each with
    its own spinning intra-op pool; on 2 cores default threads ran 5x slower than --threads 1."""
    model = onnx.load(EXAMPLE / "model_compressed.onnx")
    result = bnpass.reestimate_batchnorms(model, _data(), batch_size=32, reference=EXAMPLE / "model.onnx",
                                          device="cpu")
    assert result.scores.samples == 128
    assert len(spinning) == 3 + 1  # calibration, then one session scoring the reference and the models, merged
    assert spinning == ["0"] * len(spinning)


def test_a_session_that_runs_alone_does_not_spin_either(spinning):
    """Plain re-estimation's one session spun against the data-loading thread: 3.2-3.6 s where it takes
    1.6-2.0 s without spinning on 2 cores (12,800 samples of the example)."""
    model = onnx.load(EXAMPLE / "model_compressed.onnx")
    bnpass.reestimate_batchnorms(model, _data(), batch_size=32)
    assert spinning == ["0"]


def test_the_calibration_sessions_are_gone_before_the_scoring_sessions_open(monkeypatch):
    """Regression: the list the calibration sessions were opened into kept all three alive while every
    scoring session was open beside them."""
    alive = []
    opened = statistics_session.StatisticsSession.__init__

    def tracked(self, *args, **kwargs):
        opened(self, *args, **kwargs)
        alive.append(weakref.ref(self.session))

    scored = match_reference.score_models

    def scoring(*args, **kwargs):
        gc.collect()
        assert len(alive) == 3 and all(session() is None for session in alive)
        return scored(*args, **kwargs)

    monkeypatch.setattr(statistics_session.StatisticsSession, "__init__", tracked)
    monkeypatch.setattr(match_reference, "score_models", scoring)
    model = onnx.load(EXAMPLE / "model_compressed.onnx")
    result = bnpass.reestimate_batchnorms(model, _data(), batch_size=32, reference=EXAMPLE / "model.onnx")
    assert result.scores.samples == 128
