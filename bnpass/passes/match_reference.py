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

**The steps**, one method each (:meth:`MatchReferencePass.call` is their sequence): ``_plan`` pairs
the BNs and the layers without BN with the reference's and lists the candidates (a :class:`_Plan`);
``_read`` is the first reading, which measures every site (a :class:`_Site` per BN of the augmented
model: its own or inserted after a layer); ``_make_candidates`` writes and folds them; ``_score`` is
the second reading; :func:`~bnpass.passes.candidates.choose` keeps one; ``_result`` reports it.

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

BNs correspond by node name when both models name every BN, uniquely, with the same set of names;
otherwise by order (:func:`~bnpass.passes.correct_layers.pair_by_name`, the rule layers pair by too). Counts,
channels, epsilons, inputs and outputs must agree, or a ModelError names the first difference. Only
the BNs are compared, so a QDQ-quantized model matches its float original. """

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
from .candidates import EXCEPT_LOGITS, GIVEN, MATCHED, REESTIMATED, Choice, Scores, choose, score_models
from .correct_layers import (
    MAX_GAIN,
    Augmented,
    BatchNormSite,
    LayerSite,
    foldable_layers,
    insert_identity_batchnorms,
    layers_without_batchnorm,
    logits_layer,
    pair_by_name,
    pair_layers,
)
from .fold_batchnorm import FoldBatchNormPass
from .reestimate_batchnorm import holds_statistics
from .statistics_session import StatisticsSession
from .written_statistics import ReestimateResult, WrittenStatistics, checked_statistics, write_statistics

logger = logging.getLogger(__name__)

CHOICES = ("auto", REESTIMATED, MATCHED, EXCEPT_LOGITS, GIVEN)  # --candidate
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
    pairs = list(enumerate(pair_by_name([bn.name for bn in mine], [bn.name for bn in theirs])))
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


def match_targets(reference: onnx.ModelProto, positions: list) -> list:
    """One :class:`~bnpass.calibration.MatchTarget` per entry of ``positions`` (positions among the
    reference's BNs): the stored statistics of that BN."""
    theirs, index = batchnorm_nodes(reference), GraphIndex(reference)
    targets = []
    for reference_position in positions:
        bn = theirs[reference_position]
        mean, var = (index.constant(name).value.astype(np.float64).reshape(-1) for name in bn.input[3:5])
        targets.append(MatchTarget(mean=mean, var=var, epsilon=float(attribute(bn, "epsilon", 1e-5))))
    return targets


@dataclass
class _Plan:
    """What a run corrects, decided before any data is read."""

    batchnorm_pairs: list  # [(position among the model's BNs, among the reference's)] (:func:`pair_batchnorms`)
    layer_pairs: list      # [(Layer of the model, Layer of the reference)]: the layers without BN corrected
    refused: dict          # layer label -> why it is not corrected
    logits: Optional[str]  # the logits layer, when corrected
    evaluation_batch: Optional[int] = None  # the batch size the models' own inputs fix (None: free)

    @property
    def has_batchnorm(self) -> bool:
        return bool(self.batchnorm_pairs)


@dataclass
class _Site:
    """One BN of the augmented model (one of its own, or one inserted after a layer) and what the first
    reading measured there: the reference's BN input moments (m_o, v_o), the compressed model's
    (m_c, v_c, count; upstream matched) and the statistics matched from them."""

    site: object  # a BatchNormSite or a LayerSite (:mod:`bnpass.passes.correct_layers`)
    reference_position: int  # its partner among the augmented reference's BNs
    target: MatchTarget
    tap: object = None
    reference: tuple = ()
    compressed: tuple = ()
    match: Optional[MatchedStatistics] = None

    @property
    def is_layer(self) -> bool:
        return isinstance(self.site, LayerSite)


@dataclass
class _Reading:
    """What the first reading gave: the augmented copies and their sites, plain re-estimation's taps
    and statistics (empty without BN), and the device the sessions ran on."""

    augmented: Augmented
    augmented_reference: Augmented
    sites: list
    plain_taps: list
    reestimated: list
    device: str = ""


@dataclass
class _Candidate:
    """A candidate model, what was written into it, and the fold of its layer corrections (None: none)."""

    model: onnx.ModelProto
    written: WrittenStatistics
    fold: Optional[object] = None


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

    @property
    def forced(self) -> bool:
        """A candidate asked for: nothing is compared (one reading), nothing can be chosen wrong."""
        return self.choose != "auto"

    def call(self, model: onnx.ModelProto) -> ReferenceResult:
        started = time.perf_counter()
        plan = self._plan(model)
        if not plan.has_batchnorm and not plan.layer_pairs:  # nothing to match: the model as given
            return ReferenceResult(model=copy_model(model), modified=False, refused_layers=plan.refused)
        run = CalibrationRun(self.samples, self.settings)
        reading = self._read(run, model, plan)
        candidates = self._make_candidates(model, plan, reading)
        scores, comparing_seconds = self._score(run, model, plan, candidates)
        choice = choose(scores, list(candidates) + ([GIVEN] if plan.layer_pairs else []),
                        self.choose if self.forced else None)
        result = self._result(model, plan, run, reading, candidates, scores, choice)
        result.comparing_seconds = comparing_seconds
        result.seconds = time.perf_counter() - started
        return result

    def ensures(self, result: ReferenceResult, model: onnx.ModelProto) -> None:
        """The output has the input's BNs, in order: statistics change, the inserted BNs are folded."""
        if batchnorm_labels(result.model) != batchnorm_labels(model):
            raise PassContractError("the output's BatchNormalization nodes are not the input's (an inserted "
                                    "correction BN left, or one of the model's lost)")

    def _plan(self, model: onnx.ModelProto) -> _Plan:
        """Pair the BNs and the layers without BN with the reference's (a ModelError names the first
        difference), check that a forced candidate is one, and the batch size the models' inputs fix for scoring."""
        has_batchnorm = bool(batchnorm_nodes(model))
        if not has_batchnorm and not self.correct_layers:
            return _Plan([], [], {}, None)
        batchnorm_pairs = pair_batchnorms(model, self.reference)
        layer_pairs, refused = [], {}
        if self.correct_layers:
            layer_pairs, refused = self._layer_pairs(model)
        logits = logits_layer(model, [mine for mine, _ in layer_pairs])
        candidates = ([REESTIMATED] if has_batchnorm else []) + [MATCHED] + (
            [EXCEPT_LOGITS] if logits is not None else []) + ([GIVEN] if layer_pairs else [])
        if has_batchnorm or layer_pairs:
            if self.forced and self.choose not in candidates:
                raise ModelError(f"--candidate {self.choose}: not a candidate for this model (its candidates: "
                                 f"{', '.join(candidates)})")
        evaluation_batch = input_batch_size(model, self.reference) if has_batchnorm or layer_pairs else None
        return _Plan(batchnorm_pairs, layer_pairs, refused, logits, evaluation_batch)

    def _layer_pairs(self, model: onnx.ModelProto) -> tuple:
        """``(pairs, refused)``: the layers without BN paired with the reference's, those that can be
        corrected, and why each other is not."""
        pairs = pair_layers(layers_without_batchnorm(model), layers_without_batchnorm(self.reference))
        kept, refused = foldable_layers(model, [mine for mine, _ in pairs])
        for mine, theirs in pairs:  # an unreadable reference layer: that one layer is left
            if theirs.unreadable and mine.label not in refused:
                refused[mine.label] = f"its partner in the reference, '{theirs.label}': {theirs.unreadable}"
        kept_labels = {layer.label for layer in kept if layer.label not in refused}
        for label, reason in refused.items():
            logger.info("layer '%s' is not corrected: %s", label, reason)
        return [(mine, theirs) for mine, theirs in pairs if mine.label in kept_labels], refused

    def _sites(self, plan: _Plan, augmented: Augmented, augmented_reference: Augmented) -> list:
        """One :class:`_Site` per BN of the augmented model, paired with its partner in the augmented
        reference and given its target (a corrected layer's: the identity, its gain bounded)."""
        partner_bn = dict(plan.batchnorm_pairs)
        partner_layer = {mine.label: theirs.label for mine, theirs in plan.layer_pairs}
        where = augmented_reference.position_of()
        partners = [where[BatchNormSite(partner_bn[site.position])] if isinstance(site, BatchNormSite)
                    else where[LayerSite(partner_layer[site.label])] for site in augmented.sites]
        min_ratio = 0.0 if self.max_gain is None else 1 / self.max_gain ** 2
        targets = match_targets(augmented_reference.model, partners)
        return [_Site(site, partner, replace(target, min_ratio=min_ratio) if isinstance(site, LayerSite) else target)
                for site, partner, target in zip(augmented.sites, partners, targets)]

    def _read(self, run: CalibrationRun, model: onnx.ModelProto, plan: _Plan) -> _Reading:
        """The first reading: every batch through the reference's observe copy, the matched copy (fed the
        reference's moments) and the plain copy; each site's moments and matched statistics."""
        augmented = insert_identity_batchnorms(model, [mine for mine, _ in plan.layer_pairs])
        augmented_reference = insert_identity_batchnorms(self.reference, [theirs for _, theirs in plan.layer_pairs])
        sites = self._sites(plan, augmented, augmented_reference)
        augmented_pairs = [(position, site.reference_position) for position, site in enumerate(sites)]
        matched = run.copy(augmented.model, mode="matched", targets=[site.target for site in sites])
        observed = run.copy(augmented_reference.model, mode="observe")
        plain = run.copy(model) if plan.has_batchnorm else None
        if not self.forced:
            run.require_second_reading("--reference")
        what = " and ".join(part for part in (
            plural(len(plan.batchnorm_pairs), "BatchNormalization node") if plan.has_batchnorm else "",
            plural(len(plan.layer_pairs), "layer") + " without BatchNormalization" if plan.layer_pairs else "")
            if part)
        opened = run.open([copy for copy in (matched, observed, plain) if copy is not None], what=what)
        sessions = _Sessions(opened[2] if plain is not None else None, opened[0], opened[1], augmented_pairs)
        logger.info("matching the reference model as well: %d sessions per batch, then %s", len(opened),
                    "every candidate compared with it on the same samples" if not self.forced else
                    f"the {self.choose} candidate kept, as asked (nothing compared)")
        sessions.collect(run.feeds())
        device = sessions.matched.device
        mode = self.settings.stats
        reestimated = [checked_statistics(tap, moment, mode) for tap, moment in
                       zip(plain.taps, sessions.plain_moments)] if plain is not None else []
        for site, tap, moment in zip(sites, matched.taps, sessions.matched_moments):
            site.tap = tap
            site.compressed = checked_statistics(tap, moment, mode)
            site.reference = checked_statistics(tap, sessions.reference_moments[site.reference_position], mode)[:2]
            site.match = match_statistics(site.target.mean, site.target.var, site.target.epsilon, *site.reference,
                                          *site.compressed[:2], min_ratio=site.target.min_ratio, name=tap.bn)
        del sessions, opened  # the calibration sessions' memory goes back before the candidates are made
        return _Reading(augmented, augmented_reference, sites, plain.taps if plain is not None else [],
                        reestimated, device)

    def _make_candidates(self, model: onnx.ModelProto, plan: _Plan, reading: _Reading) -> dict:
        """``{name: _Candidate}``: re-estimated (with BN), matched, and matched except the logits layer
        (when that layer is corrected); forced, only the one asked for is matched. ``modified`` is exact:
        a candidate that gives back the model as given says so."""
        preprocessing = getattr(self.samples, "preprocessing", None)
        candidates = {}
        if plan.has_batchnorm:
            output = copy_model(model)
            written = write_statistics(output, reading.plain_taps, reading.reestimated, preprocessing=preprocessing)
            if holds_statistics(model, reading.plain_taps, reading.reestimated):
                output, written.modified = copy_model(model), False
            candidates[REESTIMATED] = _Candidate(output, written)
        inserted = reading.augmented.inserted
        variants = {MATCHED: None}
        if plan.logits is not None:
            variants[EXCEPT_LOGITS] = inserted[plan.logits]  # its inserted BN keeps the identity
        if self.forced:
            variants = {name: left for name, left in variants.items() if name == self.choose}
        given = fingerprint(model) if inserted else None  # to tell whether folded corrections changed anything
        taps = [site.tap for site in reading.sites]
        for name, left in variants.items():
            output = copy_model(reading.augmented.model)
            results = [(site.target.mean, site.target.var, site.compressed[2]) if site.tap.bn == left
                       else (site.match.mean, site.match.var, site.compressed[2]) for site in reading.sites]
            written = write_statistics(output, taps, results, preprocessing=preprocessing, diagnose=False)
            written.stats = {label: entry for label, entry in written.stats.items()
                             if label not in inserted.values()}
            fold = None
            if inserted:
                fold = FoldBatchNormPass(only=set(inserted.values()), activation_pairs="keep",
                                         keep_per_tensor=self.keep_per_tensor)(output)
                output = fold.model
                written.modified = fingerprint(output) != given
            elif holds_statistics(model, taps, results):
                output, written.modified = copy_model(model), False
            candidates[name] = _Candidate(output, written, fold)
        return candidates

    def _score(self, run: CalibrationRun, model: onnx.ModelProto, plan: _Plan, candidates: dict) -> tuple:
        """``(scores, seconds)``: the second reading, every candidate, the model as given and the reference
        on every sample (:func:`~bnpass.passes.candidates.score_models`); forced, none (no reading)."""
        if self.forced:
            return Scores(), 0.0
        started = time.perf_counter()
        scores = score_models(self.reference, model, {name: made.model for name, made in candidates.items()},
                              run.evaluation_feeds(plan.evaluation_batch), run.providers,
                              threads=self.settings.threads, tf32=self.settings.tf32)
        return scores, time.perf_counter() - started

    def _result(self, model: onnx.ModelProto, plan: _Plan, run: CalibrationRun, reading: _Reading,
                candidates: dict, scores: Scores, choice: Choice) -> ReferenceResult:
        """The kept candidate, with every figure the choice and the report rest on."""
        chosen = choice.chosen
        kept = candidates[chosen] if chosen != GIVEN else _Candidate(copy_model(model), WrittenStatistics())
        result = ReferenceResult(
            model=kept.model, modified=kept.written.modified, stats=kept.written.stats,
            warnings=candidates[REESTIMATED].written.warnings if plan.has_batchnorm else [],
            samples=run.samples_read, batches=run.batches_read, batch_size=run.batch_size, device=reading.device,
            chosen=chosen, why=choice.why, choice=choice, scores=scores, refused_layers=plan.refused,
            logits=plan.logits, per_channel=kept.fold.per_channel if kept.fold is not None else [],
            float_biases=kept.fold.float_biases if kept.fold is not None else {})
        if scores.labels_set_aside:
            result.warnings.append(scores.labels_set_aside)
        label_of = {name: label for label, name in reading.augmented.inserted.items()}
        for site in reading.sites:
            if site.is_layer:
                result.layers[label_of[site.tap.bn]] = LayerCorrection(site.reference, site.compressed[:2], site.match)
            else:
                result.reference_moments[site.tap.bn] = site.reference
                result.compressed_moments[site.tap.bn] = site.compressed[:2]
                result.matched[site.tap.bn] = site.match
        for tap, (mean, var, _) in zip(reading.plain_taps, reading.reestimated):
            result.reestimated[tap.bn] = (mean, var)
        # Forced, nothing was chosen, so nothing could be chosen wrong; with labels, they chose.
        warning = "" if scores.labelled or self.forced or not plan.has_batchnorm else _domain_warning(
            reading.augmented_reference.model, [site for site in reading.sites if not site.is_layer])
        if warning:
            logger.warning("%s", warning)
            result.warnings.append(warning)
        return result


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


def _domain_warning(reference: onnx.ModelProto, sites: list) -> str:
    """A warning when the reference's first BNs see the calibration data unlike its training data
    (see the module docstring), else "". ``sites``: the :class:`_Site` of each of the model's own BNs."""
    theirs = batchnorm_nodes(reference)
    first = first_batchnorms(reference)  # node wrappers, compared while both lists are alive
    for site in sites:
        (mean, var), target, reference_position = site.reference, site.target, site.reference_position
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
