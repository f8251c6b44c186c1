"""Per-BN results -> the closing summary (text) and the ``--report`` file (JSON)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx

from .passes import FoldResult, ReestimateResult


def _summary(values: Optional[np.ndarray]) -> Optional[dict]:
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float64)
    return {"min": float(values.min()), "max": float(values.max()), "mean": float(values.mean())}


def batchnorm_records(bn_names: list, reestimate: Optional[ReestimateResult], fold: Optional[FoldResult]) -> list:
    """One JSON-ready record per BN of the input model, in node order."""
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
        if name in folded_into:
            record["folded_into"] = folded_into[name]
        elif fold is not None:
            record["left_because"] = fold.skipped.get(name, "folding was not requested")
        records.append(record)
    return records


def summary_lines(bn_names: list, reestimate: Optional[ReestimateResult], fold: Optional[FoldResult],
                  stats_mode: str) -> list:
    lines = []
    if reestimate is not None:
        written = sum(1 for s in reestimate.stats.values() if s.written)
        lines.append(f"re-estimated {written} of {len(bn_names)} BatchNormalization nodes from "
                     f"{reestimate.samples} samples ({reestimate.batches} batches of up to "
                     f"{reestimate.batch_size}, {stats_mode} statistics, {reestimate.device}, "
                     f"{reestimate.seconds:.1f} s)")
        for name, stats in reestimate.stats.items():
            if not stats.written:
                lines.append(f"  not re-estimated: {name}: {stats.reason}")
    if fold is not None:
        lines.append(f"folded {len(fold.folded)} of {len(bn_names)} BatchNormalization nodes"
                     + (f"; {len(fold.skipped)} left:" if fold.skipped else ""))
        for name, reason in fold.skipped.items():
            lines.append(f"  left {name}: {reason}")
    return lines


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
    return f"'{path}' has no BatchNormalization node; writing an unchanged copy\n  {cause}"
