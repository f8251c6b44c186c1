"""Folding BatchNormalization into its producer: grids of positive cases and every skip reason.

Each positive case runs :func:`assertions.fold_and_verify` on a tiny model built by
``tests/builders.py``: no BatchNormalization left, ``onnx.checker`` (full check) passes, outputs
equal the unfolded model's through onnxruntime (optimizations disabled) at the tolerances stated in
tests/assertions.py (float16: ``GRID_FLOAT16_ULPS``), graph inputs/outputs, opset and IR version
unchanged, no dead nodes or unused initializers, the input ModelProto untouched, and a second fold
is a no-op (``modified=False``, same bytes); and exactly the expected (BN, layer) pairs fold.

Each negative case checks the BN is left in place with the reason its test names (the reason's
words, ``assertions.assert_stays``), ``modified is False`` and the model unchanged byte for byte.

Combinations left out because onnxruntime 1.31's CPU provider has no kernel for them:
float64 Conv and ConvTranspose (so float64 is covered with Gemm and MatMul only), and
opset-15 BatchNormalization with float64 X and float32 params.
Gemm without C is left out below opset 11, where ONNX requires C.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from assertions import assert_stays, fold_and_verify
from builders import (
    BN_NODE_NAME,
    PARAM_SOURCES,
    PRODUCER_OP_TYPES,
    SHARING_LAYOUTS,
    GraphBuilder,
    add_batchnorm,
    add_producer,
    build_bn_after_op_model,
    build_conv_bn_relu_chain_model,
    build_producer_bn_model,
    build_shared_weight_model,
    constant_value,
    count_ops,
    graph_data_inputs,
    initializer_array,
    node_by_name,
    random_bn_params,
    with_initializer_as_graph_input,
)

OPSETS = (7, 9, 13, 14, 15)
DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}
# Conv/ConvTranspose: onnxruntime CPU has no float64 kernel.
CONV_DTYPES = ("float32", "float16")
# group name -> (group, in_channels, out_channels); in_channels is 4 in every model.
CONV_GROUPS = {"group1": (1, 4, 6), "group2": (2, 4, 6), "depthwise": (4, 4, 8)}


# fp16 outputs of the grid are compared with a float32 run of the unfolded model (see
# tests/assertions.py). The grid's folds (grouped ConvTranspose, Gemm with alpha/beta, fp16 BN
# params) accumulate more rounding than the patterns' one-ulp bound allows: measured worst case 1.07
# ulp of the output scale. The bound is 2 fp16 ulp of the output scale.
GRID_FLOAT16_ULPS = 2.0


def fold_and_check(model: onnx.ModelProto, expected_folded: list[tuple[str, str]], *,
                   remaining_batchnorms: int = 0, expected_skipped: set[str] = frozenset(), feeds=None):
    """:func:`assertions.fold_and_verify`, and exactly the (BN, layer) pairs ``expected_folded`` fold
    while the BNs named in ``expected_skipped`` stay; return the result."""
    result, _ = fold_and_verify(model, folded=len(expected_folded), remaining=remaining_batchnorms,
                                float16_ulps=GRID_FLOAT16_ULPS, feeds=feeds)
    assert sorted(result.folded) == sorted(expected_folded)
    assert set(result.skipped) == set(expected_skipped), result.skipped
    return result


# --------------------------------------------------------------------------------------------
# Positive grids
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("dtype_name", CONV_DTYPES)
@pytest.mark.parametrize("group_name", list(CONV_GROUPS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("producer", ["conv", "conv_transpose"])
def test_folds_conv_and_conv_transpose_grid(producer, bias, group_name, dtype_name, opset):
    group, in_channels, out_channels = CONV_GROUPS[group_name]
    model = build_producer_bn_model(
        producer, bias=bias, group=group, in_channels=in_channels, out_channels=out_channels,
        dtype=DTYPES[dtype_name], opset=opset,
    )
    fold_and_check(model, [(BN_NODE_NAME, producer)])


@pytest.mark.parametrize("dtype_name", CONV_DTYPES)
@pytest.mark.parametrize("group_name", list(CONV_GROUPS))
@pytest.mark.parametrize("spatial_dims", [1, 3], ids=["1d", "3d"])
@pytest.mark.parametrize("producer", ["conv", "conv_transpose"])
def test_folds_1d_and_3d_conv_and_conv_transpose(producer, spatial_dims, group_name, dtype_name):
    group, in_channels, out_channels = CONV_GROUPS[group_name]
    model = build_producer_bn_model(
        producer, spatial_dims=spatial_dims, spatial_size=4, group=group, in_channels=in_channels,
        out_channels=out_channels, dtype=DTYPES[dtype_name], opset=13,
    )
    fold_and_check(model, [(BN_NODE_NAME, producer)])


def _gemm_cases():
    for opset in OPSETS:
        for dtype_name in DTYPES:
            for bias in (True, False):
                if not bias and opset < 11:
                    continue  # Gemm requires C below opset 11
                for trans_b in (0, 1):
                    for alpha, beta in ((None, None), (0.7, 1.3)):
                        yield pytest.param(
                            opset, dtype_name, bias, trans_b, alpha, beta,
                            id=f"opset{opset}-{dtype_name}-{'bias' if bias else 'no_bias'}-transB{trans_b}"
                               f"-alpha{alpha}-beta{beta}",
                        )


@pytest.mark.parametrize("opset,dtype_name,bias,trans_b,alpha,beta", list(_gemm_cases()))
def test_folds_gemm_grid(opset, dtype_name, bias, trans_b, alpha, beta):
    model = build_producer_bn_model(
        "gemm", bias=bias, trans_b=trans_b, alpha=alpha, beta=beta, dtype=DTYPES[dtype_name], opset=opset,
        batch=3,
    )
    fold_and_check(model, [(BN_NODE_NAME, "gemm")])


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("opset", OPSETS)
def test_folds_matmul_with_constant_weight(opset, dtype_name):
    model = build_producer_bn_model("matmul", bias=False, dtype=DTYPES[dtype_name], opset=opset, batch=3)
    fold_and_check(model, [(BN_NODE_NAME, "matmul")])


@pytest.mark.parametrize("x_dtype,param_dtype", [("float16", "float32"), ("float32", "float16")])
@pytest.mark.parametrize("producer", ["conv", "conv_transpose", "gemm", "matmul"])
def test_folds_opset15_bn_whose_params_differ_in_dtype_from_x(producer, x_dtype, param_dtype):
    """Opset 15 lets scale/B/mean/var be another float type than X; folded tensors keep X's dtype."""
    model = build_producer_bn_model(
        producer, bias=producer != "matmul", dtype=DTYPES[x_dtype], bn_param_dtype=DTYPES[param_dtype], opset=15,
    )
    result = fold_and_check(model, [(BN_NODE_NAME, producer)])
    expected_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(DTYPES[x_dtype]))
    for tensor in result.model.graph.initializer:
        assert tensor.data_type == expected_type, f"initializer {tensor.name!r} has type {tensor.data_type}"


