"""ReestimateBatchNormPass: recompute every BN's running mean and variance from calibration data.

Statistics are reset, never blended with the stored ones. The calibration copy of the model
(:mod:`bnpass.calibration`) runs every batch with each BN normalizing by its batch statistics
(PyTorch train mode), and returns per-channel batch moments, merged in float64
(:mod:`bnpass.stats`) as ``pooled`` (default) or ``batch-mean`` statistics. The new mean and
variance are written into each BN, in the dtype of the tensors they replace, wherever those live
(:class:`bnpass.rewrite.GraphEditor`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import onnx

from .. import data as calibration_data
from ..calibration import batchnorm_nodes, build_calibration_model
from ..errors import DataError
from ..graph import node_label
from ..rewrite import GraphEditor
from ..runtime import create_session, select_providers, session_device
from ..stats import STATS_MODES, ChannelMoments
from .base import PassResult, copy_model

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
    stats: dict = field(default_factory=dict)   # bn name -> BatchNormStatistics
    samples: int = 0
    batches: int = 0
    batch_size: int = 0
    device: str = ""
    seconds: float = 0.0


class ReestimateBatchNormPass:
    """Re-estimate BN statistics from ``samples`` (an iterable of ``{input name: sample}``).

    ``samples`` may also have a ``sample_count`` attribute (the total available), used for the
    progress bar and the count printed before calibration.
    """

    def __init__(self, samples: Iterable, *, stats: str = "pooled", batch_size: int = 32,
                 num_samples: int = 2000, device: str = "auto", progress: bool = False):
        if stats not in STATS_MODES:
            raise ValueError(f"stats must be one of {STATS_MODES}, not {stats!r}")
        if batch_size < 1 or num_samples < 1:
            raise ValueError("batch_size and num_samples must be positive")
        self.samples = samples
        self.stats_mode = stats
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.device = device
        self.progress = progress

    def call(self, model: onnx.ModelProto) -> ReestimateResult:
        started = time.perf_counter()
        model = copy_model(model)
        if not batchnorm_nodes(model):
            return ReestimateResult(model=model, modified=False)
        calibration = build_calibration_model(model)
        batch_size = self.batch_size
        if calibration.fixed_batch is not None and calibration.fixed_batch != batch_size:
            logger.info("batch size %d (fixed by the model)", calibration.fixed_batch)
            batch_size = calibration.fixed_batch
        limit = calibration_data.planned_sample_count(self.num_samples, batch_size)
        providers = select_providers(self.device)
        session = create_session(calibration.model, providers)
        moments = [ChannelMoments() for _ in calibration.taps]
        output_names = [name for tap in calibration.taps for name in (tap.mean, tap.m2, tap.size)]

        available = getattr(self.samples, "sample_count", None)
        expected = min(limit, available) if available is not None else limit
        logger.info("calibrating %d BatchNormalization nodes on %d samples (%s%d requested, rounded up to "
                    "whole batches of %d; %s)", len(calibration.taps), expected,
                    "" if available is None else f"{available} available, ", self.num_samples, batch_size,
                    session_device(session))
        samples = batches = 0
        progress = _progress_bar(math.ceil(expected / batch_size), self.progress)
        try:
            for feed in calibration_data.batched(self.samples, batch_size, limit):
                count = next(iter(feed.values())).shape[0]
                if calibration.fixed_batch is not None and count != calibration.fixed_batch:
                    logger.warning("dropped the last %d samples: the model's fixed batch size is %d",
                                   count, calibration.fixed_batch)
                    break
                values = session.run(output_names, feed)
                for position, tap in enumerate(calibration.taps):
                    mean, m2, size = values[3 * position: 3 * position + 3]
                    moments[position].add_batch(mean, m2, int(size) // tap.channels)
                samples += count
                batches += 1
                progress.update(1)
        finally:
            progress.close()
        if batches == 0:
            raise DataError("no calibration samples: the data source is empty")
        return self._write_statistics(model, calibration.taps, moments, ReestimateResult(
            model=model, modified=True, samples=samples, batches=batches, batch_size=batch_size,
            device=session_device(session), seconds=time.perf_counter() - started))

    def _write_statistics(self, model, taps, moments, result: ReestimateResult) -> ReestimateResult:
        editor = GraphEditor(model)
        bns = batchnorm_nodes(model)
        for tap, moment in zip(taps, moments):
            if self.stats_mode == "batch-mean" and moment.smallest_batch < 2:
                raise DataError(f"BatchNormalization '{tap.bn}' saw {moment.smallest_batch} value per channel "
                                "in a batch, so its unbiased batch variance is undefined: use a larger batch "
                                "size or --stats pooled")
            mean, var = moment.result(self.stats_mode)
            if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
                raise DataError(f"the statistics of BatchNormalization '{tap.bn}' are not finite (NaN or Inf): "
                                "check the calibration data")
            bn = bns[tap.position]
            old_mean, old_var = (editor.index.constant(name) for name in bn.input[3:5])
            entry = BatchNormStatistics(
                old_mean=None if old_mean is None else old_mean.value.astype(np.float64).reshape(-1),
                old_var=None if old_var is None else old_var.value.astype(np.float64).reshape(-1),
                mean=mean, var=var, count=moment.count)
            if old_mean is None or old_var is None:
                entry.written = False
                entry.reason = "its running mean or variance is not a constant (fed at run time)"
                logger.warning("BatchNormalization '%s': %s; left as it was", tap.bn, entry.reason)
            else:
                label = bn.name or tap.bn
                editor.set_constant_input(bn, 3, mean.reshape(old_mean.value.shape).astype(old_mean.value.dtype),
                                          f"{label}.running_mean")
                editor.set_constant_input(bn, 4, var.reshape(old_var.value.shape).astype(old_var.value.dtype),
                                          f"{label}.running_var")
            result.stats[node_label(bn)] = entry
        editor.remove_dead()
        result.modified = any(entry.written for entry in result.stats.values())
        return result


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    # disable=None lets tqdm turn itself off when stderr is not a terminal (CI logs).
    return tqdm(total=total, unit="batch", desc="calibrating", disable=None if enabled else True, leave=False)
