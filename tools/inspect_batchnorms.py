"""Show which BatchNormalization nodes bnpass folds in ONNX models, and why the others stay.

For each model (a file, or every ``.onnx`` file of a folder), the script runs
``bnpass.fold_batchnorms`` (nothing is written) and prints a Markdown table: the number of
BatchNormalization nodes before and after folding, how many folded as each pattern
(``Conv->BN``, ``MatMul->Add->BN``, ``DequantizeLinear->Conv->BN``, ``BN->Gemm``...) and the time the
fold took. Then, for each BN that stays, its
model, name and the reason bnpass gives. ``--light`` adds the four light test models that the
installed onnx package ships (resnet50, densenet121, inception_v2, shufflenet). ``--group`` lists
each distinct reason once, with the number of BNs it applies to (node names in quotes become '…').

Usage (from the repository root)::

    python tools/inspect_batchnorms.py MODEL.onnx [MORE.onnx | FOLDER ...] [--light] [--group]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
import bnpass  # noqa: E402
from bnpass.report import group_reasons  # noqa: E402

LIGHT_MODELS = ("resnet50", "densenet121", "inception_v2", "shufflenet")


def light_model_paths() -> list:
    folder = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    return [folder / f"light_{name}.onnx" for name in LIGHT_MODELS]


def model_paths(arguments: list, light: bool) -> list:
    paths = []
    for argument in arguments:
        path = Path(argument)
        paths.extend(sorted(path.glob("*.onnx")) if path.is_dir() else [path])
    return paths + (light_model_paths() if light else [])


def inspect(path: Path) -> dict:
    """Fold the model at ``path`` (in memory) and describe what happened to each BN."""
    model = onnx.load(str(path))
    before = sum(1 for node in model.graph.node if node.op_type == "BatchNormalization")
    started = time.perf_counter()
    result = bnpass.fold_batchnorms(model)
    seconds = time.perf_counter() - started
    after = sum(1 for node in result.model.graph.node if node.op_type == "BatchNormalization")
    return dict(name=path.name, before=before, after=after, seconds=seconds, skipped=result.skipped,
                patterns=Counter(result.patterns.values()))


def print_tables(reports: list, group: bool) -> None:
    print("| model | BatchNormalization before | after | folded as | fold time |")
    print("|---|---|---|---|---|")
    for report in reports:
        patterns = ", ".join(f"{count} {pattern}" for pattern, count in sorted(report["patterns"].items())) or "-"
        print(f"| {report['name']} | {report['before']} | {report['after']} | {patterns} | {report['seconds']:.2f} s |")
    stays = [(report["name"], bn, reason) for report in reports for bn, reason in report["skipped"].items()]
    if not stays:
        return
    print()
    if group:
        print("| model | BNs | why they stay |")
        print("|---|---|---|")
        for report in reports:
            for reason, names in group_reasons(report["skipped"]):
                print(f"| {report['name']} | {len(names)} | {reason} |")
    else:
        print("| model | BatchNormalization | why it stays |")
        print("|---|---|---|")
        for name, bn, reason in stays:
            print(f"| {name} | {bn} | {reason} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", metavar="MODEL.onnx", help="ONNX models, or folders of them")
    parser.add_argument("--light", action="store_true", help="also inspect the onnx package's light test models")
    parser.add_argument("--group", action="store_true", help="one line per distinct reason instead of per BN")
    args = parser.parse_args(argv)
    paths = model_paths(args.models, args.light)
    if not paths:
        parser.error("give at least one model (or --light)")
    for path in paths:
        if not os.path.isfile(path):
            print(f"error: '{path}' is not a file", file=sys.stderr)
            return 1
    print_tables([inspect(path) for path in paths], args.group)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
