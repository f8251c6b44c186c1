"""What ``--keep-per-tensor`` costs on a model quantized per tensor by onnxruntime's ``quantize_static``.

1. The fold alone: ``examples/fused/model.onnx`` is quantized (QDQ, per-tensor int8 weights, uint8
   activations, from the in-domain calibration arrays); a BN with a correction-like gain (uniform in
   [0.8, 1.25] per channel) and shift is inserted after every layer and folded, exactly (per-channel
   scales) and with ``keep_per_tensor=True``; both are compared with the unfolded model on the
   labelled in-domain test images (onnxruntime CPU, graph optimizations off): max |difference| over
   the largest output magnitude, and top-1 agreement.
2. The repair: ``bnpass QUANTIZED --data calib --reference float`` with and without
   ``--keep-per-tensor``, test accuracy of each.

Usage: ``python tools/measure_keep_per_tensor.py`` (from the repository root; about 20 s on 2 cores).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import bnpass
from bnpass.passes.correct_layers import insert_identity_batchnorms, layers_without_batchnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT = os.path.join(ROOT, "examples", "fused", "model.onnx")
CALIB = os.path.join(ROOT, "examples", "reference", "in-domain", "calib")
TEST = os.path.join(ROOT, "examples", "reference", "in-domain", "test.npz")


class _Reader(CalibrationDataReader):
    def __init__(self, data):
        self.batches = iter([{"input": data[i:i + 32]} for i in range(0, len(data), 32)])

    def get_next(self):
        return next(self.batches, None)


def _run(model, images):
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + 100]})[0] for i in range(0, len(images), 100)])


def main() -> None:
    calib = np.concatenate([np.load(f) for f in sorted(glob.glob(os.path.join(CALIB, "*.npy")))]).astype(np.float32)
    test = np.load(TEST)
    images, labels = test["images"], test["labels"]
    with tempfile.TemporaryDirectory() as folder:
        quantized_path = os.path.join(folder, "per_tensor.onnx")
        quantize_static(FLOAT, quantized_path, _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=False,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        quantized = onnx.load(quantized_path)
        quantized.ir_version = 10
        onnx.save(quantized, quantized_path)

        unfolded = insert_identity_batchnorms(quantized, layers_without_batchnorm(quantized)).model
        rng = np.random.default_rng(0)
        for node in unfolded.graph.node:
            if node.op_type != "BatchNormalization":
                continue
            tensors = {t.name: t for t in unfolded.graph.initializer}
            channels = tensors[node.input[1]].dims[0]
            tensors[node.input[1]].CopyFrom(numpy_helper.from_array(
                rng.uniform(0.8, 1.25, channels).astype(np.float32), node.input[1]))
            tensors[node.input[2]].CopyFrom(numpy_helper.from_array(
                (rng.standard_normal(channels) * 0.05).astype(np.float32), node.input[2]))
        reference = _run(unfolded, images)
        scale = float(np.max(np.abs(reference)))
        print(f"fold alone, {len(layers_without_batchnorm(quantized))} layers, {len(images)} test images:")
        for keep in (False, True):
            folded = bnpass.fold_batchnorms(unfolded, keep_per_tensor=keep)
            output = _run(folded.model, images)
            error = float(np.max(np.abs(output - reference))) / scale
            mean_error = float(np.mean(np.abs(output - reference))) / float(np.mean(np.abs(reference)))
            agreement = float(np.mean(output.argmax(1) == reference.argmax(1))) * 100
            print(f"  keep_per_tensor={keep}: folded {len(folded.folded)}, max |output - unfolded| / max |unfolded| "
                  f"{error:.2e}, mean |output - unfolded| / mean |unfolded| {mean_error:.2e}, top-1 agreement "
                  f"with unfolded {agreement:.1f}%, accuracy "
                  f"{100 * np.mean(output.argmax(1) == labels):.1f}% (unfolded "
                  f"{100 * np.mean(reference.argmax(1) == labels):.1f}%)")

        print("repair with --reference:")
        print(f"  float model {100 * np.mean(_run(onnx.load(FLOAT), images).argmax(1) == labels):.1f}%, "
              f"quantized as written {100 * np.mean(_run(quantized, images).argmax(1) == labels):.1f}%")
        for flags in ([], ["--keep-per-tensor"]):
            output_path = os.path.join(folder, "repaired.onnx")
            subprocess.run([sys.executable, "-m", "bnpass", quantized_path, output_path, "--data", CALIB,
                            "--reference", FLOAT, "-q", *flags], check=True)
            repaired = onnx.load(output_path)
            accuracy = 100 * np.mean(_run(repaired, images).argmax(1) == labels)
            print(f"  bnpass --reference {' '.join(flags) or '(per-channel)'}: {accuracy:.1f}%")


if __name__ == "__main__":
    main()
