"""Folding beyond producer -> BN: a bias Add in between, quantized weights, BN before the layer.

Every positive case runs :func:`assertions.fold_and_verify`: the BN count drops as expected, the
result passes ``onnx.checker`` (full check), keeps IR version, opset, graph inputs and outputs, has no
dead node or unused initializer, leaves the input ModelProto untouched, is idempotent (a second fold
reports ``modified=False`` and returns identical bytes), and matches the unfolded model through
onnxruntime at the tolerances stated in tests/assertions.py: float16 outputs within one fp16 ulp of
the output scale of a float32 run of the unfolded model, forward folds within
``FORWARD_FLOAT16_ULPS``, for the reason given there.

Negative cases check the BN stays with a reason naming what blocks it and the model is unchanged byte
for byte. ``test_fold_pass_keeps_one_graph_index`` guards the linear-time fold (issue 3, item 6).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import bnpass
import bnpass.graph
from assertions import assert_stays, fold_and_verify
from builders import (
    BN_NODE_NAME,
    GraphBuilder,
    add_batchnorm,
    add_producer,
    build_bn_then_layer_model,
    build_constant_of_shape_params_model,
    build_conv_bn_relu_chain_model,
    build_producer_add_bn_model,
    build_producer_bn_model,
    build_quantized_weight_bn_model,
    build_subgraph_reader_model,
    channel_bias_shape,
    constant_value,
    count_ops,
    initializer_array,
    node_by_name,
    random_bn_params,
    random_feeds,
    random_weight,
    with_inferred_value_info,
)

# A forward fold writes b' = b + W . shift, whose magnitude can exceed the output's (it cancels
# against W' x): rounding it once costs half an ulp of |b'|, not of the output. Measured worst case
# over 5 seeds: 1.02 ulp (Gemm) against 0.97 for backward folds.
FORWARD_FLOAT16_ULPS = 1.25

# dtype variants: (X dtype, BN param dtype, opset). Opset 15 lets fp16 X have fp32 BN params.
DTYPE_VARIANTS = {
    "fp32": (np.float32, None, 13),
    "fp16": (np.float16, None, 13),
    "fp16_fp32params": (np.float16, np.float32, 15),
}


def _initializer_dtypes(model: onnx.ModelProto) -> set:
    return {np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)) for t in model.graph.initializer}


# --------------------------------------------------------------------------------------------
# 1. Producer -> Add(constant per-channel bias) -> BN
# --------------------------------------------------------------------------------------------


def _add_cases():
    for producer in ("conv", "conv_transpose", "gemm", "matmul"):
        for variant in DTYPE_VARIANTS:
            for bias in ((False,) if producer == "matmul" else (True, False)):
                yield pytest.param(producer, variant, bias,
                                   id=f"{producer}-{variant}-{'bias' if bias else 'no_bias'}")


@pytest.mark.parametrize("producer,variant,bias", list(_add_cases()))
def test_folds_producer_add_bn(producer, variant, bias):
    """Conv/ConvTranspose/Gemm absorb the Add into their bias; after a MatMul the Add stays with the
    folded bias. Folded tensors keep X's dtype (fp16 with fp32 BN params: fp16 bias and weight)."""
    dtype, param_dtype, opset = DTYPE_VARIANTS[variant]
    model = build_producer_add_bn_model(producer, bias=bias, dtype=dtype, bn_param_dtype=param_dtype, opset=opset)
    result, _ = fold_and_verify(model)
    assert count_ops(result.model, "Add") == (1 if producer == "matmul" else 0)
    assert _initializer_dtypes(result.model) == {np.dtype(dtype)}


@pytest.mark.parametrize("producer,add_shape", [
    ("conv", (1, 6, 1, 1)), ("conv", (6, 1, 1)), ("conv", (1,)), ("conv", ()), ("conv_transpose", (1, 6, 1, 1)),
    ("gemm", (1, 6)), ("gemm", ()), ("matmul", (1, 6)), ("matmul", (6,)), ("matmul", ()),
], ids=lambda value: str(value).replace(" ", ""))
@pytest.mark.parametrize("constant_first", [False, True], ids=["layer_plus_constant", "constant_plus_layer"])
def test_folds_add_of_any_channel_broadcast_shape(producer, add_shape, constant_first):
    """Any constant that adds one number per channel (or one for all) folds, on either side of the Add."""
    model = build_producer_add_bn_model(producer, add_shape=add_shape, constant_first=constant_first)
    result, _ = fold_and_verify(model)
    if producer == "matmul":
        add = next(node for node in result.model.graph.node if node.op_type == "Add")
        matmul = next(node for node in result.model.graph.node if node.op_type == "MatMul")
        assert add.input[1 if constant_first else 0] == matmul.output[0], "the Add keeps its operand order"


