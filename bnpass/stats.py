"""Per-channel moments, streamed over calibration batches and merged exactly in float64.

Each batch contributes, per channel, its element count n_b, mean m_b and sum of squared
deviations from that mean M2_b = sum (x - m_b)^2. The calibration graph returns the biased batch
variance v_b = M2_b / n_b (float32, or float64 for float64 models); M2_b = v_b * n_b is formed
here, in float64, so it carries the variance's relative precision.

``pooled`` (default) is the mean and *biased* variance of every element of every batch, as if all
batches had been concatenated (fvcore's PreciseBN). Batches merge with Chan et al.'s formula::

    n = n_a + n_b,   d = m_b - m_a,   m = m_a + d * n_b / n,   M2 = M2_a + M2_b + d^2 * n_a * n_b / n

so the split into batches changes the result only by float rounding; ``var = M2 / n``.

``batch-mean`` is the mean of batch means and the mean of *unbiased* batch variances
``M2_b / (n_b - 1)``, each batch weighted equally: ``torch.optim.swa_utils.update_bn`` (momentum
None) and AIMET's ``reestimate_bn_stats``. It ignores the spread between batch means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STATS_MODES = ("pooled", "batch-mean")


@dataclass
class ChannelMoments:
    """Running per-channel moments of one BatchNormalization input."""

    count: int = 0
    batches: int = 0
    mean: np.ndarray = None          # pooled mean
    m2: np.ndarray = None            # pooled sum of squared deviations
    sum_batch_means: np.ndarray = None
    sum_batch_unbiased_vars: np.ndarray = None
    smallest_batch: int = 0          # fewest values per channel in one batch

    def add_batch(self, batch_mean, batch_m2, batch_count: int) -> None:
        batch_mean = np.asarray(batch_mean, dtype=np.float64).reshape(-1)
        batch_m2 = np.asarray(batch_m2, dtype=np.float64).reshape(-1)
        n_b = int(batch_count)
        unbiased = batch_m2 / (n_b - 1) if n_b > 1 else np.full_like(batch_m2, np.nan)
        if self.count == 0:
            self.mean, self.m2 = batch_mean.copy(), batch_m2.copy()
            self.sum_batch_means, self.sum_batch_unbiased_vars = batch_mean.copy(), unbiased
            self.smallest_batch = n_b
        else:
            n_a = self.count
            total = n_a + n_b
            delta = batch_mean - self.mean
            self.mean = self.mean + delta * (n_b / total)
            self.m2 = self.m2 + batch_m2 + delta * delta * (n_a * n_b / total)
            self.sum_batch_means += batch_mean
            self.sum_batch_unbiased_vars += unbiased
            self.smallest_batch = min(self.smallest_batch, n_b)
        self.count += n_b
        self.batches += 1

    def add_batch_variance(self, batch_mean, batch_var, batch_count: int) -> None:
        """Add a batch given by its mean and *biased* variance (``M2_b / n_b``)."""
        batch_m2 = np.asarray(batch_var, dtype=np.float64) * int(batch_count)
        self.add_batch(batch_mean, batch_m2, batch_count)

    def result(self, mode: str):
        """``(mean, var)`` in float64 for the aggregation ``mode`` (see module docstring)."""
        if self.count == 0:
            raise ValueError("no batch was added")
        if mode == "pooled":
            return self.mean.copy(), self.m2 / self.count
        if mode == "batch-mean":
            return self.sum_batch_means / self.batches, self.sum_batch_unbiased_vars / self.batches
        raise ValueError(f"unknown statistics mode {mode!r}; expected one of {STATS_MODES}")


def drift(mean, var, base_mean, base_var, epsilon: float) -> tuple:
    """Per channel, how far moments (mean, var) are from base moments, in the base's own units (float64):
    the mean shift ``|mean - base_mean| / sqrt(base_var + e)`` and the variance ratio
    ``(var + e) / (base_var + e)``, e added on both sides as a BN adds it (the ratio is what changes
    a BN's output, and stays finite for constant channels). A zero base scale gives inf or nan."""
    mean, var, base_mean, base_var = (np.asarray(value, np.float64).reshape(-1)
                                      for value in (mean, var, base_mean, base_var))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(mean - base_mean) / np.sqrt(base_var + epsilon), (var + epsilon) / (base_var + epsilon)

