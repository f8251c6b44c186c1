"""Per-BN results -> the closing summary (text) and the ``--report`` file (JSON)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Optional

import numpy as np
import onnx

from .calibration import batchnorm_nodes
from .data import plural
from .graph import attribute, node_label
from .passes import FoldResult, ReestimateResult
from .passes.candidates import CORRECTED, EXCEPT_LOGITS, GIVEN, MATCHED, REESTIMATED, spelled
from .passes.correct_layers import EPSILON as CORRECTION_EPSILON
from .passes.match_reference import ReferenceResult
from .plot import BatchNormDrift, measure_drift
from .stats import drift
from .version import __version__


def _summary(values: Optional[np.ndarray]) -> Optional[dict]:
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float64)
    return {"min": float(values.min()), "max": float(values.max()), "mean": float(values.mean())}


def _percentiles(values) -> dict:
    """Median and 10-90% range over channels of the finite values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return {"p10": None, "median": None, "p90": None}
    low, median, high = np.percentile(values, [10, 50, 90])
    return {"p10": float(low), "median": float(median), "p90": float(high)}


def _epsilons(model: onnx.ModelProto) -> dict:
    return {node_label(bn): float(attribute(bn, "epsilon", 1e-5)) for bn in batchnorm_nodes(model)}


def reference_record(result: ReferenceResult) -> dict:
    """The ``reference`` part of the report: what was kept, by which criterion and why, and every model's
    scores on the same samples."""
    scores, choice = result.scores, result.choice
    record = {
        "chosen": result.chosen, "why": result.why,
        "criterion": choice.criterion if choice else None,
        "p_value": choice.p_value if choice else None,
        "samples": scores.samples, "labelled": scores.labelled, "labels_set_aside": scores.labels_set_aside or None,
        "agreement": {name: {"top1": meter.top1, "output_error": meter.relative_error}
                      for name, meter in scores.agreement.items()},
        "differ": {f"{a} not {b}": count for (a, b), count in scores.discordant.items()},
    }
    if scores.labelled:
        record["accuracy"] = {name: meter.accuracy for name, meter in scores.accuracy.items()}
    if result.layers or result.refused_layers:
        record["layers"] = {label: {"reference_output": {"mean": _summary(layer.reference_moments[0]),
                                                         "var": _summary(layer.reference_moments[1])},
                                    "compressed_output": {"mean": _summary(layer.compressed_moments[0]),
                                                          "var": _summary(layer.compressed_moments[1])},
                                    "rules": layer.matched.rule_counts()}
                            for label, layer in result.layers.items()}
        record["layers_not_corrected"] = dict(result.refused_layers)
    return record


def _matching_record(result: ReferenceResult, name: str, epsilon: float, stats) -> dict:
    """Per BN with --reference: the reference's input moments, the matched statistics and their rules,
    and the matched shift: where the reference BN's output sits, in its own stored units, which is
    exactly what matching keeps and re-estimation resets (to a mean of 0 and a spread of 1)."""
    reference_mean, reference_var = result.reference_moments[name]
    matched = result.matched[name]
    record = {"reference_input": {"mean": _summary(reference_mean), "var": _summary(reference_var)},
              "matched": {"mean": _summary(matched.mean), "var": _summary(matched.var),
                          "rules": matched.rule_counts()}}
    if stats is not None and stats.old_mean is not None and stats.old_var is not None:
        scale = np.sqrt(stats.old_var + epsilon)
        with np.errstate(divide="ignore", invalid="ignore"):
            record["matched_shift"] = {"mean": _percentiles((reference_mean - stats.old_mean) / scale),
                                       "spread": _percentiles(np.sqrt(reference_var + epsilon) / scale)}
    return record


def batchnorm_drifts(model: onnx.ModelProto, result: ReestimateResult) -> list:
    """``--plot``'s input: per BN of ``model`` (the input model), in graph order, how far the statistics
    written (the kept candidate's) moved from the stored ones and, with a reference, how far the BN's
    input in the compressed model (upstream as kept) is from the uncompressed model's."""
    epsilons, drifts = _epsilons(model), []
    for name, stats in result.stats.items():
        if stats.old_mean is None or stats.old_var is None:
            continue
        activations = {}
        if isinstance(result, ReferenceResult):
            reference_mean, reference_var = result.reference_moments[name]
            input_mean, input_var = (result.compressed_moments if result.chosen == MATCHED
                                     else result.reestimated)[name]
            activations = dict(reference_mean=reference_mean, reference_var=reference_var, input_mean=input_mean,
                               input_var=input_var)
        drifts.append(measure_drift(name, epsilons[name], stats.old_mean, stats.old_var, stats.mean, stats.var,
                                    **activations))
    return drifts


