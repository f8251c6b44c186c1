"""Command line: ``bnpass IN.onnx OUT.onnx --data DIR`` (also ``python -m bnpass``).

Exit codes: 0 done; 1 bad input or environment (one line ``error: ...`` on stderr; no file written:
neither the model, its external data, the report nor the plot); 2 bad command line: an argument
argparse refuses, or options that do not go together (``error: ...``, then one line pointing to
``--help``); 130 interrupted (nothing written; the entry point, :mod:`bnpass.entry`, says so from the
first instant, imports included).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import onnx

from .calibration import batchnorm_nodes
from .config import NncfSettings, check_sample_sizes, read_nncf_config
from .data import batched, model_input_specs, plural
from .errors import INTERRUPTED, BnpassError, RuntimeUnavailableError, UsageError
from .feeding import batches_of
from .graph import node_label
from .images import COLORS, LAYOUTS, ImageFolder, ImageOptions
from .images import describe as describe_images
from .loaders import LoaderSource
from .model_io import StagedFiles, exceeds_protobuf_limit, read_model, set_metadata
from .passes import FoldBatchNormPass, FoldResult, ReestimateResult, Sequential, calibrating_pass
from .passes.calibration_settings import DEFAULT_BATCH_SIZE, DEFAULT_NUM_SAMPLES, input_batch_size
from .passes.match_reference import CHOICES, check_reference_differs
from .paths import check_separate, same_file
from .plot import LAYER_SERIES, plot_format, render_drift, require_matplotlib
from .progress import close_progress_bars, progress_bar
from .report import (
    batchnorm_drifts,
    closing_note,
    drift_title,
    layer_drift_title,
    layer_drifts,
    no_batchnorm_notice,
    provenance,
    run_report,
    summary_lines,
)
from .runtime import DEVICES, select_providers
from .sources import ImageOptionsNotApplicable, open_source
from .stats import STATS_MODES
from .verify import compare_models
from .version import __version__

logger = logging.getLogger("bnpass")

VERIFY_BATCHES = 4  # at most; never more batches than calibration used


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _sample_count(text: str) -> int:
    if text.strip() == "0":
        raise argparse.ArgumentTypeError("expected a positive integer, got 0 (to fold without re-estimating, use "
                                         "--fold-only)")
    return _positive_int(text)


def _size(text: str) -> tuple:
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HEIGHTxWIDTH, got {text!r}")
    return values


def _floats(text: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _positive_floats(text: str) -> tuple:
    values = _floats(text)
    if not all(value > 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def usage_error_text(prog: str, message: str) -> str:
    """What a bad command line prints (exit 2): the one useful line, then where to read more."""
    return f"error: {message}\nsee '{prog} --help' for the options\n"


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors said in two lines (:func:`usage_error_text`) instead of the whole usage."""

    def error(self, message: str):
        self.exit(2, usage_error_text(self.prog, message))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bnpass",
        description="Re-estimate the BatchNormalization statistics of an ONNX model from calibration "
                    "data (train-mode semantics), then fold every BN it can into the preceding layer.",
        epilog="example: bnpass model.onnx model_fixed.onnx --data calib/")
    parser.add_argument("input", help="the ONNX model to fix (never modified)")
    parser.add_argument("output", help="where to write the result (written atomically)")
    parser.add_argument("--version", action="version", version=f"bnpass {__version__}")

    data = parser.add_argument_group("Data")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="DIR",
                        help="folder of .npy (one sample, or a batch), .npz (one array per input name) or image "
                             "files, subfolders included, read in sorted order; or one .npy/.npz file")
    source.add_argument("--loader", metavar="FILE.py:FUNCTION",
                        help="a Python function returning an iterable of samples or batches (arrays, dicts by "
                             "input name, or (inputs, labels) tuples) or a CalibrationDataReader, instead of --data")
    data.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE, metavar="N",
                      help=f"calibration batch size (default: {DEFAULT_BATCH_SIZE})")
    data.add_argument("--num-samples", type=_sample_count, default=None, metavar="N",
                      help=f"samples to calibrate on, rounded up to whole batches as NNCF does "
                           f"(default: {DEFAULT_NUM_SAMPLES}, or the --config file's)")
    data.add_argument("--shuffle", action="store_true",
                      help="read the --data samples in a random order, the same for the same --seed: a random "
                           "subset, and batches that mix the folder's classes (default: sorted file order)")
    data.add_argument("--seed", type=int, metavar="N",
                      help="seed of --shuffle (default: 0); implies --shuffle")
    data.add_argument("--config", metavar="NNCF.json",
                      help="NNCF config: num_bn_adaptation_samples (0: fold only, no data needed) and "
                           "input_info.sample_size (checked against the model); flags win")

    images = parser.add_argument_group("Images (when --data holds .jpg/.png/.bmp/.webp/.tif files)")
    images.add_argument("--resize", type=_positive_int, metavar="N",
                        help="resize the shorter side to N pixels (default: crop size / 0.875)")
    images.add_argument("--crop", type=_size, metavar="HxW",
                        help="center-crop size (default: the model input's height and width)")
    images.add_argument("--color", choices=COLORS, help="channel order (default: rgb, or gray for 1-channel models)")
    images.add_argument("--no-scale", dest="scale", action="store_false",
                        help="keep pixel values in 0..255 (default: scale to 0..1)")
    images.add_argument("--mean", type=_floats, metavar="M[,M,M]",
                        help="per-channel mean subtracted after scaling (default: 0)")
    images.add_argument("--std", type=_positive_floats, metavar="S[,S,S]",
                        help="per-channel std divided by after the mean (default: 1)")
    images.add_argument("--layout", choices=LAYOUTS, help="default: from the model input's shape")

    stats = parser.add_argument_group("Statistics")
    stats.add_argument("--stats", choices=STATS_MODES, default="pooled",
                       help="pooled: mean and biased variance over every calibration value (default); "
                            "batch-mean: mean of batch means and of unbiased batch variances, "
                            "as torch.optim.swa_utils.update_bn and AIMET")

    reference = parser.add_argument_group("Reference (the uncompressed model)")
    reference.add_argument("--reference", metavar="ORIGINAL.onnx",
                           help="the model before compression: also compute statistics with which every BN "
                                "reproduces the per-channel output mean and spread of the original's, and keep "
                                "the better candidate (re-estimated or matched), judged on every calibration sample: "
                                "by accuracy where the data carry labels, else by agreement with the original")
    reference.add_argument("--candidate", choices=CHOICES, default="auto",
                           help="which candidate --reference keeps (default: auto, by labels or agreement)")

    runtime = parser.add_argument_group("Runtime")
    runtime.add_argument("--device", choices=DEVICES, default="auto",
                         help="auto uses CUDA when its provider really loads, else CPU (default: auto)")
    runtime.add_argument("--threads", type=_positive_int, metavar="N",
                         help="onnxruntime intra-op threads (default: onnxruntime's, one per physical core)")
    runtime.add_argument("--tf32", action="store_true",
                         help="let the CUDA provider run float32 convolutions in TF32: faster, less exact "
                              "(default: off; no effect on CPU)")

    folding = parser.add_argument_group("Folding")
    mode = folding.add_mutually_exclusive_group()
    mode.add_argument("--no-fold", action="store_true", help="re-estimate only; keep the BN nodes")
    folding.add_argument("--keep-per-tensor", action="store_true",
                         help="a quantized weight with one scale per tensor keeps one scale, the folded weight "
                              "re-rounded on it (default: the fold goes exactly into one scale per output channel)")
    mode.add_argument("--fold-only", action="store_true",
                      help="fold without re-estimating (no data needed, except for --verify)")

    output = parser.add_argument_group("Output")
    output.add_argument("--report", metavar="FILE", help="write per-BN results as JSON")
    output.add_argument("--plot", metavar="FILE.png",
                        help="draw, per BN in graph order, how far the new statistics drifted from the stored "
                             "ones (and, with --reference, from the original model's), as PNG, SVG or PDF by the "
                             "name's suffix; needs matplotlib (the [plot] extra)")
    output.add_argument("--verify", action="store_true",
                        help=f"run the unfolded and the folded model on up to {VERIFY_BATCHES} calibration "
                             "batches (no more than calibration used), both without onnxruntime's graph "
                             "optimizations, and report the largest output difference")

    logging_group = parser.add_argument_group("Logging")
    verbosity = logging_group.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true",
                           help="say more: one line per BN (statistics before and after, what it folded into)")
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


