"""Keep the better candidate: every candidate scored on every calibration sample, by labels where
there are any, with the counts the choice rests on and whether its margin is beyond chance.

A calibrating pass that makes several candidate models (``--reference``: re-estimated and matched
statistics) reads the data a second time once they exist (:meth:`CalibrationRun.evaluation_feeds`),
so that every candidate is built from every sample and judged on every sample; nothing is held out
and the order of the data does not matter. Each batch runs through the uncompressed model (the
reference), the model as given and each candidate, at the batch size the models' own inputs fix;
only counts and sums are kept (:mod:`bnpass.agreement`), nothing per sample. On the CPU the models
run as one merged model (:mod:`bnpass.passes.scoring_graph`): what they have in common (the candidates
differ in a few tensors) is computed once, with every output bit for bit what the model computes alone.

**The criterion.** With labels (class indices of the model's first classifier-shaped output):
top-1 accuracy. Without: top-1 agreement with the reference. A model with no classifier-shaped
output: the relative output error against the reference. Equal counts fall back to the lower
output error, then to the first candidate (re-estimation), and the reason says so.

**Labels that are not labels.** A loader yielding ``(images, zeros)``, as an unlabelled DataLoader
often does, carries placeholders. Labels are used only where the model that judges them (the
reference; without one, the best of the models scored) is right on significantly more of them than
chance would give: more than ``max(1 / classes, share of the most common label)``, by a one-sided
exact binomial test at :data:`CHANCE` (:func:`binomial_upper_tail`). Otherwise they are set aside
with one warning saying why (:attr:`Scores.labels_set_aside`) and the models are compared as
without labels.

**How sure.** Both candidates are right (or agree with the reference) on most samples; what decides
is the samples where exactly one of them is. Under "neither is better", each such sample favours
either with probability 1/2: McNemar's exact test, a two-sided binomial test on those discordant
samples (:func:`mcnemar_p_value`). The margin is called beyond chance below :data:`CHANCE`.
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..agreement import AgreementMeter, LabelAccuracy, is_classifier_shaped
from ..data import LABELS
from ..errors import DataError, SessionError
from ..feeding import batch_length, feed_each
from ..runtime import CPU, BatchRunner, create_session
from .scoring_graph import MergeRefused, merge_models

logger = logging.getLogger(__name__)

CHANCE = 0.05  # a McNemar p-value below this: the margin is beyond chance
# The candidates' names, as options take them, and in prose (:func:`spelled`).
REESTIMATED = "reestimated"              # plain re-estimation
MATCHED = "matched"                      # every BN (and corrected layer) matched to the reference
EXCEPT_LOGITS = "matched-except-logits"  # matched, the logits layer as given
GIVEN = "compressed"                     # the model as given, scored beside the candidates
SPELLED = {REESTIMATED: "re-estimated", MATCHED: "matched", EXCEPT_LOGITS: "matched except the logits layer",
           GIVEN: "compressed (as given)"}
CORRECTED = (MATCHED, EXCEPT_LOGITS)     # the candidates whose layers without BN were corrected
REFERENCE = "reference"                  # the uncompressed model, scored beside them (never kept)


@dataclass
class Scores:
    """Every model's scores over the same samples. ``agreement``: per model (the given one and each
    candidate) an :class:`~bnpass.agreement.AgreementMeter` against the reference; ``accuracy``: per
    model, the reference included, a :class:`~bnpass.agreement.LabelAccuracy` (empty without labels);
    ``discordant[(a, b)]``: samples where ``a`` is right (or agrees with the reference) and ``b`` not."""

    samples: int = 0
    agreement: dict = field(default_factory=dict)
    accuracy: dict = field(default_factory=dict)
    discordant: dict = field(default_factory=dict)
    labels_set_aside: str = ""  # why the data's labels were not used (module docstring); "" when they were
    set_aside_accuracy: dict = field(default_factory=dict)  # the accuracy on those labels, per model

    @property
    def labelled(self) -> bool:
        return bool(self.accuracy)

    def hits(self, name: str) -> Optional[int]:
        """Samples ``name`` got right (labels) or agreed on with the reference; None without top-1 (or
        without labels and reference)."""
        if self.labelled:
            return self.accuracy[name].correct
        meter = self.agreement.get(name)
        if meter is None:
            return None
        return meter.top1_matches if meter.top1 is not None else None

    def judged(self) -> int:
        """How many samples the hits are counted over."""
        if self.labelled:
            return next(iter(self.accuracy.values())).samples
        return next(iter(self.agreement.values())).top1_samples


@dataclass
class Choice:
    chosen: str
    why: str          # one line: the rule and the figures it rests on
    criterion: str    # "asked for", "accuracy", "top-1 agreement" or "output error"
    p_value: Optional[float] = None  # McNemar's, between the two best candidates; None when not counted


def score_models(reference, given, candidates: dict, feeds, providers: list, *, threads=None,
                 tf32: bool = False) -> Scores:
    """Run every feed (``{input: batch}``, maybe with :data:`bnpass.data.LABELS`) through the reference,
    the model as given (``given``) and each candidate (``{name: ModelProto}``), keeping only counts.
    ``reference`` None (plain re-estimation): the models are judged by labels alone, no agreement.
    The models run as one merged model where they can (:class:`ScoringSessions`)."""
    models = {GIVEN: given, **candidates}
    sessions = ScoringSessions({REFERENCE: reference, **models} if reference is not None else models, providers,
                               threads=threads, tf32=tf32)
    tally = _Tally(models, [output.name for output in given.graph.output], reference is not None)
    labels = collections.deque()  # the labels of the feeds taken, the one being scored first

    def inputs_of(feeds):
        try:
            for feed in feeds:
                labels.append(feed.get(LABELS))
                yield {name: array for name, array in feed.items() if name != LABELS}
        finally:
            close = getattr(feeds, "close", None)
            if close is not None:
                close()  # a prefetching generator stops its loading thread

    feed_each(inputs_of(feeds), sessions.runner, lambda inputs, values: tally.add(
        inputs, labels.popleft(), sessions.outputs_of(values)))
    return tally.scores()


class ScoringSessions:
    """The models scored side by side, in one onnxruntime session: on the CPU, one model merged from
    them (:func:`~bnpass.passes.scoring_graph.merge_models`: every common node once, every output bit
    for bit what the model computes in a session of its own); elsewhere, or where the merge is
    refused, one session per model behind one runner. ``runner`` runs a feed; ``outputs_of`` splits
    what it returned into ``{model: outputs}``, in each model's output order."""

    def __init__(self, models: dict, providers: list, *, threads=None, tf32: bool = False):
        options = dict(threads=threads, tf32=tf32)
        merged = None
        if providers == [CPU]:  # measured bit-exact on the CPU provider only
            try:
                merged, self.names = merge_models(models)
            except MergeRefused as why:
                logger.debug("scoring in one session per model: %s", why)
        if merged is not None:
            order = [name for names in self.names.values() for name in names]
            try:
                self.runner = BatchRunner(create_session(merged, providers, **options), order)
                return
            except SessionError as why:  # each model alone is what the user gave: its own error, if any, says it
                logger.debug("scoring in one session per model: onnxruntime refused the merged model: %s", why)
            finally:
                del merged
        self.names = {name: [output.name for output in model.graph.output] for name, model in models.items()}
        runners = {name: BatchRunner(create_session(model, providers, **options), self.names[name])
                   for name, model in models.items()}
        self.runner = _EachRunner(runners)

    def outputs_of(self, values: list) -> dict:
        outputs, position = {}, 0
        for name, names in self.names.items():
            outputs[name] = values[position:position + len(names)]
            position += len(names)
        return outputs


