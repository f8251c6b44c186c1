"""Matched statistics (bnpass.matching) against hand-computed cases and against their definition:
a BN with the matched statistics, fed the compressed model's values, gives outputs with the
per-channel mean and variance that the stored BN gives on the reference model's values (numpy on
the concatenated values)."""

from __future__ import annotations

import numpy as np
import pytest

from bnpass.errors import DataError, ModelError
from bnpass.matching import MatchRule, match_batch_statistics, match_statistics

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # no 0/0 or sqrt(<0) on any path


def bn_output(values, mean, var, epsilon):
    """Inference-mode BN with gamma 1, beta 0, on (samples, channels) values, in float64."""
    return (values - mean) / np.sqrt(var + epsilon)


def random_case(rng, channels=7):
    """Stored statistics and moments of both models with scales far apart, as compression makes them."""
    return dict(
        stored_mean=rng.standard_normal(channels) * 10.0 ** rng.uniform(-3, 2, channels),
        stored_var=np.abs(rng.standard_normal(channels)) * 10.0 ** rng.uniform(-4, 3, channels),
        reference_mean=rng.standard_normal(channels) * 10.0 ** rng.uniform(-3, 2, channels),
        reference_var=10.0 ** rng.uniform(-4, 3, channels),
        compressed_mean=rng.standard_normal(channels) * 10.0 ** rng.uniform(-3, 2, channels),
        compressed_var=10.0 ** rng.uniform(-4, 3, channels))