def _check_output_paths(args) -> None:
    """What can be checked before anything is read."""
    if not os.path.exists(args.input):
        raise BnpassError(f"model file '{args.input}' does not exist")
    for flag, path in (("output", args.output), ("--report", args.report), ("--plot", args.plot)):
        if path:
            _check_writable(flag, path)


def _check_writable(flag: str, path: str) -> None:
    """A file can be written at ``path``, or a BnpassError says why not."""
    if os.path.isdir(path):
        raise BnpassError(f"{flag} path '{path}' is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise BnpassError(f"{flag} folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise BnpassError(f"{flag} folder '{folder}' is not writable")


def _reestimating(args, num_samples: int) -> bool:
    """Whether statistics are re-estimated (``num_samples`` 0: the config turned that off)."""
    return not args.fold_only and num_samples > 0


def _check_request(args, num_samples: int, image_options: ImageOptions) -> None:
    """The options must make sense together: a UsageError (exit 2) where they do not."""
    has_data = bool(args.data or args.loader)
    if not args.fold_only and num_samples > 0 and not has_data:
        raise UsageError("--data DIR (or --loader) is required to re-estimate statistics (or use --fold-only)")
    if args.verify and not has_data:
        raise UsageError("--verify needs --data or --loader: it compares the models on calibration batches")
    if args.verify and args.no_fold:
        raise UsageError("--verify compares the unfolded and folded models; it needs folding (drop --no-fold)")
    shuffling = [flag for flag, given in (("--shuffle", args.shuffle), ("--seed", args.seed is not None)) if given]
    if args.loader and shuffling:
        raise UsageError(f"{' and '.join(shuffling)} {plural(len(shuffling), 'applies', 'apply', counted=False)} "
                         "to --data folders; a --loader decides its own order")
    if args.loader and image_options.given():
        raise UsageError(image_options.refused("a --loader prepares its own samples"))
    reestimating = _reestimating(args, num_samples)
    if args.reference and args.fold_only:
        raise UsageError("--reference needs re-estimated statistics: drop --fold-only")
    if args.reference and not reestimating:
        raise UsageError(f"--reference needs re-estimated statistics, and '{args.config}' sets "
                         "num_bn_adaptation_samples to 0: give --num-samples N to re-estimate")
    if args.candidate != "auto" and not args.reference:
        raise UsageError(f"--candidate {args.candidate} chooses between the candidates of --reference; give "
                         "--reference ORIGINAL.onnx")
    if args.plot:
        if not reestimating:
            raise UsageError("--plot draws re-estimated statistics: it needs --data or --loader, without --fold-only")
        try:
            plot_format(args.plot)
        except BnpassError as error:  # a name the plot cannot take is a bad command line
            raise UsageError(str(error)) from None
        require_matplotlib()


def _providers(args) -> list:
    try:
        return select_providers(args.device)
    except RuntimeUnavailableError as error:
        raise BnpassError(f"--device {error.device}: {error.reason}") from None


@dataclass(frozen=True)
class _Request:
    """What the command line asks for, settled and checked before any model or data is read."""

    settings: Optional[NncfSettings]  # the --config file's, or None
    num_samples: int
    reestimating: bool
    image_options: ImageOptions  # from the image flags, built once
    providers: Optional[list]  # onnxruntime's, where anything runs; None where nothing does


@dataclass(frozen=True)
class _Inputs:
    """What the run read and checked: nothing is calibrated or written before all of it passes."""

    model: onnx.ModelProto
    external_files: list
    reference: Optional[onnx.ModelProto]
    reference_files: list
    samples: object  # the calibration samples, or None where nothing runs
    batchnorms: list  # the labels of the model's BatchNormalization nodes
    writes_external: bool  # whether the output goes with an external data file


@dataclass(frozen=True)
class _Outcome:
    """What the passes made of the model."""

    reestimate: Optional[ReestimateResult]  # None where statistics were not re-estimated
    fold: Optional[FoldResult]  # None where nothing was to be folded
    model: onnx.ModelProto  # the model to write
    unfolded: onnx.ModelProto  # the model before folding (--verify's baseline)


def run(args) -> int:
    """The command line's recipe: each step checks what it can before the next one costs anything."""
    started = time.perf_counter()
    request = _settle_request(args)
    inputs = _read_inputs(args, request)
    outcome = _run_passes(args, request, inputs)
    difference = _verify(args, request, inputs, outcome)
    _record_provenance(args, inputs, outcome)
    seconds = time.perf_counter() - started
    plot = _draw_plot(args, inputs.model, outcome.reestimate)
    _write_files(args, inputs, outcome, difference, plot, seconds)
    if not args.quiet:
        _print_summary(args, inputs, outcome, difference, plot is not None, seconds)
    return 0


def _settle_request(args) -> _Request:
    """The command line checked as far as it can be before reading a model: paths, options, the device."""
    _check_output_paths(args)
    settings = read_nncf_config(args.config) if args.config else None
    num_samples = _num_samples(args, settings)
    image_options = _image_options(args)
    _check_request(args, num_samples, image_options)
    reestimating = _reestimating(args, num_samples)
    providers = _providers(args) if reestimating or args.verify else None  # a missing CUDA fails fast
    return _Request(settings, num_samples, reestimating, image_options, providers)


def _read_inputs(args, request: _Request) -> _Inputs:
    """The models, the config's shapes and the data read and checked; no file read is one written."""
    if args.reference and same_file(args.input, args.reference):
        raise BnpassError(f"--reference '{args.reference}' is the input model: give the uncompressed model, from "
                          "before compression")
    model, external_files = read_model(args.input)
    reference, reference_files = read_model(args.reference) if args.reference else (None, [])
    specs = model_input_specs(model)
    if request.settings is not None:
        check_sample_sizes(request.settings, specs, args.config)
    runs = request.reestimating or args.verify
    samples = _samples(args, specs, request.image_options) if runs else None  # a folder is checked here
    writes_external = bool(external_files) or exceeds_protobuf_limit(model)
    check_separate(_reads(args, external_files, reference_files, samples), _writes(args, writes_external))
    if reference is not None:
        check_reference_differs(model, reference)
    batchnorms = [node_label(node) for node in batchnorm_nodes(model)]
    if not batchnorms and reference is None:
        logger.warning("%s", no_batchnorm_notice(model, args.input))
    return _Inputs(model, external_files, reference, reference_files, samples, batchnorms, writes_external)


def _run_passes(args, request: _Request, inputs: _Inputs) -> _Outcome:
    """Re-estimate (or match the reference) where there is something to calibrate, then fold."""
    calibrate = folding = None
    if (inputs.batchnorms or inputs.reference is not None) and request.reestimating:
        calibrate = calibrating_pass(inputs.samples, reference=inputs.reference, candidate=args.candidate,
                                     keep_per_tensor=args.keep_per_tensor, stats=args.stats,
                                     batch_size=args.batch_size, num_samples=request.num_samples, device=args.device,
                                     progress=not args.quiet, threads=args.threads, tf32=args.tf32,
                                     providers=request.providers)
    if inputs.batchnorms and not args.no_fold:
        folding = FoldBatchNormPass(keep_per_tensor=args.keep_per_tensor)
    done = Sequential(*(pass_ for pass_ in (calibrate, folding) if pass_ is not None))(inputs.model)
    reestimate = done.result_of(calibrate)
    unfolded = reestimate.model if reestimate is not None else inputs.model
    return _Outcome(reestimate, done.result_of(folding), done.model, unfolded)


def _verify(args, request: _Request, inputs: _Inputs, outcome: _Outcome):
    """``--verify``: the unfolded and the folded model compared on the first calibration batches (no more
    than calibration used); None where that was not asked or nothing was folded."""
    reestimate, fold = outcome.reestimate, outcome.fold
    if not (args.verify and fold is not None and fold.folded):
        return None
    batch_size = reestimate.batch_size if reestimate else args.batch_size
    count = min(VERIFY_BATCHES, reestimate.batches) if reestimate else VERIFY_BATCHES
    bar = progress_bar(count, not args.quiet, "verifying")
    try:
        batches = _first_batches(inputs.samples, batch_size, inputs.model, count)
        return compare_models(outcome.unfolded, outcome.model, batches, request.providers, progress=bar, tf32=args.tf32)
    finally:
        bar.close()


def _record_provenance(args, inputs: _Inputs, outcome: _Outcome) -> None:
    """A changed model says in its metadata what bnpass did to it."""
    reestimate, fold = outcome.reestimate, outcome.fold
    if (reestimate is not None and reestimate.modified) or (fold is not None and fold.modified):
        set_metadata(outcome.model, provenance(reestimate, fold, stats=args.stats, batchnorms=len(inputs.batchnorms),
                                               reference_path=args.reference))


def _draw_plot(args, model: onnx.ModelProto, reestimate) -> Optional[bytes]:
    """``--plot``'s picture: the BNs' statistics before and after, else the corrected layers' outputs; None
    (with a warning) where there is nothing to draw."""
    if not args.plot:
        return None
    drifts = batchnorm_drifts(model, reestimate) if reestimate is not None else []
    if drifts:
        return render_drift(drifts, plot_format(args.plot), title=drift_title(reestimate))
    if getattr(reestimate, "layers", None):  # no BN: the corrected layers' outputs
        return render_drift(layer_drifts(reestimate), plot_format(args.plot), title=layer_drift_title(reestimate),
                            legends=LAYER_SERIES, subject="layers without BatchNormalization")
    logger.warning("no plot drawn: the model has no BatchNormalization statistics to show")
    return None


def _write_files(args, inputs: _Inputs, outcome: _Outcome, difference, plot: Optional[bytes],
                 seconds: float) -> None:
    """Every file under a temporary name first, all renamed once all are written: exit 1 writes nothing."""
    with StagedFiles() as staged:
        # The written model is checked (onnx.checker, full): a failure there is a bug in bnpass.
        staged.write_model(outcome.model, args.output, external_data=bool(inputs.external_files), what="the output")
        if args.report:
            staged.write_bytes(args.report, run_report(
                inputs.model, outcome.reestimate, outcome.fold, difference, input_path=args.input,
                output_path=args.output, stats=args.stats, seconds=seconds, reference_path=args.reference),
                what="the report")
        if plot is not None:
            staged.write_bytes(args.plot, plot, what="the plot")
        staged.commit()


def _print_summary(args, inputs: _Inputs, outcome: _Outcome, difference, plotted: bool, seconds: float) -> None:
    """What was done, on stdout: the summary lines, --verify's figures, the files written."""
    reestimate, fold = outcome.reestimate, outcome.fold
    for line in summary_lines(inputs.batchnorms, reestimate, fold, args.stats, verbose=args.verbose):
        print(line)
    if args.verify and fold is not None and not fold.folded:
        print("verify: nothing was folded, so the output computes exactly what the unfolded model does")
    if difference is not None:
        print(f"verify: folded vs unfolded on {difference.batches} batches: max abs difference "
              f"{difference.max_abs:.3g}, max relative {difference.max_rel:.3g}")
    external = inputs.writes_external and os.path.exists(args.output + ".data")
    print(f"wrote {_written(args, external, plotted)} in {seconds:.1f} s"
          + closing_note(inputs.batchnorms, reestimate, fold))


def _written(args, external: bool, plotted: bool) -> str:
    """``out.onnx (with out.onnx.data), the report r.json and the plot p.png``: where the files went."""
    files = [args.output + (f" (with {args.output}.data)" if external else "")]
    if args.report:
        files.append(f"the report {args.report}")
    if plotted:
        files.append(f"the plot {args.plot}")
    return files[0] if len(files) == 1 else ", ".join(files[:-1]) + " and " + files[-1]


def _reads(args, external_files: list, reference_files: list, samples) -> list:
    """Every file the run reads, by role: none of them may be written."""
    reads = [("the input model", args.input)]
    reads += [("the input model's external data", path) for path in external_files]
    if args.reference:
        reads.append(("the --reference model", args.reference))
        reads += [("the --reference model's external data", path) for path in reference_files]
    reads += [("a calibration data file", path) for path in getattr(samples, "files", ())]
    if args.config:
        reads.append(("the --config file", args.config))
    if args.loader:
        reads.append(("the --loader file", samples.path))
    return reads


def _writes(args, external: bool) -> list:
    """Every file the run writes, by role."""
    writes = [("the output", args.output)]
    if external:
        writes.append(("the output's external data", args.output + ".data"))
    if args.report:
        writes.append(("--report", args.report))
    if args.plot:
        writes.append(("--plot", args.plot))
    return writes


def _num_samples(args, settings) -> int:
    """--num-samples, else the NNCF config's num_bn_adaptation_samples, else the default."""
    if args.num_samples is not None:
        return args.num_samples
    if settings is not None and settings.num_samples is not None:
        if settings.num_samples == 0:
            logger.info("'%s' sets num_bn_adaptation_samples to 0: statistics are not re-estimated",
                        args.config)
        return settings.num_samples
    return DEFAULT_NUM_SAMPLES


def _samples(args, specs: list, image_options: ImageOptions):
    if args.loader:
        return LoaderSource(args.loader, specs)
    if not args.data:
        return None
    try:
        samples = open_source(args.data, specs, image_options, shuffle=args.shuffle or args.seed is not None,
                              seed=args.seed or 0)
    except ImageOptionsNotApplicable as error:  # flags that do not go with these data: a bad command line
        raise UsageError(str(error)) from None
    if isinstance(samples, ImageFolder):
        logger.info("%s", describe_images(samples.preprocessing))
    return samples


def _image_options(args) -> ImageOptions:
    return ImageOptions(resize=args.resize, crop=args.crop, color=args.color, scale=args.scale, mean=args.mean,
                        std=args.std, layout=args.layout)


def _first_batches(samples, batch_size: int, model, count: int):
    """Up to ``count`` batches of calibration data, at the model's fixed batch if it has one."""
    fixed = input_batch_size(model)
    size = fixed or batch_size
    return batches_of(batched(samples, size, count * size), fixed)


@contextlib.contextmanager
def _pillow_warnings_silenced():
    """Pillow warns on images between its decompression-bomb limit and twice that (large scans);
    bnpass reads them safely (see bnpass.images), so the CLI keeps that warning off the terminal."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def main(argv=None) -> int:
    """The command line (the ``bnpass`` command runs it through :func:`bnpass.entry.main`). Every error
    closes the progress bars first, so that its line starts a line of its own."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _logging_to_stderr(args), _pillow_warnings_silenced():
            return run(args)
    except UsageError as error:
        close_progress_bars()
        print(usage_error_text(parser.prog, str(error)), end="", file=sys.stderr)
        return 2
    except BnpassError as error:
        close_progress_bars()
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        close_progress_bars()
        print(INTERRUPTED, file=sys.stderr)
        return 130
