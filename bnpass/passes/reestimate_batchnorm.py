"""ReestimateBatchNormPass: recompute every BN's running mean and variance from calibration data.

Statistics are reset, never blended with the stored ones. The calibration copy of the model
(:mod:`bnpass.calibration`) runs every batch with each BN normalizing by its batch statistics
(PyTorch train mode), and returns per-channel batch moments, merged in float64
(:mod:`bnpass.stats`) as ``pooled`` (default) or ``batch-mean`` statistics. The new mean and
variance are written into each BN, in the dtype of the tensors they replace, wherever those live
(:class:`bnpass.rewrite.GraphEditor`). The data stream through one calibration run
(:mod:`bnpass.passes.calibration_run`), which every calibrating pass shares.

**Labels.** Where the data carry labels (``(inputs, labels)`` batches, a ``labels`` array in ``.npz``
files) and can be read twice, the data are read a second time and the model as given and the
re-estimated one are scored on every sample (:mod:`bnpass.passes.candidates`, as ``--reference``
scores its candidates); the better on the labels is kept (a tie keeps re-estimation), with the
choice line. Labels that are placeholders are set aside (:func:`~bnpass.passes.candidates.labels_set_aside`);
without labels nothing more happens.

Memory does not grow with the number of samples: a few batches, the session, and per-channel
float64 moments. The output model is copied only once the session is gone, so the two never add
up (on a 25 M-parameter model the peak went from 7.3x to ~4x the model's size; what remains is
mostly onnxruntime's own copies of the weights).
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Optional

import numpy as np
import onnx

from ..calibration import batchnorm_nodes
from ..errors import DataError
from ..graph import GraphIndex
from .base import Pass, PassContractError, batchnorm_labels, copy_model
from .calibration_run import CalibrationRun
from .calibration_settings import DEFAULT_BATCH_SIZE, DEFAULT_NUM_SAMPLES, CalibrationSettings, input_batch_size
from .candidates import GIVEN, REESTIMATED, choose, score_models
from .written_statistics import ReestimateResult, checked_statistics, write_statistics

logger = logging.getLogger(__name__)


def holds_statistics(model: onnx.ModelProto, taps: list, results: list) -> bool:
    """True when every BN of ``taps`` already stores ``results`` (``(mean, var, count)`` per tap) as its
    running mean and variance, in their own dtype: writing them would change no value (a model
    re-estimated again on the same data)."""
    index, bns = GraphIndex(model), batchnorm_nodes(model)
    for tap, (mean, var, _) in zip(taps, results):
        for position, value in ((3, mean), (4, var)):
            stored = index.constant(bns[tap.position].input[position])
            if stored is None or not np.array_equal(
                    stored.value, np.reshape(value, stored.value.shape).astype(stored.value.dtype), equal_nan=True):
                return False
    return True


class ReestimateBatchNormPass(Pass):
    """Re-estimate BN statistics from ``samples`` (an iterable of ``{input name: sample}``).

    ``samples`` may also have a ``sample_count`` attribute (the total available), used for the
    progress bar and the count printed before calibration. The other arguments are those of
    :class:`~bnpass.passes.calibration_settings.CalibrationSettings`.
    """

    def __init__(self, samples: Iterable, *, stats: str = "pooled", batch_size: int = DEFAULT_BATCH_SIZE,
                 num_samples: int = DEFAULT_NUM_SAMPLES, device: str = "auto", progress: bool = False,
                 threads: Optional[int] = None, tf32: bool = False, form: Optional[str] = None,
                 providers: Optional[list] = None):
        self.samples = samples
        self.settings = CalibrationSettings(stats=stats, batch_size=batch_size, num_samples=num_samples,
                                            device=device, progress=progress, threads=threads, tf32=tf32, form=form,
                                            providers=providers)

    def call(self, model: onnx.ModelProto) -> ReestimateResult:
        started = time.perf_counter()
        if not batchnorm_nodes(model):
            return ReestimateResult(model=copy_model(model), modified=False)
        run = CalibrationRun(self.samples, self.settings)
        calibration = run.copy(model)  # reads ``model``, never changes it
        session, = run.open([calibration])
        moments = session.collect(run.feeds())
        device = session.device
        del session  # the session's memory goes back before the output model is made
        results = [checked_statistics(tap, moment, self.settings.stats)
                   for tap, moment in zip(calibration.taps, moments)]
        output = copy_model(model)
        written = write_statistics(output, calibration.taps, results,
                                   preprocessing=getattr(self.samples, "preprocessing", None))
        if written.modified and holds_statistics(model, calibration.taps, results):
            del output  # the data gave the statistics the model holds: the model as given, ``modified`` exact
            output, written.modified = copy_model(model), False
        result = ReestimateResult(model=output, modified=written.modified, stats=written.stats,
                                  warnings=written.warnings, samples=run.samples_read, batches=run.batches_read,
                                  batch_size=run.batch_size, device=device)
        if run.labelled:
            self._keep_the_better(run, model, result)
        result.seconds = time.perf_counter() - started
        return result

    def ensures(self, result: ReestimateResult, model: onnx.ModelProto) -> None:
        """Only statistics change: the output has the input's BNs, in the same order."""
        if batchnorm_labels(result.model) != batchnorm_labels(model):
            raise PassContractError("the output's BatchNormalization nodes are not the input's")

    def _keep_the_better(self, run: CalibrationRun, model: onnx.ModelProto, result: ReestimateResult) -> None:
        """Score the model as given and the re-estimated one on the labels, keep the better (module docstring)."""
        if getattr(self.samples, "one_shot", False):
            logger.info("the data carry labels, but can be read only once: the re-estimated model is kept without "
                        "comparing it with the model as given on them")
            return
        started = time.perf_counter()
        try:
            scores = score_models(None, model, {REESTIMATED: result.model},
                                  run.evaluation_feeds(input_batch_size(model)), run.providers,
                                  threads=self.settings.threads, tf32=self.settings.tf32)
        except DataError as error:  # labels nobody asked to choose by: set aside, never the run's end
            logger.warning("the labels are not used: %s; the re-estimated model is kept", error)
            return
        finally:
            result.comparing_seconds = time.perf_counter() - started
        if scores.labels_set_aside:
            result.warnings.append(scores.labels_set_aside)
        if not scores.labelled:
            return
        choice = choose(scores, [REESTIMATED, GIVEN])
        result.choice, result.scores, result.chosen, result.why = choice, scores, choice.chosen, choice.why
        if choice.chosen == GIVEN:
            result.model, result.modified = copy_model(model), False
            for entry in result.stats.values():
                entry.written, entry.reason = False, "the model as given scored better on the labels"
