"""The graph patterns QDQ quantizers write around layers and BNs, on models quantized by onnxruntime itself.

``onnxruntime.quantization.quantize_static`` (QDQ) writes ``Conv -> Q -> DQ -> BN -> Q -> DQ`` for a
model whose BN was not folded first (the BN's scale as DequantizeLinear of int8, its B of int32),
``Conv -> Q -> DQ`` after a layer (a Relu after it removed) and ``MatMul -> Q -> DQ -> Add(DQ bias)``.
Checked here: such a BN folds, exactly the activation pairs in front of the BNs and the BNs go, and
the result computes what onnxruntime computes for the quantized model without those pairs; BN
statistics behind them are re-estimated against numpy; layer correction (``--reference``) reaches a
MatMul behind its pair keeping every node; a layer that cannot be read is skipped with its reason
while the others are corrected; the closing line and the report say what was left.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper

import bnpass
from bnpass.cli import main
from bnpass.passes.match_reference import ReferenceResult
from bnpass.report import closing_note
from builders import GraphBuilder, add_batchnorm, random_bias, random_bn_params, random_weight, run_onnxruntime
from quantized_patterns_builders import (
    INPUT,
    calibration_batches,
    conv_bn_model,
    conv_matmul_model,
    op_counts,
    quantize,
    without_activation_pairs_before_batchnorms,
)

FLOAT_BIASES = {"extra_options": {"QuantizeBias": False}}


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(tensor) for tensor in model.graph.initializer if tensor.name == name)


def _assert_computes_without_the_pairs(folded: onnx.ModelProto, quantized: onnx.ModelProto, data: np.ndarray):
    """``folded`` computes what onnxruntime computes for ``quantized`` with the pairs before its BNs taken
    out: every output equal but where the last rounding flips (at most one step of the output's scale)."""
    want = run_onnxruntime(without_activation_pairs_before_batchnorms(quantized), {INPUT: data})[0]
    got = run_onnxruntime(folded, {INPUT: data})[0]
    step = float(_initializer(quantized, "logits_scale"))
    assert np.max(np.abs(got - want)) <= step * 1.001
    assert np.mean(got != want) < 0.01, np.mean(got != want)


def test_bn_behind_activation_pairs_folds_and_exactly_those_pairs_go():
    """Issue 21, E6: onnxruntime's Conv -> Q -> DQ -> BN(scale = DQ int8) -> Q -> DQ; 0 of 2 BNs folded."""
    batches = calibration_batches()
    quantized = quantize(conv_bn_model(), batches, **FLOAT_BIASES)
    before = quantized.SerializeToString()
    result = bnpass.fold_batchnorms(quantized)
    assert quantized.SerializeToString() == before
    assert result.folded == [("bn0", "conv0"), ("bn1", "conv1")], result.skipped
    assert result.removed_pairs == {"bn0": ("conv0_QuantizeLinear", "conv0_DequantizeLinear"),
                                    "bn1": ("conv1_QuantizeLinear", "conv1_DequantizeLinear")}
    onnx.checker.check_model(result.model, full_check=True)
    removed = op_counts(quantized) - op_counts(result.model)
    assert removed == {"BatchNormalization": 2, "QuantizeLinear": 2, "DequantizeLinear": 2,
                       "DequantizeLinear(constant)": 2}  # the pairs, the BNs and the BNs' quantized scales
    assert not op_counts(result.model) - op_counts(quantized)
    _assert_computes_without_the_pairs(result.model, quantized, np.concatenate(batches))
    assert bnpass.fold_batchnorms(result.model).modified is False


def test_bn_parameters_behind_int8_and_int32_dequantize_linear_fold():
    """Issue 21, E6/E1: a BN's B as onnxruntime writes it, DequantizeLinear(int32, scale [1], scalar zero
    point), and its scale as DequantizeLinear(int8): read dequantized and folded."""
    batches = calibration_batches(seed=1)
    quantized = quantize(conv_bn_model(seed=1), batches)
    bn = next(node for node in quantized.graph.node if node.op_type == "BatchNormalization")
    assert _initializer(quantized, "bn0_bias_quantized").dtype == np.int32
    assert _initializer(quantized, "bn0_bias_quantized_scale").shape == (1,)
    assert _initializer(quantized, "bn0_bias_quantized_zero_point").shape == ()
    assert bn.input[2] == "bn0_bias"  # made by that DequantizeLinear
    result = bnpass.fold_batchnorms(quantized)
    assert len(result.folded) == 2, result.skipped
    onnx.checker.check_model(result.model, full_check=True)
    removed = op_counts(quantized) - op_counts(result.model)
    assert {op: removed[op] for op in ("BatchNormalization", "QuantizeLinear", "DequantizeLinear")} == {
        "BatchNormalization": 2, "QuantizeLinear": 2, "DequantizeLinear": 2}
    assert removed["DequantizeLinear(constant)"] >= 4  # the BNs' scales and Bs (the Conv biases: issue 21, E1)
    _assert_computes_without_the_pairs(result.model, quantized, np.concatenate(batches))


def test_relu_between_the_bn_and_its_quantize_still_folds():
    """A quantizer that keeps the Relu: Conv -> Q -> DQ -> BN -> Relu -> Q -> DQ; the pair before the BN goes."""
    rng = np.random.default_rng(3)
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, ["N", 3, 6, 6])
    builder.add_initializer("w", random_weight((4, 3, 3, 3), rng))
    builder.add_initializer("b", random_bias(4, rng))
    builder.add_node("Conv", ["x", "w", "b"], ["conv_out"], name="conv")
    for name, scale, zero_point in (("a", 0.05, 0), ("r", 0.03, -128)):
        builder.add_initializer(f"{name}_scale", np.float32(scale))
        builder.add_initializer(f"{name}_zero_point", np.int8(zero_point))
    builder.add_node("QuantizeLinear", ["conv_out", "a_scale", "a_zero_point"], ["a_q"], name="quantize_a")
    builder.add_node("DequantizeLinear", ["a_q", "a_scale", "a_zero_point"], ["a_dq"], name="dequantize_a")
    add_batchnorm(builder, "a_dq", random_bn_params((4,), rng), output="bn_out", name="bn")
    builder.add_node("Relu", ["bn_out"], ["relu_out"], name="relu")
    builder.add_node("QuantizeLinear", ["relu_out", "r_scale", "r_zero_point"], ["r_q"], name="quantize_r")
    builder.add_node("DequantizeLinear", ["r_q", "r_scale", "r_zero_point"], ["y"], name="dequantize_r")
    builder.add_output("y")
    model = builder.build()
    result = bnpass.fold_batchnorms(model)
    assert result.folded == [("bn", "conv")] and result.removed_pairs == {"bn": ("quantize_a", "dequantize_a")}
    onnx.checker.check_model(result.model, full_check=True)
    assert [node.op_type for node in result.model.graph.node] == ["Conv", "Relu", "QuantizeLinear",
                                                                 "DequantizeLinear"]
    data = rng.standard_normal((8, 3, 6, 6)).astype(np.float32)
    want = run_onnxruntime(without_activation_pairs_before_batchnorms(model), {"x": data})[0]
    got = run_onnxruntime(result.model, {"x": data})[0]
    assert np.max(np.abs(got - want)) <= 0.03 * 1.001 and np.mean(got != want) < 0.01


