"""The calibration copy of a model in one onnxruntime session, built once, run per batch.

Each run of the copy (:mod:`bnpass.calibration`) brings back, per tapped BN, the batch's mean and
variance per channel and how many values they cover; :meth:`StatisticsSession.absorb` merges them
into one :class:`~bnpass.stats.ChannelMoments` per tap, in float64. The session takes its batches
as they come (:func:`bnpass.feeding.feed_each`): cutting them to a size and counting them is the
calibration run's (:class:`~bnpass.passes.calibration_run.CalibrationRun`)::

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    from bnpass.calibration import build_calibration_model
    from bnpass.passes.statistics_session import StatisticsSession

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2, 3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2, 3])
    parameters = [numpy_helper.from_array(np.array(value, np.float32), name)
                  for name, value in (("scale", [1, 1]), ("bias", [0, 0]), ("mean", [0, 0]), ("var", [1, 1]))]
    bn = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], name="bn")
    model = helper.make_model(helper.make_graph([bn], "g", [x], [y], parameters),
                              opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 10
    data = np.random.default_rng(0).standard_normal((8, 2, 3)).astype(np.float32)
    session = StatisticsSession(build_calibration_model(model), ["CPUExecutionProvider"])
    moments = session.collect([{"x": data[:4]}, {"x": data[4:]}])
    mean, var = moments[0].result("pooled")
    assert np.allclose(mean, data.mean(axis=(0, 2)), atol=1e-6) and np.allclose(var, data.var(axis=(0, 2)), atol=1e-5)
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