def layer_drifts(result: ReferenceResult) -> list:
    """``--plot``'s input for a model without BN (:data:`bnpass.plot.LAYER_SERIES`): per corrected layer, in
    graph order, its output's moments against the uncompressed layer's (m_o, v_o), in the latter's units: as
    kept (``mean_shift``, ``variance_ratio``) and before its own correction (``reference_*``: (m_c, v_c),
    earlier layers corrected). Corrected, the output is (x - mu') / sqrt(v' + e): mean (m_c - mu') /
    sqrt(v' + e), variance v_c / (v' + e); a layer the kept candidate leaves as given keeps (m_c, v_c)."""
    corrected = result.chosen in CORRECTED
    drifts = []
    for label, layer in result.layers.items():
        (reference_mean, reference_var), (mean, var) = layer.reference_moments, layer.compressed_moments
        before = drift(mean, var, reference_mean, reference_var, CORRECTION_EPSILON)
        if corrected and not (result.chosen == EXCEPT_LOGITS and label == result.logits):
            scale_squared = np.asarray(layer.matched.var, np.float64) + CORRECTION_EPSILON
            mean = (np.asarray(mean) - layer.matched.mean) / np.sqrt(scale_squared)
            var = np.asarray(var) / scale_squared
        drifts.append(BatchNormDrift(label, *drift(mean, var, reference_mean, reference_var, CORRECTION_EPSILON),
                                     *before))
    return drifts


def layer_drift_title(result: ReferenceResult) -> str:
    return (f"layer outputs against the uncompressed model: the {spelled(result.chosen)} candidate, kept "
            f"({result.choice.criterion if result.choice else 'asked for'})")


def drift_title(result: ReestimateResult) -> str:
    """The plot's title: what was written."""
    if isinstance(result, ReferenceResult):
        return (f"BatchNormalization statistics per node: the {spelled(result.chosen)} candidate, kept "
                f"({result.choice.criterion if result.choice else 'asked for'})")
    return "BatchNormalization statistics per node: re-estimated from the calibration data"


def batchnorm_records(model: onnx.ModelProto, reestimate: Optional[ReestimateResult],
                      fold: Optional[FoldResult]) -> list:
    """One JSON-ready record per BN of the input ``model``, in node order."""
    epsilons = _epsilons(model)
    bn_names = list(epsilons)
    folded_into = dict(fold.folded) if fold else {}
    records = []
    for name in bn_names:
        record = {"name": name}
        stats = reestimate.stats.get(name) if reestimate else None
        if stats is not None:
            record["reestimated"] = stats.written
            record["values_per_channel"] = stats.count
            record["old"] = {"mean": _summary(stats.old_mean), "var": _summary(stats.old_var)}
            record["new"] = {"mean": _summary(stats.mean), "var": _summary(stats.var)}
            if not stats.written:
                record["not_reestimated_because"] = stats.reason
        else:
            record["reestimated"] = False
        if isinstance(reestimate, ReferenceResult) and name in reestimate.matched:
            record.update(_matching_record(reestimate, name, epsilons[name], stats))
        if name in folded_into:
            record["folded_into"] = folded_into[name]
            if name in fold.removed_pairs:
                record["activation_pair_removed"] = list(fold.removed_pairs[name])
        elif fold is not None:
            record["left_because"] = fold.skipped.get(name, "folding was not requested")
        records.append(record)
    return records


def group_reasons(skipped: dict) -> list:
    """``[(reason, [bn names])]``: BNs that stay for the same reason but for the node names in it
    (quoted names become '…'), largest group first, then in first-seen order."""
    groups: dict = {}
    for name, reason in skipped.items():
        groups.setdefault(re.sub(r"'[^']*'", "'…'", reason), []).append(name)
    return sorted(groups.items(), key=lambda item: -len(item[1]))


def _names(names: list, shown: int = 3) -> str:
    if len(names) <= shown:
        return ", ".join(names)
    return ", ".join(names[:shown]) + f", ... ({len(names)} in all)"


