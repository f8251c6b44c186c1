"""The calibration run feeds every session (issue 23): batches cut and counted once, by the run; providers
chosen once, by whoever needed them first; and the examples the calibration modules' docstrings show run."""

from __future__ import annotations

import importlib
import re
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

import bnpass
from bnpass.passes import MatchReferencePass, ReestimateBatchNormPass, calibration_run
from bnpass.runtime import CPU, BatchRunner, create_session
from builders import GraphBuilder, add_batchnorm, random_bn_params

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "reference"
DOCUMENTED = ("bnpass.feeding", "bnpass.passes.calibration_settings", "bnpass.passes.calibration_messages",
              "bnpass.passes.written_statistics", "bnpass.passes.calibration_run")


@pytest.mark.parametrize("name", DOCUMENTED)
def test_the_module_docstring_example_runs(name):
    """Regression: calibration_run's example used names it never defined (``moments``, ``model_copy``)."""
    example = re.search(r"::\n\n((?:    .*\n|\n)+)", importlib.import_module(name).__doc__)
    exec(compile(textwrap.dedent(example.group(1)), f"{name} docstring", "exec"), {})


def fixed_batch_model(seed: int) -> onnx.ModelProto:
    """x (a batch of 4, fixed) -> Reshape to [1, 12, 5, 4] -> BN over 12 channels: the graph depends on the batch
    size, so the calibration copy keeps it and the data are cut into pieces of exactly 4."""
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, [4, 3, 5, 4])
    builder.add_initializer("shape", np.array([1, 12, 5, 4], dtype=np.int64))
    builder.add_node("Reshape", ["x", "shape"], ["folded"], name="batch_into_channels")
    add_batchnorm(builder, "folded", random_bn_params((12,), np.random.default_rng(seed)))
    builder.add_output("y")
    return builder.build()


@pytest.mark.parametrize("reference", [False, True])
def test_the_run_counts_what_its_sessions_took_once_after_the_cut(reference, caplog):
    """70 samples for a model whose batch of 4 cannot be freed: 17 pieces of 4 are read (68 samples), the
    last 2 dropped with one warning; the result reports those counts, whatever the number of sessions fed."""
    model = fixed_batch_model(0)
    data = (np.random.default_rng(1).standard_normal((70, 3, 5, 4)) * 2 + 1).astype(np.float32)
    samples = bnpass.calibration_samples(model, [data])
    options = dict(batch_size=32, device="cpu")
    calibrate = MatchReferencePass(samples, fixed_batch_model(1), choose="reestimated", **options) if reference \
        else ReestimateBatchNormPass(samples, **options)
    result = calibrate(model)
    onnx.checker.check_model(result.model, full_check=True)
    assert (result.samples, result.batches, result.batch_size) == (68, 17, 4)
    assert [record.getMessage() for record in caplog.records if "dropped" in record.getMessage()] == [
        "dropped the last 2 samples: the model's fixed batch size is 4"]
    # ... and the statistics are those of exactly those samples (numpy on the reshaped data).
    folded = data[:68].reshape(17, 12, 5, 4).astype(np.float64)
    np.testing.assert_allclose(result.stats["bn"].mean, folded.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.stats["bn"].var, folded.var(axis=(0, 2, 3)), rtol=1e-5)
    assert result.stats["bn"].count == 17 * 5 * 4


def test_providers_chosen_by_the_caller_are_not_chosen_again(monkeypatch):
    """The CLI chooses the providers first (a missing CUDA fails before anything loads); the run takes them."""
    def chosen_again(device):
        raise AssertionError(f"providers chosen again for {device!r}")

    monkeypatch.setattr(calibration_run, "select_providers", chosen_again)
    model = fixed_batch_model(0)
    data = np.random.default_rng(1).standard_normal((16, 3, 5, 4)).astype(np.float32)
    samples = bnpass.calibration_samples(model, [data])
    for calibrate in (ReestimateBatchNormPass(samples, providers=[CPU]),
                      MatchReferencePass(samples, fixed_batch_model(1), choose="matched", providers=[CPU])):
        assert calibrate(model).batches == 4
    with pytest.raises(AssertionError, match="chosen again for 'auto'"):
        ReestimateBatchNormPass(samples)(model)


def test_the_command_line_chooses_the_providers_once(monkeypatch, tmp_path):
    """The CLI chooses them before reading anything and hands them to the pass, which does not choose again."""
    from bnpass import cli

    choices = []
    monkeypatch.setattr(cli, "select_providers", lambda device: choices.append(device) or [CPU])
    monkeypatch.setattr(calibration_run, "select_providers", lambda device: choices.append(device) or [CPU])
    onnx.save(fixed_batch_model(0), tmp_path / "m.onnx")
    np.save(tmp_path / "data.npy", np.random.default_rng(1).standard_normal((16, 3, 5, 4)).astype(np.float32))
    assert cli.main([str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx"), "--data", str(tmp_path / "data.npy"),
                     "--verify", "-q"]) == 0
    assert choices == ["auto"]


def test_a_runner_on_the_device_path_takes_outputs_whose_shape_follows_the_batch():
    """Regression: the I/O bindings kept the first run's outputs and onnxruntime reused them at their shape,
    so a scoring session (logits of shape (batch, classes)) failed on the short last batch."""
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, ["N", 3, 5, 4])
    add_batchnorm(builder, "x", random_bn_params((3,), np.random.default_rng(0)))
    builder.add_output("y")
    model = builder.build()
    session = create_session(model, [CPU])
    bound = BatchRunner(session, ["y"], device="cpu")
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((size, 3, 5, 4)).astype(np.float32)} for size in (8, 8, 5, 8)]
    for feed, outputs in bound.run_all(feeds):
        np.testing.assert_array_equal(outputs[0], session.run(["y"], feed)[0])


def test_every_session_on_the_device_path_gives_the_same_reference_result(monkeypatch):
    """The --reference path with every runner copying through I/O bindings (the CUDA path, run on the CPU):
    the reference's session reads the run's batches from the copying thread; counts and model unchanged."""
    model = onnx.load(EXAMPLE / "model_compressed.onnx")
    data = np.random.default_rng(23).standard_normal((100, 1, 8, 8)).astype(np.float32)

    def calibrate():
        return bnpass.reestimate_batchnorms(model, data, batch_size=32, reference=EXAMPLE / "model.onnx")

    plain = calibrate()
    unbound = BatchRunner.__init__
    monkeypatch.setattr(BatchRunner, "__init__", lambda self, session, names, device=None: unbound(
        self, session, names, device="cpu"))
    bound = calibrate()
    assert (bound.samples, bound.batches, bound.scores.samples) == (plain.samples, plain.batches, 100) == (100, 4, 100)
    assert bound.chosen == plain.chosen
    assert bound.model.SerializeToString(deterministic=True) == plain.model.SerializeToString(deterministic=True)
