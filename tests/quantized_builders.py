"""Quantized models as the quantizers write them, for tests/test_quantized_formats.py.

* :func:`quantized_by_onnxruntime`: a tiny float model (Conv -> Relu -> Conv, or Gemm) quantized by
  ``onnxruntime.quantization.quantize_static`` in QDQ format (per tensor or per channel, int8 /
  uint8 / int4 weights; int4 below opset 21 is written in the ``com.microsoft`` domain).
* :func:`with_batchnorm_after`: a fresh, non-trivial BN inserted after a quantized layer (the
  quantizer folds BNs itself, so a model as it writes it has none); the Q/DQ pair that quantized
  the layer's output (the graph output) is dropped, so the BN's output is the graph output and the
  folded model can be compared with the unfolded one without an activation rounding in between.
* :func:`hand_quantized_model`: the forms no quantizer here writes on a tiny graph: float8 (as
  ModelOpt's fp8 export stores weights: ``DequantizeLinear(float8 constant, scale, float8 0)``),
  blocked quantization (opset 21 ``block_size``), ``QuantizeLinear(constant W) -> DequantizeLinear``.

Every model sets ``ir_version = 10``; calibration data are small, seeded normal samples.
"""

from __future__ import annotations

import os
import tempfile

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from builders import BN_NODE_NAME, INPUT_NAME, OUTPUT_NAME, GraphBuilder, random_bn_params

CONV_INPUT = (2, 3, 6, 6)
GEMM_INPUT = (4, 12)
WEIGHT_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8, "int4": QuantType.QInt4}


def float_model(layer: str, *, opset: int, seed: int = 0) -> onnx.ModelProto:
    """``conv``: x -> Conv(3->8, 3x3, bias) -> Relu -> Conv(8->6, 1x1, bias) ``last`` -> y;
    ``gemm``: x -> Gemm(12->5, transB=1, bias) ``last`` -> y."""
    rng = np.random.default_rng(seed)
    builder = GraphBuilder(opset=opset)
    if layer == "conv":
        builder.add_input(INPUT_NAME, np.float32, CONV_INPUT)
        builder.add_initializer("w1", (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32))
        builder.add_initializer("b1", (rng.standard_normal(8) * 0.1).astype(np.float32))
        builder.add_initializer("w2", (rng.standard_normal((6, 8, 1, 1)) * 0.3).astype(np.float32))
        builder.add_initializer("b2", (rng.standard_normal(6) * 0.1).astype(np.float32))
        builder.add_node("Conv", [INPUT_NAME, "w1", "b1"], ["c1"], name="first", pads=[1, 1, 1, 1])
        builder.add_node("Relu", ["c1"], ["r1"], name="relu")
        builder.add_node("Conv", ["r1", "w2", "b2"], [OUTPUT_NAME], name="last")
    else:
        builder.add_input(INPUT_NAME, np.float32, GEMM_INPUT)
        builder.add_initializer("w", (rng.standard_normal((5, 12)) * 0.3).astype(np.float32))
        builder.add_initializer("b", (rng.standard_normal(5) * 0.1).astype(np.float32))
        builder.add_node("Gemm", [INPUT_NAME, "w", "b"], [OUTPUT_NAME], name="last", transB=1)
    builder.add_output(OUTPUT_NAME)
    return builder.build()


class _Samples(CalibrationDataReader):
    def __init__(self, shape, seed: int):
        rng = np.random.default_rng(seed)
        self.batches = iter([{INPUT_NAME: rng.standard_normal(shape).astype(np.float32)} for _ in range(4)])

    def get_next(self):
        return next(self.batches, None)


def quantized_by_onnxruntime(layer: str, *, weight_type: str = "int8", per_channel: bool = False, opset: int = 13,
                             seed: int = 0, extra_options=None) -> onnx.ModelProto:
    """:func:`float_model` as ``quantize_static`` (QDQ, uint8 activations) writes it."""
    model = float_model(layer, opset=opset, seed=seed)
    with tempfile.TemporaryDirectory() as folder:
        source, target = os.path.join(folder, "float.onnx"), os.path.join(folder, "quantized.onnx")
        onnx.save(model, source)
        quantize_static(source, target, _Samples(CONV_INPUT if layer == "conv" else GEMM_INPUT, seed),
                        quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        weight_type=WEIGHT_TYPES[weight_type], activation_type=QuantType.QUInt8,
                        extra_options=extra_options or {})
        quantized = onnx.load(target)
    quantized.ir_version = 10
    return quantized


def with_batchnorm_after(model: onnx.ModelProto, layer: str = "last", *, seed: int = 1,
                         gamma_sign: str = "random") -> onnx.ModelProto:
    """``model`` with a BN ``bn`` (random statistics; ``gamma_sign`` "random" or "positive") reading
    ``layer``'s output; when that output reached the graph output through a Q/DQ pair, the pair is
    dropped and the BN writes the graph output."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    node = next(n for n in graph.node if n.name == layer)
    readers = [n for n in graph.node if node.output[0] in n.input]
    outputs = {value.name for value in graph.output}
    target = node.output[0]
    if len(readers) == 1 and readers[0].op_type == "QuantizeLinear":
        after = [n for n in graph.node if readers[0].output[0] in n.input]
        if len(after) == 1 and after[0].op_type == "DequantizeLinear" and after[0].output[0] in outputs:
            target = after[0].output[0]
            for dropped in (readers[0], after[0]):
                graph.node.remove(dropped)
    channels = next(t for t in graph.initializer if t.name == _weight_source(model, node)).dims[0]
    params = random_bn_params((channels,), np.random.default_rng(seed))
    if gamma_sign == "positive":
        params.scale[:] = np.abs(params.scale) + 0.1
    inner = f"{layer}_out"
    node.output[0] = inner
    names = []
    for what, value in params.as_dict().items():
        names.append(f"{BN_NODE_NAME}_{what}")
        graph.initializer.append(numpy_helper.from_array(value, names[-1]))
    position = list(graph.node).index(node) + 1
    graph.node.insert(position, helper.make_node("BatchNormalization", [inner, *names], [target], name=BN_NODE_NAME))
    _drop_unread_initializers(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _weight_source(model: onnx.ModelProto, layer) -> str:
    """The name of the stored tensor behind the layer's weight (through DequantizeLinear / QuantizeLinear)."""
    name = layer.input[1]
    producers = {output: n for n in model.graph.node for output in n.output}
    while name in producers:
        name = producers[name].input[0]
    return name