class _EachRunner:
    """Several runners taken as one: ``run`` gives their outputs one after the other (the first runner's
    first), ``run_all`` copies the next feed ahead for the first runner."""

    def __init__(self, runners: dict):
        self.runners = list(runners.values())

    def run(self, feed: dict) -> list:
        return [value for runner in self.runners for value in runner.run(feed)]

    def run_all(self, feeds):
        for feed, first in self.runners[0].run_all(feeds):
            yield feed, list(first) + [value for runner in self.runners[1:] for value in runner.run(feed)]


class _Tally:
    """The counts of one scoring: per model its agreement with the reference (``against_reference``) and
    its accuracy on the labels, and the samples on which one model is right and another not."""

    def __init__(self, models: dict, output_names: list, against_reference: bool):
        self.models = list(models)
        self.against_reference = against_reference
        self.agreement = {name: AgreementMeter(output_names) for name in self.models} if against_reference else {}
        self.accuracy: dict = {}
        self.by_labels = {(a, b): 0 for a in self.models for b in self.models if a != b}
        self.by_agreement = dict(self.by_labels)
        self.usable = None  # whether labels can be scored: the judging model has a classifier-shaped output
        self.labelled = None  # whether the first batch carried labels
        self.samples = self.batches = 0

    def add(self, inputs: dict, labels, outputs: dict) -> None:
        """One batch: its inputs, its labels (None without) and ``{model: outputs}``."""
        number = self.batches
        self.batches += 1
        if self.labelled is None:
            self.labelled = labels is not None
        elif (labels is not None) != self.labelled:
            raise DataError(f"batch {number} {'has' if labels is not None else 'has no'} labels and the batches "
                            f"before it {'have none' if labels is not None else 'have them'}: give labels with every "
                            "sample or with none")
        expected = outputs.get(REFERENCE)
        if labels is not None and self.usable is None:
            judged = expected if expected is not None else outputs[GIVEN]
            self.usable = any(is_classifier_shaped(np.asarray(output)) for output in judged)
            if not self.usable:  # said as a warning where they were to choose between candidates, else as a note
                logger.log(logging.WARNING if expected is not None else logging.INFO,
                           "the data carry labels, but the model has no classifier-shaped output ((N, classes) "
                           "scores or (N,) classes): " + ("the candidates are compared with the reference instead"
                                                         if expected is not None else "they are not used"))
        if not self.usable:
            labels = None
        if expected is not None:
            _tally(self.by_agreement, {name: self.agreement[name].add(expected, outputs[name])
                                       for name in self.models})
        if labels is not None:
            if not self.accuracy:
                self.accuracy = {name: LabelAccuracy() for name in
                                 ((REFERENCE,) if expected is not None else ()) + tuple(self.models)}
            if expected is not None:
                self.accuracy[REFERENCE].add(expected, labels, batch=number)
            _tally(self.by_labels, {name: self.accuracy[name].add(outputs[name], labels, batch=number)
                                    for name in self.models})
        self.samples += batch_length(inputs)

    def scores(self) -> Scores:
        """The scores counted; labels that look like placeholders set aside (module docstring)."""
        if self.samples == 0:
            raise DataError("the second reading of the calibration data gave no sample: the source can be read "
                            "only once; give a folder, a list, a DataLoader or a loader function")
        scores = Scores(samples=self.samples, agreement=self.agreement, accuracy=self.accuracy)
        scores.discordant = self.by_labels if scores.labelled else self.by_agreement
        if scores.labelled:
            reason = labels_set_aside(scores.accuracy, REFERENCE if self.against_reference else None)
            if reason:
                logger.warning("%s", reason)
                scores.labels_set_aside, scores.set_aside_accuracy = reason, scores.accuracy
                scores.accuracy, scores.discordant = {}, self.by_agreement
        return scores


