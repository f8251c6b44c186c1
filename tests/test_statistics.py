"""Re-estimated statistics against independent references: numpy on the concatenated data.

The calibration data feeds the BN directly (or through a BN whose train-mode output numpy
recomputes), so the expected statistics are plain numpy over all samples, whatever the batching.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnpass
from bnpass.stats import ChannelMoments
from builders import GraphBuilder, add_batchnorm, random_bn_params, run_onnxruntime

CHANNELS = 3


def direct_bn_model(rank=4, *, opset=13, dtype=np.float32, param_dtype=None, batch="N",
                    param_source="initializer", spatial=None):
    """x -> BN -> y: the BN sees the calibration data itself."""
    builder = GraphBuilder(opset=opset, ir_version=10 if opset >= 9 else 3)
    shape = [batch, CHANNELS] + [5, 4, 3][: rank - 2]
    builder.add_input("x", dtype, shape)
    param_shape = (CHANNELS,) if spatial != 0 else tuple(shape[1:])
    add_batchnorm(builder, "x", random_bn_params(param_shape, np.random.default_rng(0), param_dtype or dtype),
                  param_source=param_source, spatial=spatial)
    builder.add_output("y")
    return builder.build()


def make_data(count, rank=4, seed=1, dtype=np.float32):
    rng = np.random.default_rng(seed)
    shape = [count, CHANNELS] + [5, 4, 3][: rank - 2]
    # Offsets and scales per channel, so that a wrong axis or a missing shift shows.
    offsets = np.array([3.0, -2.0, 0.5]).reshape([1, CHANNELS] + [1] * (rank - 2))
    scales = np.array([0.5, 2.0, 1.0]).reshape(offsets.shape)
    return (rng.standard_normal(shape) * scales + offsets).astype(dtype)


def pooled_reference(data):
    axes = (0,) + tuple(range(2, data.ndim))
    data = data.astype(np.float64)
    return data.mean(axis=axes), data.var(axis=axes)


def bn_param(model, position):
    """Value of input ``position`` of the only BN, wherever it lives (initializer or Constant)."""
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    name = bn.input[position]
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    producer = next(n for n in model.graph.node if name in n.output)
    return numpy_helper.to_array(producer.attribute[0].t)


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("opset", [7, 9, 14, 15])
def test_pooled_statistics_equal_numpy_for_every_rank_and_opset(rank, opset):
    model = direct_bn_model(rank, opset=opset)
    data = make_data(50, rank)
    result = bnpass.reestimate_batchnorms(model, [data], batch_size=8, num_samples=50)
    mean, var = pooled_reference(data)
    stats = result.stats["bn"]
    assert result.samples == 50 and result.batches == 7  # six of 8 and a short last batch of 2
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats.var, var, rtol=1e-6)
    # ... and the numbers are what the output model carries, rounded once to its own dtype.
    np.testing.assert_array_equal(bn_param(result.model, 3), stats.mean.astype(np.float32))
    np.testing.assert_array_equal(bn_param(result.model, 4), stats.var.astype(np.float32))
    onnx.checker.check_model(result.model, full_check=True)


@pytest.mark.parametrize("batch_sizes", [[50], [1] * 50, [7, 13, 1, 29], [25, 25]])
def test_pooled_statistics_do_not_depend_on_the_batch_split(batch_sizes):
    model = direct_bn_model()
    data = make_data(50)
    splits = np.split(data, np.cumsum(batch_sizes)[:-1])
    moments = ChannelMoments()
    for part in splits:
        axes = (0, 2, 3)
        part64 = part.astype(np.float64)
        moments.add_batch(part64.mean(axes), ((part64 - part64.mean(axes, keepdims=True)) ** 2).sum(axes),
                          part[:, 0].size)
    mean, var = moments.result("pooled")
    expected_mean, expected_var = pooled_reference(data)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-12)
    np.testing.assert_allclose(var, expected_var, rtol=1e-12)
    # The same through the whole pipeline, batching by bnpass:
    result = bnpass.reestimate_batchnorms(model, [data], batch_size=max(batch_sizes))
    np.testing.assert_allclose(result.stats["bn"].var, expected_var, rtol=1e-6)


def test_batch_mean_statistics_are_means_of_batch_means_and_unbiased_variances():
    model = direct_bn_model()
    data = make_data(40)
    result = bnpass.reestimate_batchnorms(model, [data], stats="batch-mean", batch_size=16)
    batches = [data[0:16], data[16:32], data[32:40]]
    means = [b.astype(np.float64).mean((0, 2, 3)) for b in batches]
    variances = [b.astype(np.float64).var((0, 2, 3), ddof=1) for b in batches]
    np.testing.assert_allclose(result.stats["bn"].mean, np.mean(means, axis=0), rtol=1e-6)
    np.testing.assert_allclose(result.stats["bn"].var, np.mean(variances, axis=0), rtol=1e-6)


def test_a_bn_after_a_bn_sees_train_mode_normalized_activations():
    """Train-mode semantics: BN2's input is BN1 normalized by each batch's own statistics."""
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, ["N", CHANNELS, 5, 4])
    first = random_bn_params((CHANNELS,), np.random.default_rng(1))
    add_batchnorm(builder, "x", first, output="h", name="bn1")
    add_batchnorm(builder, "h", random_bn_params((CHANNELS,), np.random.default_rng(2)), output="y", name="bn2")
    builder.add_output("y")
    model = builder.build()
    data = make_data(48)
    result = bnpass.reestimate_batchnorms(model, [data], batch_size=16)

    normalized = []
    for batch in np.split(data.astype(np.float64), 3):
        mean, var = batch.mean((0, 2, 3), keepdims=True), batch.var((0, 2, 3), keepdims=True)
        gamma, beta = (first.scale.reshape(1, -1, 1, 1).astype(np.float64),
                       first.bias.reshape(1, -1, 1, 1).astype(np.float64))
        normalized.append((batch - mean) / np.sqrt(var + 1e-5) * gamma + beta)
    expected_mean, expected_var = pooled_reference(np.concatenate(normalized))
    np.testing.assert_allclose(result.stats["bn2"].mean, expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.stats["bn2"].var, expected_var, rtol=1e-5)


def test_per_activation_statistics_for_opset7_spatial0():
    model = direct_bn_model(4, opset=7, spatial=0)
    data = make_data(30)
    result = bnpass.reestimate_batchnorms(model, [data], batch_size=8)
    expected = data.astype(np.float64)
    np.testing.assert_allclose(result.stats["bn"].mean, expected.mean(0).reshape(-1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.stats["bn"].var, expected.var(0).reshape(-1), rtol=1e-5)
    assert bn_param(result.model, 3).shape == (CHANNELS, 5, 4)


@pytest.mark.parametrize("dtype,param_dtype,opset", [(np.float16, np.float16, 13), (np.float16, np.float32, 15),
                                                     (np.float64, np.float64, 13)])
def test_statistics_of_float16_and_float64_models(dtype, param_dtype, opset):
    model = direct_bn_model(opset=opset, dtype=dtype, param_dtype=param_dtype)
    data = make_data(40, dtype=dtype)
    result = bnpass.reestimate_batchnorms(model, [data], batch_size=16)
    mean, var = pooled_reference(data)
    # Reductions run in float32 (float64 for float64 models), whatever the activations' type.
    tolerance = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(result.stats["bn"].mean, mean, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(result.stats["bn"].var, var, rtol=tolerance)
    assert bn_param(result.model, 3).dtype == param_dtype
    np.testing.assert_array_equal(bn_param(result.model, 4), result.stats["bn"].var.astype(param_dtype))


@pytest.mark.parametrize("source", ["constant_node", "identity_chain", "constant_behind_identity"])
def test_statistics_are_written_wherever_the_params_live(source):
    model = direct_bn_model(param_source=source)
    data = make_data(20)
    result = bnpass.reestimate_batchnorms(model, [data], batch_size=10)
    mean, var = pooled_reference(data)
    onnx.checker.check_model(result.model, full_check=True)
    np.testing.assert_allclose(result.stats["bn"].mean, mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.stats["bn"].var, var, rtol=1e-6)

    # The output model normalizes with the new statistics: its output has per-channel mean beta.
    output = run_onnxruntime(result.model, {"x": data})[0].astype(np.float64)
    params = random_bn_params((CHANNELS,), np.random.default_rng(0))
    np.testing.assert_allclose(output.mean((0, 2, 3)), params.bias, atol=1e-5)


def test_a_mean_shared_by_two_bns_is_not_overwritten_in_place():
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, ["N", CHANNELS, 5, 4])
    params = random_bn_params((CHANNELS,), np.random.default_rng(3))
    builder.add_initializer("shared_mean", params.mean)
    builder.add_initializer("g", params.scale)
    builder.add_initializer("b", params.bias)
    builder.add_initializer("v", params.var)
    builder.add_node("BatchNormalization", ["x", "g", "b", "shared_mean", "v"], ["h"], name="bn1")
    builder.add_node("Relu", ["h"], ["r"], name="relu")
    builder.add_node("BatchNormalization", ["r", "g", "b", "shared_mean", "v"], ["y"], name="bn2")
    builder.add_output("y")
    model = builder.build()
    result = bnpass.reestimate_batchnorms(model, [make_data(20)], batch_size=10)
    bns = [n for n in result.model.graph.node if n.op_type == "BatchNormalization"]
    assert bns[0].input[3] != bns[1].input[3]  # each BN got its own mean
    assert not np.allclose(result.stats["bn1"].mean, result.stats["bn2"].mean)
    onnx.checker.check_model(result.model, full_check=True)
    # The input model is untouched.
    assert [n for n in model.graph.node if n.op_type == "BatchNormalization"][0].input[3] == "shared_mean"


def test_fixed_batch_of_one_is_freed_for_calibration():
    """A model exported with batch 1 and x.view(1, -1) still calibrates with real batches."""
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, [1, CHANNELS, 5, 4])
    builder.add_initializer("flat_shape", np.array([1, -1], dtype=np.int64))
    builder.add_node("Reshape", ["x", "flat_shape"], ["flat"], name="view")
    add_batchnorm(builder, "flat", random_bn_params((CHANNELS * 20,), np.random.default_rng(0)))
    builder.add_output("y")
    model = builder.build()
    data = make_data(64)
    result = bnpass.reestimate_batchnorms(model, [data], stats="batch-mean", batch_size=32)
    assert result.batch_size == 32 and result.batches == 2
    flat = data.reshape(64, -1).astype(np.float64)
    expected_var = np.mean([flat[:32].var(0, ddof=1), flat[32:].var(0, ddof=1)], axis=0)
    np.testing.assert_allclose(result.stats["bn"].var, expected_var, rtol=1e-5)
    # The output model keeps its fixed batch and its Reshape.
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    np.testing.assert_array_equal(
        numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "flat_shape")), [1, -1])


def test_a_batch_the_graph_depends_on_stays_fixed_with_a_warning(caplog):
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, [2, CHANNELS, 5, 4])
    builder.add_initializer("odd_shape", np.array([6, -1], dtype=np.int64))  # mixes batch and channels
    builder.add_node("Reshape", ["x", "odd_shape"], ["mixed"], name="mix")
    add_batchnorm(builder, "mixed", random_bn_params((20,), np.random.default_rng(0)))
    builder.add_output("y")
    model = builder.build()
    data = make_data(9)
    with caplog.at_level(logging.WARNING, logger="bnpass"):
        result = bnpass.reestimate_batchnorms(model, [data], batch_size=32)
    assert result.batch_size == 2 and result.samples == 8  # the odd sample out is dropped
    assert "fixed at 2" in caplog.text and "dropped the last 1" in caplog.text
    mixed = data[:8].reshape(4, 6, 20).astype(np.float64)
    np.testing.assert_allclose(result.stats["bn"].mean, mixed.mean((0, 1)), rtol=1e-6, atol=1e-7)


def test_non_finite_data_is_an_error():
    data = make_data(16)
    data[3, 1, 2, 2] = np.nan
    with pytest.raises(bnpass.DataError, match="NaN or Inf"):
        bnpass.reestimate_batchnorms(direct_bn_model(), [data], batch_size=8)


def test_non_finite_statistics_are_an_error():
    """Finite data whose squares overflow float32 gives an infinite variance: refuse to write it."""
    data = make_data(16) * np.float32(1e20)
    with pytest.raises(bnpass.DataError, match="not finite"):
        bnpass.reestimate_batchnorms(direct_bn_model(), [data], batch_size=8)


def test_batch_mean_with_one_value_per_channel_is_an_error():
    model = direct_bn_model(rank=2)
    with pytest.raises(bnpass.DataError, match="unbiased"):
        bnpass.reestimate_batchnorms(model, [make_data(3, rank=2)], stats="batch-mean", batch_size=2)


def test_num_samples_is_rounded_up_to_whole_batches():
    result = bnpass.reestimate_batchnorms(direct_bn_model(), [make_data(100)], batch_size=16, num_samples=40)
    assert result.samples == 48 and result.batches == 3