@pytest.mark.parametrize("group", [2, 4], ids=["group2", "depthwise"])
@pytest.mark.parametrize("producer", ["conv", "conv_transpose"])
def test_folds_grouped_producer_add_bn(producer, group):
    model = build_producer_add_bn_model(producer, group=group, in_channels=4, out_channels=8, bias=True)
    fold_and_verify(model)


@pytest.mark.parametrize("add_source", ["constant_node", "identity_chain"])
@pytest.mark.parametrize("producer", ["conv", "matmul"])
def test_folds_add_whose_constant_is_a_constant_node_or_behind_identity(producer, add_source):
    """The Conv absorbs the Add, so its constant's chain goes; the MatMul's Add keeps its private
    chain, with the source rewritten (as for weights behind Identity)."""
    model = build_producer_add_bn_model(producer, add_source=add_source)
    result, _ = fold_and_verify(model)
    if producer == "conv":
        assert count_ops(result.model, "Identity") == 0


@pytest.mark.parametrize("producer,add_shape,words", [
    ("conv", (5,), ["shape [5]", "one value per channel"]),          # broadcasts along the width
    ("conv", (6, 5, 5), ["shape [6, 5, 5]"]),                        # varies over space
    ("conv", (1, 1, 6, 1, 1), ["rank-4"]),                           # would add an axis
    ("matmul", (3, 1), ["shape [3, 1]"]),                            # one value per row
    ("gemm", (3, 6), ["shape [3, 6]"]),
])
def test_skips_add_that_is_not_a_per_channel_bias(producer, add_shape, words):
    model = build_producer_add_bn_model(producer, add_shape=add_shape)
    assert_stays(model, "'add'", *words)


@pytest.mark.parametrize("shared", ["producer_output", "add_output"])
def test_skips_add_pattern_whose_intermediate_is_read_elsewhere(shared):
    model = build_producer_add_bn_model("conv", producer_output_also_consumed=shared == "producer_output",
                                        add_output_also_consumed=shared == "add_output")
    assert_stays(model, "also read by other nodes")


def test_skips_add_of_a_runtime_tensor():
    """x -> conv -> Add(conv_out, x2) -> BN: x2 is fed at run time, so it is no bias."""
    rng = np.random.default_rng(0)
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, (2, 4, 5, 5))
    builder.add_input("x2", np.float32, (2, 6, 5, 5))
    spec = add_producer(builder, "conv", "x", (2, 4, 5, 5), rng, out_channels=6)
    builder.add_node("Add", [spec.output, "x2"], ["add_out"], name="add")
    builder.add_output("y")
    add_batchnorm(builder, "add_out", random_bn_params((6,), rng))
    assert_stays(builder.build(), "Add 'add'", "does not add a constant")


# --------------------------------------------------------------------------------------------
# 2. Quantized weights: DequantizeLinear -> layer -> BN
# --------------------------------------------------------------------------------------------

# (quantized dtype, zero point, integer range): symmetric int8 as narrow-range quantizers write it,
# and asymmetric uint8 around 128 (values 1..255, so every channel can be mirrored exactly).
QUANTIZATIONS = {
    "int8_symmetric": (np.int8, 0, None),
    "uint8_zp128": (np.uint8, 128, (1, 255)),
    "int8_no_zero_point": (np.int8, None, None),
}
QUANTIZED_LAYERS = {  # name -> (producer, transB, output-channel axis of the weight)
    "conv": ("conv", 0, 0), "conv_transpose": ("conv_transpose", 0, 1), "gemm": ("gemm", 0, 1),
    "gemm_transB": ("gemm", 1, 0), "matmul": ("matmul", 0, 1),
}


