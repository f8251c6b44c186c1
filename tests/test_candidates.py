"""Choosing between candidates (bnpass.passes.candidates) on hand-made scores: the tie rule and the test
that sets placeholder labels aside, against hand-computed figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnpass.agreement import AgreementMeter, LabelAccuracy, OutputAgreement
from bnpass.passes.candidates import Scores, binomial_upper_tail, choose, labels_set_aside


def agreeing(matches: int, error: float, samples: int = 100) -> AgreementMeter:
    meter = AgreementMeter(["logits"])
    meter.outputs["logits"] = OutputAgreement("logits", samples=samples, top1_matches=matches, top1_samples=samples,
                                              squared_difference=error ** 2, squared_reference=1.0, float_output=True)
    return meter


@pytest.mark.parametrize("order", [("reestimated", "matched"), ("matched", "reestimated")])
def test_an_exact_tie_keeps_the_first_candidate(order):
    """Regression (issue 22, planted): the sort key's last term reversed kept the last candidate on a tie in
    every figure. Equal agreement and equal output error: the first candidate named is kept."""
    scores = Scores(samples=100, agreement={"compressed": agreeing(40, 0.9), "reestimated": agreeing(90, 0.3),
                                            "matched": agreeing(90, 0.3)},
                    discordant={("reestimated", "matched"): 2, ("matched", "reestimated"): 2})
    choice = choose(scores, list(order))
    assert choice.chosen == order[0]
    assert choice.why.endswith(f"equal in every figure, so {order[0].replace('reestimated', 're-estimated')} is kept")


def test_a_lower_output_error_breaks_a_tie_in_counts():
    scores = Scores(samples=100, agreement={"reestimated": agreeing(90, 0.3), "matched": agreeing(90, 0.2)},
                    discordant={("reestimated", "matched"): 0, ("matched", "reestimated"): 0})
    assert choose(scores, ["reestimated", "matched"]).chosen == "matched"


def test_labels_decide_by_accuracy_with_mcnemar_on_the_discordant_samples():
    """With labels, accuracy decides even against agreement; the line gives both counts and McNemar's
    two-sided exact p on the 10 discordant samples split 9 to 1: 2 * (1 + 10) / 2**10."""
    scores = Scores(samples=100, agreement={"reestimated": agreeing(95, 0.1), "matched": agreeing(80, 0.4)},
                    accuracy={"reestimated": LabelAccuracy(correct=82, samples=100),
                              "matched": LabelAccuracy(correct=90, samples=100)},
                    discordant={("matched", "reestimated"): 9, ("reestimated", "matched"): 1})
    choice = choose(scores, ["reestimated", "matched"])
    assert (choice.chosen, choice.criterion) == ("matched", "accuracy")
    assert choice.p_value == pytest.approx(22 / 1024)
    assert choice.why == ("accuracy: matched right on 90 of 100 samples, re-estimated on 82; they differ on 10, "
                          "9 to 1, beyond chance (McNemar p = 0.021)")


def test_without_top1_the_lower_output_error_decides():
    """A model with no classifier-shaped output has no top-1: the relative output error decides."""
    flat = {name: AgreementMeter(["y"]) for name in ("reestimated", "matched")}
    for meter, error in zip(flat.values(), (0.5, 0.25)):
        meter.outputs["y"] = OutputAgreement("y", samples=100, squared_difference=error ** 2, squared_reference=1.0,
                                             float_output=True)
    choice = choose(Scores(samples=100, agreement=flat), ["reestimated", "matched"])
    assert (choice.chosen, choice.criterion) == ("matched", "output error")


@pytest.mark.parametrize("successes, trials, probability, expected", [
    (0, 5, 0.3, 1.0), (5, 5, 0.5, 1 / 32), (4, 5, 0.5, 6 / 32), (3, 4, 0.1, 4 * 0.1 ** 3 * 0.9 + 0.1 ** 4),
    (5, 5, 1.0, 1.0), (2, 5, 0.0, 0.0),
])
def test_binomial_upper_tail_is_hand_computed(successes, trials, probability, expected):
    assert binomial_upper_tail(successes, trials, probability) == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_binomial_upper_tail_does_not_underflow_on_many_samples():
    # 10,000 samples, 1,100 right at chance 0.1: about 3.3 standard deviations above, p ~ 5e-4
    assert 1e-4 < binomial_upper_tail(1100, 10_000, 0.1) < 1e-3
    assert binomial_upper_tail(9_000, 10_000, 0.1) == 0.0 or binomial_upper_tail(9_000, 10_000, 0.1) < 1e-300


def scored(predictions, labels, classes=10) -> LabelAccuracy:
    meter = LabelAccuracy()
    outputs = np.eye(classes, dtype=np.float32)[np.asarray(predictions)]
    meter.add([outputs], np.asarray(labels), batch=0)
    return meter


def test_placeholder_labels_are_set_aside_with_the_reason():
    """Regression (issue 22, item 2): zeros from an unlabelled DataLoader, or random classes, are no labels:
    the uncompressed model does no better on them than the most common label or chance."""
    rng = np.random.default_rng(0)
    predictions = rng.integers(0, 10, 256)
    zeros = labels_set_aside({"reference": scored(predictions, np.zeros(256, int))}, "reference")
    share = np.mean(predictions == 0)
    assert zeros == (f"the labels are set aside: the uncompressed model is right on {100 * share:.1f}% of them "
                     f"({int(share * 256)} of 256), no better than the share of the most common label (0: 100.0%) "
                     "(one-sided binomial p = 1); they look like placeholders, so the models are compared as without "
                     "labels")
    random_labels = labels_set_aside({"reference": scored(predictions, rng.integers(0, 10, 256))}, "reference")
    assert random_labels.startswith("the labels are set aside: the uncompressed model is right on")
    assert "no better than" in random_labels


def test_labels_the_reference_gets_right_are_kept():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 64)
    predictions = np.where(rng.random(64) < 0.5, labels, (labels + 1) % 10)  # right on about half: 5x chance
    assert labels_set_aside({"reference": scored(predictions, labels)}, "reference") == ""
    # the most common label is 80% of them; a reference right on 85% is not significantly better
    skewed = np.r_[np.zeros(80, int), np.arange(20) % 9 + 1]
    right = np.r_[np.zeros(80, int), np.where(np.arange(20) < 5, np.arange(20) % 9 + 1, 0)]
    reason = labels_set_aside({"reference": scored(right, skewed)}, "reference")
    assert "right on 85.0% of them (85 of 100), no better than the share of the most common label (0: 80.0%)" in reason
    # without a reference, the best model judges
    assert labels_set_aside({"compressed": scored(np.zeros(64, int), labels),
                             "reestimated": scored(predictions, labels)}, None) == ""
    assert math.isclose(binomial_upper_tail(85, 100, 0.8), float(reason.split("p = ")[1].split(")")[0]), rel_tol=0.05)
