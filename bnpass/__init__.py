"""bnpass: re-estimate BatchNormalization statistics of an ONNX model, then fold BN away.

Python API::

    import onnx, bnpass
    model = onnx.load("in.onnx")
    result = bnpass.reestimate_batchnorms(model, "calib/")   # or an iterable of batches
    folded = bnpass.fold_batchnorms(result.model)
    onnx.save(folded.model, "out.onnx")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import BnpassError, DataError, ModelError, RuntimeUnavailableError, SessionError
from .version import __version__  # noqa: F401  (bnpass.__version__)

# Loaded on first use: importing onnx, numpy and onnxruntime takes seconds, and the command
# (bnpass.entry) must be able to say "interrupted" in one line from its first instant.
_LAZY = {
    "reestimate_batchnorms": "api", "fold_batchnorms": "api", "calibration_samples": "api",
    "ImageOptions": "images",
    "FoldResult": "passes", "ReestimateResult": "passes", "ReferenceResult": "passes",
    "BatchNormStatistics": "passes",
}

__all__ = [
    "reestimate_batchnorms", "fold_batchnorms", "calibration_samples", "ImageOptions",
    "FoldResult", "ReestimateResult", "ReferenceResult", "BatchNormStatistics",
    "BnpassError", "ModelError", "DataError", "RuntimeUnavailableError", "SessionError",
]

if TYPE_CHECKING:
    from .api import calibration_samples, fold_batchnorms, reestimate_batchnorms  # noqa: F401
    from .images import ImageOptions  # noqa: F401
    from .passes import BatchNormStatistics, FoldResult, ReestimateResult, ReferenceResult  # noqa: F401


def __getattr__(name: str):
    """``bnpass.reestimate_batchnorms`` and the other API names, imported when first asked for (and
    ``bnpass.passes``, ``bnpass.runtime``..., the submodules, as after an eager import)."""
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted({*__all__, "__version__"})