def _check_quantized_rewrite(model, result, *, axis):
    """Scales keep their sign and become per-axis along ``axis``; integers change only by mirroring
    the channels whose BN factor is negative; zero points are repeated per channel."""
    folded_dq = next(node for node in result.model.graph.node
                     if node.op_type == "DequantizeLinear" and node.output[0] != "b")
    axis_attribute = [a.i for a in folded_dq.attribute if a.name == "axis"]
    assert axis_attribute == [axis]
    original_q = initializer_array(model, "w_quantized").astype(np.int64)
    folded_q = initializer_array(result.model, folded_dq.input[0]).astype(np.int64)
    new_scale = initializer_array(result.model, folded_dq.input[1])
    assert new_scale.ndim == 1 and np.all(new_scale > 0), new_scale
    gamma = initializer_array(model, "bn_scale")
    zero_point = 0
    if len(folded_dq.input) > 2:
        new_zero_point = initializer_array(result.model, folded_dq.input[2])
        assert new_zero_point.shape == new_scale.shape
        zero_point = int(initializer_array(model, "w_zero_point").reshape(-1)[0])
        assert np.all(new_zero_point == zero_point)
    moved_q, moved_original = np.moveaxis(folded_q, axis, 0), np.moveaxis(original_q, axis, 0)
    for channel, g in enumerate(gamma):
        expected = moved_original[channel] if g > 0 else 2 * zero_point - moved_original[channel]
        np.testing.assert_array_equal(moved_q[channel], expected, err_msg=f"channel {channel}")


@pytest.mark.parametrize("quantization", list(QUANTIZATIONS))
@pytest.mark.parametrize("per_axis", [False, True], ids=["per_tensor", "per_axis"])
@pytest.mark.parametrize("layer", list(QUANTIZED_LAYERS))
def test_folds_bn_into_dequantize_linear_scale(layer, per_axis, quantization):
    """scale' = scale * |s| per output channel; gamma has random signs, so channels with a negative
    factor are mirrored (q' = 2 zp - q) and every scale stays positive."""
    producer, trans_b, axis = QUANTIZED_LAYERS[layer]
    quantized_dtype, zero_point, quantized_range = QUANTIZATIONS[quantization]
    model = build_quantized_weight_bn_model(producer, trans_b=trans_b, per_axis=per_axis,
                                            quantized_dtype=quantized_dtype, zero_point=zero_point,
                                            quantized_range=quantized_range)
    result, _ = fold_and_verify(model)
    _check_quantized_rewrite(model, result, axis=axis)


@pytest.mark.parametrize("producer", ["conv", "gemm", "matmul"])
def test_folds_quantized_weight_with_positive_factors_without_touching_integers(producer):
    model = build_quantized_weight_bn_model(producer, gamma_sign="positive", per_axis=False)
    result, _ = fold_and_verify(model)
    dq = node_by_name(result.model, "dequantize")
    assert dq.input[0] == "w_quantized"
    np.testing.assert_array_equal(initializer_array(result.model, "w_quantized"),
                                  initializer_array(model, "w_quantized"))


@pytest.mark.parametrize("opset", [19, 21])
@pytest.mark.parametrize("producer", ["conv", "matmul"])
def test_folds_quantized_weight_with_float16_scale(producer, opset):
    """From opset 19 the scale (and so the activations) may be float16; the new scale stays float16."""
    model = build_quantized_weight_bn_model(producer, scale_dtype=np.float16, per_axis=True, opset=opset)
    result, _ = fold_and_verify(model)
    assert initializer_array(result.model, node_by_name(result.model, "dequantize").input[1]).dtype == np.float16


@pytest.mark.parametrize("producer", ["conv", "gemm"])
def test_folds_dequantized_int32_bias_as_float(producer):
    """onnxruntime's quantizer writes the bias as DequantizeLinear(int32): it folds in float."""
    model = build_quantized_weight_bn_model(producer, quantized_bias=True)
    result, _ = fold_and_verify(model)
    assert count_ops(result.model, "DequantizeLinear") == 1
    bias = initializer_array(result.model, node_by_name(result.model, producer).input[2])
    assert bias.dtype == np.float32


@pytest.mark.parametrize("axis,scales", [(3, 6), (0, 4)], ids=["axis_out_of_range", "scale_count"])
def test_skips_dequantized_bias_whose_per_axis_scale_does_not_fit(axis, scales):
    """Regression (the bias reader crashed with IndexError / a numpy broadcast error): a per-axis
    bias scale along an axis the int32 bias lacks, or with the wrong count, cannot be read, and the
    reason says so (issue 21: it used to say, falsely, that the bias is not a constant)."""
    model = build_quantized_weight_bn_model("conv", quantized_bias=True)
    for tensor in model.graph.initializer:
        if tensor.name == "b_scale":
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.full(scales, 1e-4, np.float32), "b_scale"))
    node_by_name(model, "bias_dequantize").attribute.append(onnx.helper.make_attribute("axis", axis))
    assert_stays(model, "the bias of 'conv' cannot be read", f"{scales} scales along axis {axis}")


