"""ReestimateBatchNormPass: recompute every BN's running mean and variance from calibration data.

Statistics are reset, never blended with the stored ones. The calibration copy of the model
(:mod:`bnpass.calibration`) runs every batch with each BN normalizing by its batch statistics
(PyTorch train mode), and returns per-channel batch moments, merged in float64
(:mod:`bnpass.stats`) as ``pooled`` (default) or ``batch-mean`` statistics. The new mean and
variance are written into each BN, in the dtype of the tensors they replace, wherever those live
(:class:`bnpass.rewrite.GraphEditor`).

One session is built per call and runs every batch; batches are read and stacked in a background
thread, one or two ahead, so data loading overlaps the session's compute (onnxruntime releases
the GIL while it runs). Memory does not grow with the number of samples: a few batches, the
session, and per-channel float64 moments. The output model is copied only once the session is
gone, so the two never add up (on a 25 M-parameter model the peak went from 7.3x to ~4x the
model's size; what remains is mostly onnxruntime's own copies of the weights).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np
import onnx

from .. import data as calibration_data
from ..calibration import CalibrationModel, batchnorm_nodes, build_calibration_model, form_for_providers
from ..data import plural
from ..diagnostics import first_batchnorms, input_shift, preprocessing_warning
from ..errors import DataError, ModelError
from ..graph import node_label
from ..progress import progress_bar
from ..rewrite import GraphEditor
from ..runtime import BatchRunner, create_session, select_providers, session_device
from ..stats import STATS_MODES, ChannelMoments
from .base import PassResult, copy_model

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
DEFAULT_NUM_SAMPLES = 2000  # NNCF's default num_bn_adaptation_samples
SMALL_BATCH = 8     # fewer samples per batch make train-mode normalization noisy
FEW_SAMPLES = 100   # fewer samples in all make the statistics themselves noisy


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
    stats: dict[str, BatchNormStatistics] = field(default_factory=dict)
    samples: int = 0
    batches: int = 0
    batch_size: int = 0
    device: str = ""
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # what the data looked like it got wrong


class ReestimateBatchNormPass:
    """Re-estimate BN statistics from ``samples`` (an iterable of ``{input name: sample}``).

    ``samples`` may also have a ``sample_count`` attribute (the total available), used for the
    progress bar and the count printed before calibration. ``threads`` is onnxruntime's intra-op
    thread count (None: its default, one per physical core). ``tf32=True`` lets the CUDA provider
    run float32 convolutions in TF32 (faster, less exact; off by default). ``form`` forces the
    calibration graph's statistics form (:data:`bnpass.calibration.FORMS`), for measurements;
    None picks the one made for the provider (:data:`bnpass.calibration.FORM_FOR_PROVIDER`).
    """

    def __init__(self, samples: Iterable, *, stats: str = "pooled", batch_size: int = DEFAULT_BATCH_SIZE,
                 num_samples: int = DEFAULT_NUM_SAMPLES, device: str = "auto", progress: bool = False,
                 threads: Optional[int] = None, tf32: bool = False, form: Optional[str] = None):
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
        self.threads = threads
        self.tf32 = tf32
        self.form = form

    def call(self, model: onnx.ModelProto) -> ReestimateResult:
        started = time.perf_counter()
        if not batchnorm_nodes(model):
            return ReestimateResult(model=copy_model(model), modified=False)
        providers = select_providers(self.device)
        form = self.form or form_for_providers(providers)
        calibration = build_calibration_model(model, form)  # reads ``model``, never changes it
        batch_size = self._batch_size([calibration])
        limit, expected = self._selection(batch_size, fixed=calibration.fixed_batch is not None)
        statistics = StatisticsSession(calibration, providers, threads=self.threads, tf32=self.tf32,
                                       release_model=True)
        logger.debug("statistics form %s (%s)", form, ", ".join(
            f"{calibration.forms.count(f)} BN {f}" for f in dict.fromkeys(calibration.forms)))
        self._announce(len(calibration.taps), batch_size, limit, expected, statistics.device,
                       fixed=calibration.fixed_batch is not None)
        progress = progress_bar(math.ceil(expected / batch_size) if expected is not None else None,
                                self.progress, "calibrating")
        try:
            moments, samples, batches = statistics.collect(
                prefetched(calibration_data.batched(self.samples, batch_size, limit)), progress=progress)
        finally:
            progress.close()
        if batches == 0:
            raise DataError("no calibration samples: the data source is empty")
        device = statistics.device
        del statistics  # the session's memory goes back before the output model is made
        results = [self._result(tap, moment) for tap, moment in zip(calibration.taps, moments)]
        return self._write_statistics(copy_model(model), calibration.taps, results, ReestimateResult(
            model=None, modified=True, samples=samples, batches=batches, batch_size=batch_size,
            device=device, seconds=time.perf_counter() - started))

    # --- steps the reference pass shares -----------------------------------------------------
    def _batch_size(self, calibrations: list) -> int:
        """The batch size: the one asked for, or the one the model fixes (the same in every copy)."""
        fixed = {calibration.fixed_batch for calibration in calibrations if calibration.fixed_batch is not None}
        if len(fixed) > 1:
            raise ModelError(f"the models fix different batch sizes {sorted(fixed)}; they must take the same batches")
        if fixed:
            batch_size = fixed.pop()
            if batch_size != self.batch_size:
                logger.info("batch size %d (fixed by the model)", batch_size)
            return batch_size
        return self.batch_size

    def _selection(self, batch_size: int, *, fixed: bool) -> tuple:
        """``(limit, expected)``: at most how many samples are read, and how many will be used (None
        when the source does not say how many it holds). Too few for one batch is an error."""
        limit = calibration_data.planned_sample_count(self.num_samples, batch_size)
        available = getattr(self.samples, "sample_count", None)
        if available is not None and available < batch_size:
            raise DataError(f"the calibration data holds {plural(available, 'sample')}, fewer than one batch of "
                            f"{batch_size}: add data or lower the batch size")
        return limit, _expected_samples(limit, available, batch_size, fixed=fixed)

    def _announce(self, batchnorms: int, batch_size: int, limit: int, expected: Optional[int], device: str, *,
                  fixed: bool) -> None:
        """The line saying what calibration is about to do, and warnings about the data."""
        available = getattr(self.samples, "sample_count", None)
        logger.info("calibrating %s on %s (%s; %s)", plural(batchnorms, "BatchNormalization node"),
                    _describe_selection(expected, available, limit),
                    _describe_request(self.num_samples, limit, available, batch_size), device)
        for line in (_small_data_advice(expected, batch_size, fixed=fixed),
                     calibration_data.order_advice(self.samples, expected)):
            if line:
                logger.warning("%s", line)

    def _result(self, tap, moment: ChannelMoments) -> tuple:
        """``(mean, var, count)`` of one BN in this pass's statistics mode, checked."""
        if self.stats_mode == "batch-mean" and moment.smallest_batch < 2:
            raise DataError(f"BatchNormalization '{tap.bn}' saw {moment.smallest_batch} value per channel "
                            "in a batch, so its unbiased batch variance is undefined: use a larger batch "
                            "size or --stats pooled")
        mean, var = moment.result(self.stats_mode)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
            raise DataError(f"the statistics of BatchNormalization '{tap.bn}' are not finite (NaN or Inf): "
                            "check the calibration data")
        return mean, var, moment.count

    def _write_statistics(self, model, taps, results: list, result: ReestimateResult, *,
                          diagnose: bool = True) -> ReestimateResult:
        """Write ``results`` (``(mean, var, count)`` per tap) into ``model``'s BNs, in place; fill and
        return ``result`` with the model, each BN's old and new statistics and (``diagnose``: the
        re-estimated statistics, said once per run) the warnings about the data."""
        editor = GraphEditor(model)
        bns = batchnorm_nodes(model)
        first = first_batchnorms(model, editor.index)  # node wrappers, compared while both lists are alive
        shifts = []
        for tap, (mean, var, count) in zip(taps, results):
            bn = bns[tap.position]
            old_mean, old_var = (editor.index.constant(name) for name in bn.input[3:5])
            entry = BatchNormStatistics(
                old_mean=None if old_mean is None else old_mean.value.astype(np.float64).reshape(-1),
                old_var=None if old_var is None else old_var.value.astype(np.float64).reshape(-1),
                mean=mean, var=var, count=count)
            if old_mean is None or old_var is None:
                entry.written = False
                entry.reason = "its running mean or variance is not a constant (fed at run time)"
                if diagnose:
                    logger.warning("BatchNormalization '%s': %s; left as it was", tap.bn, entry.reason)
            else:
                label = bn.name or tap.bn
                editor.set_constant_input(bn, 3, mean.reshape(old_mean.value.shape).astype(old_mean.value.dtype),
                                          f"{label}.running_mean")
                editor.set_constant_input(bn, 4, var.reshape(old_var.value.shape).astype(old_var.value.dtype),
                                          f"{label}.running_var")
            result.stats[node_label(bn)] = entry
            if diagnose and any(bn is node for node in first) and entry.written:
                shifts.append(input_shift(bn, entry.old_mean, entry.old_var, mean, var))
        warning = preprocessing_warning(shifts, images=getattr(self.samples, "preprocessing", None))
        if warning:
            logger.warning("%s", warning)
            result.warnings.append(warning)
        editor.remove_dead()
        result.model = model
        result.modified = any(entry.written for entry in result.stats.values())
        return result


