"""Agreement metrics (bnpass.agreement) against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnpass.agreement import AgreementMeter, LabelAccuracy, OutputAgreement, format_agreement
from bnpass.errors import DataError
from bnpass.passes.candidates import mcnemar_p_value


def meter_after(batches, names=("logits",)):
    meter = AgreementMeter(list(names))
    for reference, candidate in batches:
        meter.add(reference, candidate)
    return meter


def test_top1_agreement_counts_matching_arg_max_over_batches():
    # Reference classes 1, 0 | 2, 1; candidate classes 1, 2 | 2, 0: 2 of 4 agree.
    meter = meter_after([
        ([np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])], [np.array([[0.0, 9.0, 1.0], [0.0, 1.0, 2.0]])]),
        ([np.array([[0.0, 0.0, 1.0], [0.0, 5.0, 1.0]])], [np.array([[1.0, 1.0, 4.0], [7.0, 5.0, 1.0]])]),
    ])
    assert meter.top1 == 0.5 and meter.outputs["logits"].samples == 4


def test_relative_error_is_normwise_over_all_batches():
    # Batch 1: ||a - b||^2 = 16, ||a||^2 = 25; batch 2: 9 and 0. Over both: sqrt(25 / 25) = 1, not
    # a mean of the per-batch errors (0.8 and infinity).
    meter = meter_after([
        ([np.array([[3.0, 4.0]])], [np.array([[3.0, 0.0]])]),
        ([np.array([[0.0, 0.0]])], [np.array([[0.0, 3.0]])]),
    ])
    assert meter.relative_error == pytest.approx(1.0, rel=1e-15)
    single = meter_after([([np.array([[3.0, 4.0]])], [np.array([[3.0, 0.0]])])])
    assert single.relative_error == pytest.approx(0.8, rel=1e-15)


def test_float32_outputs_accumulate_in_float64():
    # 2e5 values whose squares in float32 sums would lose the 1e-4 differences.
    reference = np.full((200_000, 2), 1000.0, dtype=np.float32)
    candidate = reference + np.float32(0.125)
    meter = meter_after([([reference], [candidate])])
    assert meter.relative_error == pytest.approx(0.125 / 1000.0, rel=1e-12)


@pytest.mark.parametrize("shape, top1", [((4, 1), False), ((4, 3, 2, 2), False), ((4, 3, 5), False), ((4, 3), True)])
def test_top1_only_for_classifier_shaped_float_outputs(shape, top1):
    rng = np.random.default_rng(0)
    reference = rng.standard_normal(shape)
    meter = meter_after([([reference], [reference + 0.1])])
    assert (meter.top1 is not None) == top1
    assert meter.relative_error is not None


def test_integer_labels_compare_as_they_are_and_have_no_output_error():
    meter = meter_after([([np.array([3, 1, 4, 1], dtype=np.int64)], [np.array([3, 1, 5, 9], dtype=np.int64)])])
    assert meter.top1 == 0.5 and meter.relative_error is None


def test_zero_reference_output():
    zeros = np.zeros((2, 3))
    assert meter_after([([zeros], [zeros])]).relative_error == 0.0
    assert math.isinf(meter_after([([zeros], [zeros + 1])]).relative_error)


def test_relative_error_reports_the_worst_output_and_top1_pools_classifier_outputs():
    # logits: classes (0, 1) vs (0, 0), 1 of 2 agree, error sqrt(2 / 2) = 1; scores: 2 of 2 agree,
    # error sqrt(1 / 8); boxes (rank 3): no top-1, error sqrt(1 / 16) = 0.25.
    meter = meter_after([(
        [np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([[[4.0]], [[0.0]]])],
        [np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([[2.0, 1.0], [0.0, 2.0]]), np.array([[[3.0]], [[0.0]]])],
    )], names=("logits", "scores", "boxes"))
    assert meter.outputs["logits"].top1 == 0.5 and meter.outputs["scores"].top1 == 1.0
    assert meter.outputs["boxes"].top1 is None
    assert meter.top1 == 0.75
    assert meter.outputs["scores"].relative_error == pytest.approx(8 ** -0.5, rel=1e-15)
    assert meter.outputs["boxes"].relative_error == pytest.approx(0.25, rel=1e-15)
    assert meter.relative_error == pytest.approx(1.0, rel=1e-15)


def hand_made(samples, matches, error, name="logits"):
    return OutputAgreement(name, samples=samples, top1_matches=matches, top1_samples=samples,
                           squared_difference=error ** 2, squared_reference=1.0, float_output=True)


def with_outputs(*outputs):
    meter = AgreementMeter([output.name for output in outputs])
    meter.outputs = {output.name: output for output in outputs}
    return meter


def test_format_agreement_one_output():
    line = format_agreement(with_outputs(hand_made(1000, 412, 0.83)), with_outputs(hand_made(1000, 986, 0.07)))
    assert line == "agreement with reference (1000 samples): 41.2% -> 98.6% top-1, output error 0.83 -> 0.07"


def test_format_agreement_several_outputs_names_each():
    before = with_outputs(hand_made(64, 32, 0.5), hand_made(64, 0, 2e-3, "boxes"))
    after = with_outputs(hand_made(64, 64, 0.0), hand_made(64, 0, 0.0, "boxes"))
    before.outputs["boxes"].top1_samples = after.outputs["boxes"].top1_samples = 0
    line = format_agreement(before, after)
    assert line == ("agreement with reference (64 samples): logits: 50.0% -> 100.0% top-1, output error 0.50 -> "
                    "0.0e+00; boxes: output error 2.0e-03 -> 0.0e+00")
    assert "\n" not in line


def test_mismatched_outputs_are_errors():
    meter = AgreementMeter(["logits"])
    with pytest.raises(ValueError, match="expected 1 outputs"):
        meter.add([np.zeros((2, 3))], [np.zeros((2, 3)), np.zeros(2)])
    with pytest.raises(ValueError, match="output 'logits': shapes differ"):
        meter.add([np.zeros((2, 3))], [np.zeros((2, 4))])


def test_a_meter_prints_its_figures():
    meter = AgreementMeter(["logits"])
    meter.add([np.eye(4, dtype=np.float32)], [np.eye(4, dtype=np.float32)[[0, 1, 3, 2]]])
    assert repr(meter) == "AgreementMeter(samples=4, top1=0.5, relative_error=1)"


@pytest.mark.parametrize("for_a, for_b, expected", [
    (0, 0, 1.0), (3, 0, 0.25), (2, 3, 1.0), (10, 0, 2 / 1024), (43, 2, 2 * (1 + 45 + 990) / 2 ** 45),
])
def test_mcnemar_p_value_is_the_two_sided_binomial_tail(for_a, for_b, expected):
    """Hand-computed: under the null each discordant sample favours either side with probability 1/2."""
    assert mcnemar_p_value(for_a, for_b) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_p_value(for_b, for_a) == pytest.approx(expected, rel=1e-12)


def test_label_accuracy_takes_whole_number_labels_and_names_the_batch_of_others():
    """The labels rule is bnpass.data.are_class_indices: 2.0 is class 2; 0.5 or inf is a DataError naming the batch."""
    scores = np.eye(3, dtype=np.float32)  # sample i predicts class i
    meter = LabelAccuracy()
    hits = meter.add([scores], np.array([0.0, 1.0, 0.0]), batch=0)
    assert hits.tolist() == [True, True, False] and meter.correct == 2 and meter.label_counts == {0: 2, 1: 1}
    for labels in ([0.5, 1.0, 2.0], [np.inf, 1.0, 2.0]):
        with pytest.raises(DataError, match=r"^batch 7: labels must be class indices \(whole numbers\), got float64 "
                                            r"values that are not \(fractions, infinities or NaN\)$"):
            LabelAccuracy().add([scores], np.array(labels), batch=7)
