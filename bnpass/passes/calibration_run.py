"""One calibration run, shared by every pass that calibrates: its data, providers and statistics form,
its sessions, and the one place its batches are cut, read ahead and counted.

A pass that calibrates builds its calibration copies (:mod:`bnpass.calibration`: the compressed
model's train-mode copy, and for ``--reference`` the matched copy and the reference's observe copy)
in the run's statistics form, opens the run on them (the batch size decided,
:mod:`bnpass.passes.calibration_settings`; what will be read said,
:mod:`bnpass.passes.calibration_messages`), and feeds them :meth:`CalibrationRun.feeds`::

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    from bnpass.passes.calibration_run import CalibrationRun
    from bnpass.passes.calibration_settings import CalibrationSettings
    from bnpass.passes.written_statistics import checked_statistics, write_statistics

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2, 3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2, 3])
    parameters = [numpy_helper.from_array(np.array(value, np.float32), name)
                  for name, value in (("scale", [1, 1]), ("bias", [0, 0]), ("mean", [0, 0]), ("var", [1, 1]))]
    bn = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], name="bn")
    model = helper.make_model(helper.make_graph([bn], "g", [x], [y], parameters),
                              opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 10
    samples = [{"x": sample} for sample in np.random.default_rng(0).standard_normal((50, 2, 3)).astype(np.float32)]

    run = CalibrationRun(samples, CalibrationSettings(batch_size=8, num_samples=50, device="cpu"))
    calibration = run.copy(model)                   # in the run's statistics form
    session, = run.open([calibration])              # batch size, what is read (said), one session per copy
    moments = session.collect(run.feeds())          # read ahead in a thread, counted here once
    assert (run.samples_read, run.batches_read) == (50, 7)  # six batches of 8 and a last one of 2
    results = [checked_statistics(tap, moment, "pooled") for tap, moment in zip(calibration.taps, moments)]
    written = write_statistics(onnx.ModelProto.FromString(model.SerializeToString()), calibration.taps, results)
    assert written.stats["bn"].count == 150         # values per channel: 50 samples x 3

**What is read.** ``num_samples`` is rounded up to whole batches (as NNCF does); a source that
says how many samples it holds (``sample_count``) is checked for one batch at least, and the
line said before calibration tells how many samples will be used. Batches are read and stacked in
a background thread, one or two ahead (:func:`bnpass.feeding.prefetched`), so data loading overlaps
compute (onnxruntime releases the GIL while it runs); a model with a fixed batch takes pieces of
exactly that size (:func:`bnpass.feeding.batches_of`). The run counts what its sessions consumed
(``samples_read``, ``batches_read``); the sessions take the batches as they come
(:func:`bnpass.feeding.feed_each`). Nothing grows with the number of samples.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Iterator, Optional

import onnx

from .. import data as calibration_data
from ..calibration import CalibrationModel, build_calibration_model
from ..data import LABELS, plural
from ..errors import DataError
from ..feeding import batch_length, batches_of, prefetched
from ..progress import progress_bar
from ..runtime import select_providers
from ..statistics_forms import form_for_providers
from .calibration_messages import announce_calibration
from .calibration_settings import CalibrationSettings, common_batch_size, expected_samples
from .statistics_session import StatisticsSession

logger = logging.getLogger(__name__)


class CalibrationRun:
    """The data, providers and statistics form of one calibration, and its batches (module docstring)."""

    def __init__(self, samples: Iterable, settings: CalibrationSettings):
        self.samples = samples
        self.settings = settings
        self.providers = settings.providers if settings.providers is not None else select_providers(settings.device)
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
        self.expected = expected_samples(self.limit, available, self.batch_size, fixed=self.fixed)
        sessions = [StatisticsSession(copy, self.providers, threads=self.settings.threads, tf32=self.settings.tf32,
                                      release_model=True) for copy in copies]
        logger.debug("statistics form %s (%s)", self.form, ", ".join(
            f"{copies[0].forms.count(f)} BN {f}" for f in dict.fromkeys(copies[0].forms)))
        announce_calibration(what or plural(len(copies[0].taps), "BatchNormalization node"), sessions[0].device,
                             samples=self.samples, expected=self.expected, limit=self.limit,
                             num_samples=self.settings.num_samples, batch_size=self.batch_size, fixed=self.fixed)
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