@pytest.mark.parametrize("shared", ["dequantize_output", "quantized", "scale"])
def test_folds_quantized_weight_shared_with_another_layer_into_private_copies(shared):
    """The other layer keeps reading the original DequantizeLinear inputs, unchanged."""
    model = build_quantized_weight_bn_model("conv", per_axis=True, shared=shared)
    other_before = node_by_name(model, "other")
    other_inputs = {name: initializer_array(model, name) for name in
                    ([*node_by_name(model, "dequantize").input] if shared == "dequantize_output"
                     else [*node_by_name(model, "other_dequantize").input])}
    result, _ = fold_and_verify(model)
    other = node_by_name(result.model, "other")
    assert other.input[1] == other_before.input[1]
    for name, value in other_inputs.items():
        np.testing.assert_array_equal(initializer_array(result.model, name), value, err_msg=name)
    assert count_ops(result.model, "DequantizeLinear") == 2


@pytest.mark.parametrize("producer", ["conv", "matmul"])
def test_folds_quantized_layer_followed_by_a_bias_add(producer):
    """DequantizeLinear -> layer -> Add(constant) -> BN: both extensions at once."""
    model = build_quantized_weight_bn_model(producer, bias=False)
    bn = node_by_name(model, BN_NODE_NAME)
    constant = np.random.default_rng(3).standard_normal(channel_bias_shape(producer, 6)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(constant, "add_constant"))
    add = onnx.helper.make_node("Add", ["producer_out", "add_constant"], ["add_out"], name="add")
    model.graph.node.insert(list(model.graph.node).index(bn), add)
    bn.input[0] = "add_out"
    onnx.checker.check_model(model, full_check=True)
    result, _ = fold_and_verify(model)
    assert result.patterns == {BN_NODE_NAME: f"DequantizeLinear->{'Conv' if producer == 'conv' else 'MatMul'}->Add->BN"}


def test_skips_quantized_weight_below_opset_13():
    """DequantizeLinear-10 has no axis: a per-channel scale needs opset 13."""
    model = build_quantized_weight_bn_model("conv", opset=12)
    assert_stays(model, "the weight of Conv 'conv'", "opset 13", "opset 12")


def test_skips_quantized_grouped_conv_transpose():
    model = build_quantized_weight_bn_model("conv_transpose", group=2, in_channels=4, out_channels=6)
    assert_stays(model, "group 2", "per-axis")


def test_skips_quantized_weight_whose_axis_is_not_the_output_channels():
    """Per-axis along the Conv weight's input axis 1: one more per-channel factor would need a 2-D scale."""
    model = build_quantized_weight_bn_model("conv", per_axis=True)
    dq = node_by_name(model, "dequantize")
    scale = initializer_array(model, "w_scale")[:4]
    for tensor in model.graph.initializer:
        if tensor.name in ("w_scale", "w_zero_point"):
            values = onnx.numpy_helper.to_array(tensor)[:4]
            tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    dq.attribute[0].i = 1
    assert scale.shape == (4,)
    onnx.checker.check_model(model, full_check=True)
    assert_stays(model, "along axis 1", "axis 0")


@pytest.mark.parametrize("quantized_dtype,zero_point,quantized_range,words", [
    (np.int8, 0, (-128, 127), ["mirroring", "overflows int8"]),
    (np.uint8, 100, (0, 255), ["mirroring", "overflows uint8"]),
], ids=["int8_full_range", "uint8_asymmetric"])
def test_skips_negative_factor_whose_mirrored_integers_overflow(quantized_dtype, zero_point, quantized_range, words):
    """A negative BN factor cannot go into the scale (TensorRT refuses non-positive scales) and the
    mirrored integers do not fit: the BN stays."""
    model = build_quantized_weight_bn_model("conv", gamma_sign="negative", quantized_dtype=quantized_dtype,
                                            zero_point=zero_point, quantized_range=quantized_range)
    assert_stays(model, *words)


def test_folds_full_range_integers_when_every_factor_is_positive():
    model = build_quantized_weight_bn_model("conv", gamma_sign="positive", quantized_range=(-128, 127))
    fold_and_verify(model)