def _expected_samples(limit: int, available: Optional[int], batch_size: int, *, fixed: bool) -> Optional[int]:
    """How many samples calibration will use: None when the source does not say how many it holds.
    A model with a fixed batch size drops the short last batch."""
    if available is None:
        return None
    count = min(limit, available)
    return count - count % batch_size if fixed else count


def _describe_selection(expected: Optional[int], available: Optional[int], limit: int) -> str:
    if available is None:
        return f"up to {plural(limit, 'sample')} from the data source"
    if expected == available:
        return f"all {plural(available, 'available sample')}" if available > 1 else "the only sample"
    return f"{expected} of the {plural(available, 'available sample')}"


def _describe_request(num_samples: int, limit: int, available: Optional[int], batch_size: int) -> str:
    if limit == num_samples or (available is not None and available < limit):
        return f"{num_samples} requested, batches of {batch_size}"
    return f"{num_samples} requested, rounded up to whole batches of {batch_size}"


def _small_data_advice(expected: Optional[int], batch_size: int, *, fixed: bool) -> str:
    """A warning when batches or the whole set are too small for trustworthy statistics, else ""."""
    problems = []
    if batch_size < SMALL_BATCH and not fixed:  # a fixed batch gets its own warning from calibration
        problems.append(f"batches of {plural(batch_size, 'sample')}: during calibration every BN normalizes with its "
                        f"batch's statistics, as in training, and those of fewer than {SMALL_BATCH} samples are "
                        "noisy (use batches of 32 or more)")
    if expected is not None and expected < FEW_SAMPLES:
        problems.append(f"{plural(expected, 'sample')} in all is little to estimate statistics from "
                        f"(NNCF uses {DEFAULT_NUM_SAMPLES})")
    return "; ".join(problems)


