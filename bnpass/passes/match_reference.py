"""MatchReferencePass (``--reference``): re-estimate, match the uncompressed model, keep the better.

Re-estimation makes every BN of the compressed model output N(beta, gamma^2) per channel on the
calibration data. The uncompressed model's BNs do not: on the same data their outputs have means
and spreads of their own, which every later layer was trained on. Given that model (the
*reference*), this pass computes two candidates from every calibration sample in one pass over the
data, then reads the data again to score both, the model as given and the reference on every
sample, and keeps the better candidate (:mod:`bnpass.passes.candidates`: by top-1 accuracy where
the data carry labels, else by agreement with the reference, with the counts and McNemar's test). A
forced candidate (``choose``) skips that second reading: nothing is compared, nothing is warned of.

- **reestimated**: plain re-estimation, exactly what a run without ``--reference`` writes;
- **matched**: each BN's statistics chosen so that its output has, per channel, the mean and
  variance the reference BN's output has (:mod:`bnpass.matching`), measured with every upstream BN
  already matched.

Per batch three sessions run, all on the same feed (:mod:`bnpass.passes.calibration_run`): the
reference with each BN input's moments tapped (``observe`` calibration copy); the compressed
model's ``matched`` copy, fed those moments, in which each BN normalizes with statistics matched on
this batch (as a train-mode BN normalizes with its batch's); and the plain ``train`` copy. Pooled
moments of both sides give the final matched statistics; with one batch holding every sample this
equals matching level by level exactly (tests/test_match_reference.py checks it against an
independent PyTorch implementation).

Agreement with the uncompressed model is the right signal only when that model is good on the
calibration data: on data of another domain, re-estimation can beat the uncompressed model itself,
and agreement then prefers the matched candidate that copies its weakness (measured in
tools/make_reference_example.py's shifted domain). Labels settle it. Without them, that case shows
in the reference itself: the first BNs of a model see the input through one layer, and on data of
its own domain their input moments stay at the stored statistics (there: spread ratio 0.99-1.01,
mean shift <= 0.03 stored standard deviations, also when only a subset of the classes is seen),
while on the shifted images the spread fell to 0.67. So when the reference's first BNs see a spread
outside [1/DOMAIN_SPREAD_LIMIT, DOMAIN_SPREAD_LIMIT] of the stored one, or a mean moved by more
than DOMAIN_SHIFT_LIMIT, the result carries a warning that agreement may pick the wrong candidate.
``choose`` forces a candidate.

BNs correspond by node name when both models name every BN, uniquely, with the same set of
names; otherwise by order. Counts, channels, epsilons, inputs and outputs must agree, or a
ModelError names the first difference. Only the BNs are compared, so a QDQ-quantized model matches
its float original.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from ..agreement import format_agreement
from ..calibration import MatchTarget, batchnorm_nodes
from ..data import model_input_specs, plural
from ..diagnostics import first_batchnorms, input_shift
from ..errors import ModelError
from ..feeding import feed_each
from ..graph import GraphIndex, attribute, node_label
from ..matching import MatchedStatistics, match_statistics
from ..model_io import as_model
from .base import Pass, PassContractError, batchnorm_labels, copy_model, fingerprint
from .calibration_run import CalibrationRun
from .calibration_settings import CalibrationSettings, input_batch_size
from .candidates import GIVEN, Choice, Scores, choose, score_models
from .correct_layers import (
    MAX_GAIN,
    foldable_layers,
    insert_identity_batchnorms,
    inserted_names,
    layers_without_batchnorm,
    logits_layer,
    pair_layers,
)
from .fold_batchnorm import FoldBatchNormPass
from .reestimate_batchnorm import holds_statistics
from .statistics_session import StatisticsSession
from .written_statistics import ReestimateResult, WrittenStatistics, checked_statistics, write_statistics

logger = logging.getLogger(__name__)

CANDIDATES = ("reestimated", "matched")
EXCEPT_LOGITS = "matched-except-logits"  # layers corrected, the logits layer as given
CHOICES = ("auto",) + CANDIDATES + (EXCEPT_LOGITS, GIVEN)
DOMAIN_SPREAD_LIMIT = 1.25  # the reference's first BNs: spread ratio against the stored statistics
DOMAIN_SHIFT_LIMIT = 0.5    # ... and mean shift, in stored standard deviations


@dataclass
class LayerCorrection:
    """One corrected layer output: the reference's moments (m_o, v_o), the compressed model's (m_c, v_c,
    earlier layers corrected) and the matched statistics of its inserted BN, with the rule per channel."""

    reference_moments: tuple
    compressed_moments: tuple
    matched: MatchedStatistics


@dataclass
class ReferenceResult(ReestimateResult):
    """A :class:`ReestimateResult` for the kept candidate, with what the choice rested on.

    ``scores`` (:class:`~bnpass.passes.candidates.Scores`) holds every model's scores on every
    calibration sample: ``scores.agreement`` an :class:`~bnpass.agreement.AgreementMeter` against
    the reference for "compressed" (the model as given), "reestimated" and "matched";
    ``scores.accuracy`` (with labels) the top-1 accuracy of those and of "reference". ``choice``
    says what was kept and why (the criterion, the counts, McNemar's p-value). Per BN:
    ``reference_moments`` (m_o, v_o), ``compressed_moments`` (m_c, v_c, upstream matched),
    ``matched`` (the matched statistics and the rule per channel), ``reestimated`` (mean, var).
    """

    chosen: str = ""
    why: str = ""
    choice: Optional[Choice] = None
    scores: Scores = field(default_factory=Scores)
    reference_moments: dict[str, tuple] = field(default_factory=dict)
    compressed_moments: dict[str, tuple] = field(default_factory=dict)
    matched: dict[str, MatchedStatistics] = field(default_factory=dict)
    reestimated: dict[str, tuple] = field(default_factory=dict)
    layers: dict[str, LayerCorrection] = field(default_factory=dict)  # per corrected layer (label)
    refused_layers: dict[str, str] = field(default_factory=dict)  # layer label -> why it is not corrected
    logits: Optional[str] = None  # the logits layer, when corrected (EXCEPT_LOGITS leaves it as given)
    per_channel: list[str] = field(default_factory=list)  # corrected layers whose weight scale became per-channel
    float_biases: dict[str, str] = field(default_factory=dict)  # corrected layer -> why its int32 bias became float

    @property
    def agreement(self) -> dict:
        """Per model, its :class:`~bnpass.agreement.AgreementMeter` against the reference."""
        return self.scores.agreement

    def agreement_line(self) -> str:
        """``agreement with reference (N samples): 41.2% -> 98.6% top-1, output error 0.83 -> 0.07``; "" when
        the models were not compared (a forced candidate)."""
        if not self.agreement:
            return ""
        return format_agreement(self.agreement[GIVEN], self.agreement[self.chosen])


def pair_batchnorms(model: onnx.ModelProto, reference: onnx.ModelProto) -> list:
    """``[(position in the model's BN order, position in the reference's)]``, checked (see the
    module docstring); a ModelError names the first difference."""
    mine, theirs = batchnorm_nodes(model), batchnorm_nodes(reference)
    prefix = "the reference does not correspond to the model:"
    if len(mine) != len(theirs):
        hint = ""
        if not mine:
            hint = ("; if the model's BNs were folded before it was compressed, fold the reference's the same way "
                    "(bnpass ORIGINAL.onnx ORIGINAL_folded.onnx --fold-only) and give that")
        raise ModelError(f"{prefix} it has {plural(len(theirs), 'BatchNormalization node')}, the model "
                         f"{len(mine)}{hint}")
    names, reference_names = [bn.name for bn in mine], [bn.name for bn in theirs]
    if all(names) and len(set(names)) == len(names) and set(names) == set(reference_names):
        where = {name: position for position, name in enumerate(reference_names)}
        pairs = [(position, where[name]) for position, name in enumerate(names)]
    else:
        pairs = [(position, position) for position in range(len(mine))]
    model_index, reference_index = GraphIndex(model), GraphIndex(reference)
    for position, reference_position in pairs:
        bn, other = mine[position], theirs[reference_position]
        label = f"BatchNormalization #{position + 1} ('{node_label(bn)}' / '{node_label(other)}')"
        stored = [reference_index.constant(name) for name in other.input[3:5]]
        if any(value is None for value in stored):
            raise ModelError(f"{prefix} the running statistics of the reference's {label} are not constants")
        own = model_index.constant(bn.input[3])
        channels, reference_channels = (own.value.size if own is not None else None), stored[0].value.size
        if channels is not None and channels != reference_channels:
            raise ModelError(f"{prefix} {label} has {channels} channels in the model, {reference_channels} in the "
                             "reference")
        epsilon, reference_epsilon = attribute(bn, "epsilon", 1e-5), attribute(other, "epsilon", 1e-5)
        if np.float32(epsilon) != np.float32(reference_epsilon):  # attributes are float32; the default is 1e-5
            raise ModelError(f"{prefix} {label} has epsilon {epsilon:g} in the model, {reference_epsilon:g} in the "
                             "reference")
    specs, reference_specs = model_input_specs(model), model_input_specs(reference)
    for spec, other in zip(specs, reference_specs):
        if (spec.name, spec.dtype, len(spec.shape)) != (other.name, other.dtype, len(other.shape)):
            raise ModelError(f"{prefix} the model's input {spec.describe()} is {other.describe()} in the reference")
    if len(specs) != len(reference_specs):
        raise ModelError(f"{prefix} it has {plural(len(reference_specs), 'input')}, the model {len(specs)}")
    if len(model.graph.output) != len(reference.graph.output):
        raise ModelError(f"{prefix} it has {plural(len(reference.graph.output), 'output')}, the model "
                         f"{len(model.graph.output)}")
    return pairs


def check_reference_differs(model: onnx.ModelProto, reference: onnx.ModelProto) -> None:
    """A ModelError when ``reference`` holds the model's own weights and statistics (every initializer
    and ``Constant`` tensor the same): matched against itself a model keeps its stored statistics and
    agrees 100% with itself, so the run could only look like a success."""
    mine = _weights_digest(model)
    if mine is not None and mine == _weights_digest(reference):
        raise ModelError("the reference has the same weights and statistics as the model: give the uncompressed "
                         "model, from before compression")


def _weights_digest(model: onnx.ModelProto) -> Optional[str]:
    """A SHA-256 of every initializer (by name) and ``Constant`` tensor (in node order): name, type,
    shape and values; None for a model without any."""
    tensors = sorted(model.graph.initializer, key=lambda tensor: tensor.name)
    tensors += [attribute.t for node in model.graph.node if node.op_type == "Constant"
                for attribute in node.attribute if attribute.type == onnx.AttributeProto.TENSOR]
    if not tensors:
        return None
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(f"{tensor.name}:{tensor.data_type}:{list(tensor.dims)}:".encode())
        digest.update(numpy_helper.to_array(tensor).tobytes())
    return digest.hexdigest()


def match_targets(reference: onnx.ModelProto, pairs: list) -> list:
    """One :class:`~bnpass.calibration.MatchTarget` per pair (per BN of the model): the stored
    statistics of the reference BN it corresponds to."""
    theirs, index = batchnorm_nodes(reference), GraphIndex(reference)
    targets = []
    for _, reference_position in pairs:
        bn = theirs[reference_position]
        mean, var = (index.constant(name).value.astype(np.float64).reshape(-1) for name in bn.input[3:5])
        targets.append(MatchTarget(mean=mean, var=var, epsilon=float(attribute(bn, "epsilon", 1e-5))))
    return targets


class MatchReferencePass(Pass):
    """Re-estimate and match ``reference`` (a ModelProto or a path), keep the better candidate.

    Takes :class:`~bnpass.passes.ReestimateBatchNormPass`'s arguments, plus ``choose``: "auto" (by
    accuracy on labels where the data carry them, else agreement with the reference, on every
    calibration sample), "reestimated" or "matched"; ``correct_layers``: correct the layers without
    BN too (:mod:`bnpass.passes.correct_layers`), with their gain capped at ``max_gain`` (None: no cap);
    ``keep_per_tensor``: corrections fold into per-tensor quantized weights keeping one scale
    (:class:`~bnpass.passes.FoldBatchNormPass`).
    """

    def __init__(self, samples: Iterable, reference, *, choose: str = "auto", correct_layers: bool = True,
                 max_gain: Optional[float] = MAX_GAIN, keep_per_tensor: bool = False, **options):
        if choose not in CHOICES:
            raise ValueError(f"choose must be one of {CHOICES}, not {choose!r}")
        self.samples = samples
        self.settings = CalibrationSettings(**options)
        self.reference = as_model(reference)
        self.choose = choose
        self.correct_layers = correct_layers
        self.max_gain = max_gain
        self.keep_per_tensor = keep_per_tensor

    def call(self, model: onnx.ModelProto) -> ReferenceResult:
        started = time.perf_counter()
        has_batchnorm = bool(batchnorm_nodes(model))
        if not has_batchnorm and not self.correct_layers:
            return ReferenceResult(model=copy_model(model), modified=False)
        pairs = pair_batchnorms(model, self.reference)
        layer_pairs, refused = [], {}
        if self.correct_layers:
            layer_pairs = pair_layers(layers_without_batchnorm(model), layers_without_batchnorm(self.reference))
            kept, refused = foldable_layers(model, [mine for mine, _ in layer_pairs])
            for mine, theirs in layer_pairs:  # an unreadable reference layer: that one layer is left
                if theirs.unreadable and mine.label not in refused:
                    refused[mine.label] = f"its partner in the reference, '{theirs.label}': {theirs.unreadable}"
            kept_labels = {layer.label for layer in kept if layer.label not in refused}
            layer_pairs = [(mine, theirs) for mine, theirs in layer_pairs if mine.label in kept_labels]
            for label, reason in refused.items():
                logger.info("layer '%s' is not corrected: %s", label, reason)
        if not has_batchnorm and not layer_pairs:
            return ReferenceResult(model=copy_model(model), modified=False, refused_layers=refused)
        logits = logits_layer(model, [mine for mine, _ in layer_pairs])
        possible = (["reestimated"] if has_batchnorm else []) + ["matched"] + (
            [EXCEPT_LOGITS] if logits is not None else []) + ([GIVEN] if layer_pairs else [])
        if self.choose != "auto" and self.choose not in possible:
            raise ModelError(f"--candidate {self.choose}: not a candidate for this model (its candidates: "
                             f"{', '.join(possible)})")
        batch_size_for_evaluation = input_batch_size(model, self.reference)
        augmented, origins = insert_identity_batchnorms(model, [mine for mine, _ in layer_pairs])
        augmented_reference, reference_origins = insert_identity_batchnorms(
            self.reference, [theirs for _, theirs in layer_pairs])
        partner = {mine.label: theirs.label for mine, theirs in layer_pairs}
        where = {origin: position for position, origin in enumerate(reference_origins)}
        batchnorm_partner = dict(pairs)
        augmented_pairs = [
            (position, where[("bn", batchnorm_partner[origin[1]])] if origin[0] == "bn"
             else where[("layer", partner[origin[1]])]) for position, origin in enumerate(origins)]
        min_ratio = 0.0 if self.max_gain is None else 1 / self.max_gain ** 2
        targets = [target if origin[0] == "bn" else replace(target, min_ratio=min_ratio)
                   for target, origin in zip(match_targets(augmented_reference, augmented_pairs), origins)]
        run = CalibrationRun(self.samples, self.settings)
        matched = run.copy(augmented, mode="matched", targets=targets)
        observed = run.copy(augmented_reference, mode="observe")
        plain = run.copy(model) if has_batchnorm else None
        if self.choose == "auto":  # a forced candidate is not compared: one reading
            run.require_second_reading("--reference")
        what = " and ".join(part for part in (
            plural(len(pairs), "BatchNormalization node") if has_batchnorm else "",
            plural(len(layer_pairs), "layer") + " without BatchNormalization" if layer_pairs else "") if part)
        opened = run.open([copy for copy in (matched, observed, plain) if copy is not None], what=what)
        sessions = _Sessions(opened[2] if plain is not None else None, opened[0], opened[1], augmented_pairs)
        logger.info("matching the reference model as well: %d sessions per batch, then %s", len(opened),
                    "every candidate compared with it on the same samples" if self.choose == "auto" else
                    f"the {self.choose} candidate kept, as asked (nothing compared)")
        sessions.collect(run.feeds())
        device = sessions.matched.device
        taps, mode = matched.taps, self.settings.stats
        reestimated = [checked_statistics(tap, moment, mode) for tap, moment in
                       zip(plain.taps, sessions.plain_moments)] if plain is not None else []
        compressed = [checked_statistics(tap, moment, mode) for tap, moment in zip(taps, sessions.matched_moments)]
        references = [checked_statistics(tap, sessions.reference_moments[reference_position], mode)[:2]
                      for tap, (_, reference_position) in zip(taps, augmented_pairs)]
        matches = [match_statistics(target.mean, target.var, target.epsilon, *reference, *own[:2],
                                    min_ratio=target.min_ratio, name=tap.bn)
                   for tap, target, reference, own in zip(taps, targets, references, compressed)]
        del sessions, opened  # the calibration sessions' memory goes back before the candidates are made

        preprocessing = getattr(self.samples, "preprocessing", None)
        inserted = inserted_names(augmented, origins)
        candidates, written, folds = {}, {}, {}
        if has_batchnorm:
            candidates["reestimated"] = copy_model(model)
            written["reestimated"] = write_statistics(candidates["reestimated"], plain.taps, reestimated,
                                                      preprocessing=preprocessing)
            if holds_statistics(model, plain.taps, reestimated):  # ``modified`` exact: the model as given
                candidates["reestimated"], written["reestimated"].modified = copy_model(model), False
        variants = {"matched": None}
        if logits is not None:
            variants[EXCEPT_LOGITS] = inserted[logits]
        if self.choose != "auto":  # forced: only the candidate asked for is made
            variants = {name: left for name, left in variants.items() if name == self.choose}
        given = fingerprint(model) if inserted else None  # to tell whether folded corrections changed anything
        for name, left in variants.items():
            candidate = copy_model(augmented)
            results = [(target.mean, target.var, count) if tap.bn == left else (match.mean, match.var, count)
                       for tap, target, match, (_, _, count) in zip(taps, targets, matches, compressed)]
            written[name] = write_statistics(candidate, taps, results, preprocessing=preprocessing, diagnose=False)
            if not inserted and holds_statistics(model, taps, results):  # as for "reestimated" above
                candidate, written[name].modified = copy_model(model), False
            written[name].stats = {label: entry for label, entry in written[name].stats.items()
                                   if label not in inserted.values()}
            if inserted:
                fold = FoldBatchNormPass(only=set(inserted.values()), activation_pairs="keep",
                                         keep_per_tensor=self.keep_per_tensor)(candidate)
                candidate, folds[name] = fold.model, fold
                # ``modified`` exact: the model with its corrections folded may be the model as given
                written[name].modified = fingerprint(candidate) != given
            candidates[name] = candidate
        names = list(candidates) + ([GIVEN] if layer_pairs else [])
        forced = self.choose != "auto"
        compared = time.perf_counter()
        scores = Scores() if forced else score_models(  # a forced candidate needs no second reading
            self.reference, model, candidates, run.evaluation_feeds(batch_size_for_evaluation), run.providers,
            threads=self.settings.threads, tf32=self.settings.tf32)
        comparing_seconds = time.perf_counter() - compared if not forced else 0.0
        choice = choose(scores, names, self.choose if forced else None)
        chosen = choice.chosen
        if chosen == GIVEN:
            kept = WrittenStatistics()
            candidates[GIVEN] = copy_model(model)
        else:
            kept = written[chosen]
        result = ReferenceResult(
            model=candidates[chosen], modified=kept.modified, stats=kept.stats,
            warnings=written["reestimated"].warnings if has_batchnorm else [], samples=run.samples_read,
            batches=run.batches_read, batch_size=run.batch_size, device=device, chosen=chosen, why=choice.why,
            choice=choice, scores=scores, refused_layers=refused, logits=logits, comparing_seconds=comparing_seconds,
            per_channel=folds[chosen].per_channel if chosen in folds else [],
            float_biases=folds[chosen].float_biases if chosen in folds else {})
        if scores.labels_set_aside:
            result.warnings.append(scores.labels_set_aside)
        label_of = {name: label for label, name in inserted.items()}
        for tap, reference, own, match in zip(taps, references, compressed, matches):
            if tap.bn in label_of:
                result.layers[label_of[tap.bn]] = LayerCorrection(reference, own[:2], match)
                continue
            result.reference_moments[tap.bn] = reference
            result.compressed_moments[tap.bn] = own[:2]
            result.matched[tap.bn] = match
        for tap, (mean, var, _) in zip(plain.taps if plain is not None else [], reestimated):
            result.reestimated[tap.bn] = (mean, var)
        bn_pairs = [pair for pair, origin in zip(augmented_pairs, origins) if origin[0] == "bn"]
        bn_targets = [target for target, origin in zip(targets, origins) if origin[0] == "bn"]
        bn_references = [reference for reference, origin in zip(references, origins) if origin[0] == "bn"]
        # Forced, nothing was chosen, so nothing could be chosen wrong; with labels, they chose.
        warning = "" if scores.labelled or forced or not has_batchnorm else _domain_warning(
            augmented_reference, bn_pairs, bn_targets, bn_references)
        if warning:
            logger.warning("%s", warning)
            result.warnings.append(warning)
        result.seconds = time.perf_counter() - started
        return result

    def ensures(self, result: ReferenceResult, model: onnx.ModelProto) -> None:
        """The output has the input's BNs, in order: statistics change, the inserted BNs are folded."""
        if batchnorm_labels(result.model) != batchnorm_labels(model):
            raise PassContractError("the output's BatchNormalization nodes are not the input's (an inserted "
                                    "correction BN left, or one of the model's lost)")