@pytest.mark.parametrize("opset", [7, 13])
@pytest.mark.parametrize("param_source", PARAM_SOURCES)
@pytest.mark.parametrize("producer", ["conv", "conv_transpose", "gemm", "matmul"])
def test_folds_bn_params_from_constant_nodes_and_identity_chains(producer, param_source, opset):
    """Params as initializers, Constant nodes, Identity chains; the chains must not stay behind."""
    model = build_producer_bn_model(producer, bias=producer != "matmul", param_source=param_source, opset=opset)
    result = fold_and_check(model, [(BN_NODE_NAME, producer)])
    assert count_ops(result.model, "Identity") == 0
    assert count_ops(result.model, "Constant") == 0


@pytest.mark.parametrize("epsilon", [0.0, 1e-3, 0.5], ids=["eps0", "eps1e-3", "eps0.5"])
@pytest.mark.parametrize("producer", ["conv", "gemm"])
def test_folds_with_the_bn_epsilon_attribute(producer, epsilon):
    """epsilon=1e-3 moves the result by ~1e-3 relative: a fold that used the default 1e-5 fails."""
    model = build_producer_bn_model(producer, epsilon=epsilon, opset=13)
    fold_and_check(model, [(BN_NODE_NAME, producer)])


@pytest.mark.parametrize("opset,attributes", [
    (7, {"spatial": 1}),
    (14, {"training_mode": 0}),
    (15, {"training_mode": 0}),
], ids=["opset7-spatial1", "opset14-training_mode0", "opset15-training_mode0"])
def test_folds_bn_with_explicit_inference_attributes(opset, attributes):
    model = build_producer_bn_model("conv", opset=opset, momentum=0.9, **attributes)
    fold_and_check(model, [(BN_NODE_NAME, "conv")])


