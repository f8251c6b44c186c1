"""The models ``--reference`` scores, captured as it makes them, and a check that one merged session
gives each model's outputs bit for bit (tests/test_scoring_graph.py, tools/measure_scoring_graph.py).

:func:`scored_models` runs :class:`~bnpass.passes.match_reference.MatchReferencePass` with its
scoring step replaced by one that records what it was given (the reference, the model as given and
each candidate) and stops the pass there: the candidates are the pass's own, not rebuilt here.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import onnx

import bnpass
from bnpass.passes import match_reference
from bnpass.passes.candidates import GIVEN
from bnpass.runtime import create_session

REFERENCE = "reference"


class _Captured(Exception):
    """Raised by the stand-in scoring step to stop the pass once the candidates are made."""

    def __init__(self, models: dict):
        super().__init__("captured")
        self.models = models


def scored_models(model: onnx.ModelProto, reference: onnx.ModelProto, data: np.ndarray, *, batch_size: int = 16,
                  **options) -> dict:
    """``{"reference": ..., "compressed": ..., candidate: ...}``: every model ``--reference`` scores on
    ``data`` (one array of samples), as ``MatchReferencePass`` makes them."""

    def capture(reference, given, candidates, feeds, providers, **_):
        raise _Captured({REFERENCE: reference, GIVEN: given, **candidates})

    samples = bnpass.calibration_samples(model, [data])
    with mock.patch.object(match_reference, "score_models", capture):
        try:
            match_reference.MatchReferencePass(samples, reference, batch_size=batch_size, device="cpu",
                                               **options)(model)
        except _Captured as captured:
            return captured.models
    raise AssertionError("MatchReferencePass did not score any candidate")


def separate_outputs(models: dict, feeds: dict, *, threads=None, optimize: bool = True) -> dict:
    """``{name: [outputs]}``, each model in its own session (what candidates.score_models runs)."""
    results = {}
    for name, model in models.items():
        session = create_session(model, ["CPUExecutionProvider"], threads=threads, optimize=optimize)
        results[name] = session.run([output.name for output in model.graph.output], feeds)
    return results


def merged_outputs(merged: onnx.ModelProto, outputs: dict, feeds: dict, *, threads=None,
                   optimize: bool = True) -> dict:
    """``{name: [outputs]}`` from one session of the merged model."""
    session = create_session(merged, ["CPUExecutionProvider"], threads=threads, optimize=optimize)
    order = [name for names in outputs.values() for name in names]
    values = dict(zip(order, session.run(order, feeds)))
    return {name: [values[output] for output in names] for name, names in outputs.items()}


def differing_outputs(expected: dict, got: dict) -> list:
    """``[(model, output position, largest absolute difference)]`` where ``got`` is not bit for bit
    ``expected`` (dtype, shape and every bit)."""
    differ = []
    for name, arrays in expected.items():
        for position, (want, have) in enumerate(zip(arrays, got[name])):
            want, have = np.asarray(want), np.asarray(have)
            if want.dtype != have.dtype or want.shape != have.shape or not np.array_equal(
                    want.view(np.uint8) if want.dtype.kind == "f" else want,
                    have.view(np.uint8) if have.dtype.kind == "f" else have):
                gap = (float(np.max(np.abs(want.astype(np.float64) - have.astype(np.float64))))
                       if want.shape == have.shape else float("inf"))
                differ.append((name, position, gap))
    return differ


def compressed_copy(model: onnx.ModelProto, levels: int = 7) -> onnx.ModelProto:
    """A copy with every weight of rank >= 2 rounded to ``2 * levels + 1`` steps per tensor (a crude
    int4-like compression): a model that shares no weight with ``model``, its BNs untouched."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        array = onnx.numpy_helper.to_array(tensor)
        if array.ndim >= 2 and array.dtype.kind == "f":
            step = float(np.abs(array).max()) / levels or 1.0
            tensor.CopyFrom(onnx.numpy_helper.from_array((np.round(array / step) * step).astype(array.dtype),
                                                         tensor.name))
    return copy


def bench_network(name: str, size: int) -> onnx.ModelProto:
    """tools/bench.py's generated network ``name`` at ``size`` x ``size`` pixels, exported with its BNs."""
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bench import build_network, export_network

    net, shape = build_network(name, size)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "network.onnx"
        export_network(net, shape, path)
        model = onnx.load(path)
    model.ir_version = 10
    return model