def _with_quantized_running_mean(model: onnx.ModelProto, bn_name: str) -> tuple:
    """``(copy of model, stored mean)``: the BN's running mean made ``DequantizeLinear(int8, scale)`` by
    hand (onnxruntime leaves statistics float; another tool may not)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    bn = next(node for node in copy.graph.node if node.name == bn_name)
    mean = _initializer(copy, bn.input[3]).astype(np.float64)
    scale = np.float32(np.abs(mean).max() / 127)
    copy.graph.initializer.extend([numpy_helper.from_array(np.round(mean / scale).astype(np.int8), "mean_q"),
                                   numpy_helper.from_array(scale, "mean_scale")])
    copy.graph.node.insert(0, onnx.helper.make_node("DequantizeLinear", ["mean_q", "mean_scale"], ["mean_dq"],
                                                    name="dequantize_mean"))
    bn.input[3] = "mean_dq"
    stored = (np.round(mean / scale) * np.float64(scale)).astype(np.float32)
    return copy, stored


def test_reestimation_reads_and_writes_statistics_behind_the_pairs():
    """Plain re-estimation of the quantized BN model: the first BN's statistics are numpy's moments of its
    input (the pair's output, tapped in onnxruntime), written where they live (a running mean behind
    DequantizeLinear: read dequantized, replaced by a float tensor), and then every BN folds."""
    batches = calibration_batches(seed=2)
    quantized, stored_mean = _with_quantized_running_mean(quantize(conv_bn_model(seed=2), batches), "bn0")
    data = np.concatenate(batches)
    result = bnpass.reestimate_batchnorms(quantized, [data], batch_size=len(data))
    np.testing.assert_array_equal(result.stats["bn0"].old_mean, stored_mean)
    tapped = onnx.ModelProto()
    tapped.CopyFrom(quantized)
    tapped.graph.output.append(onnx.ValueInfoProto(name="conv0_DequantizeLinear_Output"))
    bn_input = run_onnxruntime(tapped, {INPUT: data})[1].astype(np.float64)
    stats = result.stats["bn0"]
    np.testing.assert_allclose(stats.mean, bn_input.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.var, bn_input.var(axis=(0, 2, 3)), rtol=1e-4)
    bn = next(node for node in result.model.graph.node if node.name == "bn0")
    np.testing.assert_allclose(_initializer(result.model, bn.input[3]), stats.mean, rtol=1e-6)
    assert op_counts(quantized) - op_counts(result.model) == {"DequantizeLinear(constant)": 1}
    folded = bnpass.fold_batchnorms(result.model)
    assert len(folded.folded) == 2 and len(folded.removed_pairs) == 2, folded.skipped
    onnx.checker.check_model(folded.model, full_check=True)


def _damaged(quantized: onnx.ModelProto, seed: int = 5) -> onnx.ModelProto:
    """``quantized`` with every layer's weight scales moved by seeded per-channel factors in [0.85, 1.15]:
    a compressed model whose activation ranges the quantizer calibrated on the uncompressed one. (With
    factors in [0.6, 1.4] the corrected MatMul's gain can push its output past the range of the pair
    before its Add, which the correction keeps: README, "Quantized models".)"""
    rng = np.random.default_rng(seed)
    damaged = onnx.ModelProto()
    damaged.CopyFrom(quantized)
    for tensor in damaged.graph.initializer:
        if tensor.name in ("w0_scale", "w1_scale", "fc_w_scale"):
            scale = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(
                (scale * rng.uniform(0.85, 1.15, scale.shape)).astype(scale.dtype), tensor.name))
    return damaged


def test_matmul_behind_its_activation_pair_is_corrected_keeping_every_node():
    """Issue 21, E2: MatMul -> Q -> DQ -> Add(DequantizeLinear int8 bias) "has no bias Add to take the
    correction's bias". The logits layer is corrected (gain into the MatMul's weight, shift into the
    Add's quantized constant), the Convs before their pairs too, every node and op type kept; the logits'
    per-class means come back to the uncompressed model's."""
    batches = calibration_batches(seed=4)
    reference = conv_matmul_model(seed=4)
    damaged = _damaged(quantize(reference, batches, per_channel=True, **FLOAT_BIASES))
    result = bnpass.reestimate_batchnorms(damaged, batches, reference=reference, candidate="matched")
    assert sorted(result.layers) == ["conv0", "conv1", "fc"] and result.refused_layers == {}
    onnx.checker.check_model(result.model, full_check=True)
    assert op_counts(result.model) == op_counts(damaged)
    assert [node.op_type for node in result.model.graph.node] == [node.op_type for node in damaged.graph.node]
    data = np.concatenate(batches)
    means = [run_onnxruntime(model, {INPUT: data})[0].mean(axis=0) for model in (reference, damaged, result.model)]
    assert np.max(np.abs(means[1] - means[0])) > 0.05
    assert np.max(np.abs(means[2] - means[0])) < 0.03, means


