"""Exactness and speed of each statistics form, against numpy in float64 and against the CPU.

Default mode, one hard tensor: one BatchNormalization reads the model input directly, so the
statistics bnpass returns can be compared with numpy's mean and biased variance of the very same
float32 data, computed in float64. The data is hard on purpose: per-channel means far from zero
against small spreads (``--offset``, ``--spread``), as in pruned networks, where a one-pass
``E[x^2] - E[x]^2`` variance loses every digit. Each form's calibration session runs the same
batch ``--repeats`` times, the forms interleaved; the median time per batch is reported, with
the ratio to the ``reduce`` form measured in the same run.

Network mode (``--network NAME`` or ``--model FILE.onnx``): every BN of a generated network
(tools/bench.py's) or of a model, each form's statistics on ``--device`` (on CUDA with TF32 off
and on) against the ``reduce`` form's on the CPU provider, on the same batches. Issue 12's
target: within 1e-4 with TF32 off.

    python tools/measure_forms.py                          # CPU, 32x96x48x48, one thread
    python tools/measure_forms.py --device cuda            # the same on CUDA (TF32 off)
    python tools/measure_forms.py --device cuda --network resnet50 --batch-size 64 --batches 2

Errors: the mean's in units of the channel's standard deviation, the variance's relative, the
largest over the channels (and over the BNs).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bnpass.calibration import FORMS, build_calibration_model  # noqa: E402
from bnpass.data import model_input_specs  # noqa: E402
from bnpass.passes.statistics_session import StatisticsSession  # noqa: E402
from bnpass.runtime import CPU, select_providers  # noqa: E402


def single_batchnorm_model(channels: int, opset: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    params = [numpy_helper.from_array(value.astype(np.float32), name) for name, value in (
        ("scale", rng.uniform(0.5, 1.5, channels)), ("bias", rng.standard_normal(channels)),
        ("mean", rng.standard_normal(channels)), ("var", rng.uniform(0.5, 2.0, channels)))]
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], name="bn")], "one_bn",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", channels, "H", "W"])], params)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def hard_data(shape, offset: float, spread: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    channels = shape[1]
    means = rng.uniform(-offset, offset, (1, channels, 1, 1))
    spreads = rng.uniform(spread / 10, spread, (1, channels, 1, 1))
    return (rng.standard_normal(shape) * spreads + means).astype(np.float32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--forms", nargs="*", choices=FORMS, default=list(FORMS))
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--tf32", action="store_true", help="TF32 on in the CUDA sessions (default off)")
    tensor = parser.add_argument_group("one hard tensor (default mode)")
    tensor.add_argument("--shape", default="32x96x48x48", help="N x C x H x W (default 32x96x48x48)")
    tensor.add_argument("--offset", type=float, default=8.0, help="channel means drawn from +-offset (default 8)")
    tensor.add_argument("--spread", type=float, default=0.5,
                        help="channel standard deviations drawn from spread/10 .. spread (default 0.5)")
    tensor.add_argument("--repeats", type=int, default=11)
    network = parser.add_argument_group("network mode")
    network.add_argument("--network", help="a network tools/bench.py generates (resnet, mobilenet, resnet50)")
    network.add_argument("--size", type=int, help="its input height and width")
    network.add_argument("--model", help="an ONNX model instead (one input, fixed dims after the batch)")
    network.add_argument("--batch-size", type=int, default=32)
    network.add_argument("--batches", type=int, default=2)
    args = parser.parse_args(argv)
    words = sys.argv[1:] if argv is None else argv
    print(f"Command: `{' '.join(['python tools/measure_forms.py', *words])}`")
    if args.network or args.model:
        return network_agreement(args)
    return hard_tensor(args)


def usable_forms(args) -> list:
    if args.device == "cuda" and "training" in args.forms:
        print("training form skipped: the CUDA provider refuses training_mode=1", file=sys.stderr)
    return [form for form in args.forms if form != "training" or args.device != "cuda"]


def hard_tensor(args) -> int:
    shape = tuple(int(d) for d in args.shape.lower().split("x"))
    data = hard_data(shape, args.offset, args.spread)
    exact = data.astype(np.float64)
    mean_ref, var_ref = exact.mean((0, 2, 3)), exact.var((0, 2, 3))
    model = single_batchnorm_model(shape[1], opset=14)  # training needs 14; the others run at any opset
    providers = select_providers(args.device)
    feed = {"x": data}
    sessions, errors = {}, {}
    for form in usable_forms(args):
        calibration = build_calibration_model(model, form)
        sessions[form] = StatisticsSession(calibration, providers, threads=args.threads, tf32=args.tf32)
        moments = sessions[form].collect([feed])  # also the warm-up
        mean, var = moments[0].result("pooled")
        errors[form] = (calibration.forms[0], float(np.max(np.abs(mean - mean_ref) / np.sqrt(var_ref))),
                        float(np.max(np.abs(var - var_ref) / var_ref)))
    times = {form: [] for form in sessions}
    for _ in range(args.repeats):
        for form, session in sessions.items():
            started = time.perf_counter()
            session.collect([feed])
            times[form].append(time.perf_counter() - started)

    print(f"\nOne BN on a {args.shape} float32 tensor, channel means in +-{args.offset:g}, standard deviations "
          f"{args.spread / 10:g}..{args.spread:g}; {sessions[next(iter(sessions))].device}, "
          f"{args.threads} thread(s), median of {args.repeats} interleaved runs.\n")
    print("| form | built as | mean error (std units) | variance error (relative) | ms per batch | / reduce |")
    print("|---|---|---|---|---|---|")
    medians = {form: statistics.median(values) for form, values in times.items()}
    for form in sessions:
        built, mean_error, var_error = errors[form]
        ratio = f"{medians[form] / medians['reduce']:.2f}" if "reduce" in medians else "-"
        print(f"| {form} | {built} | {mean_error:.1e} | {var_error:.1e} | {1000 * medians[form]:.1f} | {ratio} |")
    return 0


def network_agreement(args) -> int:
    import tempfile

    sys.path.insert(0, str(REPO / "tools"))
    import bench

    if args.model:
        model, name = onnx.load(args.model), Path(args.model).stem
    else:
        net, _ = bench.build_network(args.network, args.size)
        with tempfile.TemporaryDirectory() as folder:
            shape = bench._networks()[args.network][1]
            shape = (shape[0], args.size, args.size) if args.size else shape
            bench.export_network(net, shape, Path(folder) / "net.onnx")
            model, name = onnx.load(Path(folder) / "net.onnx"), args.network
    (spec,) = model_input_specs(model)
    rng = np.random.default_rng(0)
    shape = (args.batch_size, *spec.shape[1:])
    offsets = rng.uniform(-1, 1, (1, shape[1]) + (1,) * (len(shape) - 2))
    feeds = [{spec.name: (rng.standard_normal(shape) * 1.5 + offsets).astype(np.float32)} for _ in range(args.batches)]

    def statistics_of(form, providers, tf32=False):
        calibration = build_calibration_model(model, form)
        session = StatisticsSession(calibration, providers, threads=args.threads, tf32=tf32)
        moments = session.collect(feeds)
        return [m.result("pooled") for m in moments], session.device, collections.Counter(calibration.forms)

    reference, _, _ = statistics_of("reduce", [CPU])
    print(f"\n`{name}`: {len(reference)} BN, {args.batches} batches of {args.batch_size}; each form on --device "
          f"against the reduce form on the CPU provider (largest over BNs and channels).\n")
    print("| form | device | TF32 | built as | mean error (std units) | variance error (relative) |")
    print("|---|---|---|---|---|---|")
    providers = select_providers(args.device)
    for form in usable_forms(args):
        for tf32 in ((False, True) if args.device == "cuda" else (False,)):
            got, device, built = statistics_of(form, providers, tf32)
            mean_error = max(float(np.max(np.abs(m - m_ref) / np.sqrt(np.maximum(v_ref, 1e-30))))
                             for (m, _), (m_ref, v_ref) in zip(got, reference))
            var_error = max(float(np.max(np.abs(v - v_ref) / np.maximum(v_ref, 1e-30)))
                            for (_, v), (_, v_ref) in zip(got, reference))
            print(f"| {form} | {device} | {'on' if tf32 else 'off'} | "
                  f"{', '.join(f'{n} {f}' for f, n in built.items())} | {mean_error:.1e} | {var_error:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
