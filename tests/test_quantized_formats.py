"""Quantized weights and biases in every form the quantizers write, folded in their own format (issue 21).

Models come from the real quantizer where it writes the form (``onnxruntime.quantization.quantize_static``,
QDQ: per-tensor and per-channel int8, uint8, int4 in the ``com.microsoft`` domain at opset 13 and
native at opset 21), with a fresh non-trivial BN after the quantized layer; by hand for the forms
it does not write here (float8, blocked, ``QuantizeLinear(constant) -> DequantizeLinear``, a [1]
scale with a scalar zero point) (tests/quantized_builders.py).

Every fold is checked against onnxruntime running the unfolded model (graph optimizations off):

* the weight fold is exact in the scale: float32 rtol 1e-5 (:func:`assertions.fold_and_verify`)
  where the bias stays float;
* an int32 bias is re-quantized at input scale x folded weight scale, so channel c may differ by at
  most half a bias step, 0.5 x input scale x weight scale[c] x |s[c]| (computed here from the input
  model's scales and BN), plus the float32 tolerance;

and the folded model keeps the input's node counts, op types and domains (the BN gone), the storage
type of every quantized tensor, and passes ``check_model(full_check=True)``.
"""

from __future__ import annotations

from collections import Counter

import ml_dtypes
import numpy as np
import onnx
import pytest

import bnpass
from assertions import assert_stays, fold_and_verify
from bnpass.passes.correct_layers import layers_without_batchnorm
from builders import BN_NODE_NAME, node_by_name, random_feeds, run_onnxruntime
from quantized_builders import hand_quantized_model, quantized_by_onnxruntime, with_batchnorm_after

FLOAT32_RTOL = 1e-5

# name -> (layer, quantize_static options, gamma sign): int4's symmetric range is the full [-8, 7],
# so a mirrored -8 overflows: those BNs get positive factors (a correction's gain is positive).
REAL_FORMS = {
    "int8_per_tensor": ("conv", dict(per_channel=False), "random"),
    "int8_per_channel": ("conv", dict(per_channel=True), "random"),
    "uint8_per_tensor": ("conv", dict(weight_type="uint8"), "positive"),
    "int8_gemm_per_tensor": ("gemm", dict(per_channel=False), "random"),
    "int8_gemm_per_channel": ("gemm", dict(per_channel=True), "random"),
    "int4_microsoft_per_channel": ("conv", dict(weight_type="int4", per_channel=True, opset=13), "positive"),
    "int4_microsoft_gemm": ("gemm", dict(weight_type="int4", per_channel=True, opset=13), "positive"),
    "int4_opset21_per_channel": ("conv", dict(weight_type="int4", per_channel=True, opset=21), "positive"),
    "int4_opset21_per_tensor": ("gemm", dict(weight_type="int4", per_channel=False, opset=21), "positive"),
}


def _initializers(model) -> dict:
    return {tensor.name: tensor for tensor in model.graph.initializer}