def _tally(discordant: dict, hits: dict) -> None:
    """Add one batch's per-sample verdicts (``{model: bool array or None}``) to the discordant counts."""
    for a, b in discordant:
        if hits.get(a) is not None and hits.get(b) is not None:
            discordant[(a, b)] += int(np.count_nonzero(hits[a] & ~hits[b]))


def labels_set_aside(accuracy: dict, judge: Optional[str]) -> str:
    """Why the labels behind ``accuracy`` (``{model: LabelAccuracy}``) are no labels, or "" when they are
    (module docstring). ``judge``: the model whose accuracy decides (None: the best of them)."""
    if judge is None:
        judge = max(accuracy, key=lambda name: accuracy[name].correct)
    meter = accuracy[judge]
    label, share = meter.majority()
    chance = 1 / meter.classes if meter.classes else 0.0
    baseline = max(chance, share)
    p_value = binomial_upper_tail(meter.correct, meter.samples, baseline)
    if p_value < CHANCE:
        return ""
    who = "the uncompressed model" if judge == REFERENCE else f"the best model on them ({spelled(judge)})"
    against = (f"the share of the most common label ({label}: {100 * share:.1f}%)" if share >= chance
               else f"chance over {meter.classes} classes ({100 * chance:.1f}%)")
    return (f"the labels are set aside: {who} is right on {100 * meter.accuracy:.1f}% of them ({meter.correct} of "
            f"{meter.samples}), no better than {against} (one-sided binomial p = {p_value:.2g}); they look like "
            "placeholders, so the models are compared as without labels")


