"""One calibration run, shared by every pass that calibrates.

A pass that calibrates builds its calibration copies (:mod:`bnpass.calibration`: the compressed
model's train-mode copy, and for ``--reference`` the matched copy and the reference's observe copy)
in the run's statistics form, opens the run on them, and consumes its batches::

    run = CalibrationRun(samples, settings)         # providers and statistics form, chosen once
    copy = run.copy(model)
    session, = run.open([copy])                     # batch size, what is read, one session per copy
    for feed in run.feeds():                        # prefetched; the progress bar; counted
        session.absorb(moments, session.runner.run(feed))
    mean, var, count = checked_statistics(tap, moment, settings.stats)
    written = write_statistics(model_copy, copy.taps, results, ...)

**The batch rule, here alone.** The batch size is the one asked for, unless the models fix one
(a calibration copy whose batch dimension could not be freed, or, for running the models as they
are, an input with a fixed first dimension): then that one, the same for every model, or a
ModelError. Data for a model with a fixed batch come in pieces of exactly that size
(:func:`batches_of`); what is left over is dropped, with one warning saying how many samples.

**What is read.** ``num_samples`` is rounded up to whole batches (as NNCF does); a source that
says how many samples it holds (``sample_count``) is checked for one batch at least, and the
line said before calibration tells how many samples will be used. Batches are read and stacked in
a background thread, one or two ahead (:func:`prefetched`), so data loading overlaps compute
(onnxruntime releases the GIL while it runs). Nothing grows with the number of samples.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np
import onnx

from .. import data as calibration_data
from ..calibration import CalibrationModel, batchnorm_nodes, build_calibration_model
from ..data import LABELS, model_input_specs, plural
from ..diagnostics import first_batchnorms, input_shift, preprocessing_warning
from ..errors import DataError, ModelError
from ..graph import node_label
from ..progress import progress_bar
from ..rewrite import GraphEditor
from ..runtime import BatchRunner, create_session, select_providers, session_device
from ..statistics_forms import form_for_providers
from ..stats import STATS_MODES, ChannelMoments
from .base import PassResult
from .fold_batchnorm import batchnorm_parameter
from .fold_reasons import CannotFold

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
DEFAULT_NUM_SAMPLES = 2000  # NNCF's default num_bn_adaptation_samples
SMALL_BATCH = 8     # fewer samples per batch make train-mode normalization noisy
FEW_SAMPLES = 100   # fewer samples in all make the statistics themselves noisy


@dataclass
class CalibrationSettings:
    """How a pass calibrates. ``threads``: onnxruntime's intra-op threads (None: its default);
    ``tf32``: let the CUDA provider run float32 convolutions in TF32 (faster, less exact);
    ``form``: force the calibration graph's statistics form (:data:`bnpass.calibration.FORMS`),
    for measurements; None picks the one made for the provider."""

    stats: str = "pooled"
    batch_size: int = DEFAULT_BATCH_SIZE
    num_samples: int = DEFAULT_NUM_SAMPLES
    device: str = "auto"
    progress: bool = False
    threads: Optional[int] = None
    tf32: bool = False
    form: Optional[str] = None

    def __post_init__(self):
        if self.stats not in STATS_MODES:
            raise ValueError(f"stats must be one of {STATS_MODES}, not {self.stats!r}")
        if self.batch_size < 1 or self.num_samples < 1:
            raise ValueError("batch_size and num_samples must be positive")


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


class CalibrationRun:
    """The data, providers and statistics form of one calibration, and its batches (module docstring)."""

    def __init__(self, samples: Iterable, settings: CalibrationSettings):
        self.samples = samples
        self.settings = settings
        self.providers = select_providers(settings.device)
        self.form = settings.form or form_for_providers(self.providers)
        self.batch_size = settings.batch_size
        self.fixed = False
        self.limit = self.expected = None
        self.samples_read = self.batches_read = 0
        self.labelled = False  # whether the batches read carried labels

    def copy(self, model: onnx.ModelProto, **options) -> CalibrationModel:
        """The calibration copy of ``model`` in this run's form (``options``: mode, targets)."""
        return build_calibration_model(model, self.form, **options)

    def open(self, copies: list, *, what: Optional[str] = None) -> list:
        """Decide the batch size and what is read, say it, and open one :class:`StatisticsSession`
        per copy (each copy's model is released to its session). ``what`` names what is calibrated
        (default: the first copy's BatchNormalization nodes)."""
        self.batch_size = common_batch_size([copy.fixed_batch for copy in copies], self.settings.batch_size)
        self.fixed = any(copy.fixed_batch is not None for copy in copies)
        self.limit = calibration_data.planned_sample_count(self.settings.num_samples, self.batch_size)
        available = getattr(self.samples, "sample_count", None)
        if available is not None and available < self.batch_size:
            raise DataError(f"the calibration data holds {plural(available, 'sample')}, fewer than one batch of "
                            f"{self.batch_size}: add data or lower the batch size")
        self.expected = _expected_samples(self.limit, available, self.batch_size, fixed=self.fixed)
        sessions = [StatisticsSession(copy, self.providers, threads=self.settings.threads, tf32=self.settings.tf32,
                                      release_model=True) for copy in copies]
        logger.debug("statistics form %s (%s)", self.form, ", ".join(
            f"{copies[0].forms.count(f)} BN {f}" for f in dict.fromkeys(copies[0].forms)))
        self._announce(what or plural(len(copies[0].taps), "BatchNormalization node"), sessions[0].device)
        return sessions

    def feeds(self) -> Iterator[dict]:
        """The calibration batches, prefetched, each counted once consumed; a DataError when the
        source held none. Leaving the loop early stops the loading thread."""
        expected = self.expected
        progress = progress_bar(math.ceil(expected / self.batch_size) if expected is not None else None,
                                self.settings.progress, "calibrating")
        batches = calibration_data.batched(self.samples, self.batch_size, self.limit)
        feeds = prefetched(batches_of(batches, self.batch_size if self.fixed else None))
        try:
            for feed in feeds:
                self.labelled = self.labelled or LABELS in feed
                yield {name: array for name, array in feed.items() if name != LABELS}
                self.samples_read += batch_length(feed)
                self.batches_read += 1
                progress.update(1)
        finally:
            feeds.close()  # stops the loading thread
            progress.close()
        if self.batches_read == 0:
            raise DataError("no calibration samples: the data source is empty")

    def require_second_reading(self, why: str) -> None:
        """A DataError, before anything runs, when the data can be read only once."""
        if getattr(self.samples, "one_shot", False):
            raise DataError(f"{why} reads the calibration data twice, but they come from a one-shot iterator or "
                            "generator: give a folder, a list, a DataLoader or a loader function")

    def evaluation_feeds(self, size: Optional[int]) -> Iterator[dict]:
        """The samples calibration used, read again (labels kept under :data:`bnpass.data.LABELS`), in
        batches for running the models as they are: cut to ``size`` when their inputs fix it."""
        progress = progress_bar(self.batches_read, self.settings.progress, "comparing")
        batches = calibration_data.batched(self.samples, self.batch_size, self.samples_read)
        feeds = prefetched(batches_of(batches, size))
        try:
            for feed in feeds:
                yield feed
                progress.update(1)
        finally:
            feeds.close()
            progress.close()

    def _announce(self, what: str, device: str) -> None:
        """The line saying what calibration is about to do, and warnings about the data."""
        available = getattr(self.samples, "sample_count", None)
        logger.info("calibrating %s on %s (%s; %s)", what,
                    _describe_selection(self.expected, available, self.limit),
                    _describe_request(self.settings.num_samples, self.limit, available, self.batch_size), device)
        for line in (_small_data_advice(self.expected, self.batch_size, fixed=self.fixed),
                     calibration_data.order_advice(self.samples, self.expected)):
            if line:
                logger.warning("%s", line)


