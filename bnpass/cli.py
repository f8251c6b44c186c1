"""Command line: ``bnpass IN.onnx OUT.onnx --data DIR`` (also ``python -m bnpass``).

Exit codes: 0 done; 1 bad input or environment (one line ``error: ...`` on stderr, no output
file written); 2 bad command line (argparse); 130 interrupted (no output file written).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time

import onnx

from . import __version__, calibration_samples
from .calibration import batchnorm_nodes
from .data import batched, model_input_specs
from .errors import BnpassError
from .graph import node_label
from .model_io import load_model, save_model, uses_external_data
from .passes import FoldBatchNormPass, ReestimateBatchNormPass
from .report import batchnorm_records, summary_lines
from .runtime import DEVICES, select_providers
from .stats import STATS_MODES
from .verify import compare_models

logger = logging.getLogger("bnpass")

VERIFY_BATCHES = 4


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnpass",
        description="Re-estimate the BatchNormalization statistics of an ONNX model from calibration "
                    "data (train-mode semantics), then fold every BN it can into the preceding layer.",
        epilog="example: bnpass model.onnx model_fixed.onnx --data calib/")
    parser.add_argument("input", help="the ONNX model to fix (never modified)")
    parser.add_argument("output", help="where to write the result (written atomically)")
    parser.add_argument("--version", action="version", version=f"bnpass {__version__}")

    data = parser.add_argument_group("Data")
    data.add_argument("--data", metavar="DIR",
                      help="folder of .npy (one sample, or a batch) or .npz (one array per input name) files, "
                           "read in sorted order")
    data.add_argument("--batch-size", type=_positive_int, default=32, metavar="N",
                      help="calibration batch size (default: 32)")
    data.add_argument("--num-samples", type=_positive_int, default=2000, metavar="N",
                      help="samples to calibrate on, rounded up to whole batches as NNCF does (default: 2000)")

    stats = parser.add_argument_group("Statistics")
    stats.add_argument("--stats", choices=STATS_MODES, default="pooled",
                       help="pooled: mean and biased variance over every calibration value (default); "
                            "batch-mean: mean of batch means and of unbiased batch variances, "
                            "as torch.optim.swa_utils.update_bn and AIMET")

    runtime = parser.add_argument_group("Runtime")
    runtime.add_argument("--device", choices=DEVICES, default="auto",
                         help="auto uses CUDA when its provider really loads, else CPU (default: auto)")

    folding = parser.add_argument_group("Folding")
    mode = folding.add_mutually_exclusive_group()
    mode.add_argument("--no-fold", action="store_true", help="re-estimate only; keep the BN nodes")
    mode.add_argument("--fold-only", action="store_true",
                      help="fold without re-estimating (no data needed, except for --verify)")

    output = parser.add_argument_group("Output")
    output.add_argument("--report", metavar="FILE", help="write per-BN results as JSON")
    output.add_argument("--verify", action="store_true",
                        help=f"run the unfolded and the folded model on up to {VERIFY_BATCHES} calibration "
                             "batches and report the largest output difference")

    logging_group = parser.add_argument_group("Logging")
    verbosity = logging_group.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="say more")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


@contextlib.contextmanager
def _logging_to_stderr(args):
    """Route bnpass's log records to stderr for one CLI run, then restore the logger as it was."""
    saved = logger.handlers[:], logger.propagate, logger.level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    try:
        yield
    finally:
        logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