def _value(model, name: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(_initializers(model)[name])


def _op_types(model) -> Counter:
    return Counter((node.domain, node.op_type) for node in model.graph.node)


def _storage_types(model) -> dict:
    """``{DequantizeLinear name: data type of what it reads}``."""
    tensors = _initializers(model)
    return {node.name: tensors[node.input[0]].data_type for node in model.graph.node
            if node.op_type == "DequantizeLinear" and node.input[0] in tensors}


def _bn_factor(model) -> np.ndarray:
    gamma, var = (_value(model, f"{BN_NODE_NAME}_{what}").astype(np.float64) for what in ("scale", "var"))
    return gamma / np.sqrt(var + 1e-5)


def _half_bias_steps(model) -> np.ndarray:
    """Half the int32 bias step after the fold, per channel, from the input model alone."""
    producers = {output: node for node in model.graph.node for output in node.output}
    layer = node_by_name(model, "last")
    input_scale = float(_value(model, producers[layer.input[0]].input[1]).reshape(-1)[0])
    factor = _bn_factor(model)
    weight_scale = np.broadcast_to(_value(model, producers[layer.input[1]].input[1]).reshape(-1), factor.shape)
    return 0.5 * input_scale * weight_scale.astype(np.float64) * np.abs(factor)


def _fold_real(model, **options):
    """Fold a real-quantizer model; check everything but the outputs; return the result."""
    original = model.SerializeToString()
    result = bnpass.fold_batchnorms(model, **options)
    assert model.SerializeToString() == original
    assert result.folded == [(BN_NODE_NAME, "last")], result.skipped
    onnx.checker.check_model(result.model, full_check=True)
    expected = _op_types(model)
    expected[("", "BatchNormalization")] -= 1
    assert _op_types(result.model) == +expected
    before = _storage_types(model)
    assert {name: kind for name, kind in _storage_types(result.model).items() if name in before} == before
    return result


def _assert_within_bias_steps(model, folded, half_steps: np.ndarray, *, channel_axis: int = 1) -> None:
    feeds = random_feeds(model)
    want, got = run_onnxruntime(model, feeds)[0], run_onnxruntime(folded, feeds)[0]
    scale = float(np.max(np.abs(want)))
    error = np.moveaxis(np.abs(got.astype(np.float64) - want), channel_axis, 0).reshape(half_steps.size, -1).max(axis=1)
    bound = half_steps * 1.0001 + FLOAT32_RTOL * scale
    assert np.all(error <= bound), (error, bound)


@pytest.mark.parametrize("form", list(REAL_FORMS))
def test_folds_real_quantizer_models_in_their_own_format(form):
    """Weights keep their integers and storage type, the int32 bias stays an int32
    DequantizeLinear (regression: per-tensor biases, scale [1] with a scalar zero point, were
    refused as "not a constant"; int4 in either domain was not read at all)."""
    layer, options, gamma_sign = REAL_FORMS[form]
    model = with_batchnorm_after(quantized_by_onnxruntime(layer, **options), gamma_sign=gamma_sign)
    result = _fold_real(model)
    _assert_within_bias_steps(model, result.model, _half_bias_steps(model))
    producers = {output: node for node in result.model.graph.node for output in node.output}
    weight_dq = producers[node_by_name(result.model, "last").input[1]]
    bias_dq = producers[node_by_name(result.model, "last").input[2]]
    assert _value(result.model, bias_dq.input[0]).dtype == np.int32
    folded_scale = _value(result.model, weight_dq.input[1])
    assert folded_scale.shape == _bn_factor(model).shape and np.all(folded_scale > 0)
    per_tensor = _value(model, node_by_name(model, weight_dq.name).input[1]).size == 1
    assert result.per_channel == (["last"] if per_tensor else [])
    assert result.float_biases == {}


def test_keep_per_tensor_rerounds_the_weight_on_one_scale():
    """``keep_per_tensor``: the scale stays one number (shape kept), the folded weight is re-rounded
    on the symmetric max-abs scale onnxruntime's quantizer would choose (int8: max |w| / 127), every
    value within half a step of the exact fold, and the bias scale is input scale x that scale."""
    model = with_batchnorm_after(quantized_by_onnxruntime("conv", per_channel=False))
    result = _fold_real(model, keep_per_tensor=True)
    assert result.per_channel == []
    dq = node_by_name(model, "w2_DequantizeLinear")
    exact = ((_value(model, dq.input[0]).astype(np.float64) - _value(model, dq.input[2]))
             * _value(model, dq.input[1]) * _bn_factor(model).reshape(-1, 1, 1, 1))
    folded_dq = node_by_name(result.model, "w2_DequantizeLinear")
    scale = _value(result.model, folded_dq.input[1])
    assert scale.shape == _value(model, dq.input[1]).shape
    np.testing.assert_allclose(scale, np.abs(exact).max() / 127, rtol=1e-6)
    stored = _value(result.model, folded_dq.input[0])
    assert stored.dtype == np.int8 and np.abs(stored).max() == 127
    rounded = (stored.astype(np.float64) - _value(result.model, folded_dq.input[2])) * scale
    assert np.max(np.abs(rounded - exact)) <= 0.5 * scale * (1 + 1e-6)
    bias_dq = node_by_name(result.model, "b2_DequantizeLinear")
    bias_scale = _value(result.model, bias_dq.input[1])
    input_scale = _value(model, "r1_scale")  # the DequantizeLinear feeding the last Conv
    assert bias_scale.shape == (1,)
    np.testing.assert_allclose(bias_scale, input_scale.astype(np.float32) * scale.astype(np.float32), rtol=1e-7)


@pytest.mark.parametrize("form", ["float8_per_tensor", "float8_per_channel", "int8_blocked", "int4_blocked",
                                  "quantize_per_tensor", "quantize_per_channel", "int8_one_element_scale"])
def test_folds_hand_written_forms_exactly(form):
    """float8 (negation is the exact mirror), blocked along the input axis (the output axis's scale
    multiplies exactly), QuantizeLinear(constant W) -> DequantizeLinear (W and both scales folded, so
    QuantizeLinear computes the same integers, mirrored), a [1] scale with a scalar zero point."""
    model = hand_quantized_model(form)
    before = _op_types(model)
    result, _ = fold_and_verify(model)
    before[("", "BatchNormalization")] -= 1
    assert _op_types(result.model) == +before
    dq = node_by_name(result.model, "dequantize")
    if not form.startswith("quantize"):  # the stored type is kept
        assert _storage_types(result.model) == _storage_types(model)
    else:  # W stays float, QuantizeLinear and DequantizeLinear keep sharing one scale
        quantize = node_by_name(result.model, "quantize")
        assert _value(result.model, quantize.input[0]).dtype == np.float32
        assert quantize.input[1] == dq.input[1]
    assert result.per_channel == (["matmul"] if form.endswith(("per_tensor", "one_element_scale")) else [])


@pytest.mark.parametrize("weight_source", ["initializer", "constant_node"])
def test_run_time_quantized_weight_keeps_its_integers(weight_source):
    """QuantizeLinear(W) -> DequantizeLinear (issue 21 E5, W an initializer or a Constant node):
    the integers QuantizeLinear computes from the folded W are the original ones, mirrored where
    the BN factor is negative (computed here with numpy from both models)."""
    model = hand_quantized_model("quantize_per_channel", weight_source=weight_source)
    result, _ = fold_and_verify(model)

    def integers(m):
        from builders import constant_value
        quantize = node_by_name(m, "quantize")
        weight, scale = constant_value(m, quantize.input[0]), constant_value(m, quantize.input[1])
        return np.clip(np.rint(weight.astype(np.float32) / scale.astype(np.float32)), -128, 127)

    factor = _bn_factor(model)
    np.testing.assert_array_equal(integers(result.model), integers(model) * np.sign(factor))


def test_keeps_bn_whose_int4_mirror_would_overflow():
    """onnxruntime's int4 weights use the full [-8, 7]: mirroring -8 for a negative BN factor does not fit."""
    model = with_batchnorm_after(quantized_by_onnxruntime("gemm", weight_type="int4", per_channel=True, opset=21),
                                 gamma_sign="random")
    assert_stays(model, "mirroring", "overflows int4 [-8, 7]")


def test_keeps_bn_blocked_along_the_output_axis_with_the_reason():
    assert_stays(hand_quantized_model("int8_blocked_output_axis"), "blocks of 2 along its output axis 1",
                 "one scale covers several channels")


@pytest.mark.parametrize("case,words", [
    ("int4_at_opset_19", ["int4 values, which needs opset 21", "imports 19"]),
    ("scale_fed_at_run_time", ["the scale 'w_scale' of DequantizeLinear 'dequantize' is not a constant"]),
    ("float8_zero_point", ["non-zero float8_e4m3fn zero point"]),
])
def test_unreadable_forms_say_the_true_reason(case, words):
    """Never "the weight is not a constant" when it is one: the reason names what is not read."""
    if case == "int4_at_opset_19":
        model = hand_quantized_model("float8_per_channel")
        tensor = _initializers(model)["w_quantized"]
        tensor.CopyFrom(onnx.numpy_helper.from_array(np.ones((8, 6), ml_dtypes.int4), "w_quantized"))
        _initializers(model)["w_zero_point"].CopyFrom(
            onnx.numpy_helper.from_array(np.zeros(6, ml_dtypes.int4), "w_zero_point"))
    elif case == "scale_fed_at_run_time":
        model = hand_quantized_model("int8_one_element_scale")
        scale = _initializers(model)["w_scale"]
        model.graph.input.append(onnx.helper.make_tensor_value_info("w_scale", scale.data_type, list(scale.dims)))
    else:
        model = hand_quantized_model("float8_per_tensor")
        _initializers(model)["w_zero_point"].CopyFrom(
            onnx.numpy_helper.from_array(np.array(1.0, ml_dtypes.float8_e4m3fn), "w_zero_point"))
    reason = assert_stays(model, *words)
    assert "not a constant" not in reason.replace("'w_scale' of DequantizeLinear 'dequantize' is not a constant", "")


def test_int32_bias_without_an_input_scale_is_written_in_float_and_says_why():
    """A layer whose input does not come from a DequantizeLinear has no input scale to re-quantize
    its int32 bias at: the folded bias is written in float, and the result says why."""
    from builders import build_quantized_weight_bn_model
    result, _ = fold_and_verify(build_quantized_weight_bn_model("conv", quantized_bias=True))
    assert list(result.float_biases) == ["conv"]
    assert "does not come from a DequantizeLinear" in result.float_biases["conv"]
    from bnpass.report import summary_lines
    lines = summary_lines([BN_NODE_NAME], None, result, "pooled")
    assert any(line.startswith("  1 int32 bias DequantizeLinear written in float (conv): its input does not")
               for line in lines), lines


@pytest.mark.parametrize("form", ["int4_microsoft", "quantize_per_channel"])
def test_pairs_layers_by_the_dequantized_weight_shape(form):
    """--reference pairs layers whatever the weight's storage: com.microsoft int4, or a weight
    quantized at run time (issue 21 E3/E5 stopped the run: "the reference does not correspond")."""
    if form == "int4_microsoft":
        model = quantized_by_onnxruntime("conv", weight_type="int4", per_channel=True, opset=13)
        expected = [(8, 3, 3, 3), (6, 8, 1, 1)]
    else:  # the BN dropped: MatMul -> Add is a layer without BN
        model = hand_quantized_model(form)
        model.graph.node.remove(node_by_name(model, BN_NODE_NAME))
        node_by_name(model, "add").output[0] = "y"
        expected = [(8, 6)]
    assert [layer.weight_shape for layer in layers_without_batchnorm(model)] == expected


@pytest.mark.parametrize("keep", [False, True], ids=["per_channel", "keep_per_tensor"])
def test_command_line_says_when_a_scale_became_per_channel(tmp_path, capsys, keep):
    """``--fold-only``: the summary says in one line which per-tensor weights became per-channel, and
    ``--keep-per-tensor`` keeps the scale's shape (no such line)."""
    from bnpass.cli import main
    model = with_batchnorm_after(quantized_by_onnxruntime("conv", per_channel=False))
    onnx.save(model, tmp_path / "in.onnx")
    arguments = [str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--fold-only"]
    assert main(arguments + (["--keep-per-tensor"] if keep else [])) == 0
    out = capsys.readouterr().out
    line = "1 quantized weight went from one scale per tensor to one per output channel (last)"
    assert (line in out) is not keep, out
    scale = _value(onnx.load(tmp_path / "out.onnx"), "w2_scale")
    assert scale.shape == (() if keep else (6,))


def test_keeps_bn_whose_run_time_quantized_weight_feeds_another_layer():
    """Folding into W would change the other layer reading the same DequantizeLinear: the BN stays."""
    model = hand_quantized_model("quantize_per_channel")
    model.graph.node.append(onnx.helper.make_node("MatMul", ["x", "w"], ["other_out"], name="other"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("other_out", onnx.TensorProto.FLOAT, [4, 6]))
    assert_stays(model, "quantized at run time", "also read by other nodes")