@pytest.mark.parametrize("seed", range(40))
def test_matching_a_model_against_itself_returns_its_stored_statistics(seed):
    rng = np.random.default_rng(seed)
    case = random_case(rng)
    epsilon = [0.0, 1e-5, 1e-3, 0.1][seed % 4]
    matched = match_statistics(case["stored_mean"], case["stored_var"], epsilon, case["reference_mean"],
                               case["reference_var"], case["reference_mean"], case["reference_var"])
    np.testing.assert_allclose(matched.mean, case["stored_mean"], rtol=1e-14, atol=0)
    np.testing.assert_allclose(matched.var, case["stored_var"], rtol=1e-14, atol=0)
    assert matched.rule_counts() == {"matched": 7}
    # The per-batch form in float32, as the calibration graph computes it: float32 rounding.
    as32 = {key: value.astype(np.float32) for key, value in case.items()}
    mean32, var32 = match_batch_statistics(as32["stored_mean"], as32["stored_var"], epsilon,
                                           as32["reference_mean"], as32["reference_var"],
                                           as32["reference_mean"], as32["reference_var"])
    assert mean32.dtype == var32.dtype == np.float32
    np.testing.assert_allclose(mean32, as32["stored_mean"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(var32, as32["stored_var"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("epsilon", [0.0, 1e-5, 0.5])
def test_matched_bn_reproduces_the_reference_output_moments(seed, epsilon):
    rng = np.random.default_rng(100 + seed)
    channels = 5
    stored_mean = rng.standard_normal(channels) * 3
    stored_var = np.abs(rng.standard_normal(channels)) + 0.5
    # Values of both models, each channel with its own mean and spread; moments measured on them.
    reference = rng.standard_normal((400, channels)) * rng.uniform(0.5, 4, channels) + rng.uniform(-5, 5, channels)
    compressed = rng.standard_normal((300, channels)) * rng.uniform(0.5, 4, channels) + rng.uniform(-5, 5, channels)
    matched = match_statistics(stored_mean, stored_var, epsilon, reference.mean(0), reference.var(0),
                               compressed.mean(0), compressed.var(0))
    expected = bn_output(reference, stored_mean, stored_var, epsilon)
    got = bn_output(compressed, matched.mean, matched.var, epsilon)
    np.testing.assert_allclose(got.mean(0), expected.mean(0), rtol=1e-10, atol=1e-12)
    exact = matched.rule == MatchRule.MATCHED
    np.testing.assert_allclose(got.var(0)[exact], expected.var(0)[exact], rtol=1e-10)
    # Where the spread cannot be reached (a BN amplifies at most 1/sqrt(e)), it stays below.
    clamped = matched.rule == MatchRule.CLAMPED
    assert np.all(got.var(0)[clamped] < expected.var(0)[clamped])
    assert np.all(exact | clamped)


def test_hand_computed_case():
    # stored scale sqrt(3 + 1) = 2; sqrt(v' + e) = sqrt(16) * 2 / sqrt(4) = 4, so v' = 15;
    # mu' = 2 - 4 * (5 - 1) / 2 = -6.
    matched = match_statistics([1.0], [3.0], 1.0, [5.0], [4.0], [2.0], [16.0])
    np.testing.assert_allclose(matched.mean, [-6.0], rtol=1e-15)
    np.testing.assert_allclose(matched.var, [15.0], rtol=1e-15)
    assert matched.rule.tolist() == [MatchRule.MATCHED]


def test_clamps_a_negative_variance_and_still_matches_the_mean():
    # sqrt(v' + e) = sqrt(0.01) * 2 / sqrt(16) = 0.05 < sqrt(e) = 1: v' = 0.0025 - 1 < 0 -> 0. The
    # scale is then sqrt(e) = 1: mu' = 7 - 1 * (5 - 1) / 2 = 5, so the output mean
    # (7 - 5) / 1 = 2 is the reference's (5 - 1) / 2; its spread 0.1 is below the reference's 2.
    matched = match_statistics([1.0], [3.0], 1.0, [5.0], [16.0], [7.0], [0.01])
    np.testing.assert_allclose(matched.var, [0.0], atol=0)
    np.testing.assert_allclose(matched.mean, [5.0], rtol=1e-15)
    assert matched.rule.tolist() == [MatchRule.CLAMPED]


@pytest.mark.parametrize("reference_var, compressed_var, rule", [
    (0.0, 4.0, MatchRule.REFERENCE_CONSTANT),
    (4.0, 0.0, MatchRule.COMPRESSED_CONSTANT),
    (0.0, 0.0, MatchRule.BOTH_CONSTANT),
])
@pytest.mark.parametrize("epsilon", [0.0, 1e-5])
def test_constant_channels_keep_the_stored_scale_and_match_the_mean(reference_var, compressed_var, rule, epsilon):
    # Channel 0 constant as parametrized, channel 1 an ordinary one beside it.
    stored_mean, stored_var = np.array([1.0, -2.0]), np.array([3.0, 0.7])
    reference_mean, compressed_mean = np.array([5.0, 0.5]), np.array([2.5, 1.5])
    matched = match_statistics(stored_mean, stored_var, epsilon, reference_mean, [reference_var, 2.0],
                               compressed_mean, [compressed_var, 0.3])
    assert matched.rule.tolist() == [rule, MatchRule.MATCHED]
    assert matched.var[0] == 3.0
    np.testing.assert_allclose(matched.mean[0], 1.0 + 2.5 - 5.0, rtol=1e-15)
    # The output mean is the reference's: (2.5 - mu') / sqrt(3 + e) == (5 - 1) / sqrt(3 + e).
    np.testing.assert_allclose(bn_output(2.5, matched.mean[0], 3.0, epsilon), bn_output(5.0, 1.0, 3.0, epsilon))
    ordinary = match_statistics(stored_mean[1:], stored_var[1:], epsilon, reference_mean[1:], [2.0],
                                compressed_mean[1:], [0.3])
    np.testing.assert_array_equal(matched.mean[1:], ordinary.mean)
    np.testing.assert_array_equal(matched.var[1:], ordinary.var)
    assert matched.rule_counts() == {"matched": 1, rule.name.lower(): 1}


def test_a_constant_channel_is_recognized_despite_float32_rounding():
    # A constant channel of 3.7, its float32 mean off by a few ulps: a spread of about 3e-7 of the
    # mean, though 1e-4 of the small stored scale 0.01. A spread of 1e-3 of the mean is a real one.
    rounding_spread = (3.7 * 3e-7) ** 2
    matched = match_statistics([1.0, 1.0], [1e-4, 1e-4], 0.0, [3.7, 3.7], [rounding_spread, (3.7e-3) ** 2],
                               [2.0, 2.0], [1.0, 1.0])
    assert matched.rule.tolist() == [MatchRule.REFERENCE_CONSTANT, MatchRule.MATCHED]


def test_zero_stored_scale_is_left_as_stored():
    # epsilon 0 and a stored variance of 0: the stored BN divides by zero; nothing to match.
    matched = match_statistics([1.0, 2.0], [0.0, 3.0], 0.0, [5.0, 5.0], [4.0, 4.0], [2.0, 2.0], [16.0, 16.0])
    assert matched.rule.tolist() == [MatchRule.ZERO_STORED_SCALE, MatchRule.MATCHED]
    assert matched.mean[0] == 1.0 and matched.var[0] == 0.0
    # epsilon 0 otherwise: v' = v_r * v_c / v_o exactly, never negative.
    np.testing.assert_allclose(matched.var[1], 3.0 * 16.0 / 4.0, rtol=1e-15)


def test_batch_form_equals_pooled_form_on_ordinary_channels():
    case = random_case(np.random.default_rng(3), channels=50)
    matched = match_statistics(*(case[k] for k in ("stored_mean", "stored_var")), 1e-3,
                               *(case[k] for k in ("reference_mean", "reference_var", "compressed_mean",
                                                   "compressed_var")))
    mean, var = match_batch_statistics(*(case[k] for k in ("stored_mean", "stored_var")), 1e-3,
                                       *(case[k] for k in ("reference_mean", "reference_var",
                                                           "compressed_mean", "compressed_var")))
    assert MatchRule.CLAMPED in matched.rule  # the comparison covers the clamp too
    np.testing.assert_array_equal(mean, matched.mean)
    np.testing.assert_array_equal(var, matched.var)


@pytest.mark.parametrize("position, value, error, words", [
    (4, [4.0, np.nan], DataError,
     "reference model's input variance of BatchNormalization 'bn3' is not finite (nan) in channel 1"),
    (6, [-1e-3, 1.0], DataError, "compressed model's input variance of BatchNormalization 'bn3' is negative"),
    (5, [1.0, np.inf], DataError, "compressed model's input mean of BatchNormalization 'bn3' is not finite"),
    (0, [np.inf, 1.0], ModelError, "stored mean of BatchNormalization 'bn3' is not finite (inf) in channel 0"),
    (1, [1.0, -2.0], ModelError, "stored variance of BatchNormalization 'bn3' is negative (-2.0) in channel 1"),
    (2, -1e-5, ModelError, "epsilon of BatchNormalization 'bn3' is -1e-05"),
    (2, np.nan, ModelError, "epsilon of BatchNormalization 'bn3' is nan"),
])
def test_bad_inputs_are_one_line_errors_naming_the_quantity(position, value, error, words):
    arguments = [[1.0, 1.0], [1.0, 1.0], 1e-5, [0.0, 0.0], [4.0, 4.0], [0.0, 0.0], [4.0, 4.0]]
    arguments[position] = value
    with pytest.raises(error) as raised:
        match_statistics(*arguments, name="bn3")
    assert words in str(raised.value) and "\n" not in str(raised.value)