# --------------------------------------------------------------------------------------------
# 3. BN before the layer (forward fold)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(DTYPE_VARIANTS))
@pytest.mark.parametrize("padding", ["no_pads", "zero_pads", "valid", "same_1x1"])
@pytest.mark.parametrize("group", [1, 2, 4], ids=["group1", "group2", "depthwise"])
def test_folds_bn_into_following_conv_without_padding(group, padding, variant):
    dtype, param_dtype, opset = DTYPE_VARIANTS[variant]
    options = {"no_pads": {}, "zero_pads": dict(pads=[0, 0, 0, 0]), "valid": dict(auto_pad="VALID"),
               "same_1x1": dict(auto_pad="SAME_UPPER", kernel=1)}[padding]
    out_channels = 8 if group == 4 else 6
    model = build_bn_then_layer_model("conv", group=group, out_channels=out_channels, dtype=dtype,
                                      bn_param_dtype=param_dtype, opset=opset, **options)
    result, _ = fold_and_verify(model, float16_ulps=FORWARD_FLOAT16_ULPS)
    assert node_by_name(result.model, "layer").input[0] == "x"
    assert _initializer_dtypes(result.model) == {np.dtype(dtype)}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("before", ["input", "relu"])
def test_folds_bn_into_following_strided_conv(before, bias):
    model = build_bn_then_layer_model("conv", before=before, bias=bias, strides=[2, 2], spatial_size=7)
    fold_and_verify(model)


@pytest.mark.parametrize("variant", list(DTYPE_VARIANTS))
@pytest.mark.parametrize("trans_b", [0, 1], ids=["transB0", "transB1"])
@pytest.mark.parametrize("alpha,beta,bias_shape", [
    (None, None, None), (0.7, 1.3, None), (0.7, 1.3, (1, 6)), (1.5, 0.5, (3, 6)), (None, None, "none"),
], ids=["plain", "alpha_beta", "C_1xN", "C_MxN", "no_C"])
def test_folds_bn_into_following_gemm(alpha, beta, bias_shape, trans_b, variant):
    dtype, param_dtype, opset = DTYPE_VARIANTS[variant]
    model = build_bn_then_layer_model("gemm", trans_b=trans_b, alpha=alpha, beta=beta, bias=bias_shape != "none",
                                      gemm_bias_shape=None if bias_shape == "none" else bias_shape,
                                      dtype=dtype, bn_param_dtype=param_dtype, opset=opset)
    fold_and_verify(model, float16_ulps=FORWARD_FLOAT16_ULPS)


@pytest.mark.parametrize("variant", list(DTYPE_VARIANTS))
@pytest.mark.parametrize("before", ["input", "relu"])
def test_folds_bn_into_following_matmul(before, variant):
    """MatMul has no bias: an Add of shift @ W follows it (the BN's place is taken by one Add)."""
    dtype, param_dtype, opset = DTYPE_VARIANTS[variant]
    model = build_bn_then_layer_model("matmul", before=before, dtype=dtype, bn_param_dtype=param_dtype, opset=opset)
    result, _ = fold_and_verify(model, float16_ulps=FORWARD_FLOAT16_ULPS)
    assert count_ops(result.model, "Add") == 1


@pytest.mark.parametrize("options,words", [
    (dict(pads=[1, 1, 1, 1]), ["pads=[1, 1, 1, 1]", "borders"]),
    (dict(auto_pad="SAME_UPPER"), ["auto_pad=SAME_UPPER"]),
    (dict(bn_output_also_consumed=True), ["read by 2"]),
], ids=["padded", "same_3x3", "bn_output_shared"])
def test_skips_forward_fold_into_padded_or_shared_conv(options, words):
    model = build_bn_then_layer_model("conv", **options)
    assert_stays(model, "graph input", "nor can it fold into the layer after it", *words)


