"""``--verify``: run two models on the same batches and measure how far their outputs differ.

Like with like: both sessions run on the same providers with the same options (TF32 as asked, off
by default) and with onnxruntime's graph optimizations off, so the difference measures the fold
alone. With
optimizations on one side only, onnxruntime's own rewrites (Conv+BN fusion, QDQ pairs turned into
integer kernels) would count as fold error: on a QDQ model where nothing folded they showed a
relative difference of 0.053.

The relative difference of an output is ``max |a - b| / max |a|`` (normwise, against the
reference ``a``), which stays meaningful where individual values are near zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx

from .runtime import create_session


@dataclass
class Difference:
    batches: int
    max_abs: float
    max_rel: float


def compare_models(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: Iterable,
                   providers: list, *, progress=None, tf32: bool = False) -> Difference:
    """Largest output differences of ``candidate`` against ``reference`` over ``feeds``.

    ``progress``, when given, is updated once per batch (a tqdm bar).
    """
    reference_session = create_session(reference, providers, optimize=False, tf32=tf32)
    candidate_session = create_session(candidate, providers, optimize=False, tf32=tf32)
    names = [output.name for output in reference.graph.output]
    batches, max_abs, max_rel = 0, 0.0, 0.0
    for feed in feeds:
        expected = reference_session.run(names, feed)
        got = candidate_session.run(names, feed)
        for a, b in zip(expected, got):
            a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            if a.size == 0:
                continue
            difference = float(np.max(np.abs(a - b)))
            scale = float(np.max(np.abs(a)))
            max_abs = max(max_abs, difference)
            max_rel = max(max_rel, difference / scale if scale > 0 else (0.0 if difference == 0 else np.inf))
        batches += 1
        if progress is not None:
            progress.update(1)
    return Difference(batches=batches, max_abs=max_abs, max_rel=max_rel)
