"""Why a BatchNormalization cannot fold, and the two small helpers the fold's checks share.

:class:`CannotFold` is raised by the checks of :mod:`bnpass.passes.fold_batchnorm` and
:mod:`bnpass.passes.fold_quantized_weight` where the reason is found, in words for the user;
:meth:`~bnpass.passes.fold_batchnorm.FoldBatchNormPass.call` catches it once, from ``plan_fold``.
"""

from __future__ import annotations

import numpy as np


class CannotFold(Exception):
    """Why a BN cannot fold (in one direction), in words for the user."""


def cast_finite(value: np.ndarray, dtype, what: str) -> np.ndarray:
    """``value`` cast once to ``dtype``; the fold cannot be written when that is not finite (overflow)."""
    with np.errstate(all="ignore"):
        cast = np.asarray(value).astype(dtype)
    if not np.all(np.isfinite(cast)):
        raise CannotFold(f"{what} is not finite in {np.dtype(dtype)} (overflow)")
    return cast


def few(indices) -> str:
    indices = [int(i) for i in indices]
    return ", ".join(map(str, indices[:8])) + (f" ... ({len(indices)} in all)" if len(indices) > 8 else "")
