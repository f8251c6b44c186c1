"""Tiny float models and their QDQ versions written by onnxruntime's own quantizer (``quantize_static``).

Used by tests/test_quantized_patterns.py. Each float model is built with tests/builders.py's
GraphBuilder (opset 13, IR 10), quantized by ``onnxruntime.quantization.quantize_static`` in QDQ
format on seeded calibration batches, and read back with IR version 10 (onnxruntime 1.31 runs at
most 13; the quantizer keeps the input's).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from builders import GraphBuilder, add_batchnorm, random_bias, random_bn_params, random_weight

INPUT = "input"
OUTPUT = "logits"


def calibration_batches(seed: int = 0, batches: int = 4, size: int = 16) -> list:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((size, 3, 8, 8)).astype(np.float32) for _ in range(batches)]


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list):
        self._batches = iter([{INPUT: batch} for batch in batches])

    def get_next(self):
        return next(self._batches, None)


def quantize(model: onnx.ModelProto, batches: list, **options) -> onnx.ModelProto:
    """``quantize_static(model)`` in QDQ format (int8 weights, int8 activations: onnxruntime's
    defaults) with ``options`` passed on (``per_channel``, ``extra_options``...)."""
    options = {"quant_format": QuantFormat.QDQ, "weight_type": QuantType.QInt8,
               "activation_type": QuantType.QInt8, **options}
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "quantized.onnx"
        onnx.save(model, source)
        quantize_static(str(source), str(target), _Reader(batches), **options)
        quantized = onnx.load(target)
    quantized.ir_version = 10
    return quantized


def conv_bn_model(seed: int = 0) -> onnx.ModelProto:
    """input (N,3,8,8) -> Conv(3->4, 3x3, pad 1, bias) -> BN -> Relu -> Conv(4->6, 1x1, bias) -> BN -> Relu
    -> GlobalAveragePool -> Flatten -> Gemm(6->5) -> logits: BNs with non-trivial statistics."""
    rng = np.random.default_rng(seed)
    builder = GraphBuilder(opset=13)
    builder.add_input(INPUT, np.float32, ["N", 3, 8, 8])
    previous, channels = INPUT, 3
    for position, (out, kernel) in enumerate(((4, 3), (6, 1))):
        builder.add_initializer(f"w{position}", random_weight((out, channels, kernel, kernel), rng))
        builder.add_initializer(f"b{position}", random_bias(out, rng))
        builder.add_node("Conv", [previous, f"w{position}", f"b{position}"], [f"conv{position}"],
                         name=f"conv{position}", pads=[kernel // 2] * 4)
        add_batchnorm(builder, f"conv{position}", random_bn_params((out,), rng), output=f"bn{position}_out",
                      name=f"bn{position}")
        builder.add_node("Relu", [f"bn{position}_out"], [f"relu{position}"], name=f"relu{position}")
        previous, channels = f"relu{position}", out
    builder.add_node("GlobalAveragePool", [previous], ["pooled"], name="pool")
    builder.add_node("Flatten", ["pooled"], ["flat"], name="flatten")
    builder.add_initializer("fc_w", random_weight((5, channels), rng))
    builder.add_initializer("fc_b", random_bias(5, rng))
    builder.add_node("Gemm", ["flat", "fc_w", "fc_b"], [OUTPUT], name="fc", transB=1)
    builder.add_output(OUTPUT)
    return builder.build()


def conv_matmul_model(seed: int = 0, *, damage: float = 0.0) -> onnx.ModelProto:
    """input -> Conv(3->4, 3x3, pad 1, bias) -> Relu -> Conv(4->6, 1x1, bias) -> Relu -> GlobalAveragePool
    -> Flatten -> MatMul(6->5) -> Add(bias) -> logits: no BN (folded before compression). ``damage``
    scales every weight's channels by seeded factors in [1 - damage, 1 + damage] and shifts the first
    Conv's bias: a compressed copy of the ``damage=0`` model whose layer outputs moved."""
    rng = np.random.default_rng(seed)
    hurt = np.random.default_rng(seed + 100)
    builder = GraphBuilder(opset=13)
    builder.add_input(INPUT, np.float32, ["N", 3, 8, 8])
    previous, channels = INPUT, 3
    for position, (out, kernel) in enumerate(((4, 3), (6, 1))):
        weight = random_weight((out, channels, kernel, kernel), rng)
        bias = random_bias(out, rng)
        if damage:
            weight = weight * hurt.uniform(1 - damage, 1 + damage, (out, 1, 1, 1)).astype(np.float32)
            bias = bias + np.float32(damage) * hurt.standard_normal(out).astype(np.float32)
        builder.add_initializer(f"w{position}", weight)
        builder.add_initializer(f"b{position}", bias)
        builder.add_node("Conv", [previous, f"w{position}", f"b{position}"], [f"conv{position}"],
                         name=f"conv{position}", pads=[kernel // 2] * 4)
        builder.add_node("Relu", [f"conv{position}"], [f"relu{position}"], name=f"relu{position}")
        previous, channels = f"relu{position}", out
    builder.add_node("GlobalAveragePool", [previous], ["pooled"], name="pool")
    builder.add_node("Flatten", ["pooled"], ["flat"], name="flatten")
    weight = random_weight((channels, 5), rng)
    if damage:
        weight = weight * hurt.uniform(1 - damage, 1 + damage, (1, 5)).astype(np.float32)
    builder.add_initializer("fc_w", weight)
    builder.add_initializer("fc_b", random_bias(5, rng))
    builder.add_node("MatMul", ["flat", "fc_w"], ["fc_out"], name="fc")
    builder.add_node("Add", ["fc_out", "fc_b"], [OUTPUT], name="fc_bias")
    builder.add_output(OUTPUT)
    return builder.build()


def op_counts(model: onnx.ModelProto) -> Counter:
    """``{op type: count}``, with DequantizeLinear split into that of activations and of constants."""
    constants = {tensor.name for tensor in model.graph.initializer}
    counts = Counter()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            counts["DequantizeLinear(constant)" if node.input[0] in constants else "DequantizeLinear"] += 1
        else:
            counts[node.op_type] += 1
    return counts


def without_activation_pairs_before_batchnorms(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose BNs read their layer's output directly: each ``Q -> DQ`` pair in front
    of a BN taken out (written here independently of bnpass: what the folded model must compute)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    producers = {name: node for node in copy.graph.node for name in node.output}
    removed = set()
    for node in copy.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        dequantize = producers[node.input[0]]
        assert dequantize.op_type == "DequantizeLinear", dequantize.op_type
        quantize = producers[dequantize.input[0]]
        assert quantize.op_type == "QuantizeLinear", quantize.op_type
        node.input[0] = quantize.input[0]
        removed.update((id(dequantize), id(quantize)))
    kept = [node for node in copy.graph.node if id(node) not in removed]
    del copy.graph.node[:]
    copy.graph.node.extend(kept)
    return copy
