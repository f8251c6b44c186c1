"""Graph passes: each a small class whose ``call(model)`` returns a :class:`PassResult`."""

from .base import PassResult
from .calibration_run import BatchNormStatistics, ReestimateResult
from .fold_batchnorm import FoldBatchNormPass, FoldResult
from .reestimate_batchnorm import ReestimateBatchNormPass

__all__ = ["PassResult", "FoldBatchNormPass", "FoldResult", "ReestimateBatchNormPass",
           "ReestimateResult", "BatchNormStatistics"]
