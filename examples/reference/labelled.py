"""Labelled calibration data for ``--reference``, as a ``--loader``: the first half of each deployment's
labelled test images, as ``(images, labels)`` batches of 64 (what a PyTorch DataLoader yields).

    bnpass examples/reference/model_compressed.onnx out.onnx --loader examples/reference/labelled.py:shifted \\
        --reference examples/reference/model.onnx --batch-size 64

With labels, ``--reference`` keeps the candidate with the better top-1 accuracy on them. Evaluate on
the other half, kept apart: ``python tools/evaluate.py out.onnx --test examples/reference/shifted/test.npz
--samples 250:`` (``126:`` for classes-0-4, whose test split holds 252 images).
"""

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _first_half(deployment: str) -> list:
    with np.load(HERE / deployment / "test.npz") as archive:
        images, labels = archive["images"], archive["labels"]
    half = len(labels) // 2
    return [(images[start:min(start + 64, half)], labels[start:min(start + 64, half)]) for start in range(0, half, 64)]


def in_domain() -> list:
    return _first_half("in-domain")


def classes_0_4() -> list:
    return _first_half("classes-0-4")


def shifted() -> list:
    return _first_half("shifted")