def _check_paths(args) -> None:
    if not os.path.exists(args.input):
        raise BnpassError(f"model file '{args.input}' does not exist")
    if os.path.isdir(args.output):
        raise BnpassError(f"output path '{args.output}' is a folder; give a file name")
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output) or (
            os.path.abspath(args.input) == os.path.abspath(args.output)):
        raise BnpassError(f"output '{args.output}' is the input model; bnpass never overwrites its input")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise BnpassError(f"output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise BnpassError(f"output folder '{folder}' is not writable")
    if args.report:
        report_folder = os.path.dirname(os.path.abspath(args.report))
        if os.path.isdir(args.report) or not os.path.isdir(report_folder) or not os.access(report_folder, os.W_OK):
            raise BnpassError(f"cannot write the report to '{args.report}'")
    if not args.fold_only and not args.data:
        raise BnpassError("--data DIR is required to re-estimate statistics (or use --fold-only)")
    if args.verify and not args.data:
        raise BnpassError("--verify needs --data: it compares the models on calibration batches")
    if args.verify and args.no_fold:
        raise BnpassError("--verify compares the unfolded and folded models; it needs folding (drop --no-fold)")


def run(args) -> int:
    started = time.perf_counter()
    _check_paths(args)
    model = load_model(args.input)
    bn_names = [node_label(node) for node in batchnorm_nodes(model)]
    samples = calibration_samples(model, args.data) if args.data else None  # checks every file first
    if not bn_names:
        logger.warning("'%s' has no BatchNormalization node; writing an unchanged copy", args.input)

    reestimate = None
    unfolded = model
    if bn_names and not args.fold_only:
        reestimate = ReestimateBatchNormPass(
            samples, stats=args.stats, batch_size=args.batch_size, num_samples=args.num_samples,
            device=args.device, progress=not args.quiet).call(model)
        unfolded = reestimate.model

    fold = None
    result = unfolded
    if bn_names and not args.no_fold:
        fold = FoldBatchNormPass().call(unfolded)
        result = fold.model

    # A model bnpass writes must pass the checker; anything else is a bug in bnpass.
    onnx.checker.check_model(result, full_check=True)

    difference = None
    if args.verify and fold is not None:
        providers = select_providers(args.device)
        feeds = _first_batches(samples, args.batch_size, model)
        difference = compare_models(unfolded, result, feeds, providers)

    save_model(result, args.output, external_data=uses_external_data(model))
    seconds = time.perf_counter() - started

    if args.report:
        _write_report(args, bn_names, reestimate, fold, difference, seconds)
    if not args.quiet:
        for line in summary_lines(bn_names, reestimate, fold, args.stats):
            print(line)
        if difference is not None:
            print(f"verify: folded vs unfolded on {difference.batches} batches: max abs difference "
                  f"{difference.max_abs:.3g}, max relative {difference.max_rel:.3g}")
        print(f"wrote {args.output} in {seconds:.1f} s")
    return 0


def _first_batches(samples, batch_size: int, model):
    """Up to VERIFY_BATCHES batches of calibration data, at the model's fixed batch if it has one."""
    fixed = {spec.shape[0] for spec in model_input_specs(model) if spec.shape and spec.shape[0] is not None}
    size = fixed.pop() if len(fixed) == 1 else batch_size
    for number, feed in enumerate(batched(samples.samples(), size, VERIFY_BATCHES * size)):
        if next(iter(feed.values())).shape[0] != size and fixed:
            break
        yield feed


def _write_report(args, bn_names, reestimate, fold, difference, seconds) -> None:
    report = {
        "input": args.input, "output": args.output, "stats": None if args.fold_only else args.stats,
        "seconds": round(seconds, 3),
        "samples": reestimate.samples if reestimate else 0,
        "batches": reestimate.batches if reestimate else 0,
        "batch_size": reestimate.batch_size if reestimate else None,
        "device": reestimate.device if reestimate else None,
        "batchnorms": batchnorm_records(bn_names, reestimate, fold),
    }
    if difference is not None:
        report["verify"] = {"batches": difference.batches, "max_abs": difference.max_abs,
                            "max_rel": difference.max_rel}
    try:
        with open(args.report, "w") as stream:
            json.dump(report, stream, indent=2)
            stream.write("\n")
    except OSError as error:
        raise BnpassError(f"cannot write report '{args.report}': {error.strerror or error}") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _logging_to_stderr(args):
            return run(args)
    except BnpassError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        return 130