def binomial_upper_tail(successes: int, trials: int, probability: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, probability), summed in log space (exact for any size)."""
    if successes <= 0:
        return 1.0
    if probability <= 0:
        return 0.0
    if probability >= 1:
        return 1.0 if successes <= trials else 0.0
    log_p, log_q = math.log(probability), math.log1p(-probability)
    terms = [math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1) + k * log_p
             + (trials - k) * log_q for k in range(successes, trials + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(term - top) for term in terms))


def choose(scores: Scores, candidates: list, forced: Optional[str] = None) -> Choice:
    """The candidate to keep (see the module docstring); ``forced`` names one instead."""
    if forced is not None:
        return Choice(forced, "asked for", "asked for")
    hits = {name: scores.hits(name) for name in candidates}
    errors = {name: scores.agreement[name].relative_error if name in scores.agreement else None
              for name in candidates}
    if any(value is None for value in hits.values()):  # no classifier-shaped output: by output error
        chosen = min(candidates, key=lambda name: (math.inf if errors[name] is None else errors[name]))
        return Choice(chosen, "lower output error against the reference: " + _errors(errors, chosen),
                      "output error")
    criterion = "accuracy" if scores.labelled else "top-1 agreement"
    ranked = sorted(candidates, key=lambda name: (-hits[name], math.inf if errors[name] is None else errors[name],
                                                  candidates.index(name)))
    chosen, runner_up = ranked[0], ranked[1]
    verb = "right on" if scores.labelled else "agrees with the reference on"
    counted = (f"{spelled(chosen)} {verb} {hits[chosen]} of {scores.judged()} samples, {spelled(runner_up)} on "
               f"{hits[runner_up]}")
    for_chosen, for_other = scores.discordant[(chosen, runner_up)], scores.discordant[(runner_up, chosen)]
    p_value = mcnemar_p_value(for_chosen, for_other)
    if hits[chosen] == hits[runner_up]:
        rule = ("the lower output error against the reference decides: " + _errors(errors, chosen)
                if errors[chosen] != errors[runner_up] else f"equal in every figure, so {spelled(chosen)} is kept")
        return Choice(chosen, f"{criterion} tied ({counted}); {rule}", criterion, p_value)
    margin = "beyond chance" if p_value < CHANCE else "within chance"
    return Choice(chosen, f"{criterion}: {counted}; they differ on {for_chosen + for_other}, {for_chosen} to "
                          f"{for_other}, {margin} (McNemar p = {p_value:.2g})", criterion, p_value)


def mcnemar_p_value(for_a: int, for_b: int) -> float:
    """Two-sided exact McNemar test: the probability, if each of the ``for_a + for_b`` discordant samples
    favoured either side with probability 1/2, of a split at least as uneven as this one."""
    total = for_a + for_b
    if total == 0:
        return 1.0
    tail = sum(math.comb(total, k) for k in range(min(for_a, for_b) + 1))
    return min(1.0, 2 * tail / 2 ** total)


def spelled(candidate: str) -> str:
    """A candidate's name in prose: "re-estimated" (``reestimated`` is the value options take)."""
    return SPELLED.get(candidate, candidate)


def _errors(errors: dict, chosen: str) -> str:
    return ", ".join(f"{spelled(name)} {_error(value)}" for name, value in
                     sorted(errors.items(), key=lambda item: item[0] != chosen))


def _error(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3g}"