@pytest.mark.parametrize("param_source", ["initializer", "constant_node", "identity_chain"])
@pytest.mark.parametrize("producer", ["conv", "gemm"])
def test_folds_ir3_model_with_initializers_as_graph_inputs(producer, param_source):
    """IR 3 requires every initializer to be a graph input; the result must still pass the checker."""
    model = build_producer_bn_model(producer, opset=7, ir_version=3, param_source=param_source)
    assert len(model.graph.input) > 1
    result = fold_and_check(model, [(BN_NODE_NAME, producer)])
    initializer_names = {tensor.name for tensor in result.model.graph.initializer}
    input_names = {value.name for value in result.model.graph.input}
    assert initializer_names <= input_names, "IR-3 initializers must also be graph inputs"
    assert [value.name for value in graph_data_inputs(result.model)] == ["x"]


@pytest.mark.parametrize("dtype_name", CONV_DTYPES)
def test_folds_every_bn_in_a_conv_bn_relu_chain(dtype_name):
    model = build_conv_bn_relu_chain_model(blocks=3, dtype=DTYPES[dtype_name])
    result = fold_and_check(model, [(f"bn{block}", f"conv{block}") for block in range(3)])
    assert count_ops(result.model, "Conv") == 3
    assert count_ops(result.model, "Relu") == 3


def test_folds_foldable_bn_and_reports_the_other_in_the_same_model():
    """x -> conv0 -> bn0 -> relu0 -> bn_after_relu -> y: bn0 is folded, bn_after_relu skipped."""
    rng = np.random.default_rng(3)
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, (2, 4, 5, 5))
    spec = add_producer(builder, "conv", "x", (2, 4, 5, 5), rng, out_channels=4, node_name="conv0")
    bn0_out = add_batchnorm(builder, spec.output, random_bn_params((4,), rng), output="bn0_out", name="bn0")[0]
    builder.add_node("Relu", [bn0_out], ["relu0_out"], name="relu0")
    builder.add_output("y")
    add_batchnorm(builder, "relu0_out", random_bn_params((4,), rng), output="y", name="bn_after_relu")
    model = builder.build()
    fold_and_check(model, [("bn0", "conv0")], remaining_batchnorms=1, expected_skipped={"bn_after_relu"})


@pytest.mark.parametrize("bias_shape", [(1, 6), (3, 6), (3, 1), ()], ids=["1xC", "NxC", "Nx1", "scalar"])
@pytest.mark.parametrize("alpha,beta", [(None, None), (0.7, 1.3), (1.5, 0.0)], ids=["default", "alpha_beta", "beta0"])
def test_folds_gemm_with_broadcast_c(bias_shape, alpha, beta):
    """C may be any shape that broadcasts to (N, C_out); beta=0 makes C irrelevant."""
    model = build_producer_bn_model("gemm", gemm_bias_shape=bias_shape, alpha=alpha, beta=beta, batch=3, opset=13)
    fold_and_check(model, [(BN_NODE_NAME, "gemm")])


@pytest.mark.parametrize("weight_source", ["identity_chain", "constant_node", "constant_behind_identity"])
@pytest.mark.parametrize("producer", ["conv", "conv_transpose", "gemm", "matmul"])
def test_folds_producer_whose_weight_and_bias_are_not_initializers(producer, weight_source):
    """Weights behind Constant nodes or Identity chains fold too. (A private Identity chain may stay,
    with its source rewritten; the fold-and-check already rules out dead nodes.)"""
    model = build_producer_bn_model(producer, bias=producer != "matmul", weight_source=weight_source, opset=13)
    fold_and_check(model, [(BN_NODE_NAME, producer)])


def test_folds_two_bns_that_share_their_parameter_tensors():
    """bn_a and bn_b read the same four initializers; both fold and the shared params go away."""
    rng = np.random.default_rng(5)
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, (2, 4, 5, 5))
    params = random_bn_params((6,), rng)
    param_names = [builder.add_initializer(f"shared_{name}", array) for name, array in params.as_dict().items()]
    for branch in ("a", "b"):
        spec = add_producer(builder, "conv", "x", (2, 4, 5, 5), rng, out_channels=6, node_name=f"conv_{branch}")
        builder.add_node("BatchNormalization", [spec.output, *param_names], [f"y_{branch}"], name=f"bn_{branch}")
        builder.add_output(f"y_{branch}")
    model = builder.build()
    result = fold_and_check(model, [("bn_a", "conv_a"), ("bn_b", "conv_b")])
    assert not any(tensor.name.startswith("shared_") for tensor in result.model.graph.initializer)