class StatisticsSession:
    """The calibration copy of a model in one onnxruntime session, built once, run per batch.

    ``collect(feeds)`` streams feeds ``{input name: batch}`` through it and merges each BN's
    batch moments in float64; it returns ``(moments, samples, batches)``, one
    :class:`ChannelMoments` per tap. A model with a fixed batch size stops at the first batch
    of another size (the short last one), with a warning. ``release_model=True`` drops
    ``calibration.model`` once serialized: the session holds its own copy of the weights, and a
    third copy would only raise the peak memory on large models. ``tf32`` as in
    :func:`bnpass.runtime.create_session`.
    """

    def __init__(self, calibration: CalibrationModel, providers: list, *, threads: Optional[int] = None,
                 optimize: bool = True, profile_prefix: Optional[str] = None, release_model: bool = False,
                 tf32: bool = False):
        self.taps, self.fixed_batch = calibration.taps, calibration.fixed_batch
        model = calibration.model
        if release_model:
            calibration.model = None
        self.session = create_session(model, providers, optimize=optimize, threads=threads,
                                      memory_pattern=False, profile_prefix=profile_prefix, tf32=tf32)
        del model
        self.device = session_device(self.session)
        names = [name for tap in self.taps for name in (tap.mean, tap.var, tap.size)]
        self.runner = BatchRunner(self.session, names)

    def collect(self, feeds: Iterable, *, progress=None):
        taps, fixed_batch = self.taps, self.fixed_batch
        moments = [ChannelMoments() for _ in taps]
        samples = batches = 0
        feeds = iter(feeds)

        results = self.runner.run_all(fixed_size_batches(feeds, fixed_batch))
        try:
            for feed, values in results:
                count = next(iter(feed.values())).shape[0]
                self.absorb(moments, values)
                samples += count
                batches += 1
                if progress is not None:
                    progress.update(1)
        finally:
            results.close()  # waits for a copy in flight, which reads ``feeds``
            close = getattr(feeds, "close", None)
            if close is not None:
                close()  # a prefetching generator stops its loading thread
        return moments, samples, batches

    def absorb(self, moments: list, values: list) -> None:
        """Merge one batch's session outputs (mean, var, size per tap) into ``moments``."""
        for position, tap in enumerate(self.taps):
            mean, var, size = values[3 * position: 3 * position + 3]
            moments[position].add_batch_variance(mean, var, int(size) // tap.channels)


def fixed_size_batches(feeds: Iterable, fixed_batch: Optional[int]) -> Iterator[dict]:
    """``feeds`` up to the first whose size is not ``fixed_batch`` (the short last batch), with a
    warning; all of them when ``fixed_batch`` is None."""
    for feed in feeds:
        count = next(iter(feed.values())).shape[0]
        if fixed_batch is not None and count != fixed_batch:
            logger.warning("dropped the last %d samples: the model's fixed batch size is %d", count, fixed_batch)
            return
        yield feed


def prefetched(items: Iterable, depth: int = 2):
    """Yield ``items``, produced in a background thread up to ``depth`` items ahead.

    An exception raised while producing an item is re-raised here, in the consumer's thread,
    when that item would have come. Closing the generator (or leaving a ``for`` loop over it)
    stops the thread and waits for it, so the source is never read after this returns.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def offer(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((end, None))
        except BaseException as error:  # handed over to the consumer, raised there
            offer((None, error))

    thread = threading.Thread(target=produce, name="bnpass-calibration-data", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()