def summary_lines(bn_names: list, reestimate: Optional[ReestimateResult], fold: Optional[FoldResult],
                  stats_mode: str, *, verbose: bool = False) -> list:
    """The closing summary: what was re-estimated and folded, the BNs that stay grouped by reason.

    ``verbose`` adds one line per BN: its statistics before and after, and what it folded into
    (or the full reason it stays).
    """
    lines = []
    if reestimate is not None and bn_names:
        lines.append(_calibration_line(bn_names, reestimate, stats_mode))
        for name, stats in reestimate.stats.items():
            if not stats.written and reestimate.chosen != GIVEN:
                lines.append(f"  not re-estimated: {name}: {stats.reason}")
    if isinstance(reestimate, ReferenceResult) and (bn_names or reestimate.layers):
        lines.extend(_reference_lines(reestimate))
    elif reestimate is not None and reestimate.choice is not None:
        lines.extend(_choice_lines(reestimate))
    if fold is not None:
        patterns = Counter(fold.patterns.values())
        kinds = ", ".join(f"{count} {pattern}" for pattern, count in sorted(patterns.items(), key=lambda p: -p[1]))
        pairs = len(fold.removed_pairs)
        removed = (f"; removed {plural(pairs, 'activation QuantizeLinear/DequantizeLinear pair')} between a layer and "
                   "its BN (the pair after the BN quantizes the folded layer)" if pairs else "")
        lines.append(f"folded {len(fold.folded)} of {plural(len(bn_names), 'BatchNormalization node')}"
                     + (f" ({kinds})" if kinds else "") + removed
                     + (f"; {len(fold.skipped)} left:" if fold.skipped else ""))
        if not verbose:
            for reason, names in group_reasons(fold.skipped):
                lines.append(f"  {len(names)} left ({_names(names)}): {reason}")
        if fold.per_channel:
            lines.append(per_channel_line(fold.per_channel))
        lines.extend(float_bias_lines(fold.float_biases))
    if verbose:
        lines.extend(_per_batchnorm_lines(bn_names, reestimate, fold))
    return lines


def per_channel_line(layers: list) -> str:
    """One line: the quantized weights whose single scale the fold made one scale per output channel."""
    return (f"  {plural(len(layers), 'quantized weight')} went from one scale per tensor to one per output channel "
            f"({_names(layers)}) to take the fold exactly; --keep-per-tensor keeps one scale, re-rounding the weight")


def float_bias_lines(float_biases: dict) -> list:
    """One line per reason: the layers whose int32 bias DequantizeLinear the fold wrote in float."""
    return [f"  {len(names)} int32 bias DequantizeLinear written in float ({_names(names)}): {reason}"
            for reason, names in group_reasons(float_biases)]


def closing_note(bn_names: list, reestimate: Optional[ReestimateResult], fold: Optional[FoldResult]) -> str:
    """What the closing line adds when the run left something as it was: ``"; left as given: 2 of 6
    BatchNormalization nodes not folded (its input comes from Relu '…'), 1 of 7 layers not corrected (…)"``,
    or that the output is an unchanged copy; "" when everything was done."""
    left = []
    if reestimate is not None and bn_names:
        not_written = {name: stats.reason for name, stats in reestimate.stats.items() if not stats.written}
        if not_written:
            left.append(f"{len(not_written)} of {plural(len(bn_names), 'BatchNormalization node')} not re-estimated "
                        f"({_short(group_reasons(not_written)[0][0])})")
    if fold is not None and fold.skipped:
        left.append(f"{len(fold.skipped)} of {plural(len(bn_names), 'BatchNormalization node')} not folded "
                    f"({_short(group_reasons(fold.skipped)[0][0])})")
    if isinstance(reestimate, ReferenceResult):
        if bn_names and reestimate.chosen == GIVEN:
            left.append(f"{plural(len(bn_names), 'BatchNormalization node')}' statistics as stored (the "
                        f"{spelled(GIVEN)} candidate was kept)")
        total = len(reestimate.layers) + len(reestimate.refused_layers)
        if reestimate.layers and reestimate.chosen in (GIVEN, REESTIMATED):
            left.append(f"{total} of {plural(total, 'layer')} without BatchNormalization not corrected (the "
                        f"{spelled(reestimate.chosen)} candidate was kept)")
        elif reestimate.refused_layers:
            left.append(f"{len(reestimate.refused_layers)} of {plural(total, 'layer')} without BatchNormalization "
                        f"not corrected ({_short(group_reasons(reestimate.refused_layers)[0][0])})")
    changed = (reestimate is not None and reestimate.modified) or (fold is not None and fold.modified)
    if not changed:
        return ": an unchanged copy" + (f" ({'; '.join(left)})" if left else "")
    return "; left as given: " + ", ".join(left) if left else ""