def test_forward_fold_gives_the_layer_a_private_copy_of_a_shared_weight():
    """bn -> layer and x -> other both read 'layer_weight' and 'layer_bias': 'other' keeps the originals."""
    model = build_bn_then_layer_model("conv")
    model.graph.node.append(onnx.helper.make_node("Conv", ["x", "layer_weight", "layer_bias"], ["y_other"],
                                                  name="other", kernel_shape=[3, 3]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("y_other", onnx.TensorProto.FLOAT, [3, 6, 4, 4]))
    onnx.checker.check_model(model, full_check=True)
    weight, bias = initializer_array(model, "layer_weight"), initializer_array(model, "layer_bias")
    result, _ = fold_and_verify(model)
    assert node_by_name(result.model, "other").input[1:] == ["layer_weight", "layer_bias"]
    np.testing.assert_array_equal(initializer_array(result.model, "layer_weight"), weight)
    np.testing.assert_array_equal(initializer_array(result.model, "layer_bias"), bias)
    assert node_by_name(result.model, "layer").input[1] != "layer_weight"


def test_skips_forward_fold_into_gemm_with_trans_a():
    model = build_bn_then_layer_model("gemm", trans_a=1)
    assert_stays(model, "transA=1")


def test_folds_bn_pair_in_front_of_a_conv_over_two_sweeps():
    """relu -> bn_a -> bn_b -> conv: bn_b folds into the conv first, then bn_a can; the second fold of
    the result finds nothing (idempotence)."""
    rng = np.random.default_rng(4)
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, (2, 4, 5, 5))
    builder.add_node("Relu", ["x"], ["relu_out"], name="relu")
    add_batchnorm(builder, "relu_out", random_bn_params((4,), rng), output="a_out", name="bn_a")
    add_batchnorm(builder, "a_out", random_bn_params((4,), rng), output="b_out", name="bn_b")
    builder.add_initializer("w", rng.standard_normal((6, 4, 3, 3)).astype(np.float32) / 6)
    builder.add_node("Conv", ["b_out", "w"], ["y"], name="conv", kernel_shape=[3, 3])
    builder.add_output("y")
    result, _ = fold_and_verify(builder.build(), folded=2)
    assert [bn for bn, _ in result.folded] == ["bn_b", "bn_a"]


def test_folds_bns_on_both_sides_of_a_conv():
    """relu -> bn_in -> conv -> bn_out: one folds forward, the other backward, into the same Conv."""
    rng = np.random.default_rng(5)
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, (2, 4, 5, 5))
    builder.add_node("Relu", ["x"], ["relu_out"], name="relu")
    add_batchnorm(builder, "relu_out", random_bn_params((4,), rng), output="bn_in_out", name="bn_in")
    spec = add_producer(builder, "conv", "bn_in_out", (2, 4, 5, 5), rng, out_channels=6, kernel=1)
    pads = next(a for a in builder.nodes[-1].attribute if a.name == "pads")
    del pads.ints[:]
    pads.ints.extend([0, 0, 0, 0])
    add_batchnorm(builder, spec.output, random_bn_params((6,), rng), output="y", name="bn_out")
    builder.add_output("y")
    result, _ = fold_and_verify(builder.build(), folded=2)
    assert sorted(result.folded) == [("bn_in", "conv"), ("bn_out", "conv")]
    assert [node.op_type for node in result.model.graph.node] == ["Relu", "Conv"]


# --------------------------------------------------------------------------------------------
# 4. Parameters from ConstantOfShape, IR-3 models, float16
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_from_constant_of_shape", [False, True], ids=["random_weight", "weight_too"])
@pytest.mark.parametrize("producer", ["conv", "conv_transpose", "gemm", "matmul"])
def test_folds_bn_whose_params_are_constant_of_shape_outputs(producer, weight_from_constant_of_shape):
    """mean and var from ConstantOfShape (and the weight too, as in onnx's light models); no
    ConstantOfShape or shape tensor stays behind."""
    model = build_constant_of_shape_params_model(producer, weight_from_constant_of_shape=weight_from_constant_of_shape)
    result, _ = fold_and_verify(model)
    assert count_ops(result.model, "ConstantOfShape") == 0
    assert not any(t.name.endswith("_shape") for t in result.model.graph.initializer)


@pytest.mark.parametrize("pattern", ["producer_bn", "constant_of_shape", "producer_add_bn", "bn_conv", "bn_gemm",
                                     "bn_matmul"])
def test_folds_ir3_models(pattern):
    """IR 3 (opset 9, like onnx's light models): every initializer is also a graph input, the new ones
    included, and the IR version stays 3."""
    if pattern == "producer_bn":
        model = build_producer_bn_model("conv", opset=9, ir_version=3)
    elif pattern == "constant_of_shape":
        model = build_constant_of_shape_params_model("conv", opset=9, ir_version=3, weight_from_constant_of_shape=True)
    elif pattern == "producer_add_bn":
        model = build_producer_add_bn_model("conv", bias=True, opset=9, ir_version=3)
    else:
        model = build_bn_then_layer_model(pattern[3:], opset=9, ir_version=3, bias=pattern == "bn_gemm")
    assert model.ir_version == 3
    fold_and_verify(model)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pattern", ["conv_bn", "conv_transpose_bn", "conv_add_bn", "dequantize_conv_bn"])
