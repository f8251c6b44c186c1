"""Write examples/fused/: the reference example's digits CNN with its BNs folded, then compressed.

torch's default ONNX exporter fuses every BN into the layer before it; ``bnpass --fold-only`` does the
same to examples/reference/model.onnx, giving ``model.onnx`` here (no BN left: the uncompressed model
a user would hold). Its Conv and Gemm weights are then compressed with numpy, seeded, biases kept:

- ``model_pruned.onnx``: 50% magnitude pruning, per layer;
- ``model_int4.onnx``: int4 per-channel fake quantization (symmetric, weights rounded to the grid);
- ``model_pruned_int4.onnx``: 70% pruning, then int4 per-tensor.

The calibration data and test sets are examples/reference's (in-domain/calib, in-domain/test.npz).

Usage (from the repository root): ``python tools/make_fused_example.py``
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

import bnpass

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "examples" / "reference" / "model.onnx"
TARGET = ROOT / "examples" / "fused"


def prune(weight: np.ndarray, sparsity: float) -> np.ndarray:
    threshold = np.quantile(np.abs(weight), sparsity)
    return np.where(np.abs(weight) > threshold, weight, 0).astype(weight.dtype)


def quantize(weight: np.ndarray, bits: int, *, per_channel: bool) -> np.ndarray:
    levels = 2 ** (bits - 1) - 1
    axes = tuple(range(1, weight.ndim)) if per_channel else None
    scale = np.abs(weight).max(axis=axes, keepdims=per_channel) / levels
    scale = np.where(scale > 0, scale, 1)
    return (np.clip(np.round(weight / scale), -levels, levels) * scale).astype(weight.dtype)


COMPRESSIONS = {
    "model_pruned.onnx": lambda w: prune(w, 0.5),
    "model_int4.onnx": lambda w: quantize(w, 4, per_channel=True),
    "model_pruned_int4.onnx": lambda w: quantize(prune(w, 0.7), 4, per_channel=False),
}


def compressed(model: onnx.ModelProto, compress) -> onnx.ModelProto:
    weights = {node.input[1] for node in model.graph.node if node.op_type in ("Conv", "Gemm")}
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for position, tensor in enumerate(result.graph.initializer):
        if tensor.name in weights:
            value = compress(numpy_helper.to_array(tensor))
            result.graph.initializer[position].CopyFrom(numpy_helper.from_array(value, tensor.name))
    return result


def main() -> None:
    TARGET.mkdir(exist_ok=True)
    folded = bnpass.fold_batchnorms(SOURCE).model
    onnx.save(folded, TARGET / "model.onnx")
    for name, compress in COMPRESSIONS.items():
        onnx.save(compressed(folded, compress), TARGET / name)
        print(f"wrote {TARGET / name}")


if __name__ == "__main__":
    main()