# --------------------------------------------------------------------------------------------
# Precision: compute in float64, cast once
# --------------------------------------------------------------------------------------------


def _dtype_ulp(values: np.ndarray, dtype) -> np.ndarray:
    return np.spacing(np.abs(values).astype(dtype)).astype(np.float64)


def _assert_rounded_once(name, actual, exact, dtype):
    """``actual`` is ``exact`` (float64) rounded once to ``dtype``: within half an ulp."""
    assert actual.dtype == np.dtype(dtype), f"{name}: dtype {actual.dtype}, expected {np.dtype(dtype)}"
    assert actual.shape == exact.shape, f"{name}: shape {actual.shape}, expected {exact.shape}"
    error = np.abs(actual.astype(np.float64) - exact)
    bound = 0.5 * _dtype_ulp(exact, dtype) + 1e-12 * np.abs(exact)
    worst = int(np.argmax(error / bound))
    assert np.all(error <= bound), (
        f"{name}: {np.sum(error > bound)} of {error.size} values are more than half an ulp from the float64 "
        f"product; worst {actual.ravel()[worst]!r} vs exact {exact.ravel()[worst]!r} "
        f"({error.ravel()[worst] / _dtype_ulp(exact, dtype).ravel()[worst]:.2f} ulp)"
    )


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _precision_cases():
    for dtype_name, param_dtype_name, opset in (
        ("float16", None, 13), ("float16", "float32", 15), ("float32", None, 13), ("float64", None, 13),
    ):
        producers = [("gemm", 1, 0), ("gemm", 1, 1)]
        if dtype_name != "float64":  # no float64 Conv kernels in onnxruntime CPU
            producers += [("conv", 1, 0), ("conv", 2, 0), ("conv_transpose", 1, 0), ("conv_transpose", 2, 0)]
        for producer, group, trans_b in producers:
            yield pytest.param(
                producer, group, trans_b, dtype_name, param_dtype_name, opset,
                id=f"{producer}-group{group}-transB{trans_b}-{dtype_name}-params_{param_dtype_name or dtype_name}"
                   f"-opset{opset}",
            )


