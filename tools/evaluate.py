"""Measure the test accuracy of ONNX image classifiers, to compare models before and after bnpass.

For each model given on the command line, the script runs the labelled test set through
onnxruntime's CPU provider, takes the arg-max of the first output as the predicted class, and
prints one line: the accuracy in percent, the number of BatchNormalization nodes left in the
model (bnpass folds them all into the preceding Conv or Gemm, so a processed model shows 0), and
the model's path.

The test set is a ``.npz`` file with two arrays: ``images`` (N, C, H, W) float32 and ``labels``
(N,) integer class indices, as written by ``tools/make_example.py``. The script needs only numpy,
onnx and onnxruntime, so it runs wherever bnpass is installed.

Usage (from the repository root)::

    python tools/evaluate.py examples/digits/model.onnx examples/digits/model_compressed.onnx \\
        [--test examples/digits/test.npz] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

DEFAULT_TEST_SET = Path(__file__).resolve().parent.parent / "examples" / "digits" / "test.npz"


class EvaluationError(Exception):
    """A problem with the user's input files, reported as one line without a traceback."""


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, metavar="MODEL.onnx",
                        help="ONNX classifiers to evaluate, one output line each")
    parser.add_argument("--test", type=Path, default=DEFAULT_TEST_SET,
                        help="labelled test set, .npz with 'images' and 'labels' "
                             "(default: %(default)s)")
    parser.add_argument("--samples", type=parse_slice, metavar="START:STOP",
                        help="evaluate on these test images only (a Python slice, e.g. 250: for all from the "
                             "251st), to keep apart a labelled split used for calibration")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="images per inference call when the model's batch dimension is "
                             "dynamic (default: %(default)s)")
    return parser.parse_args(argv)


def parse_slice(text: str) -> slice:
    try:
        start, stop = (int(part) if part else None for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP (either may be empty), got {text!r}") from None
    return slice(start, stop)


def load_test_set(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``images`` as float32 and ``labels`` as int64 from a .npz file."""
    if not path.is_file():
        raise EvaluationError(f"test set '{path}' not found; create it with "
                              "'python tools/make_example.py' or pass --test")
    with np.load(path) as archive:
        missing = [key for key in ("images", "labels") if key not in archive.files]
        if missing:
            raise EvaluationError(f"test set '{path}' lacks array(s) {missing}; "
                                  f"it holds {archive.files}")
        images = archive["images"].astype(np.float32)
        labels = archive["labels"].astype(np.int64)
    if len(images) != len(labels):
        raise EvaluationError(f"test set '{path}' has {len(images)} images "
                              f"but {len(labels)} labels")
    return images, labels


def count_batchnorm_nodes(graph: onnx.GraphProto) -> int:
    """BatchNormalization nodes in the graph, including those inside If/Loop/Scan bodies."""
    count = 0
    for node in graph.node:
        count += node.op_type == "BatchNormalization"
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                count += count_batchnorm_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                count += sum(count_batchnorm_nodes(subgraph) for subgraph in attribute.graphs)
    return count


def predict(session: onnxruntime.InferenceSession, images: np.ndarray,
            batch_size: int) -> np.ndarray:
    """Predicted class per image; uses the model's own batch size when that is fixed."""
    model_input = session.get_inputs()[0]
    leading_dimension = model_input.shape[0] if model_input.shape else None
    if isinstance(leading_dimension, int) and leading_dimension > 0:
        batch_size = leading_dimension
    predictions = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        if len(batch) < batch_size and isinstance(leading_dimension, int):
            # A fixed batch dimension: pad the last batch, then drop the padded rows.
            padding = np.zeros((batch_size - len(batch),) + batch.shape[1:], batch.dtype)
            logits = session.run(None, {model_input.name: np.concatenate([batch, padding])})[0]
            logits = logits[:len(batch)]
        else:
            logits = session.run(None, {model_input.name: batch})[0]
        predictions.append(np.asarray(logits).reshape(len(batch), -1).argmax(axis=1))
    return np.concatenate(predictions)


def evaluate_model(path: Path, images: np.ndarray, labels: np.ndarray,
                   batch_size: int) -> tuple[float, int]:
    """Return (accuracy in [0, 1], number of BatchNormalization nodes) for one model file."""
    if not path.is_file():
        raise EvaluationError(f"model '{path}' not found")
    try:
        model = onnx.load(str(path), load_external_data=False)  # nodes are all we count
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnx and onnxruntime raise many unrelated types
        raise EvaluationError(f"cannot load model '{path}': {error}") from error
    predictions = predict(session, images, batch_size)
    return float((predictions == labels).mean()), count_batchnorm_nodes(model.graph)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    onnxruntime.set_default_logger_severity(3)  # errors only: no optimizer warnings
    try:
        missing = [str(path) for path in arguments.models if not path.is_file()]
        if missing:
            raise EvaluationError(f"model file(s) not found: {', '.join(missing)}")
        images, labels = load_test_set(arguments.test)
        if arguments.samples is not None:
            images, labels = images[arguments.samples], labels[arguments.samples]
            if not len(labels):
                raise EvaluationError(f"--samples selects no image of the {len(load_test_set(arguments.test)[1])}")
        print(f"test set: {arguments.test} ({len(labels)} images)")
        print(f"{'accuracy':>9}  {'BatchNormalization nodes':>24}  model")
        for path in arguments.models:
            accuracy, batchnorm_count = evaluate_model(path, images, labels,
                                                       arguments.batch_size)
            print(f"{accuracy:>9.1%}  {batchnorm_count:>24}  {path}")
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
