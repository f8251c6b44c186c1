"""Every statistics form of the calibration graph (``reduce``, ``pooling``, ``layernorm``,
``training``) gives the statistics numpy computes on the concatenated data, and those of today's
``reduce`` form, on CPU; each falls back where it does not apply; the form follows the provider.

The forms other than ``reduce`` are made for the CUDA provider; CPU is where they are tested.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import bnpass
from bnpass import statistics_forms
from bnpass.calibration import FORMS, build_calibration_model
from bnpass.passes import ReestimateBatchNormPass
from bnpass.passes.statistics_session import StatisticsSession
from bnpass.runtime import CPU
from bnpass.statistics_forms import FORM_FOR_PROVIDER
from builders import GraphBuilder, add_batchnorm, random_bn_params
from test_calibration_graph import direct_bn_model as wide_bn_model
from test_calibration_graph import torch_conv_net
from test_statistics import CHANNELS, direct_bn_model, make_data, pooled_reference

# The operator that shows a form is really in the graph (``reduce`` has none of the others').
FORM_OPERATOR = {"pooling": "GlobalAveragePool", "layernorm": "LayerNormalization", "training": "training_mode"}


def graph_operators(model: onnx.ModelProto) -> set:
    operators = {node.op_type for node in model.graph.node}
    if any(attribute.name == "training_mode" and attribute.i == 1
           for node in model.graph.node for attribute in node.attribute):
        operators.add("training_mode")
    return operators


def reestimate(model, data, form, **options):
    samples = bnpass.calibration_samples(model, [data])
    return ReestimateBatchNormPass(samples, device="cpu", form=form, **options)(model)


def copy_opset(calibration) -> int:
    return next(entry.version for entry in calibration.model.opset_import if entry.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("opset", [9, 13, 14, 17, 18])
def test_every_form_gives_numpys_statistics_for_every_rank_and_opset(form, rank, opset):
    model = direct_bn_model(rank, opset=opset)
    data = make_data(50, rank)
    result = reestimate(model, data, form, batch_size=8, num_samples=50)
    mean, var = pooled_reference(data)
    stats = result.stats["bn"]
    assert result.batches == 7  # six of 8 and a short last batch of 2
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats.var, var, rtol=1e-6)
    onnx.checker.check_model(result.model, full_check=True)


@pytest.mark.parametrize("form", FORMS)
def test_every_form_is_exact_on_a_large_tensor_with_offset_channels(form):
    """Large means against small spreads (pruned channels): the variance must not cancel."""
    channels = 8
    rng = np.random.default_rng(3)
    offsets = np.array([5.0, -4.0, 30.0, 0.0, 1.0, -2.0, 8.0, 0.5]).reshape(1, channels, 1, 1)
    scales = np.array([0.2, 0.5, 0.1, 2.0, 0.3, 1.5, 0.05, 1.0]).reshape(offsets.shape)
    data = (rng.standard_normal((32, channels, 64, 64)) * scales + offsets).astype(np.float32)
    model = wide_bn_model(channels, (64, 64))
    model.opset_import[0].version = 14  # the training form needs 14; the others run at any opset
    result = reestimate(model, data, form, batch_size=16)
    mean, var = pooled_reference(data)
    np.testing.assert_allclose(result.stats["bn"].mean, mean, rtol=0, atol=1e-6 * np.sqrt(var).max())
    np.testing.assert_allclose(result.stats["bn"].var, var, rtol=1e-6)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype,param_dtype,opset", [(np.float16, np.float16, 14), (np.float16, np.float32, 15),
                                                     (np.float64, np.float64, 14)])
def test_every_form_on_float16_and_float64_models(form, dtype, param_dtype, opset):
    model = direct_bn_model(opset=opset, dtype=dtype, param_dtype=param_dtype)
    data = make_data(40, dtype=dtype)
    result = reestimate(model, data, form, batch_size=16)
    mean, var = pooled_reference(data)
    tolerance = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(result.stats["bn"].mean, mean, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(result.stats["bn"].var, var, rtol=tolerance)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_every_form_normalizes_with_the_batch_statistics(form, dtype):
    """Train-mode semantics: BN2's input is BN1 normalized by each batch's own statistics, in
    the model's dtype (the training form normalizes in float32 and casts back: the Mul by a
    constant of the model's dtype refuses anything else)."""
    builder = GraphBuilder(opset=14)
    builder.add_input("x", dtype, ["N", CHANNELS, 5, 4])
    first = random_bn_params((CHANNELS,), np.random.default_rng(1), dtype)
    add_batchnorm(builder, "x", first, output="h", name="bn1")
    builder.add_initializer("one", np.ones((), dtype))
    builder.add_node("Mul", ["h", "one"], ["h1"], name="times_one")
    add_batchnorm(builder, "h1", random_bn_params((CHANNELS,), np.random.default_rng(2), dtype), output="y",
                  name="bn2")
    builder.add_output("y")
    data = make_data(48, dtype=dtype)
    result = reestimate(builder.build(), data, form, batch_size=16)

    normalized = []
    for batch in np.split(data.astype(np.float64), 3):
        mean, var = batch.mean((0, 2, 3), keepdims=True), batch.var((0, 2, 3), keepdims=True)
        gamma = first.scale.reshape(1, -1, 1, 1).astype(np.float64)
        beta = first.bias.reshape(1, -1, 1, 1).astype(np.float64)
        normalized.append(((batch - mean) / np.sqrt(var + 1e-5) * gamma + beta).astype(dtype))
    expected_mean, expected_var = pooled_reference(np.concatenate(normalized))
    # float16: BN1's output is rounded to float16 on both sides; BN1 normalizes with its batch
    # statistics rounded to its float16 parameters' type (2.2e-5 measured)
    tolerance = 1e-5 if dtype == np.float32 else 1e-4
    np.testing.assert_allclose(result.stats["bn2"].mean, expected_mean, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(result.stats["bn2"].var, expected_var, rtol=tolerance)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("form", [form for form in FORMS if form != "reduce"])
def test_every_form_matches_the_reduce_form_on_a_torch_network(form):
    """PyTorch's Conv-BN-ReLU export (opset 13, NCHWc-sized): the same statistics as today's
    form, with onnxruntime's optimizations on (they must not fuse the statistics away)."""
    model = torch_conv_net()
    data = np.random.default_rng(1).standard_normal((64, 3, 16, 16)).astype(np.float32) + 0.5
    feeds = [{"input": data[:32]}, {"input": data[32:]}]
    results = {}
    for name in ("reduce", form):
        calibration = build_calibration_model(model, name)
        assert calibration.forms == [name] * 3
        moments = StatisticsSession(calibration, [CPU]).collect(feeds)
        results[name] = [m.result("pooled") for m in moments]
    for (mean, var), (mean_ref, var_ref) in zip(results[form], results["reduce"]):
        np.testing.assert_allclose(mean, mean_ref, rtol=0, atol=2e-6 * np.sqrt(var_ref).max())
        np.testing.assert_allclose(var, var_ref, rtol=1e-5)


def test_each_form_puts_its_operator_in_the_graph_and_raises_the_opset_only_when_needed():
    model = direct_bn_model(4, opset=13)
    model.ir_version = 7  # enough for opset 13, not for 17
    for form in FORMS:
        calibration = build_calibration_model(model, form)
        assert calibration.forms == [form]
        operators = graph_operators(calibration.model)
        for other, operator in FORM_OPERATOR.items():
            assert (operator in operators) == (other == form), (form, operator)
        # Every node valid at the copy's opset (strict inference checks each against its schema;
        # the checker would refuse the copy's outputs, which carry no shape on purpose).
        onnx.shape_inference.infer_shapes(calibration.model, strict_mode=True)
        assert copy_opset(calibration) == {"layernorm": 17, "training": 14}.get(form, 13)
        assert calibration.model.ir_version >= onnx.helper.find_min_ir_version_for(
            [onnx.helper.make_opsetid("", copy_opset(calibration))])
    assert model.opset_import[0].version == 13 and model.ir_version == 7  # the model itself is untouched


@pytest.mark.parametrize("model,form,expected", [
    (direct_bn_model(2, opset=14), "pooling", "reduce"),           # rank 2: no spatial axis
    (direct_bn_model(2, opset=17), "layernorm", "reduce"),
    (direct_bn_model(4, opset=7, spatial=0), "pooling", "reduce"),  # per-activation statistics
    (direct_bn_model(4, opset=7, spatial=0), "training", "reduce"),
    (direct_bn_model(4, opset=17, dtype=np.float64), "layernorm", "reduce"),  # Mean/InvStdDev are float32
    (direct_bn_model(4, opset=17, dtype=np.float64), "pooling", "reduce"),  # no float64 GlobalAveragePool
    (direct_bn_model(4, opset=12), "layernorm", "pooling"),         # no opset raise below 13
    (direct_bn_model(4, opset=9), "training", "reduce"),
    (direct_bn_model(2, opset=13), "training", "training"),         # BN's own kernel handles rank 2
], ids=["rank2-pooling", "rank2-layernorm", "spatial0-pooling", "spatial0-training", "float64-layernorm",
        "float64-pooling", "opset12-layernorm", "opset9-training", "rank2-training"])
def test_a_form_that_does_not_fit_falls_back(model, form, expected):
    calibration = build_calibration_model(model, form)
    assert calibration.forms == [expected]
    if expected != form:
        assert FORM_OPERATOR[form] not in graph_operators(calibration.model)


def test_a_node_whose_meaning_changes_keeps_the_opset_and_the_layernorm_form_falls_back():
    """RoiAlign's default coordinate_transformation_mode changed at opset 16: raising an opset-13
    copy to 17 would change what it computes, so the copy keeps 13 and uses ``pooling``."""
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, ["N", CHANNELS, 8, 8])
    add_batchnorm(builder, "x", random_bn_params((CHANNELS,), np.random.default_rng(0)), output="h")
    builder.add_initializer("rois", np.array([[0, 0, 4, 4]], np.float32))
    builder.add_initializer("indices", np.array([0], np.int64))
    builder.add_node("RoiAlign", ["h", "rois", "indices"], ["y"], name="roi", output_height=2, output_width=2)
    builder.add_output("y")
    model = builder.build()
    assert statistics_forms.opset_raise_refusal(model, 13, 17) == (
        "its RoiAlign node 'roi' means something else at opset 17")
    calibration = build_calibration_model(model, "layernorm")
    assert calibration.forms == ["pooling"] and copy_opset(calibration) == 13
    # ... while training (opset 14) may raise: RoiAlign changed at 16 only.
    assert build_calibration_model(model, "training").forms == ["training"]


def test_the_form_follows_the_provider():
    assert statistics_forms.form_for_providers([CPU]) == FORM_FOR_PROVIDER[CPU]
    assert statistics_forms.form_for_providers(["CUDAExecutionProvider", CPU]) == (
        FORM_FOR_PROVIDER["CUDAExecutionProvider"])
    assert set(FORM_FOR_PROVIDER.values()) <= set(FORMS)


def test_an_unknown_form_is_refused():
    with pytest.raises(ValueError, match="unknown statistics form 'median'"):
        build_calibration_model(direct_bn_model(), "median")