@pytest.mark.parametrize("producer,group,trans_b,dtype_name,param_dtype_name,opset", list(_precision_cases()))
def test_folded_weight_and_bias_are_float64_products_rounded_once(
    producer, group, trans_b, dtype_name, param_dtype_name, opset
):
    """W' = W * s and b' = (b - mean) * s + beta, computed in float64, cast once to W's dtype.

    Computing in float16 puts folded fp16 weights 1-2 ulp off (REFERENCE: ~1e-3 relative error);
    rounding a float64 result once keeps every value within half an ulp.
    Gemm may keep or absorb alpha/beta: alpha' * W' and beta' * C' are what must match.
    """
    dtype = DTYPES[dtype_name]
    alpha, beta = (0.7, 1.3) if producer == "gemm" else (None, None)
    model = build_producer_bn_model(
        producer, group=group, trans_b=trans_b, alpha=alpha, beta=beta, dtype=dtype,
        bn_param_dtype=DTYPES[param_dtype_name] if param_dtype_name else None, opset=opset, epsilon=1e-3,
    )
    result = fold_and_check(model, [(BN_NODE_NAME, producer)])

    gamma, bn_beta, mean, var = (
        constant_value(model, f"{BN_NODE_NAME}_{name}").astype(np.float64) for name in ("scale", "bias", "mean", "var")
    )
    epsilon = float(np.float32(1e-3))  # the attribute as ONNX stores it (float32)
    s = gamma / np.sqrt(var + epsilon)
    original_node = node_by_name(model, producer)
    weight = initializer_array(model, original_node.input[1]).astype(np.float64)
    bias = initializer_array(model, original_node.input[2]).astype(np.float64)

    if producer == "conv":
        exact_weight = weight * s.reshape(-1, *[1] * (weight.ndim - 1))
        exact_bias = (bias - mean) * s + bn_beta
        weight_multiplier = bias_multiplier = 1.0
    elif producer == "conv_transpose":
        in_channels, out_per_group = weight.shape[:2]
        grouped = weight.reshape(group, in_channels // group, out_per_group, *weight.shape[2:])
        exact_weight = (grouped * s.reshape(group, 1, out_per_group, *[1] * (weight.ndim - 2))).reshape(weight.shape)
        exact_bias = (bias - mean) * s + bn_beta
        weight_multiplier = bias_multiplier = 1.0
    else:
        folded_node = node_by_name(result.model, producer)
        assert _attribute(folded_node, "transA", 0) == 0
        assert _attribute(folded_node, "transB", 0) == trans_b, "test assumes the fold keeps transB"
        weight_multiplier = _attribute(folded_node, "alpha", 1.0)
        bias_multiplier = _attribute(folded_node, "beta", 1.0)
        # alpha and beta as the original node stores them (float32 attributes).
        original_alpha = _attribute(original_node, "alpha", 1.0)
        original_beta = _attribute(original_node, "beta", 1.0)
        exact_weight = original_alpha * weight * (s.reshape(-1, 1) if trans_b else s.reshape(1, -1))
        exact_bias = original_beta * bias * s + bn_beta - mean * s

    folded_node = node_by_name(result.model, producer)
    folded_weight = constant_value(result.model, folded_node.input[1])
    folded_bias = constant_value(result.model, folded_node.input[2])
    _assert_rounded_once("folded weight", folded_weight, exact_weight / weight_multiplier, dtype)
    _assert_rounded_once("folded bias", folded_bias.reshape(exact_bias.shape), exact_bias / bias_multiplier, dtype)


# --------------------------------------------------------------------------------------------
# Shared tensors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_through", SHARING_LAYOUTS)
@pytest.mark.parametrize("share_bias", [True, False], ids=["weight_and_bias_shared", "weight_shared"])
def test_folds_into_private_copy_of_weight_shared_with_another_conv(share_bias, shared_through):
    """conv and conv_other read the same weight (through an initializer, Identity or Constant);
    only conv feeds a BN. The fold must give conv new tensors and leave conv_other's untouched."""
    model = build_shared_weight_model(share_bias=share_bias, shared_through=shared_through)
    original_other = node_by_name(model, "conv_other")
    original_values = [constant_value(model, name) for name in original_other.input[1:]]
    result = fold_and_check(model, [(BN_NODE_NAME, "conv")])

    other = node_by_name(result.model, "conv_other")
    for name, original in zip(other.input[1:], original_values):
        np.testing.assert_array_equal(constant_value(result.model, name), original,
                                      err_msg=f"conv_other's input {name!r} changed")
    conv = node_by_name(result.model, "conv")
    assert conv.input[1] not in other.input, "folded conv still reads the shared weight"


# --------------------------------------------------------------------------------------------
# Negative cases: left in place, with a reason, model unchanged
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("producer", ["conv", "gemm", "matmul"])
def test_skips_shared_producer_output(producer):
    """The producer's output also feeds a Relu: folding would change what the Relu sees."""
    model = build_producer_bn_model(producer, bias=producer != "matmul", producer_output_also_consumed=True)
    assert_stays(model, f"'{producer}_out', the output of {producer}, is also read by other nodes",
                 "its output 'y' is a graph output")


@pytest.mark.parametrize("producer", ["conv", "gemm"])
def test_skips_producer_output_that_is_a_graph_output(producer):
    model = build_producer_bn_model(producer, producer_output_also_graph_output=True)
    assert_stays(model, f"'{producer}_out', the output of {producer}, is also a graph output")


@pytest.mark.parametrize("position", [1, 2, 3, 4], ids=["scale", "B", "input_mean", "input_var"])
def test_folds_bn_param_quantized_at_run_time(position):
    """A BN param that is QuantizeLinear -> DequantizeLinear of a constant is a constant quantized at run time,
    not an activation: it is read as onnxruntime computes it, and the fold matches the unfolded model."""
    model = build_producer_bn_model("conv", opset=13)
    bn = node_by_name(model, BN_NODE_NAME)
    model.graph.initializer.extend([onnx.numpy_helper.from_array(np.array(0.02, np.float32), "param_scale"),
                                    onnx.numpy_helper.from_array(np.array(0, np.int8), "param_zero_point")])
    model.graph.node.insert(0, onnx.helper.make_node("QuantizeLinear", [bn.input[position], "param_scale",
                                                                        "param_zero_point"], ["param_q"], name="q"))
    model.graph.node.insert(1, onnx.helper.make_node("DequantizeLinear", ["param_q", "param_scale",
                                                                          "param_zero_point"], ["param"], name="dq"))
    bn.input[position] = "param"
    fold_and_verify(model)


@pytest.mark.parametrize("runtime_param,label", [("scale", "scale"), ("bias", "B"), ("mean", "input_mean"),
                                                 ("var", "input_var")])
def test_skips_bn_with_param_fed_at_run_time(runtime_param, label):
    """A BN param that is a graph input without initializer is not a constant."""
    model = build_producer_bn_model("conv", runtime_bn_params=(runtime_param,))
    assert_stays(model, f"its {label} 'bn_{runtime_param}' is not a constant")


@pytest.mark.parametrize("opset", [14, 15])
def test_skips_bn_in_training_mode(opset):
    """training_mode=1 normalizes with batch statistics. The running mean/variance outputs are left
    unnamed (not asked for), so the training_mode check itself must refuse the BN, not the check
    for extra outputs (the checker accepts this model; onnxruntime 1.31 wants 3 named outputs)."""
    model = build_producer_bn_model("conv", opset=opset, training_mode=1, bn_extra_outputs=2,
                                    bn_extra_outputs_named=False)
    assert_stays(model, "training_mode=1")


@pytest.mark.parametrize("opset,training_mode", [(7, None), (9, None), (13, None), (14, 1), (15, 1)])
def test_skips_bn_with_extra_outputs(opset, training_mode):
    """Opsets 7-13 select training by output count: 5 outputs (running and saved mean/var); at 14
    and 15 a training_mode=1 BN with its running mean/variance outputs."""
    extra_outputs = 2 if training_mode else 4
    model = build_producer_bn_model("conv", opset=opset, training_mode=training_mode, bn_extra_outputs=extra_outputs)
    assert_stays(model, "computes training outputs")


def test_skips_opset7_bn_with_spatial_0():
    """spatial=0 means per-activation (C x H x W) params: not a per-channel scale."""
    model = build_producer_bn_model("conv", opset=7, spatial=0)
    assert tuple(constant_value(model, "bn_mean").shape) == (6, 5, 5)
    assert_stays(model, "spatial=0")


@pytest.mark.parametrize("op,words", [
    ("Relu", "its input comes from Relu 'relu'"),
    ("MaxPool", "its input comes from MaxPool 'maxpool'"),
    ("graph_input", "its input 'x' is a graph input"),
])
def test_skips_bn_whose_input_is_not_from_a_foldable_producer(op, words):
    model = build_bn_after_op_model(op)
    assert_stays(model, words, "its output 'y' is a graph output")


@pytest.mark.parametrize("param,label", [("bn_scale", "scale"), ("bn_mean", "input_mean")])
def test_skips_bn_param_that_is_an_overridable_graph_input(param, label):
    """From IR 4 on, an initializer that is also a graph input is only a default: not a constant."""
    model = with_initializer_as_graph_input(build_producer_bn_model("conv", opset=13), param, keep_initializer=True)
    assert_stays(model, f"its {label} '{param}' is not a constant")


@pytest.mark.parametrize("keep_initializer", [False, True], ids=["runtime_weight", "overridable_weight"])
@pytest.mark.parametrize("producer", ["conv", "gemm", "matmul"])
def test_skips_producer_whose_weight_is_not_a_constant(producer, keep_initializer):
    model = with_initializer_as_graph_input(
        build_producer_bn_model(producer, bias=producer != "matmul", opset=13), f"{producer}_weight",
        keep_initializer=keep_initializer,
    )
    op = PRODUCER_OP_TYPES[producer]
    assert_stays(model, f"the weight '{producer}_weight' of {op} '{producer}' is not a constant")


def test_skips_matmul_with_rank3_output():
    """(2, 6, 4) x (4, 6) -> (2, 6, 6): BN normalizes axis 1, not the weight's output axis 2,
    although both have 6 channels."""
    model = build_producer_bn_model("matmul", bias=False, input_shape=(2, 6, 4), out_channels=6, opset=13)
    assert_stays(model, "MatMul 'matmul' has a rank-3 input, so the BN channel axis is not the weight's output axis")