class _Sessions:
    """The calibration sessions of one reference run, fed the same batches in lockstep (``plain`` None
    for a model without BN of its own)."""

    def __init__(self, plain: Optional[StatisticsSession], matched: StatisticsSession,
                 observed: StatisticsSession, pairs: list):
        self.plain, self.matched, self.observed, self.pairs = plain, matched, observed, pairs
        self.plain_moments = plain.new_moments() if plain is not None else []
        self.matched_moments = matched.new_moments()
        self.reference_moments = observed.new_moments()

    def absorb(self, feed: dict, observed: list) -> None:
        """One batch through every session, given the reference's outputs (``observed``) on it: the
        reference's moments feed the matched copy."""
        self.observed.absorb(self.reference_moments, observed)
        reference_inputs = {}
        for tap, (_, reference_position) in zip(self.matched.taps, self.pairs):
            mean, var, _ = observed[3 * reference_position: 3 * reference_position + 3]
            reference_inputs[tap.reference_mean] = mean
            reference_inputs[tap.reference_var] = var
        self.matched.absorb(self.matched_moments, self.matched.runner.run({**feed, **reference_inputs}))
        if self.plain is not None:
            self.plain.absorb(self.plain_moments, self.plain.runner.run(feed))

    def collect(self, feeds) -> None:
        """Every batch through every session, the reference's first (the next batch copied to the device
        while one runs)."""
        feed_each(feeds, self.observed.runner, self.absorb)