def test_a_layer_that_cannot_be_read_is_skipped_with_its_reason_and_the_others_corrected():
    """Issue 21, E3: one layer whose weight is not a constant (here fed as an overridable graph input)
    stopped the run with "the reference does not correspond to the model"."""
    batches = calibration_batches(seed=6)
    reference = conv_matmul_model(seed=6)
    model = conv_matmul_model(seed=6, damage=0.3)
    weight = next(tensor for tensor in model.graph.initializer if tensor.name == "w1")
    model.graph.input.append(onnx.helper.make_tensor_value_info("w1", weight.data_type, list(weight.dims)))
    result = bnpass.reestimate_batchnorms(model, batches, reference=reference, candidate="matched")
    assert sorted(result.layers) == ["conv0", "fc"]
    assert result.refused_layers == {"conv1": "the weight 'w1' of Conv 'conv1' is not a constant"}
    onnx.checker.check_model(result.model, full_check=True)


def test_closing_line_and_report_say_what_was_left_and_which_pairs_went(tmp_path, capsys):
    """The closing line counts the BNs left (with the reason in short) and says when the output is an
    unchanged copy; the summary and --report count the activation pairs removed and list the BNs left."""
    quantized = quantize(conv_bn_model(), calibration_batches(), **FLOAT_BIASES)
    onnx.save(quantized, tmp_path / "q.onnx")
    assert main([str(tmp_path / "q.onnx"), str(tmp_path / "out.onnx"), "--fold-only",
                 "--report", str(tmp_path / "r.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "removed 2 activation QuantizeLinear/DequantizeLinear pairs" in lines[0]
    assert lines[-1].startswith("wrote ") and "left as given" not in lines[-1]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["activation_pairs_removed"] == 2 and report["batchnorms_not_folded"] == {}
    assert report["batchnorms"][0]["activation_pair_removed"] == ["conv0_QuantizeLinear", "conv0_DequantizeLinear"]

    # The second BN's output no longer quantized again: it stays, and the closing line says so.
    unquantized = onnx.ModelProto()
    unquantized.CopyFrom(quantized)
    quantize_relu1 = next(node for node in unquantized.graph.node if node.name == "relu1_QuantizeLinear")
    dequantize_relu1 = next(node for node in unquantized.graph.node if node.name == "relu1_DequantizeLinear")
    next(node for node in unquantized.graph.node if node.name == "pool").input[0] = quantize_relu1.input[0]
    unquantized.graph.node.remove(quantize_relu1)
    unquantized.graph.node.remove(dequantize_relu1)
    onnx.save(unquantized, tmp_path / "u.onnx")
    assert main([str(tmp_path / "u.onnx"), str(tmp_path / "out2.onnx"), "--fold-only",
                 "--report", str(tmp_path / "r2.json")]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert "; left as given: 1 of 2 BatchNormalization nodes not folded (its input passes through the " \
           "activation quantization" in last, last
    assert list(json.loads((tmp_path / "r2.json").read_text())["batchnorms_not_folded"]) == ["bn1"]

    # --reference kept the model as given: its BNs keep their stored statistics, and the line says so.
    kept_as_given = ReferenceResult(model=quantized, modified=False, chosen="compressed")
    assert "2 BatchNormalization nodes' statistics as stored (the compressed (as given) candidate was kept)" in (
        closing_note(["bn0", "bn1"], kept_as_given, bnpass.fold_batchnorms(quantized)))

    # Nothing to do: an unchanged copy, said on the closing line.
    model = conv_matmul_model()
    onnx.save(model, tmp_path / "plain.onnx")
    assert main([str(tmp_path / "plain.onnx"), str(tmp_path / "out3.onnx"), "--fold-only"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(": an unchanged copy")