def _short(reason: str, limit: int = 120) -> str:
    """The first clause of a reason, for one line ("its input comes from Relu '…'")."""
    clause = re.split(r"[;:(]| \(|, (?=and|so|which)", reason, maxsplit=1)[0].strip()
    return clause if len(clause) <= limit else clause[:limit - 3].rstrip() + "..."


def no_batchnorm_notice(model: onnx.ModelProto, path: str) -> str:
    """Two lines for a model without BatchNormalization: what likely removed it, and the fix."""
    producer = model.producer_name.lower()
    if producer == "pytorch":
        cause = (f"exported by PyTorch {model.producer_version}: torch.onnx.export fuses BN into the layer before it "
                 "by default; re-export with dynamo=True, optimize=False (or dynamo=False, do_constant_folding=False)")
    elif producer == "tf2onnx":
        cause = ("converted by tf2onnx, which fuses BN into the Conv before it by default; convert with "
                 "tf2onnx.convert.from_keras(..., optimizers=...) leaving out 'remove_back_to_back'")
    else:
        cause = ("if the network had BN, its export fused BN into the layers before it; export it with BN kept "
                 "(README: \"Exporting with BN kept\")")
    return (f"'{path}' has no BatchNormalization node; writing an unchanged copy\n  {cause}\n  or, with the model "
            "from before compression, --reference ORIGINAL.onnx can repair it: every layer's output matched to it")


def _calibration_line(bn_names: list, result: ReestimateResult, stats_mode: str) -> str:
    """What was written into the BNs (re-estimated or matched statistics, or nothing: the model as given
    kept), from what, and how long the calibration and the comparison of the models each took."""
    written = sum(1 for s in result.stats.values() if s.written)
    total = plural(len(bn_names), "BatchNormalization node")
    if result.chosen in CORRECTED:
        what = f"matched {written} of {total} to the reference, from"
    elif result.chosen == GIVEN:
        what = f"kept the stored statistics of {total} (the model as given), after calibrating on"
    else:
        what = f"re-estimated {written} of {total} from"
    timing = f"{result.seconds:.1f} s"
    if result.comparing_seconds:
        timing += (f": {result.seconds - result.comparing_seconds:.1f} s calibrating, {result.comparing_seconds:.1f} s "
                   "comparing the models on a second reading")
    return (f"{what} {plural(result.samples, 'sample')} ({plural(result.batches, 'batch')} of up to "
            f"{result.batch_size}, {stats_mode} statistics, {result.device}, {timing})")


def _choice_lines(result: ReestimateResult) -> list:
    """The choice line and every model's figures on the same samples (where the models were compared)."""
    scores = result.scores
    kind = "statistics" if result.stats or result.chosen == REESTIMATED else "candidate"
    if result.chosen == GIVEN and not isinstance(result, ReferenceResult):
        kind = "model"
    lines = [f"kept the {spelled(result.chosen)} {kind}: {result.why}"
             + (" (--candidate; the candidates were not compared)" if scores is None or not scores.samples else "")]
    if scores is None or not scores.samples:
        return lines
    if scores.labelled:
        accuracy = scores.accuracy
        lines.append(f"top-1 accuracy on the labels of {plural(scores.samples, 'sample')}: " + ", ".join(
            f"{spelled(name)} {100 * accuracy[name].accuracy:.1f}%"
            for name in accuracy))
    elif scores.agreement and all(meter.top1 is not None for meter in scores.agreement.values()):
        lines.append(f"top-1 agreement with the reference on all {plural(scores.samples, 'sample')}: " + ", ".join(
            f"{spelled(name)} {100 * meter.top1:.1f}%" for name, meter in scores.agreement.items()))
    return lines


