"""What a calibration run tells the user before it reads anything: one line saying what is calibrated,
on how many samples, in what batches and on which device, then a warning where the batches or the
whole set are too small for trustworthy statistics, or the data look sorted by class::

    import logging
    from bnpass.passes.calibration_messages import announce_calibration

    class Source(list):  # a source that says how many samples it holds
        sample_count = 70

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    announce_calibration("3 BatchNormalization nodes", "CPU", samples=Source(), expected=56, limit=56,
                         num_samples=50, batch_size=8, fixed=False)
    # INFO calibrating 3 BatchNormalization nodes on 56 of the 70 available samples (50 requested,
    #     rounded up to whole batches of 8; CPU)
    # WARNING 56 samples in all is little to estimate statistics from (NNCF uses 2000)
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

from .. import data as calibration_data
from ..data import plural
from .calibration_settings import DEFAULT_NUM_SAMPLES

logger = logging.getLogger(__name__)

SMALL_BATCH = 8     # fewer samples per batch make train-mode normalization noisy
FEW_SAMPLES = 100   # fewer samples in all make the statistics themselves noisy


def announce_calibration(what: str, device: str, *, samples: Iterable, expected: Optional[int], limit: int,
                         num_samples: int, batch_size: int, fixed: bool) -> None:
    """Say what calibration is about to do (``what`` on ``device``: ``expected`` of ``samples``, read up
    to ``limit`` for ``num_samples`` asked for), and warn about the data."""
    available = getattr(samples, "sample_count", None)
    logger.info("calibrating %s on %s (%s; %s)", what, _describe_selection(expected, available, limit),
                _describe_request(num_samples, limit, available, batch_size), device)
    for line in (small_data_advice(expected, batch_size, fixed=fixed),
                 calibration_data.order_advice(samples, expected)):
        if line:
            logger.warning("%s", line)


def small_data_advice(expected: Optional[int], batch_size: int, *, fixed: bool) -> str:
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
