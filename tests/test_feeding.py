"""The calibration run feeds every session (issue 23): batches cut and counted once, by the run; providers
chosen once, by whoever needed them first; and the examples the calibration modules' docstrings show run."""

from __future__ import annotations

import importlib
import re
import textwrap

import numpy as np
import onnx
import pytest

import bnpass
from bnpass.passes import MatchReferencePass, ReestimateBatchNormPass, calibration_run
from bnpass.runtime import CPU
from builders import GraphBuilder, add_batchnorm, random_bn_params

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
