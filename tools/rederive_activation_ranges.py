"""Re-derive a QDQ model's activation ranges from calibration data, as onnxruntime's MinMax calibrator does.

A measurement tool for the question bnpass's README answers under "Quantized models": after bnpass
changes what reaches an activation QuantizeLinear (a layer corrected with ``--reference``, a BN
re-estimated and folded), does keeping the quantizer's range cost accuracy against re-deriving it?

For every activation ``QuantizeLinear`` (its input is not a constant) with a constant per-tensor
scale and zero point, the tool runs the model on the calibration arrays, takes the minimum and the
maximum of its input over all of them (every QuantizeLinear sharing that scale and zero point
together), and writes the scale and zero point onnxruntime's quantizer computes from that range
(``onnxruntime.quantization.quant_utils.compute_scale_zp``: the range widened to include 0,
asymmetric, the zero point's own integer range). A range that started at exactly 0 (zero point at
the type's minimum: onnxruntime writes that where it removed a Relu and lets the rounding clip)
keeps its lower end at 0, so the clipping stays.

Usage::

    python tools/rederive_activation_ranges.py MODEL.onnx OUT.onnx --data CALIB_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import numpy_helper
from onnxruntime.quantization.quant_utils import compute_scale_zp


def activation_quantizers(model: onnx.ModelProto) -> dict:
    """``{(scale name, zero point name): [QuantizeLinear input names]}`` of the activation QuantizeLinears."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    groups: dict = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.input[0] in initializers:
            continue
        if node.input[1] in initializers and node.input[2] in initializers:
            groups.setdefault((node.input[1], node.input[2]), []).append(node.input[0])
    return groups


def observed_ranges(model: onnx.ModelProto, names: list, batches: list) -> dict:
    """``{tensor name: (min, max)}`` over every batch."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    outputs = {value.name for value in tapped.graph.output}
    for name in names:
        if name not in outputs:
            tapped.graph.output.append(onnx.ValueInfoProto(name=name))
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(tapped.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    ranges = {name: (np.inf, -np.inf) for name in names}
    for batch in batches:
        for name, value in zip(names, session.run(names, {input_name: batch})):
            low, high = ranges[name]
            ranges[name] = (min(low, float(value.min())), max(high, float(value.max())))
    return ranges


def rederive(model: onnx.ModelProto, batches: list) -> tuple:
    """``(model with re-derived activation scales and zero points, {scale name: (old, new scale)})``."""
    groups = activation_quantizers(model)
    ranges = observed_ranges(model, sorted({name for names in groups.values() for name in names}), batches)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    result = onnx.ModelProto()
    result.CopyFrom(model)
    written = {tensor.name: tensor for tensor in result.graph.initializer}
    changes = {}
    for (scale_name, zero_name), names in groups.items():
        scale = numpy_helper.to_array(initializers[scale_name])
        zero_point = numpy_helper.to_array(initializers[zero_name])
        if scale.size != 1:
            continue  # per-axis activation quantization: left as it is
        info = np.iinfo(zero_point.dtype)
        low = min(ranges[name][0] for name in names)
        high = max(ranges[name][1] for name in names)
        if int(zero_point.reshape(-1)[0]) == info.min:
            low = 0.0  # the range started at 0: a removed Relu's clipping, kept
        qmin, qmax = (np.array(bound, zero_point.dtype) for bound in (info.min, info.max))
        new_zero, new_scale = compute_scale_zp(np.array(low, np.float32), np.array(high, np.float32), qmin, qmax)
        written[scale_name].CopyFrom(numpy_helper.from_array(
            np.asarray(new_scale, dtype=scale.dtype).reshape(scale.shape), scale_name))
        written[zero_name].CopyFrom(numpy_helper.from_array(
            np.asarray(new_zero, dtype=zero_point.dtype).reshape(zero_point.shape), zero_name))
        changes[scale_name] = (float(scale.reshape(-1)[0]), float(np.asarray(new_scale).reshape(-1)[0]))
    return result, changes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="folder of .npy batches for the model's input")
    args = parser.parse_args(argv)
    model = onnx.load(args.model)
    batches = [np.load(path).astype(np.float32) for path in sorted(args.data.glob("*.npy"))]
    result, changes = rederive(model, batches)
    onnx.save(result, args.output)
    ratios = [new / old for old, new in changes.values() if old > 0]
    print(f"re-derived {len(changes)} activation ranges; new/old scale: min {min(ratios):.3f}, "
          f"median {float(np.median(ratios)):.3f}, max {max(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
