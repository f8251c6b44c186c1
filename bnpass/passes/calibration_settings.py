"""How a pass calibrates (:class:`CalibrationSettings`), and the batch rule, here alone.

**The batch rule.** The batch size is the one asked for, unless the models fix one (a calibration
copy whose batch dimension could not be freed, or, for running the models as they are, an input
with a fixed first dimension): then that one, the same for every model, or a ModelError. Data for a
model with a fixed batch come in pieces of exactly that size (:func:`bnpass.feeding.batches_of`);
what is left over is dropped, with one warning saying how many samples.

**What is read.** ``num_samples`` is rounded up to whole batches (as NNCF does,
:func:`bnpass.data.planned_sample_count`); of a source that says how many samples it holds,
:func:`expected_samples` is how many calibration will use::

    from bnpass.passes.calibration_settings import CalibrationSettings, common_batch_size, expected_samples

    settings = CalibrationSettings(batch_size=32, num_samples=100, providers=["CPUExecutionProvider"])
    assert common_batch_size([None, None], settings.batch_size) == 32   # no model fixes one
    assert common_batch_size([None, 8], settings.batch_size) == 8       # one copy fixes 8
    assert expected_samples(128, 70, 8, fixed=True) == 64               # the short last batch dropped
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional

import onnx

from ..data import model_input_specs
from ..errors import ModelError
from ..stats import STATS_MODES

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
DEFAULT_NUM_SAMPLES = 2000  # NNCF's default num_bn_adaptation_samples


@dataclass
class CalibrationSettings:
    """How a pass calibrates. ``threads``: onnxruntime's intra-op threads (None: its default);
    ``tf32``: let the CUDA provider run float32 convolutions in TF32 (faster, less exact);
    ``form``: force the calibration graph's statistics form (:data:`bnpass.calibration.FORMS`),
    for measurements; None picks the one made for the provider. ``providers``: onnxruntime's
    providers, already chosen (:func:`bnpass.runtime.select_providers`) by a caller that needed them
    first; None: chosen from ``device`` when the run starts."""

    stats: str = "pooled"
    batch_size: int = DEFAULT_BATCH_SIZE
    num_samples: int = DEFAULT_NUM_SAMPLES
    device: str = "auto"
    progress: bool = False
    threads: Optional[int] = None
    tf32: bool = False
    form: Optional[str] = None
    providers: Optional[list] = None

    def __post_init__(self):
        if self.stats not in STATS_MODES:
            raise ValueError(f"stats must be one of {STATS_MODES}, not {self.stats!r}")
        if self.batch_size < 1 or self.num_samples < 1:
            raise ValueError("batch_size and num_samples must be positive")


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


def expected_samples(limit: int, available: Optional[int], batch_size: int, *, fixed: bool) -> Optional[int]:
    """How many samples calibration will use of the ``available`` ones (None when the source does not
    say how many it holds), reading up to ``limit``. A model with a fixed batch size drops the short
    last batch."""
    if available is None:
        return None
    count = min(limit, available)
    return count - count % batch_size if fixed else count
