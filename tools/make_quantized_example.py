"""Write examples/quantized/: the digits CNN as the quantizers write it, for ``bnpass --reference`` to repair.

Users do not round weights by hand: they run ``onnxruntime.quantization.quantize_static`` or
``nncf.quantize`` on their float model. This script does that to the digits CNN of
``examples/reference`` (99.0% on its 500 labelled in-domain test images), calibrating every quantizer
on the 384 images of ``examples/reference/in-domain/calib``:

- from ``examples/fused/model.onnx`` (its BNs folded, as torch's exporter writes it), with
  ``quantize_static`` in QDQ format:

  - ``int8_per_tensor.onnx``: the defaults (per-tensor int8 weights, uint8 activations, int32 biases);
  - ``int8_symmetric_activations.onnx``: the same with ``ActivationSymmetric`` (int8 activations
    centred on zero, as some accelerators want);
  - ``int4_per_channel.onnx``: int4 weights per channel (``com.microsoft`` Q/DQ, the model's opset 13);
  - ``int4_per_tensor.onnx``: int4 weights per tensor with ``reduce_range`` (3 bits of magnitude);

- ``with_batchnorm_int4_per_tensor.onnx``: ``quantize_static`` as in the last row, on
  ``examples/reference/model.onnx``, which still has its six BNs (no pre-processing);
- where NNCF is installed, ``nncf.quantize`` on ``examples/fused/model.onnx``: ``nncf_default.onnx``
  (8-bit, fast bias correction, its default) and ``nncf_bias_correction.onnx`` (full BiasCorrection).

Each pairs with its float model, the ``--reference``: ``examples/fused/model.onnx``, or
``examples/reference/model.onnx`` for the BN model. The quantizers are tests/quantizers.py's (the
same calls the tests make). About 320 KB in all.

``--measure`` then repairs every model with ``python -m bnpass MODEL out.onnx --data CALIB --reference
FLOAT`` and prints the README's table: accuracy on the test images as written and after bnpass (with
bnpass's exit code and how many layers it corrected), and the relative RMS output error against the
float model on the same images.

Usage (from the repository root): ``python tools/make_quantized_example.py [--measure]``
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnxruntime.quantization import QuantType

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT / "tests"))

from quantizers import (  # noqa: E402
    CALIBRATION_FOLDER,
    FLOAT_FOLDED,
    FLOAT_WITH_BN,
    calibration_images,
    labelled_test_images,
    quantize_with_nncf,
    quantize_with_onnxruntime,
)

TARGET = REPOSITORY_ROOT / "examples" / "quantized"


@dataclasses.dataclass(frozen=True)
class QuantizedExample:
    file: str
    quantizer: str  # what the README's table calls it
    float_model: Path
    quantize: Callable[[onnx.ModelProto, Path, np.ndarray], None]
    needs: str = ""


def _onnxruntime(**options):
    return lambda source, output, images: quantize_with_onnxruntime(source, output, images, **options)


def _nncf(**options):
    return lambda source, output, images: quantize_with_nncf(source, output, images, **options)


EXAMPLES = [
    QuantizedExample("int8_per_tensor.onnx", "`quantize_static` defaults: int8 per-tensor weights, uint8 "
                     "activations, int32 biases", FLOAT_FOLDED, _onnxruntime(per_channel=False)),
    QuantizedExample("int8_symmetric_activations.onnx", "the same, `ActivationSymmetric` (int8 activations)",
                     FLOAT_FOLDED, _onnxruntime(per_channel=False, extra_options={"ActivationSymmetric": True})),
    QuantizedExample("int4_per_channel.onnx", "`quantize_static`, int4 per-channel weights (`com.microsoft`, "
                     "opset 13)", FLOAT_FOLDED, _onnxruntime(per_channel=True, weight_type=QuantType.QInt4)),
    QuantizedExample("int4_per_tensor.onnx", "`quantize_static`, int4 per-tensor weights, `reduce_range`",
                     FLOAT_FOLDED, _onnxruntime(per_channel=False, weight_type=QuantType.QInt4, reduce_range=True)),
    QuantizedExample("with_batchnorm_int4_per_tensor.onnx", "the same on the model with its 6 BNs "
                     "(reference: `examples/reference/model.onnx`)", FLOAT_WITH_BN,
                     _onnxruntime(per_channel=False, weight_type=QuantType.QInt4, reduce_range=True)),
    QuantizedExample("nncf_default.onnx", "`nncf.quantize` defaults: int8, fast bias correction", FLOAT_FOLDED,
                     _nncf(), needs="nncf"),
    QuantizedExample("nncf_bias_correction.onnx", "`nncf.quantize`, full BiasCorrection "
                     "(`fast_bias_correction=False`)", FLOAT_FOLDED, _nncf(fast_bias_correction=False), needs="nncf"),
]


def available(example: QuantizedExample) -> bool:
    return not example.needs or importlib.util.find_spec(example.needs) is not None


def write_examples(target: Path) -> list[QuantizedExample]:
    target.mkdir(parents=True, exist_ok=True)
    images = calibration_images(count=None)
    written = []
    for example in EXAMPLES:
        if not available(example):
            print(f"skipped {example.file}: {example.needs} is not installed")
            continue
        example.quantize(onnx.load(example.float_model), target / example.file, images)
        print(f"wrote {target / example.file} ({(target / example.file).stat().st_size // 1024} KB)")
        written.append(example)
    return written


def logits(path: Path, images: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def describe(path: Path, float_logits: np.ndarray, images: np.ndarray, labels: np.ndarray) -> str:
    output = logits(path, images)
    accuracy = np.mean(output.argmax(axis=1) == labels) * 100
    error = np.sqrt(np.mean((output - float_logits) ** 2) / np.mean(float_logits ** 2))
    return f"{accuracy:.1f}% ({error:.3f})"


def repair(example: QuantizedExample, model: Path, folder: Path) -> tuple[str, Path | None]:
    """Run the README's command; the table cell's words and the repaired model (None on failure)."""
    output, report = folder / f"repaired_{example.file}", folder / f"{example.file}.json"
    done = subprocess.run([sys.executable, "-m", "bnpass", str(model), str(output), "--data", str(CALIBRATION_FOLDER),
                           "--reference", str(example.float_model), "--report", str(report), "--device", "cpu", "-q"],
                          capture_output=True, text=True, cwd=REPOSITORY_ROOT)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        return f"exit {done.returncode}: {last[:120]}", None
    records = json.loads(report.read_text())
    reference = records.get("reference", {})
    corrected, left = len(reference.get("layers", {})), len(reference.get("layers_not_corrected", {}))
    folded = sum(bool(bn.get("folded_into")) for bn in records.get("batchnorms", []))
    words = f"exit 0, {corrected} of {corrected + left} layers corrected"
    if records.get("batchnorms"):
        words += f", {folded} of {len(records['batchnorms'])} BN folded"
    return words, output


def measure(examples: list[QuantizedExample], target: Path) -> None:
    images, labels = labelled_test_images()
    print("\n| model | quantizer | float model | as written | after `bnpass --reference` | bnpass says |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for example in examples:
            float_logits = logits(example.float_model, images)
            model = target / example.file
            words, repaired = repair(example, model, Path(folder))
            after = describe(repaired, float_logits, images, labels) if repaired else "-"
            reference, as_written = (describe(path, float_logits, images, labels)
                                     for path in (example.float_model, model))
            print(f"| `{example.file}` | {example.quantizer} | {reference} | {as_written} | {after} | {words} |")
    print("\n(accuracy on the 500 labelled in-domain test images; in brackets the relative RMS difference of the "
          "logits from the float model's)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=TARGET, help="where to write (default: %(default)s)")
    parser.add_argument("--measure", action="store_true",
                        help="then repair every model with bnpass --reference and print the README's table")
    arguments = parser.parse_args(argv)
    onnxruntime.set_default_logger_severity(3)
    examples = write_examples(arguments.output_dir)
    if arguments.measure:
        measure(examples, arguments.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
