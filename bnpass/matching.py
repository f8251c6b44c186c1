"""Matching a reference model: new BN statistics that reproduce the uncompressed model's BN outputs.

A BN computes ``y = gamma (x - mu) / sqrt(v + e) + beta`` per channel. Let (mu_r, v_r) be its stored
statistics and e its epsilon, (m_o, v_o) the mean and biased variance of its input in the
**uncompressed** (reference) model on the calibration data, and (m_c, v_c) those of the same BN's
input in the **compressed** model, measured with every upstream BN already matched. The matched
statistics (mu', v') make ``(x_c - mu') / sqrt(v' + e)`` have the mean and variance that
``(x_o - mu_r) / sqrt(v_r + e)`` has::

    sqrt(v' + e) = sqrt(v_c) * sqrt(v_r + e) / sqrt(v_o),      v' = max(that^2 - e, 0)
    mu'          = m_c - sqrt(v' + e) * (m_o - mu_r) / sqrt(v_r + e)

Computed as below, with ``ratio = v_c / v_o`` and ``k = sqrt(v' + e) / sqrt(v_r + e)``; the same
values, but matching a model against itself (ratio = 1, k = 1) returns (mu_r, v_r) exactly rather
than to rounding, and a small v_r next to a large e loses no digits::

    v'  = max(v_r * ratio + e * (ratio - 1), 0)
    mu' = mu_r + (m_c - m_o) + (1 - k) * (m_o - mu_r)

Channels where the formula does not apply get a rule of their own (:class:`MatchRule`), so a
report can say what happened to which channel. A variance counts as zero ("the channel is
constant") when ``v <= tolerance^2 * max(m^2, v_r + e)``: its spread is below ``tolerance`` of
both its own mean (the rounding of a float32 mean leaves that much on a constant channel) and
the BN's stored scale. In every rule the output **mean** is matched exactly; only the spread can
differ from the reference's.

=====================  ==========================================  =================================
rule                   when                                        new statistics
=====================  ==========================================  =================================
MATCHED                the formula applies                         (mu', v') above
CLAMPED                ``that^2 - e < 0``: the compressed input    v' = 0, mu' from the actual
                       spreads less, relative to the reference's,  scale sqrt(e): the output spread
                       than e allows a BN to amplify               is smaller than the reference's
REFERENCE_CONSTANT     v_o = 0 < v_c: no finite scale gives the    v' = v_r (the stored scale),
                       compressed channel the reference's zero     mu' = mu_r + m_c - m_o
                       spread
COMPRESSED_CONSTANT    v_c = 0 < v_o: compression killed the       v' = v_r, mu' = mu_r + m_c - m_o:
                       channel; no scale restores its spread       the formula would set v' = 0 and
                                                                   amplify any variation the
                                                                   calibration data missed by
                                                                   1/sqrt(e)
BOTH_CONSTANT          v_o = v_c = 0                               v' = v_r, mu' = mu_r + m_c - m_o:
                                                                   the constant output is reproduced
ZERO_STORED_SCALE      v_r + e = 0: the stored BN divides by zero  (mu_r, v_r) unchanged, as the
                       (e = 0 and v_r = 0)                         reference computes it
BOUNDED                ``ratio < min_ratio`` (given): the channel  ratio = min_ratio: the gain
                       spreads so much less than the reference's   sqrt(v_o / v_c) the formula would
                       that the formula would amplify it by more   apply is capped at
                       than ``1 / sqrt(min_ratio)``                1 / sqrt(min_ratio)
=====================  ==========================================  =================================

``min_ratio`` is 0 (no bound) for the BNs of a model; the layer correction of
:mod:`bnpass.passes.correct_layers` bounds the gain of the BNs it inserts (see there why).

e = 0 needs no rule of its own: v' = v_r * ratio is never negative. Non-finite or negative inputs
are errors (:class:`~bnpass.errors.DataError` for measured moments, :class:`~bnpass.errors.ModelError`
for stored statistics and epsilon), naming the quantity and the first bad channel.

**The per-batch form.** The one-pass calibration graph applies the same formula inside
onnxruntime (the nodes of :mod:`bnpass.matching_graph`, tested against this module's) to each
batch's moments of both models (each compressed BN then normalizes with its
batch-matched statistics, as a train-mode BN normalizes with its batch statistics), and the final
statistics come from the pooled moments. :func:`match_batch_statistics` is that computation in
numpy, op for op, in the dtype it is given (float32 in the graph), without validation or rules
beyond what the graph can express: each line of it names the ONNX op that computes it. With one
batch holding every sample, batch moments are the pooled moments and the one-pass form equals
matching level by level exactly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import DataError, ModelError

DEFAULT_CONSTANT_TOLERANCE = 1e-5


class MatchRule(enum.IntEnum):
    """What was done to one channel (see the module docstring's table)."""

    MATCHED = 0
    CLAMPED = 1
    REFERENCE_CONSTANT = 2
    COMPRESSED_CONSTANT = 3
    BOTH_CONSTANT = 4
    ZERO_STORED_SCALE = 5
    BOUNDED = 6


@dataclass
class MatchedStatistics:
    """New per-channel statistics of one BN (float64) and the rule applied to each channel."""

    mean: np.ndarray
    var: np.ndarray
    rule: np.ndarray   # int8 per channel, values of MatchRule

    def rule_counts(self) -> dict:
        """``{rule name: channels}`` for the rules that occurred, in MatchRule order."""
        counts = np.bincount(self.rule.astype(np.int64), minlength=len(MatchRule))
        return {rule.name.lower(): int(counts[rule]) for rule in MatchRule if counts[rule]}


def match_statistics(stored_mean, stored_var, epsilon: float, reference_mean, reference_var,
                     compressed_mean, compressed_var, *, tolerance: float = DEFAULT_CONSTANT_TOLERANCE,
                     min_ratio: float = 0.0, name: Optional[str] = None) -> MatchedStatistics:
    """Matched statistics of one BN, in float64, with the rule applied per channel.

    ``stored_*``: the BN's (mu_r, v_r); ``reference_*``: (m_o, v_o), the pooled mean and biased
    variance of its input in the uncompressed model; ``compressed_*``: (m_c, v_c), the same in
    the compressed model with every upstream BN already matched. ``min_ratio``: the smallest
    v_c / v_o the formula takes (the BOUNDED rule). ``name`` (the BN's) goes into error messages.
    """
    where = f" of BatchNormalization '{name}'" if name else ""
    epsilon = float(epsilon)
    if not np.isfinite(epsilon) or epsilon < 0:
        raise ModelError(f"epsilon{where} is {epsilon}; it must be finite and not negative")
    stored_mean, stored_var = _checked(stored_mean, "stored mean", where, ModelError), \
        _checked(stored_var, "stored variance", where, ModelError, variance=True)
    reference_mean, reference_var = _checked(reference_mean, "reference model's input mean", where, DataError), \
        _checked(reference_var, "reference model's input variance", where, DataError, variance=True)
    compressed_mean, compressed_var = _checked(compressed_mean, "compressed model's input mean", where, DataError), \
        _checked(compressed_var, "compressed model's input variance", where, DataError, variance=True)
    shapes = {a.shape for a in (stored_mean, stored_var, reference_mean, reference_var, compressed_mean,
                                compressed_var)}
    if len(shapes) != 1:
        raise ValueError(f"statistics{where} have different shapes: {sorted(shapes)}")

    with np.errstate(divide="ignore", invalid="ignore"):  # zero stored scales are replaced below
        mean, var, reference_constant, compressed_constant, clamped, bounded = _match(
            stored_mean, stored_var, np.float64(epsilon), reference_mean, reference_var, compressed_mean,
            compressed_var, tolerance, np.float64(min_ratio))
    zero_scale = stored_var + epsilon == 0
    mean, var = np.where(zero_scale, stored_mean, mean), np.where(zero_scale, stored_var, var)
    rule = np.full(stored_mean.shape, MatchRule.MATCHED, dtype=np.int8)
    rule[bounded] = MatchRule.BOUNDED
    rule[clamped] = MatchRule.CLAMPED
    rule[reference_constant & ~compressed_constant] = MatchRule.REFERENCE_CONSTANT
    rule[compressed_constant & ~reference_constant] = MatchRule.COMPRESSED_CONSTANT
    rule[reference_constant & compressed_constant] = MatchRule.BOTH_CONSTANT
    rule[zero_scale] = MatchRule.ZERO_STORED_SCALE
    return MatchedStatistics(mean=mean, var=var, rule=rule)


def match_batch_statistics(stored_mean, stored_var, epsilon: float, reference_mean, reference_var,
                           compressed_mean, compressed_var, *, tolerance: float = DEFAULT_CONSTANT_TOLERANCE,
                           min_ratio: float = 0.0):
    """``(mu', v')`` from one batch's moments (or pooled ones), in the dtype of the moments.

    What the one-pass calibration graph computes per BN; the comment on each line names the ONNX
    op (all exist from opset 9, LessOrEqual from 12: before it, Not(Greater)). Stored (mu_r, v_r)
    and e are constants there, so ``v_r + e`` and ``threshold`` become initializers. No
    validation: a NaN propagates and is caught on the pooled moments. ZERO_STORED_SCALE channels
    are not handled here (the stored BN divides by zero; the graph's output is then NaN anyway).
    """
    dtype = np.result_type(reference_mean, compressed_mean)
    mean, var, *_ = _match(*(np.asarray(values, dtype) for values in (
        stored_mean, stored_var, epsilon, reference_mean, reference_var, compressed_mean, compressed_var)),
        dtype.type(tolerance), dtype.type(min_ratio))
    return mean, var


def _checked(values, what: str, where: str, error: type, *, variance: bool = False) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(values)
    if variance:
        bad |= values < 0
    if np.any(bad):
        channel = int(np.flatnonzero(bad)[0])
        kind = "not finite" if not np.isfinite(values[channel]) else "negative"
        raise error(f"the {what}{where} is {kind} ({values[channel]}) in channel {channel}")
    return values


def _match(stored_mean, stored_var, epsilon, reference_mean, reference_var, compressed_mean, compressed_var,
           tolerance, min_ratio):
    """The formula and its constant-channel rule, in the inputs' dtype; also returns which
    channels were constant in each model, which were clamped and which bounded (for the rules)."""
    one, zero = np.ones((), epsilon.dtype), np.zeros((), epsilon.dtype)
    stored_scale_squared = stored_var + epsilon                                   # initializer
    stored_scale = np.sqrt(stored_scale_squared)                                  # initializer
    threshold = tolerance * tolerance                                             # initializer
    reference_constant = reference_var <= threshold * np.maximum(                 # LessOrEqual, Mul, Max
        reference_mean * reference_mean, stored_scale_squared)                    # Mul
    compressed_constant = compressed_var <= threshold * np.maximum(               # LessOrEqual, Mul, Max
        compressed_mean * compressed_mean, stored_scale_squared)                  # Mul
    constant = np.logical_or(reference_constant, compressed_constant)             # Or
    safe_reference_var = np.where(constant, one, reference_var)                   # Where
    ratio = np.where(constant, one, compressed_var / safe_reference_var)          # Div, Where
    bounded = ratio < min_ratio                                                   # (for the rule only)
    ratio = np.maximum(ratio, min_ratio)                                          # Max (min_ratio > 0 only)
    unclamped = stored_var * ratio + epsilon * (ratio - one)                      # Mul, Sub, Mul, Add
    var = np.maximum(unclamped, zero)                                             # Max
    scale_ratio = np.sqrt(var + epsilon) / stored_scale                           # Add, Sqrt, Div
    mean = stored_mean + (compressed_mean - reference_mean) \
        + (one - scale_ratio) * (reference_mean - stored_mean)                    # Sub x3, Mul, Add x2
    return mean, var, reference_constant, compressed_constant, unclamped < 0, bounded
