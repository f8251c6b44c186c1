"""The independent reference for ``--reference`` (tests/matching_reference.py) checked on its own:
against the definition of matching (BN outputs with the reference's per-channel moments), against
itself (a model matched to itself keeps its statistics), and against the one-pass form phase 2
will build, which equals it exactly with one calibration batch and only then."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builders import export_with_batchnorm_kept, run_onnxruntime
from matching_reference import (
    batchnorms,
    channel_moments,
    compressible_layers,
    fake_quantize,
    magnitude_prune,
    make_network,
    match_level_by_level,
    match_one_pass,
)

LEVELS = [["bn1"], ["bn2"], ["bn3a", "bn3b"], ["bn4"]]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    offsets = rng.uniform(-1, 1, size=(1, 3, 1, 1))
    return torch.from_numpy((rng.standard_normal((192, 3, 8, 8)) * 1.5 + offsets).astype(np.float32))


@pytest.fixture(scope="module")
def reference():
    return make_network(seed=0)


def compress(model, kind):
    return magnitude_prune(model, 0.7) if kind == "prune70" else fake_quantize(model, bits=4)


def batchnorm_outputs(model, data):
    """``{name: (mean, var)}`` of every BN's output (inference mode), float64."""
    captured, hooks = {}, []
    for name, module in batchnorms(model).items():
        hooks.append(module.register_forward_hook(
            lambda module, inputs, output, name=name: captured.__setitem__(name, channel_moments(output))))
    with torch.no_grad():
        model.eval()(data)
    for hook in hooks:
        hook.remove()
    return captured


def statistics(model):
    return {name: (bn.running_mean.double().numpy().copy(), bn.running_var.double().numpy().copy())
            for name, bn in batchnorms(model).items()}


@pytest.mark.parametrize("kind", ["prune70", "int4"])
def test_level_by_level_reproduces_the_reference_bn_output_moments(reference, data, kind):
    compressed = compress(reference, kind)
    before = batchnorm_outputs(compressed, data)
    matched, moments = match_level_by_level(reference, compressed, data, LEVELS)
    expected, got = batchnorm_outputs(reference, data), batchnorm_outputs(matched, data)
    assert list(moments) == ["bn1", "bn2", "bn3a", "bn3b", "bn4"]
    dead = 0
    for name, ((_, reference_var), (_, compressed_var)) in moments.items():
        scale = float(expected[name][1].max()) ** 0.5
        np.testing.assert_allclose(got[name][0], expected[name][0], rtol=1e-4, atol=1e-5 * scale, err_msg=name)
        ordinary = ((reference_var > 1e-8) & (compressed_var > 1e-8)).numpy()
        dead += int((compressed_var == 0).sum())
        np.testing.assert_allclose(got[name][1][ordinary], expected[name][1][ordinary], rtol=1e-4, err_msg=name)
        # Compression had moved them below the first (uncompressed) layer: the check is not one
        # of an untouched model.
        moved = float((before[name][0] - expected[name][0]).abs().max()) / scale
        assert moved == 0 if name == "bn1" else moved > 1e-2, name
    # 70% pruning kills whole depthwise and 1x1 filters: the constant-channel rule is covered.
    assert dead > 0 if kind == "prune70" else dead == 0


def test_a_model_matched_against_itself_keeps_its_statistics(reference, data):
    matched, _ = match_level_by_level(reference, reference, data, LEVELS)
    for name, (mean, var) in statistics(matched).items():
        stored_mean, stored_var = statistics(reference)[name]
        np.testing.assert_allclose(mean, stored_mean, rtol=1e-6, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(var, stored_var, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind", ["prune70", "int4"])
def test_one_pass_over_one_batch_equals_level_by_level(reference, data, kind):
    compressed = compress(reference, kind)
    level_by_level, _ = match_level_by_level(reference, compressed, data, LEVELS)
    one_pass = match_one_pass(reference, compressed, [data])
    expected = statistics(level_by_level)
    for name, (mean, var) in statistics(one_pass).items():
        np.testing.assert_allclose(mean, expected[name][0], rtol=1e-12, atol=0, err_msg=name)
        np.testing.assert_allclose(var, expected[name][1], rtol=1e-12, atol=0, err_msg=name)


def test_one_pass_over_several_batches_differs_below_the_first_level(reference, data):
    # Each BN then normalizes with batch-matched statistics, so deeper inputs are not those of
    # the final model: the one-batch equality above is not a coincidence of this fixture.
    compressed = compress(reference, "prune70")
    level_by_level, _ = match_level_by_level(reference, compressed, data, LEVELS)
    one_pass = match_one_pass(reference, compressed, list(torch.split(data, 32)))
    expected, got = statistics(level_by_level), statistics(one_pass)
    np.testing.assert_allclose(got["bn1"][1], expected["bn1"][1], rtol=1e-5)   # nothing upstream
    relative = np.max(np.abs(got["bn4"][1] - expected["bn4"][1]) / expected["bn4"][1])
    assert relative > 1e-3


def test_compressions_change_only_the_inner_weights(reference):
    pruned, quantized = magnitude_prune(reference, 0.7), fake_quantize(reference, bits=4)
    for layer in compressible_layers(pruned):
        assert abs(float((layer.weight == 0).float().mean()) - 0.7) < 0.02
    for layer in compressible_layers(quantized):
        assert len(torch.unique(layer.weight)) <= 16
    for model in (pruned, quantized):
        assert torch.equal(model.conv.weight, reference.conv.weight)
        assert torch.equal(model.head.weight, reference.head.weight)
        for name, (mean, _) in statistics(model).items():
            np.testing.assert_array_equal(mean, statistics(reference)[name][0])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_exported_matched_model_runs_in_onnxruntime_with_bns_named_after_modules(reference, data):
    matched, _ = match_level_by_level(reference, magnitude_prune(reference, 0.7), data, LEVELS)
    exported = export_with_batchnorm_kept(matched, data[:2])
    bn_means = [node.input[3] for node in exported.graph.node if node.op_type == "BatchNormalization"]
    assert bn_means == [f"{name}.running_mean" for name in batchnorms(matched)]   # how phase 2 pairs them
    with torch.no_grad():
        expected = matched(data).numpy()
    got = run_onnxruntime(exported, {"input": data.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
