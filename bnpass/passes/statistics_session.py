"""The calibration copy of a model in one onnxruntime session, built once, run per batch.

Each run of the copy (:mod:`bnpass.calibration`) brings back, per tapped BN, the batch's mean and
variance per channel and how many values they cover; :meth:`StatisticsSession.absorb` merges them
into one :class:`~bnpass.stats.ChannelMoments` per tap, in float64. The session takes its batches
as they come (:func:`bnpass.feeding.feed_each`): cutting them to a size and counting them is the
calibration run's (:class:`~bnpass.passes.calibration_run.CalibrationRun`, whose module docstring
shows a session at work: ``moments = session.collect(run.feeds())``).
"""

from __future__ import annotations

from typing import Iterable, Optional

from ..calibration import CalibrationModel
from ..feeding import feed_each
from ..runtime import BatchRunner, create_session, session_device
from ..stats import ChannelMoments


class StatisticsSession:
    """The calibration copy ``calibration`` in one session (module docstring).

    ``release_model=True`` drops ``calibration.model`` once serialized: the session holds its own
    copy of the weights, and a third copy would only raise the peak memory on large models.
    ``tf32`` as in :func:`bnpass.runtime.create_session`.
    """

    def __init__(self, calibration: CalibrationModel, providers: list, *, threads: Optional[int] = None,
                 optimize: bool = True, profile_prefix: Optional[str] = None, release_model: bool = False,
                 tf32: bool = False):
        self.taps = calibration.taps
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
        """One empty :class:`ChannelMoments` per tap."""
        return [ChannelMoments() for _ in self.taps]

    def collect(self, feeds: Iterable) -> list:
        """The moments of every feed merged, one :class:`ChannelMoments` per tap (the next feed copied
        to the device while one runs)."""
        moments = self.new_moments()
        feed_each(feeds, self.runner, lambda _, values: self.absorb(moments, values))
        return moments

    def absorb(self, moments: list, values: list) -> None:
        """Merge one batch's session outputs (mean, var, size per tap) into ``moments``."""
        for position, tap in enumerate(self.taps):
            mean, var, size = values[3 * position: 3 * position + 3]
            moments[position].add_batch_variance(mean, var, int(size) // tap.channels)