def _drop_unread_initializers(model: onnx.ModelProto) -> None:
    read = {name for node in model.graph.node for name in node.input}
    for tensor in list(model.graph.initializer):
        if tensor.name not in read:
            model.graph.initializer.remove(tensor)


def hand_quantized_model(form: str, *, seed: int = 0, gamma_sign: str = "random",
                         weight_source: str = "initializer") -> onnx.ModelProto:
    """x (4, 8) -> MatMul(x, DequantizeLinear(...) of an (8, 6) weight) -> BN -> y, the weight in ``form``:

    * ``float8_per_tensor`` / ``float8_per_channel``: float8 E4M3FN values, zero point float8 0 (opset 19);
    * ``int8_blocked`` / ``int4_blocked``: blocks of 4 along the input axis 0 (opset 21);
    * ``int8_blocked_output_axis``: blocks of 2 along the output axis 1 (opset 21);
    * ``quantize_per_tensor`` / ``quantize_per_channel``: ``QuantizeLinear(W float constant, scale,
      int8 0) -> DequantizeLinear`` on the same scale and zero point (opset 13), W an initializer or a
      ``Constant`` node (``weight_source``);
    * ``int8_one_element_scale``: scale of shape [1] with a scalar zero point (onnxruntime's bias form).
    """
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((8, 6)) * 0.4).astype(np.float32)
    opset = 19 if form.startswith("float8") else 21 if "blocked" in form else 13
    builder = GraphBuilder(opset=opset)
    builder.add_input(INPUT_NAME, np.float32, (4, 8))
    attributes = {}
    if form.startswith("float8"):
        per_channel = form.endswith("per_channel")
        scale = (np.abs(weight).max(axis=0) if per_channel else np.abs(weight).max()) / 448.0
        stored = (weight / scale).astype(ml_dtypes.float8_e4m3fn)
        zero_point = np.zeros(scale.shape, ml_dtypes.float8_e4m3fn)
        attributes = {"axis": 1} if per_channel else {}
    elif "blocked" in form:
        dtype, low, high = (np.int8, -127, 127) if form.startswith("int8") else (ml_dtypes.int4, -7, 7)
        axis, block = (1, 2) if form.endswith("output_axis") else (0, 4)
        blocks = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis] // block, block, -1)
        scale = np.moveaxis(np.abs(blocks).max(axis=1) / high, 0, axis).astype(np.float32)
        expanded = np.repeat(scale, block, axis=axis)
        stored = np.clip(np.rint(weight / expanded), low, high).astype(np.int64).astype(dtype)
        zero_point = np.zeros(scale.shape, dtype)
        attributes = {"axis": axis, "block_size": block}
    elif form.startswith("quantize"):
        per_channel = form.endswith("per_channel")
        scale = ((np.abs(weight).max(axis=0) if per_channel else np.abs(weight).max()) / 127).astype(np.float32)
        zero_point = np.zeros(scale.shape, np.int8)
        attributes = {"axis": 1} if per_channel else {}
        builder.add_constant("w_float", weight, weight_source)
        builder.add_initializer("w_scale", np.asarray(scale, np.float32))
        builder.add_initializer("w_zero_point", zero_point)
        builder.add_node("QuantizeLinear", ["w_float", "w_scale", "w_zero_point"], ["w_quantized"], name="quantize",
                         **attributes)
        stored = None
    else:  # int8_one_element_scale
        scale = np.array([np.abs(weight).max() / 127], np.float32)
        stored = np.rint(weight / scale).astype(np.int8)
        zero_point = np.zeros((), np.int8)
    if stored is not None:
        builder.add_initializer("w_quantized", stored)
        builder.add_initializer("w_scale", np.asarray(scale, np.float32))
        builder.add_initializer("w_zero_point", zero_point)
    builder.add_node("DequantizeLinear", ["w_quantized", "w_scale", "w_zero_point"], ["w"], name="dequantize",
                     **attributes)
    builder.add_node("MatMul", [INPUT_NAME, "w"], ["matmul_out"], name="matmul")
    builder.add_initializer("add_bias", (rng.standard_normal(6) * 0.1).astype(np.float32))
    builder.add_node("Add", ["matmul_out", "add_bias"], ["layer_out"], name="add")
    params = random_bn_params((6,), rng)
    if gamma_sign == "positive":
        params.scale[:] = np.abs(params.scale) + 0.1
    names = []
    for what, value in params.as_dict().items():
        names.append(builder.add_initializer(f"{BN_NODE_NAME}_{what}", value))
    builder.add_node("BatchNormalization", ["layer_out", *names], [OUTPUT_NAME], name=BN_NODE_NAME)
    builder.add_output(OUTPUT_NAME)
    return builder.build()