def test_folded_float16_model_is_closer_to_float32_than_one_ulp(pattern, seed):
    """float16 models with fp16 params: weights folded in float64 and rounded once keep the output
    within one fp16 ulp (of the output scale) of the float32 reference, over several seeds."""
    if pattern == "conv_bn":
        model = build_producer_bn_model("conv", dtype=np.float16, opset=13, seed=seed)
    elif pattern == "conv_transpose_bn":
        model = build_producer_bn_model("conv_transpose", dtype=np.float16, opset=13, seed=seed)
    elif pattern == "conv_add_bn":
        model = build_producer_add_bn_model("conv", bias=True, dtype=np.float16, seed=seed)
    else:
        model = build_quantized_weight_bn_model("conv", scale_dtype=np.float16, per_axis=True, opset=19, seed=seed)
    _, errors = fold_and_verify(model, float16_ulps=1.0)
    assert all(error[0] == "ulp" for error in errors.values())


@pytest.mark.parametrize("pattern", ["conv_bn", "conv_transpose_bn", "gemm_bn", "matmul_bn", "conv_add_bn",
                                     "matmul_add_bn", "dequantize_conv_bn", "bn_conv", "bn_matmul"])
def test_folds_model_that_carries_value_info(pattern):
    """Exported models declare intermediate tensors: none may stay declared once it is gone or retyped
    (the per-tensor scale that becomes per-axis, for one)."""
    if pattern.endswith("add_bn"):
        model = build_producer_add_bn_model(pattern.split("_")[0])
    elif pattern == "dequantize_conv_bn":
        model = build_quantized_weight_bn_model("conv")
    elif pattern.startswith("bn_"):
        model = build_bn_then_layer_model(pattern[3:])
    else:
        producer = pattern[: -len("_bn")]
        model = build_producer_bn_model(producer, bias=producer != "matmul", opset=13)
    result, _ = fold_and_verify(with_inferred_value_info(model))
    produced = {name for node in result.model.graph.node for name in node.output}
    assert [v.name for v in result.model.graph.value_info if v.name not in produced] == []


# --------------------------------------------------------------------------------------------
# 5. What cannot fold stays, with a reason, and never crashes
# --------------------------------------------------------------------------------------------


def _bn_after(op: str) -> onnx.ModelProto:
    """x -> conv -> op -> BN -> y, with the BN output a graph output (so no forward fold either)."""
    rng = np.random.default_rng(2)
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, (2, 4, 6, 6))
    spec = add_producer(builder, "conv", "x", (2, 4, 6, 6), rng, out_channels=4)
    if op == "Concat":
        builder.add_node("Concat", [spec.output, "x"], ["op_out"], name="concat", axis=1)
        channels = 8
    else:
        builder.add_node(op, [spec.output], ["op_out"], name=op.lower(), kernel_shape=[2, 2], strides=[2, 2])
        channels = 4
    builder.add_output("y")
    add_batchnorm(builder, "op_out", random_bn_params((channels,), rng))
    return builder.build()


@pytest.mark.parametrize("op", ["Concat", "AveragePool", "MaxPool"])
def test_skips_bn_after_concat_or_pooling(op):
    assert_stays(_bn_after(op), f"comes from {op}", "graph output")


def test_skips_bn_whose_variance_plus_epsilon_is_not_positive():
    """var = -1 and epsilon 0: the BN is not a finite affine map; report it, do not crash."""
    model = build_producer_bn_model("conv", epsilon=0.0)
    for tensor in model.graph.initializer:
        if tensor.name == "bn_var":
            values = onnx.numpy_helper.to_array(tensor).copy()
            values[2] = -1.0
            tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    assert_stays(model, "not positive", "channel(s) 2")


def test_skips_fold_that_would_overflow_float16():
    """A tiny variance and a large gamma make W * s exceed the float16 range (s ~ 3e6): the BN stays
    rather than writing inf."""
    model = build_producer_bn_model("conv", dtype=np.float16, opset=13, epsilon=0.0)
    for tensor in model.graph.initializer:
        if tensor.name in ("bn_var", "bn_scale"):
            fill = 1e-7 if tensor.name == "bn_var" else 1000.0
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.full(6, fill, np.float16), tensor.name))
    assert_stays(model, "not finite in float16")


