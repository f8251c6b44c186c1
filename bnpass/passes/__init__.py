"""Graph passes: each a small :class:`Pass` (``pass_(model)`` runs its ``call(model)`` inside the checks of the
contract, :mod:`bnpass.passes.base`) that returns a :class:`PassResult`; :class:`Sequential` runs several."""

from .base import Pass, PassContractError, PassResult, Sequential
from .fold_batchnorm import FoldBatchNormPass, FoldResult
from .match_reference import MatchReferencePass, ReferenceResult
from .reestimate_batchnorm import ReestimateBatchNormPass
from .written_statistics import BatchNormStatistics, ReestimateResult


def calibrating_pass(samples, *, reference=None, candidate: str = "auto", keep_per_tensor: bool = False, **settings):
    """The pass that re-estimates from ``samples`` (``settings``: those of
    :class:`~bnpass.passes.calibration_settings.CalibrationSettings`): with a ``reference``, the one that
    also matches it and keeps the better ``candidate`` (``keep_per_tensor``: how its corrections fold into
    per-tensor quantized weights, as :class:`FoldBatchNormPass` takes it)."""
    if reference is not None:
        return MatchReferencePass(samples, reference, choose=candidate, keep_per_tensor=keep_per_tensor, **settings)
    return ReestimateBatchNormPass(samples, **settings)


__all__ = ["Pass", "PassContractError", "PassResult", "Sequential", "FoldBatchNormPass", "FoldResult",
           "ReestimateBatchNormPass", "ReestimateResult",
           "MatchReferencePass", "ReferenceResult", "BatchNormStatistics", "calibrating_pass"]
