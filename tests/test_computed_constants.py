"""Computed constants (bnpass/computed_constants.py): values exporters compute from constants.

Every op path is checked against onnxruntime computing the same chain at run time, an evaluator
independent of bnpass's (onnx.reference); then what must not be a constant, the bounds, the cache,
and what the rewrite, the fold and the calibration copy do with such values.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest

from assertions import fold_and_verify
from bnpass import computed_constants
from bnpass.calibration import build_calibration_model
from bnpass.computed_constants import MIN_ELEMENT_CAP
from bnpass.graph import GraphIndex
from bnpass.rewrite import GraphEditor
from builders import (
    GraphBuilder,
    add_batchnorm,
    add_computed_zero_bias,
    count_ops,
    random_bn_params,
    random_feeds,
    random_weight,
    run_onnxruntime,
    with_inferred_value_info,
    with_initializer_as_graph_input,
)

RNG_SEED = 5


def _weight(builder, rng, shape=(6, 3, 3, 3), name="W"):
    return builder.add_initializer(name, random_weight(shape, rng))


# Each case: (opset, build(builder, rng) -> the name whose value is computed). The graph input is
# "x", float32 (2, 3, 5, 5) unless the case adds its own; a case whose output shape inference
# cannot tell declares it.
def _shape_slice(b, rng):
    return b.add_node("Shape", [_weight(b, rng)], ["out"], name="shape", start=0, end=1)[0]


def _shape_through_identity(b, rng):
    b.add_node("Identity", [_weight(b, rng)], ["W_identity"], name="identity")
    return b.add_node("Shape", ["W_identity"], ["out"], name="shape")[0]


def _slice_with_an_empty_optional_input(b, rng):
    b.add_node("Shape", [_weight(b, rng)], ["shape"], name="shape")
    starts = b.add_initializer("starts", np.array([0], np.int64))
    ends = b.add_initializer("ends", np.array([4], np.int64))
    steps = b.add_initializer("steps", np.array([2], np.int64))
    return b.add_node("Slice", ["shape", starts, ends, "", steps], ["out"], name="slice")[0]


def _gather_unsqueeze(b, rng):  # the legacy exporter's W.size(0)
    b.add_node("Shape", [_weight(b, rng)], ["shape"], name="shape")
    b.add_constant("index", np.array(0, np.int64), "constant_node")
    b.add_node("Gather", ["shape", "index"], ["channels"], name="gather", axis=0)
    b.add_constant("axes", np.array([0], np.int64), "constant_node")
    return b.add_node("Unsqueeze", ["channels", "axes"], ["out"], name="unsqueeze")[0]


def _unsqueeze_axes_attribute(b, rng):  # opset 11: axes is an attribute
    b.add_constant("two", np.array(2, np.int64), "constant_node")
    return b.add_node("Unsqueeze", ["two"], ["out"], name="unsqueeze", axes=[0])[0]


def _squeeze(b, rng):
    b.add_constant("nested", np.array([[5, 7]], np.int64), "constant_node")
    b.add_constant("axes", np.array([0], np.int64), "constant_node")
    return b.add_node("Squeeze", ["nested", "axes"], ["out"], name="squeeze")[0]


def _concat_of_constant_nodes(b, rng, features=128, out="out"):  # the dynamo exporter's flatten target, batch 2
    b.add_constant("batch", np.array([2], np.int64), "constant_node")
    b.add_constant("features", np.array([features], np.int64), "constant_node")
    return b.add_node("Concat", ["batch", "features"], [out], name="concat", axis=0)[0]


def _reshape(b, rng, out="out"):  # the dynamo exporter's weight_norm axes
    b.add_constant("nested_axes", np.array([[1, 2, 3]], np.int64), "constant_node")
    b.add_constant("minus_one", np.array([-1], np.int64), "constant_node")
    return b.add_node("Reshape", ["nested_axes", "minus_one"], [out], name="reshape")[0]


def _transpose(b, rng):  # the legacy exporter's bias-free Linear
    return b.add_node("Transpose", [_weight(b, rng, (5, 7))], ["out"], name="transpose", perm=[1, 0])[0]


def _pruned_weight(b, rng):  # the legacy exporter's torch.nn.utils.prune: Mul(Cast(mask), W)
    mask = b.add_initializer("mask", (rng.random((6, 3, 3, 3)) > 0.5).astype(np.uint8))
    b.add_node("Cast", [mask], ["mask_float"], name="cast", to=onnx.TensorProto.FLOAT)
    return b.add_node("Mul", ["mask_float", _weight(b, rng)], ["out"], name="mul")[0]


def _weight_norm(b, rng, axes_as_input, out="out"):  # torch's weight_norm: Mul(v, Div(g, ReduceL2(v)))
    v = _weight(b, rng, name="v")
    g = b.add_initializer("g", rng.uniform(0.5, 1.5, (6, 1, 1, 1)).astype(np.float32))
    if axes_as_input:  # as the dynamo exporter writes them: Reshape(Constant, Constant [-1])
        _reshape(b, rng, out="axes")
        b.add_node("ReduceL2", [v, "axes"], ["norm"], name="norm", keepdims=1)
    else:
        b.add_node("ReduceL2", [v], ["norm"], name="norm", keepdims=1, axes=[1, 2, 3])
    b.add_node("Div", [g, "norm"], ["ratio"], name="div")
    return b.add_node("Mul", [v, "ratio"], [out], name="mul")[0]


def _add_sub(b, rng):
    shift = b.add_initializer("shift", rng.standard_normal((6, 1, 1, 1)).astype(np.float32))
    b.add_node("Add", [_weight(b, rng), shift], ["shifted"], name="add")
    return b.add_node("Sub", ["shifted", shift], ["out"], name="sub")[0]


def _dynamo_zero_bias(b, rng):  # CastLike's type from the graph input x
    return add_computed_zero_bias(b, "x", _weight(b, rng), "out")


def _cast_like_float16_input(b, rng):
    b.add_input("x16", np.float16, [2, 3])
    b.add_constant("zero", np.array(0.25, np.float32), "constant_node")
    return b.add_node("CastLike", ["zero", "x16"], ["out"], name="cast_like")[0]


def _cast_like_float16_activation(b, rng):  # the type comes from value_info or from inference
    b.add_input("x16", np.float16, [2, 3])
    b.add_node("Relu", ["x16"], ["activation"], name="relu")
    b.add_constant("zero", np.array(0.25, np.float32), "constant_node")
    return b.add_node("CastLike", ["zero", "activation"], ["out"], name="cast_like")[0]


def _constant_of_shape_without_value(b, rng):  # no ``value`` attribute: a float32 zero fill
    shape = b.add_initializer("zeros_shape", np.array([6, 1, 1, 1], np.int64))
    b.add_node("ConstantOfShape", [shape], ["zeros"], name="zeros")
    return b.add_node("Add", [_weight(b, rng), "zeros"], ["out"], name="add")[0]


OP_CASES = {
    "Shape(W, start=0, end=1)": (15, _shape_slice),
    "Shape(Identity(W))": (13, _shape_through_identity),
    "Slice with an empty optional input": (13, _slice_with_an_empty_optional_input),
    "Unsqueeze(Gather(Shape(W), 0))": (13, _gather_unsqueeze),
    "Unsqueeze with axes attribute (opset 11)": (11, _unsqueeze_axes_attribute),
    "Squeeze": (13, _squeeze),
    "Concat(Constant, Constant)": (13, _concat_of_constant_nodes),
    "Reshape(Constant, Constant)": (13, _reshape),
    "Transpose(W)": (13, _transpose),
    "Mul(Cast(mask), W)": (13, _pruned_weight),
    "weight_norm, ReduceL2 axes attribute (opset 13)": (13, lambda b, rng: _weight_norm(b, rng, False)),
    "weight_norm, ReduceL2 axes input (opset 18)": (18, lambda b, rng: b.add_output(_weight_norm(b, rng, True),
                                                                                     np.float32, [6, 3, 3, 3])),
    "Sub(Add(W, c), c)": (13, _add_sub),
    "Add(W, ConstantOfShape without value)": (13, _constant_of_shape_without_value),
    "dynamo zero bias: Expand(CastLike(0, x), Expand(Shape(W)))": (20, _dynamo_zero_bias),
    "CastLike to a float16 graph input": (15, _cast_like_float16_input),
    "CastLike to an undeclared float16 activation (inferred)": (15, _cast_like_float16_activation),
}


def build_case(case: str, *, declare_value_info: bool = False) -> tuple:
    opset, build = OP_CASES[case]
    builder = GraphBuilder(opset=opset)
    builder.add_input("x", np.float32, [2, 3, 5, 5])
    name = build(builder, np.random.default_rng(RNG_SEED))
    if name not in builder.outputs:
        builder.add_output(name)
    model = builder.build()
    return (with_inferred_value_info(model) if declare_value_info else model), name


def assert_same_as_onnxruntime(model: onnx.ModelProto, name: str) -> None:
    expected = run_onnxruntime(model, random_feeds(model))[0]
    constant = GraphIndex(model).constant(name)
    assert constant is not None, f"'{name}' is computed from constants only"
    assert constant.value.dtype == expected.dtype and constant.value.shape == expected.shape
    if np.issubdtype(expected.dtype, np.integer):
        np.testing.assert_array_equal(constant.value, expected)
    else:  # numpy and onnxruntime may round a reduction differently in the last place
        np.testing.assert_allclose(constant.value, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", OP_CASES)
def test_each_op_path_computes_what_onnxruntime_computes(case):
    model, name = build_case(case)
    assert_same_as_onnxruntime(model, name)


def test_cast_like_reads_a_declared_type_without_shape_inference(monkeypatch):
    """torch's dynamo exporter declares every activation in value_info: that type is read as it is,
    without inferring the types of the whole graph (the fallback for undeclared activations)."""
    model, name = build_case("CastLike to an undeclared float16 activation (inferred)", declare_value_info=True)
    assert any(value.name == "activation" for value in model.graph.value_info)

    def no_inference(model):
        raise AssertionError("shape inference ran for a declared type")

    monkeypatch.setattr(computed_constants, "inferred_value_infos", no_inference)
    assert_same_as_onnxruntime(model, name)


def test_what_depends_on_an_activation_shape_is_not_a_constant():
    """The calibration copy frees the batch: Shape of an activation is never constant, even where
    the graph declares it static."""
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, [2, 3, 5, 5])
    builder.add_node("Shape", ["x"], ["x_shape"], name="shape_of_input")
    builder.add_node("Relu", ["x"], ["activation"], name="relu")
    builder.add_node("Shape", ["activation"], ["activation_shape"], name="shape_of_activation")
    builder.add_initializer("starts", np.array([0], np.int64))
    builder.add_initializer("ends", np.array([1], np.int64))
    builder.add_node("Slice", ["x_shape", "starts", "ends"], ["batch"], name="slice")
    builder.add_initializer("rest", np.array([-1], np.int64))
    builder.add_node("Concat", ["batch", "rest"], ["flatten_target"], name="concat", axis=0)
    for name in ("x_shape", "activation_shape", "flatten_target"):
        builder.add_output(name)
    index = GraphIndex(with_inferred_value_info(builder.build()))
    for name in ("x_shape", "activation_shape", "batch", "flatten_target"):
        assert index.constant(name) is None, name


def _model_reading_weight(ir_version: int) -> onnx.ModelProto:
    builder = GraphBuilder(opset=13, ir_version=ir_version)
    builder.add_input("x", np.float32, [2, 7])
    weight = builder.add_initializer("W", random_weight((5, 7), np.random.default_rng(RNG_SEED)))
    builder.add_node("Shape", [weight], ["W_shape"], name="shape")
    builder.add_node("Transpose", [weight], ["W_t"], name="transpose", perm=[1, 0])
    builder.add_node("MatMul", ["x", "W_t"], ["y"], name="matmul")
    builder.add_output("y")
    builder.add_output("W_shape")
    return builder.build()


def test_an_overridable_input_is_not_a_constant():
    """From IR 4 on an initializer listed as a graph input is a default the caller may replace:
    nothing computed from it is a constant, not even its shape. In IR 3 it is."""
    overridable = with_initializer_as_graph_input(_model_reading_weight(10), "W", keep_initializer=True)
    index = GraphIndex(overridable)
    assert index.constant("W_shape") is None and index.constant("W_t") is None
    ir3 = GraphIndex(_model_reading_weight(3))  # every initializer listed as a graph input
    np.testing.assert_array_equal(ir3.constant("W_shape").value, [5, 7])
    assert ir3.constant("W_t").value.shape == (7, 5)


def test_a_value_larger_than_any_stored_tensor_is_not_computed():
    """An activation-sized Expand is refused before it runs; a computed weight as large as the
    largest stored tensor (here larger than the floor of the cap) is still a constant."""
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, [2, 400])
    weight = builder.add_initializer("W", np.ones((300, 400), np.float32))
    assert 300 * 400 > MIN_ELEMENT_CAP
    builder.add_node("Transpose", [weight], ["W_t"], name="transpose", perm=[1, 0])
    builder.add_node("MatMul", ["x", "W_t"], ["y"], name="matmul")
    builder.add_constant("zero", np.array(0, np.float32), "constant_node")
    builder.add_constant("huge", np.array([10**8], np.int64), "constant_node")  # 400 MB of float32
    builder.add_node("Expand", ["zero", "huge"], ["zeros"], name="expand")
    builder.add_output("y")
    builder.add_output("zeros")
    index = GraphIndex(builder.build())
    tracemalloc.start()
    try:
        assert index.constant("zeros") is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20, f"evaluating the refused Expand allocated {peak / 2**20:.0f} MiB"
    assert index.constant("W_t").value.shape == (400, 300)


def test_a_long_chain_is_evaluated_without_deep_recursion():
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, [1])
    builder.add_initializer("one", np.ones(1, np.float32))
    current = "one"
    for step in range(400):  # recursing per node would pass Python's limit of 1000 frames
        current = builder.add_node("Add", [current, "one"], [f"sum{step}"], name=f"add{step}")[0]
    builder.add_node("Add", ["x", current], ["y"], name="add_x")
    builder.add_output("y")
    np.testing.assert_array_equal(GraphIndex(builder.build()).constant(current).value, [401.0])


def test_cached_values_follow_edits():
    """A computed value read before an edit of what it is computed from is computed again after."""
    model = _model_reading_weight(10)
    editor = GraphEditor(model)
    before = editor.index.constant("W_t").value
    transpose = next(node for node in model.graph.node if node.name == "transpose")
    shape = next(node for node in model.graph.node if node.name == "shape")
    editor.remove_node(shape)  # so that W is private to the Transpose and is overwritten in place
    new_weight = np.arange(35, dtype=np.float32).reshape(5, 7)
    editor.set_constant_input(transpose, 0, new_weight, "W_new")
    assert transpose.input[0] == "W"
    np.testing.assert_array_equal(editor.index.constant("W_t").value, new_weight.T)
    assert not np.array_equal(before, new_weight.T)


def _conv_with_computed_bias(*, subgraph_reads_bias: bool = False) -> onnx.ModelProto:
    """x -> Conv(W, dynamo zero bias) -> y; optionally an If whose branches read the bias too."""
    rng = np.random.default_rng(RNG_SEED)
    builder = GraphBuilder(opset=20)
    builder.add_input("x", np.float32, [2, 3, 5, 5])
    weight = builder.add_initializer("W", random_weight((6, 3, 3, 3), rng))
    add_computed_zero_bias(builder, "x", weight, "bias")
    builder.add_node("Conv", ["x", weight, "bias"], ["y"], name="conv", pads=[1, 1, 1, 1])
    builder.add_output("y")
    if subgraph_reads_bias:
        builder.add_input("flag", np.bool_, [])
        branches = {}
        for branch in ("then_branch", "else_branch"):
            branches[branch] = onnx.helper.make_graph(
                [onnx.helper.make_node("Identity", ["bias"], [f"{branch}_out"])], branch, [],
                [onnx.helper.make_tensor_value_info(f"{branch}_out", onnx.TensorProto.FLOAT, [6])])
        builder.add_node("If", ["flag"], ["bias_seen"], name="if", **branches)
        builder.add_output("bias_seen", np.float32, [6])
    return builder.build()


CHAIN_OPS = ("Shape", "Expand", "CastLike")


def test_a_computed_bias_is_rewritten_as_a_plain_initializer():
    model = _conv_with_computed_bias()
    feeds = random_feeds(model)
    before = run_onnxruntime(model, feeds)[0]
    editor = GraphEditor(model)
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    bias = np.linspace(-1, 1, 6).astype(np.float32)
    editor.set_constant_input(conv, 2, bias, "conv.bias")
    editor.remove_dead()
    onnx.checker.check_model(model, full_check=True)
    assert conv.input[2] in {tensor.name for tensor in model.graph.initializer}
    assert not any(count_ops(model, op) for op in (*CHAIN_OPS, "Constant"))  # the computation went
    after = run_onnxruntime(model, feeds)[0]  # the original bias was 0
    np.testing.assert_allclose(after, before + bias.reshape(1, 6, 1, 1), rtol=1e-6, atol=1e-6)


def test_a_computed_bias_read_by_a_subgraph_stays_for_it():
    model = _conv_with_computed_bias(subgraph_reads_bias=True)
    feeds = {"x": np.ones((2, 3, 5, 5), np.float32), "flag": np.array(True)}
    editor = GraphEditor(model)
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    editor.set_constant_input(conv, 2, np.ones(6, np.float32), "conv.bias")
    editor.remove_dead()
    onnx.checker.check_model(model, full_check=True)
    assert conv.input[2] != "bias" and all(count_ops(model, op) == 1 for op in ("Shape", "CastLike"))
    _, bias_seen = run_onnxruntime(model, feeds)
    np.testing.assert_array_equal(bias_seen, np.zeros(6, np.float32))


def _conv_bn_model(*, batch_flatten: bool = False, weight_norm: bool = False, ir_version: int = 10) -> onnx.ModelProto:
    """x (2, 3, 5, 5) -> Conv(W, dynamo zero bias) -> BN [-> Reshape(Concat([2], [-1]), allowzero=1)
    -> Gemm -> BN]; ``weight_norm`` computes W as torch's weight_norm does, axes from Reshape(Constant)."""
    rng = np.random.default_rng(RNG_SEED)
    builder = GraphBuilder(opset=20, ir_version=ir_version)
    builder.add_input("x", np.float32, [2, 3, 5, 5])
    weight = _weight_norm(builder, rng, True, out="W_normed") if weight_norm else _weight(builder, rng)
    add_computed_zero_bias(builder, "x", weight, "bias")
    builder.add_node("Conv", ["x", weight, "bias"], ["conv_out"], name="conv", pads=[1, 1, 1, 1])
    if not batch_flatten:
        builder.add_output("y")
        add_batchnorm(builder, "conv_out", random_bn_params((6,), rng))
        return builder.build()
    add_batchnorm(builder, "conv_out", random_bn_params((6,), rng), output="bn_out", name="bn1")
    target = _concat_of_constant_nodes(builder, rng, features=-1, out="flatten_target")
    builder.add_node("Reshape", ["bn_out", target], ["flat"], name="flatten", allowzero=1)
    builder.add_initializer("fc_weight", random_weight((150, 4), rng))
    builder.add_initializer("fc_bias", rng.standard_normal(4).astype(np.float32))
    builder.add_node("Gemm", ["flat", "fc_weight", "fc_bias"], ["fc_out"], name="fc")
    builder.add_output("y")
    add_batchnorm(builder, "fc_out", random_bn_params((4,), rng), name="bn2")
    return builder.build()


@pytest.mark.parametrize("ir_version", [10, 3])
def test_a_batchnorm_after_a_conv_with_a_computed_bias_folds(ir_version):
    """IR 3 lists every initializer as a graph input: there they are constants, and the folded
    ones are listed too."""
    folded, _ = fold_and_verify(_conv_bn_model(ir_version=ir_version))
    assert not any(count_ops(folded.model, op) for op in CHAIN_OPS)


def test_a_computed_flatten_target_with_allowzero_frees_the_batch():
    """torch's dynamo export at batch 2: Reshape(x, Concat(Constant [2], Constant [-1])), allowzero=1."""
    model = _conv_bn_model(batch_flatten=True)
    assert build_calibration_model(model).fixed_batch is None
    assert count_ops(model, "Concat") == 1  # the input model is not changed


def test_computed_shape_constants_are_written_out_for_shape_inference():
    """weight_norm's ReduceL2 axes come from Reshape(Constant): shape inference cannot evaluate
    them, so without the value written out every shape after the Conv, and the batch, is unknown."""
    model = _conv_bn_model(batch_flatten=True, weight_norm=True)
    assert build_calibration_model(model).fixed_batch is None
