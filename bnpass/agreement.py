"""How closely a candidate model's outputs follow a reference model's, accumulated over batches.

Per output, over every batch seen (streaming: a few numbers per output, whatever the sample count):

- **top-1 agreement**, for classifier-shaped outputs: the fraction of samples whose arg-max class is
  the same in both models. Classifier-shaped means a float output of rank 2 ``(N, K)`` with K > 1
  (arg-max over axis 1), or an integer output of rank 1 ``(N,)`` (predicted labels, compared as
  they are). Other shapes get no top-1: for ``(N, C, H, W)`` or ``(N, T, K)`` the class axis, if
  there is one, cannot be told from the shape, and a guess would print a number that means
  nothing. ``(N, 1)`` scores have no arg-max to compare.
- **relative output error**, for every float output: ``||a - b||_F / ||a||_F`` over all batches
  (``a`` the reference's output, ``b`` the candidate's), i.e. the root-mean-square difference
  relative to the root-mean-square reference output. 0 means identical; about 1 means an error as
  large as the output itself (for instance a candidate that outputs zeros); unrelated outputs of
  the same spread around zero give about sqrt(2). Unlike ``--verify``'s ``max|a-b| / max|a|``,
  it does not hang on the single worst value (which only grows as more samples are seen, so two
  runs on different amounts of data could not be compared) and it weighs every sample alike; a
  reference output that is all zeros gives 0 when the candidate's is too, else infinity.

Sums are float64. :func:`format_agreement` writes the before/after line, e.g.
``agreement with reference: 41.2% -> 98.6% top-1, output error 0.83 -> 0.07``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .data import as_class_indices
from .errors import DataError


@dataclass
class OutputAgreement:
    """Running agreement of one output."""

    name: str
    samples: int = 0
    top1_matches: int = 0
    top1_samples: int = 0          # 0: not classifier-shaped
    squared_difference: float = 0.0
    squared_reference: float = 0.0
    float_output: bool = False

    @property
    def top1(self) -> Optional[float]:
        return self.top1_matches / self.top1_samples if self.top1_samples else None

    @property
    def relative_error(self) -> Optional[float]:
        if not self.float_output or self.samples == 0:
            return None
        if self.squared_reference == 0:
            return 0.0 if self.squared_difference == 0 else math.inf
        return math.sqrt(self.squared_difference / self.squared_reference)

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> Optional[np.ndarray]:
        """One batch of this output from both models; returns, per sample, whether the top-1 classes
        agree (None when the output is not classifier-shaped)."""
        reference, candidate = np.asarray(reference), np.asarray(candidate)
        if reference.shape != candidate.shape:
            raise ValueError(f"output '{self.name}': shapes differ, {reference.shape} and {candidate.shape}")
        count = reference.shape[0] if reference.ndim else 1
        self.samples += count
        floating = np.issubdtype(reference.dtype, np.floating)
        self.float_output = floating
        hits = None
        if is_classifier_shaped(reference):
            hits = top1_classes(reference) == top1_classes(candidate)
            self.top1_matches += int(np.count_nonzero(hits))
            self.top1_samples += count
        if floating:
            reference64 = reference.astype(np.float64, copy=False)
            difference = reference64 - candidate.astype(np.float64, copy=False)
            self.squared_difference += float(np.vdot(difference, difference))
            self.squared_reference += float(np.vdot(reference64, reference64))
        return hits


def is_classifier_shaped(output: np.ndarray) -> bool:
    """A float output ``(N, K)`` with K > 1, or an integer output ``(N,)`` (predicted classes)."""
    if np.issubdtype(output.dtype, np.floating):
        return output.ndim == 2 and output.shape[1] > 1
    return np.issubdtype(output.dtype, np.integer) and output.ndim == 1


def top1_classes(output: np.ndarray) -> np.ndarray:
    """The class of each sample of a classifier-shaped output."""
    return output.argmax(axis=1) if output.ndim == 2 else output


class AgreementMeter:
    """Agreement of a candidate with a reference, per output, over the batches given to :meth:`add`."""

    def __init__(self, output_names: Sequence[str]):
        self.outputs = {name: OutputAgreement(name) for name in output_names}

    def add(self, reference: Sequence, candidate: Sequence) -> Optional[np.ndarray]:
        """One batch: the outputs of both models, in ``output_names`` order (lists, as ``session.run``).
        Returns whether the top-1 classes agree, per sample and classifier-shaped output (the outputs'
        verdicts one after the other), or None when no output is classifier-shaped."""
        if len(reference) != len(self.outputs) or len(candidate) != len(self.outputs):
            raise ValueError(f"expected {len(self.outputs)} outputs, got {len(reference)} and {len(candidate)}")
        hits = [output.add(expected, got) for output, expected, got in zip(self.outputs.values(), reference, candidate)]
        hits = [verdicts for verdicts in hits if verdicts is not None]
        return np.concatenate(hits) if hits else None

    @property
    def top1_matches(self) -> int:
        """Samples (times classifier-shaped outputs) whose top-1 classes agree."""
        return sum(output.top1_matches for output in self.outputs.values())

    @property
    def top1_samples(self) -> int:
        """Samples (times classifier-shaped outputs) compared for top-1 agreement."""
        return sum(output.top1_samples for output in self.outputs.values())

    @property
    def top1(self) -> Optional[float]:
        """Top-1 agreement pooled over the classifier-shaped outputs; None when there are none."""
        return self.top1_matches / self.top1_samples if self.top1_samples else None

    @property
    def relative_error(self) -> Optional[float]:
        """The largest relative output error over the float outputs; None when there are none."""
        errors = [output.relative_error for output in self.outputs.values() if output.relative_error is not None]
        return max(errors) if errors else None

    def __repr__(self) -> str:
        samples = max((output.samples for output in self.outputs.values()), default=0)
        return (f"AgreementMeter(samples={samples}, top1={_figure(self.top1)}, "
                f"relative_error={_figure(self.relative_error)})")



@dataclass
class LabelAccuracy:
    """Top-1 accuracy against labels: class indices of a model's first classifier-shaped output."""

    correct: int = 0
    samples: int = 0
    classes: Optional[int] = None  # the output's class count; None for (N,) predicted classes
    label_counts: dict = field(default_factory=dict)  # how often each label came

    @property
    def accuracy(self) -> Optional[float]:
        return self.correct / self.samples if self.samples else None

    def majority(self) -> tuple:
        """``(label, share)``: the most common label and the fraction of samples that carry it."""
        label = max(self.label_counts, key=lambda value: (self.label_counts[value], -value))
        return label, self.label_counts[label] / self.samples

    def add(self, outputs: Sequence, labels, *, batch: int) -> np.ndarray:
        """One batch: the model's outputs (as ``session.run``) and the batch's labels; returns, per
        sample, whether the model got it right. A label that is no class of the output, or a model
        with no classifier-shaped output, is a DataError naming the batch."""
        output = next((np.asarray(value) for value in outputs if is_classifier_shaped(np.asarray(value))), None)
        if output is None:
            raise DataError(f"batch {batch}: the data carry labels, but no model output is classifier-shaped "
                            "((N, classes) scores or (N,) class indices)")
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != output.shape[0]:
            raise DataError(f"batch {batch}: {labels.shape[0]} labels for {output.shape[0]} samples")
        labels = as_class_indices(labels, f"batch {batch}")
        classes = output.shape[1] if output.ndim == 2 else None
        outside = labels[(labels < 0) | (labels >= classes)] if classes is not None else labels[labels < 0]
        if outside.size:
            limit = f"0..{classes - 1}" if classes is not None else "0 or more"
            raise DataError(f"batch {batch}: label {outside[0]} is outside the model's classes ({limit})")
        hits = top1_classes(output) == labels
        self.classes = classes
        for value, count in zip(*np.unique(labels, return_counts=True)):
            self.label_counts[int(value)] = self.label_counts.get(int(value), 0) + int(count)
        self.correct += int(np.count_nonzero(hits))
        self.samples += labels.shape[0]
        return hits


def format_agreement(before: AgreementMeter, after: AgreementMeter) -> str:
    """``agreement with reference: 41.2% -> 98.6% top-1, output error 0.83 -> 0.07``, one line.

    With several outputs, one part per output, separated by ``;``, each named.
    """
    parts = []
    several = len(after.outputs) > 1
    for name, output in after.outputs.items():
        earlier = before.outputs[name]
        figures = []
        if output.top1 is not None:
            figures.append(f"{_percent(earlier.top1)} -> {_percent(output.top1)} top-1")
        if output.relative_error is not None:
            figures.append(f"output error {_error(earlier.relative_error)} -> {_error(output.relative_error)}")
        if figures:
            parts.append((f"{name}: " if several else "") + ", ".join(figures))
    samples = max((output.samples for output in after.outputs.values()), default=0)
    return f"agreement with reference ({samples} samples): " + ("; ".join(parts) if parts else "no float output")


def _figure(value: Optional[float]) -> str:
    return "None" if value is None else f"{value:.4g}"


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _error(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.2f}" if value >= 0.01 else f"{value:.1e}"
