"""Folding onnx's own light test models (IR 3, opset 9, weights and BN params from ConstantOfShape).

The installed onnx package ships ``onnx/backend/test/data/light/light_{model}.onnx``: full-size
network graphs whose weights are ``ConstantOfShape`` fills (0.02), so that the files stay small.
Two checks per model:

* **as shipped**: every BN whose input comes from a Conv folds (the others stay, each with a
  reason), the output passes the full checker, no dead node or initializer is left, IR 3 keeps every
  initializer among the graph inputs, and a second fold changes nothing;
* **with random weights**: every float ``ConstantOfShape`` fill is replaced by a seeded random
  initializer (He-scaled weights, non-trivial BN statistics with var = |randn| + 0.5), so that a
  folding mistake shows in the outputs; then the folded and unfolded models run through
  onnxruntime (CPU, graph optimizations disabled, float32) on one random input of batch 1, and
  every graph output (plus the logits before a final Softmax, which the random weights saturate)
  must agree to ``rtol = 1e-5`` with an absolute floor of ``2e-6`` x the output's largest magnitude.
  Measured (seed 0), max |difference| / largest magnitude: resnet50 5.0e-7, densenet121 3.7e-7,
  inception_v2 4.1e-7, shufflenet 2.8e-7. The floor is twice the one-layer tests' 1e-6 because
  50-120 folded layers each reorder float32 rounding (elementwise, outputs near zero differ by up
  to 2e-3 relative: cancellation, which the floor covers).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bnpass
from builders import count_ops, dead_nodes, run_onnxruntime, unused_initializers

LIGHT_MODELS = ("resnet50", "densenet121", "inception_v2", "shufflenet")
LIGHT_DIRECTORY = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
RTOL = 1e-5
ATOL_PER_SCALE = 2e-6


def load_light_model(name: str) -> onnx.ModelProto:
    path = os.path.join(LIGHT_DIRECTORY, f"light_{name}.onnx")
    assert os.path.exists(path), f"{path} is missing from the installed onnx package"
    return onnx.load(path)


def conv_fed_batchnorms(model: onnx.ModelProto) -> set:
    producers = {output: node for node in model.graph.node for output in node.output}
    return {node.name for node in model.graph.node if node.op_type == "BatchNormalization"
            and getattr(producers.get(node.input[0]), "op_type", None) == "Conv"}


def with_random_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A copy whose float ConstantOfShape fills are seeded random initializers, drawn per reader:

    Conv/Gemm weight: N(0, 2 / fan_in); biases and BN beta/mean: N(0, 0.1^2); BN gamma:
    +-U(0.5, 1.5); BN var: |N(0, 1)| + 0.5; the per-channel Mul scales of inception/densenet:
    U(0.5, 1.5), their Add shifts N(0, 0.1^2). The logits before a final Softmax become an extra
    graph output (so they are compared too, not only the saturated probabilities).
    """
    rng = np.random.default_rng(seed)
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    graph = model_copy.graph
    readers = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, position))
    initializers = {tensor.name: tensor for tensor in graph.initializer}

    def draw(name: str, shape) -> np.ndarray:
        node, position = readers[name][0]
        if node.op_type == "Unsqueeze":  # per-channel Mul scale or Add shift, through an Unsqueeze
            node, position = readers[node.output[0]][0]
            if node.op_type == "Mul":
                return 0.5 + rng.random(shape)
            return 0.1 * rng.standard_normal(shape)
        if node.op_type in ("Conv", "Gemm") and position == 1:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            fan_in = shape[1] if node.op_type == "Gemm" and trans_b else (
                shape[0] if node.op_type == "Gemm" else int(np.prod(shape[1:])))
            return rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        if node.op_type == "BatchNormalization" and position == 1:
            return (0.5 + rng.random(shape)) * rng.choice([-1.0, 1.0], size=shape)
        if node.op_type == "BatchNormalization" and position == 4:
            return np.abs(rng.standard_normal(shape)) + 0.5
        return 0.1 * rng.standard_normal(shape)

    fills = [node for node in graph.node if node.op_type == "ConstantOfShape"
             and numpy_helper.to_array(node.attribute[0].t).dtype == np.float32]
    dropped_shapes = set()
    for node in fills:
        shape = tuple(int(d) for d in numpy_helper.to_array(initializers[node.input[0]]))
        name = node.output[0]
        graph.initializer.append(numpy_helper.from_array(draw(name, shape).astype(np.float32), name))
        graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape)))
        graph.node.remove(node)
        dropped_shapes.add(node.input[0])
    still_read = {name for node in graph.node for name in node.input}
    for name in dropped_shapes - still_read:
        graph.initializer.remove(initializers[name])
        graph.input.remove(next(value for value in graph.input if value.name == name))
    softmax = [node for node in graph.node if node.op_type == "Softmax"]
    if softmax:  # the logits have the shape of the probabilities
        probabilities = next(value for value in graph.output if value.name == softmax[-1].output[0])
        logits = graph.output.add()
        logits.CopyFrom(probabilities)
        logits.name = softmax[-1].input[0]
    onnx.checker.check_model(model_copy, full_check=True)
    return model_copy


def random_input(model: onnx.ModelProto, seed: int = 1) -> dict:
    initializer_names = {tensor.name for tensor in model.graph.initializer}
    (data,) = [value for value in model.graph.input if value.name not in initializer_names]
    shape = [dim.dim_value for dim in data.type.tensor_type.shape.dim]
    return {data.name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def check_folded(model: onnx.ModelProto, result) -> None:
    """What every fold of a light model must satisfy, whatever its weights."""
    expected_folded = conv_fed_batchnorms(model)
    assert {bn for bn, _ in result.folded} == expected_folded
    before = count_ops(model, "BatchNormalization")
    assert count_ops(result.model, "BatchNormalization") == before - len(expected_folded)
    for bn, reason in result.skipped.items():
        assert reason and bn not in expected_folded
    onnx.checker.check_model(result.model, full_check=True)
    assert result.model.ir_version == model.ir_version == 3
    assert {t.name for t in result.model.graph.initializer} <= {v.name for v in result.model.graph.input}
    assert set(dead_nodes(result.model)) <= set(dead_nodes(model))  # resnet50 ships an unused initializer
    assert set(unused_initializers(result.model)) <= set(unused_initializers(model))
    again = bnpass.fold_batchnorms(result.model)
    assert again.modified is False


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_folds_every_conv_batchnorm_of_the_shipped_light_model(name):
    model = load_light_model(name)
    original_bytes = model.SerializeToString()
    result = bnpass.fold_batchnorms(model)
    assert model.SerializeToString() == original_bytes
    check_folded(model, result)
    assert count_ops(result.model, "ConstantOfShape") < count_ops(model, "ConstantOfShape")


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_folded_light_model_with_random_weights_matches_the_unfolded_one(name):
    model = with_random_weights(load_light_model(name))
    result = bnpass.fold_batchnorms(model)
    check_folded(model, result)
    feeds = random_input(model)
    expected = run_onnxruntime(model, feeds)
    actual = run_onnxruntime(result.model, feeds)
    for value, want, got in zip(model.graph.output, expected, actual):
        scale = float(np.max(np.abs(want)))
        assert np.isfinite(scale) and scale > 0, f"{name}: output {value.name!r} is degenerate"
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL_PER_SCALE * scale,
                                   err_msg=f"{name}: output {value.name!r}")