def common_batch_size(fixed: Iterable[Optional[int]], asked: Optional[int]) -> Optional[int]:
    """The batch size: the one the models fix (``fixed``, None where free; the same for all, else a
    ModelError), else ``asked``."""
    sizes = sorted({size for size in fixed if size is not None})
    if len(sizes) > 1:
        raise ModelError(f"the models fix different batch sizes {sizes}; they must take the same batches")
    if sizes:
        if asked is not None and sizes[0] != asked:
            logger.info("batch size %d (fixed by the model)", sizes[0])
        return sizes[0]
    return asked


def input_batch_size(*models: onnx.ModelProto) -> Optional[int]:
    """The batch size the models' own inputs fix (None when free): data run through the models as
    they are must come in it."""
    return common_batch_size((spec.shape[0] for model in models for spec in model_input_specs(model)
                              if spec.shape and spec.shape[0] is not None), None)


def batch_length(feed: dict) -> int:
    return next(iter(feed.values())).shape[0]


def batches_of(feeds: Iterable, size: Optional[int]) -> Iterator[dict]:
    """``feeds`` as they are (``size`` None), else cut into pieces of exactly ``size`` samples; what is
    left over (the short last batch) is dropped, with one warning."""
    dropped = 0
    try:
        for feed in feeds:
            count = batch_length(feed)
            if size is None:
                yield feed
                continue
            for start in range(0, count - size + 1, size):
                yield feed if count == size else {name: array[start:start + size] for name, array in feed.items()}
            dropped += count % size
    finally:
        if dropped:
            logger.warning("dropped the last %d samples: the model's fixed batch size is %d", dropped, size)


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
    shifts = []
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
            shifts.append(input_shift(bn, entry.old_mean, entry.old_var, mean, var))
    warning = preprocessing_warning(shifts, images=preprocessing)
    if warning:
        logger.warning("%s", warning)
        written.warnings.append(warning)
    editor.remove_dead()
    written.modified = any(entry.written for entry in written.stats.values())
    return written


def _stored_statistic(bn, position: int, editor: GraphEditor) -> Optional[np.ndarray]:
    """The stored running mean (``position`` 3) or variance (4) of ``bn``, None when fed at run time.

    A statistic behind ``DequantizeLinear`` of constants (onnxruntime's quantizer leaves them float;
    others may not) is read dequantized, in the DequantizeLinear's output type; the new one is
    written as a float initializer of that type in its place (the DequantizeLinear, then unread,
    goes): a re-estimated statistic re-rounded to the old grid would no longer be the estimate.
    """
    constant = editor.index.constant(bn.input[position])
    if constant is not None:
        return constant.value
    try:
        return batchnorm_parameter(bn, position, editor.index)
    except CannotFold:
        return None


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
    :class:`ChannelMoments` per tap. ``release_model=True`` drops ``calibration.model`` once
    serialized: the session holds its own copy of the weights, and a third copy would only raise
    the peak memory on large models. ``tf32`` as in :func:`bnpass.runtime.create_session`.
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

    def new_moments(self) -> list:
        return [ChannelMoments() for _ in self.taps]

    def collect(self, feeds: Iterable, *, progress=None):
        """Every feed through the session (the next copied to the device while one runs), the moments
        merged; a model with a fixed batch size takes only pieces of that size (:func:`batches_of`)."""
        moments = self.new_moments()
        samples = batches = 0
        feeds = iter(feeds)
        results = self.runner.run_all(batches_of(feeds, self.fixed_batch))
        try:
            for feed, values in results:
                self.absorb(moments, values)
                samples += batch_length(feed)
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