def _reference_lines(result: ReferenceResult) -> list:
    lines = _choice_lines(result)
    if result.agreement_line():
        lines.append(result.agreement_line())
    if result.layers or result.refused_layers:
        total = len(result.layers) + len(result.refused_layers)
        lines.append(f"corrected {len(result.layers)} of {plural(total, 'layer')} without BatchNormalization (mean "
                     "and spread matched to the reference's layer outputs)"
                     + ("; not kept" if result.chosen in (GIVEN, REESTIMATED) else ""))
        for label, reason in result.refused_layers.items():
            lines.append(f"  not corrected: {label}: {reason}")
        if result.per_channel:
            lines.append(per_channel_line(result.per_channel))
        lines.extend(float_bias_lines(result.float_biases))
    changed = Counter()
    for matched in [*result.matched.values(), *(layer.matched for layer in result.layers.values())]:
        changed.update({rule: count for rule, count in matched.rule_counts().items() if rule != "matched"})
    if changed:
        lines.append("  matching rules other than the formula: " + ", ".join(
            f"{plural(count, 'channel')} {rule.replace('_', ' ')}" for rule, count in changed.items()))
    return lines


def _per_batchnorm_lines(bn_names: list, reestimate: Optional[ReestimateResult], fold: Optional[FoldResult]) -> list:
    folded_into = dict(fold.folded) if fold else {}
    lines = []
    for name in bn_names:
        parts = []
        stats = reestimate.stats.get(name) if reestimate else None
        if stats is not None and stats.old_mean is not None and stats.old_var is not None:
            parts.append(f"mean {_median(stats.old_mean):.4g} -> {_median(stats.mean):.4g}, "
                         f"var {_median(stats.old_var):.4g} -> {_median(stats.var):.4g} (medians over "
                         f"{plural(stats.mean.size, 'channel')})")
        if name in folded_into:
            parts.append(f"folded into {folded_into[name]} ({fold.patterns.get(name, '')})")
        elif fold is not None and name in fold.skipped:
            parts.append(f"left: {fold.skipped[name]}")
        lines.append(f"  {name}: " + "; ".join(parts) if parts else f"  {name}")
    return lines


def _median(values) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def provenance(reestimate: Optional[ReestimateResult], fold: Optional[FoldResult], *, stats: str,
               batchnorms: int, reference_path: Optional[str] = None) -> dict:
    """What an output model records of the run that made it (``metadata_props``, keys ``bnpass.*``)."""
    entries = {"bnpass.version": __version__}
    if reestimate is not None:
        entries.update({"bnpass.stats": stats, "bnpass.samples": reestimate.samples,
                        "bnpass.batch_size": reestimate.batch_size})
    if isinstance(reestimate, ReferenceResult):
        entries.update({"bnpass.reference": os.path.basename(reference_path),
                        "bnpass.candidate": reestimate.chosen})
    if fold is not None:
        entries["bnpass.folded"] = f"{len(fold.folded)} of {batchnorms}"
    return entries


def run_report(model: onnx.ModelProto, reestimate: Optional[ReestimateResult], fold: Optional[FoldResult],
               difference, *, input_path: str, output_path: str, stats: str, seconds: float,
               reference_path: Optional[str] = None) -> bytes:
    """The ``--report`` file's content (JSON): the run, per BN its statistics and fold, the reference's
    part (README: "The report's reference part") and ``--verify``'s difference."""
    report = {
        "bnpass_version": __version__,
        "input": input_path, "output": output_path, "stats": stats if reestimate else None,
        "seconds": round(seconds, 3),
        "samples": reestimate.samples if reestimate else 0,
        "batches": reestimate.batches if reestimate else 0,
        "batch_size": reestimate.batch_size if reestimate else None,
        "device": reestimate.device if reestimate else None,
        "warnings": reestimate.warnings if reestimate else [],
        "batchnorms": batchnorm_records(model, reestimate, fold),
        "batchnorms_not_folded": dict(fold.skipped) if fold is not None else {},
        "activation_pairs_removed": len(fold.removed_pairs) if fold is not None else 0,
    }
    if reestimate is not None:
        report["comparing_seconds"] = round(reestimate.comparing_seconds, 3)
    if isinstance(reestimate, ReferenceResult):
        report["reference"] = {"model": reference_path, **reference_record(reestimate)}
    elif reestimate is not None and reestimate.choice is not None:  # labels: the model as given vs re-estimated
        scores = reestimate.scores
        report["choice"] = {"chosen": reestimate.chosen, "why": reestimate.why, "p_value": reestimate.choice.p_value,
                            "samples": scores.samples,
                            "accuracy": {name: meter.accuracy for name, meter in scores.accuracy.items()}}
    if difference is not None:
        report["verify"] = {"batches": difference.batches, "max_abs": difference.max_abs,
                            "max_rel": difference.max_rel}
    return (json.dumps(report, indent=2) + "\n").encode()