def _domain_warning(reference: onnx.ModelProto, pairs: list, targets: list, moments: list) -> str:
    """A warning when the reference's first BNs see the calibration data unlike its training data
    (see the module docstring), else "". ``targets`` and ``moments`` (m_o, v_o) are per pair."""
    theirs = batchnorm_nodes(reference)
    first = first_batchnorms(reference)  # node wrappers, compared while both lists are alive
    for (_, reference_position), (mean, var), target in zip(pairs, moments, targets):
        bn = theirs[reference_position]
        if not any(bn is node for node in first):
            continue
        shift = input_shift(bn, target.mean, target.var, mean, var)
        if shift is None:
            continue
        if not (1 / DOMAIN_SPREAD_LIMIT <= shift.std_ratio <= DOMAIN_SPREAD_LIMIT) or (
                shift.mean_shift > DOMAIN_SHIFT_LIMIT):
            return (f"the reference's first BatchNormalization ('{node_label(bn)}') sees the calibration data "
                    f"with {shift.std_ratio:.2g}x the spread it was trained on (mean moved by "
                    f"{shift.mean_shift:.2g} standard deviations): the data differ from the reference's own, so "
                    "agreement with it may favour the wrong candidate; give labels to choose by accuracy ((inputs, "
                    "labels) from a loader, or a 'labels' array in .npz files), or choose one with --candidate")
    return ""
