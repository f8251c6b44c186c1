"""What calibration writes: each BN's new statistics, checked, written into the model in place of the
old ones, and the result a calibrating pass returns with them.

:func:`checked_statistics` turns one BN's merged moments into ``(mean, var, count)`` in the
statistics mode asked for (a DataError where they cannot be trusted); :func:`write_statistics`
writes them into the model's BNs, in the dtype of the tensors they replace, wherever those live
(:class:`bnpass.rewrite.GraphEditor`), and says, once per run, what the new statistics suggest about
the data (:mod:`bnpass.diagnostics`); :mod:`bnpass.passes.calibration_run`'s example does both.
A statistic is checked before anything is written::

    import numpy as np
    from types import SimpleNamespace
    from bnpass.errors import DataError
    from bnpass.passes.written_statistics import checked_statistics
    from bnpass.stats import ChannelMoments

    moment = ChannelMoments()
    moment.add_batch_variance(np.array([0.0, 1.0]), np.array([1.0, 4.0]), 1)  # one value per channel
    tap = SimpleNamespace(bn="bn")  # what is read of a calibration tap here: its BN's name
    mean, var, count = checked_statistics(tap, moment, "pooled")
    assert count == 1 and var.tolist() == [1.0, 4.0]
    try:
        checked_statistics(tap, moment, "batch-mean")  # the unbiased variance of one value
        raise AssertionError("a DataError was expected")
    except DataError as error:
        assert "use a larger batch size or --stats pooled" in str(error)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx

from ..calibration import batchnorm_nodes
from ..diagnostics import first_batchnorms, input_shift, preprocessing_warning
from ..errors import DataError
from ..graph import node_label
from ..rewrite import GraphEditor
from ..stats import ChannelMoments
from .base import PassResult
from .fold_batchnorm import batchnorm_parameter
from .fold_reasons import CannotFold

logger = logging.getLogger(__name__)


@dataclass
class BatchNormStatistics:
    """Old and new statistics of one BN (float64), and how many values per channel were seen."""

    old_mean: Optional[np.ndarray]
    old_var: Optional[np.ndarray]
    mean: np.ndarray
    var: np.ndarray
    count: int
    written: bool = True
    reason: str = ""   # why the statistics were not written, when they were not


@dataclass
class ReestimateResult(PassResult):
    """What a calibrating pass returns: the model with its statistics written, per BN the old and
    new statistics, and what the run read."""

    stats: dict[str, BatchNormStatistics] = field(default_factory=dict)
    samples: int = 0
    batches: int = 0
    batch_size: int = 0
    device: str = ""
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # what the data looked like it got wrong
    comparing_seconds: float = 0.0  # of ``seconds``: the second reading that scored the models (0: none)
    chosen: str = ""  # where the models were compared: the one kept ("reestimated", "compressed", ...)
    why: str = ""
    choice: Optional[object] = None  # a bnpass.passes.candidates.Choice (that module is above this one)
    scores: Optional[object] = None  # a bnpass.passes.candidates.Scores


def checked_statistics(tap, moment: ChannelMoments, mode: str) -> tuple:
    """``(mean, var, count)`` of one BN in statistics ``mode``, checked."""
    if mode == "batch-mean" and moment.smallest_batch < 2:
        raise DataError(f"BatchNormalization '{tap.bn}' saw {moment.smallest_batch} value per channel "
                        "in a batch, so its unbiased batch variance is undefined: use a larger batch "
                        "size or --stats pooled")
    mean, var = moment.result(mode)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
        raise DataError(f"the statistics of BatchNormalization '{tap.bn}' are not finite (NaN or Inf): "
                        "check the calibration data")
    return mean, var, moment.count


@dataclass
class WrittenStatistics:
    """What :func:`write_statistics` did: per BN label, the old and new statistics; the warnings
    about the data; whether any BN changed."""

    stats: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    modified: bool = False


def write_statistics(model: onnx.ModelProto, taps: list, results: list, *, preprocessing=None,
                     diagnose: bool = True) -> WrittenStatistics:
    """Write ``results`` (``(mean, var, count)`` per tap) into ``model``'s BNs, in place, in the dtype of
    the tensors they replace. ``diagnose``: say the warnings about these statistics (a BN whose
    statistics are fed at run time; the preprocessing check of the first BNs, ``preprocessing`` the
    resolved image preprocessing when the data were decoded images), once per run."""
    written = WrittenStatistics()
    editor = GraphEditor(model)
    bns = batchnorm_nodes(model)
    first = first_batchnorms(model, editor.index)  # node wrappers, compared while both lists are alive
    diagnosed = []  # (bn, entry) of the first BNs written: what they say of the data is told once the edits are done
    for tap, (mean, var, count) in zip(taps, results):
        bn = bns[tap.position]
        old_mean, old_var = (_stored_statistic(bn, position, editor) for position in (3, 4))
        entry = BatchNormStatistics(
            old_mean=None if old_mean is None else old_mean.astype(np.float64).reshape(-1),
            old_var=None if old_var is None else old_var.astype(np.float64).reshape(-1),
            mean=mean, var=var, count=count)
        if old_mean is None or old_var is None:
            entry.written = False
            entry.reason = "its running mean or variance is not a constant (fed at run time)"
            if diagnose:
                logger.warning("BatchNormalization '%s': %s; left as it was", tap.bn, entry.reason)
        else:
            label = bn.name or tap.bn
            editor.set_constant_input(bn, 3, mean.reshape(old_mean.shape).astype(old_mean.dtype),
                                      f"{label}.running_mean")
            editor.set_constant_input(bn, 4, var.reshape(old_var.shape).astype(old_var.dtype),
                                      f"{label}.running_var")
        written.stats[node_label(bn)] = entry
        if diagnose and any(bn is node for node in first) and entry.written:
            diagnosed.append((bn, entry))
    editor.remove_dead()
    written.modified = any(entry.written for entry in written.stats.values())
    shifts = [input_shift(bn, entry.old_mean, entry.old_var, entry.mean, entry.var) for bn, entry in diagnosed]
    warning = preprocessing_warning(shifts, images=preprocessing)
    if warning:
        logger.warning("%s", warning)
        written.warnings.append(warning)
    return written


def _stored_statistic(bn, position: int, editor: GraphEditor) -> Optional[np.ndarray]:
    """The stored running mean (``position`` 3) or variance (4) of ``bn``, None when fed at run time:
    what the fold reads (:func:`~bnpass.passes.fold_batchnorm.batchnorm_parameter`), a float constant
    or ``DequantizeLinear`` of constants.

    A statistic behind ``DequantizeLinear`` of constants (onnxruntime's quantizer leaves them float;
    others may not) is read dequantized, in the DequantizeLinear's output type; the new one is
    written as a float initializer of that type in its place (the DequantizeLinear, then unread,
    goes): a re-estimated statistic re-rounded to the old grid would no longer be the estimate.
    """
    try:
        return batchnorm_parameter(bn, position, editor.index)
    except CannotFold:
        return None