def test_mixed_model_folds_what_it_can_and_reports_the_rest():
    """A chain of foldable blocks plus a BN after Concat: three fold, one stays with its reason."""
    model = build_conv_bn_relu_chain_model(blocks=3)
    rng = np.random.default_rng(9)
    graph = model.graph
    graph.node.append(onnx.helper.make_node("Concat", ["y", "x"], ["cat"], name="cat", axis=1))
    params = random_bn_params((8,), rng)
    names = []
    for key, value in params.as_dict().items():
        graph.initializer.append(onnx.numpy_helper.from_array(value, f"last_{key}"))
        names.append(f"last_{key}")
    graph.node.append(onnx.helper.make_node("BatchNormalization", ["cat", *names], ["z"], name="bn_last"))
    graph.output.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 8, 6, 6]))
    onnx.checker.check_model(model, full_check=True)
    result, _ = fold_and_verify(model, folded=3, remaining=1)
    assert "Concat 'cat'" in result.skipped["bn_last"]


@pytest.mark.parametrize("reads", [("conv_weight", "bn_mean"), ("conv_weight", "conv_bias"),
                                   ("bn_scale", "bn_var")], ids=["weight_and_mean", "weight_and_bias", "scale_and_var"])
def test_fold_leaves_alone_what_an_if_branch_reads(reads):
    """Regression guard for names read inside subgraphs (GraphIndex.subgraph_reads): the If's branches
    read the conv weight or bias the fold rewrites, or parameters of the BN it removes. The BN still
    folds, into new tensors; every tensor a branch reads stays, with its value, and both branches give
    the unfolded model's output."""
    model = build_subgraph_reader_model(reads)
    originals = {name: constant_value(model, name) for name in reads}
    feeds = random_feeds(model)
    for cond in (True, False):
        feeds["cond"] = np.array(cond)
        result, _ = fold_and_verify(model, feeds=feeds)
        for name, value in originals.items():
            np.testing.assert_array_equal(constant_value(result.model, name), value, err_msg=name)
        if "conv_weight" in reads:
            assert node_by_name(result.model, "conv").input[1] != "conv_weight", "the fold changed a shared weight"


# --------------------------------------------------------------------------------------------
# 6. The fold pass stays linear: one graph index, updated in place
# --------------------------------------------------------------------------------------------


def test_fold_pass_keeps_one_graph_index(monkeypatch):
    """Regression for the O(nodes x BNs) fold (the index was rebuilt after every edit): folding 40
    Conv -> BN blocks, with Add, forward and quantized folds mixed in, builds the index once."""
    built = []
    original_init = bnpass.graph.GraphIndex.__init__

    def counting_init(self, model):
        built.append(1)
        original_init(self, model)

    model = build_conv_bn_relu_chain_model(blocks=40)
    monkeypatch.setattr(bnpass.graph.GraphIndex, "__init__", counting_init)
    result = bnpass.fold_batchnorms(model)
    assert len(result.folded) == 40
    assert len(built) == 1, f"the fold pass built {len(built)} graph indexes"
    for build in (lambda: build_producer_add_bn_model("matmul"), lambda: build_bn_then_layer_model("matmul"),
                  lambda: build_quantized_weight_bn_model("conv", shared="dequantize_output")):
        built.clear()
        assert bnpass.fold_batchnorms(build()).modified
        assert len(built) == 1


def test_bn_after_a_quantized_activation_stays_when_its_output_is_not_quantized_again():
    """Conv -> QuantizeLinear -> DequantizeLinear -> BN -> graph output: removing the pair would leave the
    folded Conv's output unquantized (tests/test_quantized_patterns.py folds the quantizer's own layout)."""
    rng = np.random.default_rng(0)
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, ["N", 3, 6, 6])
    builder.add_initializer("w", random_weight((4, 3, 3, 3), rng))
    builder.add_node("Conv", ["x", "w"], ["conv_out"], name="conv")
    builder.add_initializer("scale", np.float32(0.05))
    builder.add_initializer("zero_point", np.uint8(128))
    builder.add_node("QuantizeLinear", ["conv_out", "scale", "zero_point"], ["quantized"], name="quantize")
    builder.add_node("DequantizeLinear", ["quantized", "scale", "zero_point"], ["dequantized"], name="dequantize")
    add_batchnorm(builder, "dequantized", random_bn_params((4,), rng))
    builder.add_output("y")
    assert_stays(builder.build(), "QuantizeLinear 'quantize' -> DequantizeLinear 'dequantize' after Conv 'conv'",
                 "its own output is not quantized again")
