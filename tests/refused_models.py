"""Models onnxruntime refuses (issue 22, item 1), each with a BN that calibration needs, for the tests of
bnpass's one-line errors: a custom op, an opset onnxruntime does not know, a layer that a small input
cannot feed. Every model sets ``ir_version`` 10 and passes onnx's checker (onnxruntime is what refuses)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builders import random_bias, random_bn_params, random_weight

CUSTOM_DOMAIN = "custom.ops"


def conv_bn_model(*, plugin: str = "", opset: int = 13, kernel: int = 3, size=(8, 8), seed: int = 0) -> onnx.ModelProto:
    """x -> [MyPlugin 'plugin'] -> Conv 'conv' (3 -> 4 channels, ``kernel``, no padding) -> BN 'bn' -> [MyPlugin] -> y.

    ``plugin`` "before" or "after" the Conv/BN pair puts a ``custom.ops:MyPlugin`` node there (after the
    last BN, calibration copies leave it out; the full model, run by --verify and --reference, has it).
    ``size`` is the input's height and width (strings for free dimensions)."""
    rng = np.random.default_rng(seed)
    params = random_bn_params((4,), rng)
    initializers = [numpy_helper.from_array(random_weight((4, 3, kernel, kernel), rng), "w"),
                    numpy_helper.from_array(random_bias(4, rng), "b")]
    initializers += [numpy_helper.from_array(array, name) for name, array in params.as_dict().items()]
    nodes, x = [], "x"
    if plugin == "before":
        nodes.append(helper.make_node("MyPlugin", ["x"], ["p"], name="plugin", domain=CUSTOM_DOMAIN))
        x = "p"
    nodes.append(helper.make_node("Conv", [x, "w", "b"], ["c"], name="conv"))
    bn_output = "n" if plugin == "after" else "y"
    nodes.append(helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], [bn_output], name="bn"))
    if plugin == "after":
        nodes.append(helper.make_node("MyPlugin", ["n"], ["y"], name="plugin", domain=CUSTOM_DOMAIN))
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(CUSTOM_DOMAIN, 1)] if plugin else [])
    graph = helper.make_graph(nodes, "refused",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, *size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "h", "w"])], initializers)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model
