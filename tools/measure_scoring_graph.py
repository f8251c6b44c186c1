"""Measure --reference's second reading: separate sessions (candidates.score_models today) against one
merged session (bnpass.passes.scoring_graph.merge_models), on tools/bench.py's networks.

For each case (network x with its BNs or with them folded x the reference), the models --reference
scores are captured as ``MatchReferencePass`` makes them (tests/scoring_models.py: the pass runs on
``--calibration`` samples and stops where it would score): the reference, the model as given and
each candidate. Then, interleaved, median of ``--repeats``:

  (i)  separate  one session per model, as score_models makes them, every batch through each
  (ii) merged    merge_models once, one session, every batch through it once

with the session creation (and merge) time, the time per batch, and the peak RSS of each done once
in its own subprocess (VmHWM over the RSS after imports and loading the models). The outputs of
every batch are compared bit for bit. The reference is either the model itself (``self``, as
tools/bench.py's (g) and (h) rows do: the cost does not depend on the weights, but the candidates
then hardly differ from the model) or the network with its weights kept and the model compressed
(``compressed``: every weight of rank >= 2 rounded to 15 steps, what --reference is for).

    python tools/measure_scoring_graph.py                                # both networks, every case
    python tools/measure_scoring_graph.py --networks resnet --samples 256 --repeats 5

Needs PyTorch (the networks are exported from it).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tools"))

import bnpass  # noqa: E402
from bnpass.passes.scoring_graph import merge_models_with_statistics  # noqa: E402
from bnpass.runtime import create_session, select_providers  # noqa: E402
from peak_memory import reset_peak, status_mb  # noqa: E402
from scoring_models import bench_network, compressed_copy, differing_outputs, scored_models  # noqa: E402

BENCH_SIZES = {"resnet": 64, "mobilenet": 96}


def batches_for(model: onnx.ModelProto, samples: int, batch_size: int, seed: int = 0) -> list:
    """``samples`` random samples of the model's input shape, with per-channel offsets and scales as
    tools/bench.py writes them, cut into feeds."""
    rng = np.random.default_rng(seed)
    name = model.graph.input[0].name
    shape = [dim.dim_value for dim in model.graph.input[0].type.tensor_type.shape.dim][1:]
    offsets = rng.uniform(-1, 1, (shape[0],) + (1,) * (len(shape) - 1))
    scales = rng.uniform(0.5, 2.0, offsets.shape)
    data = (rng.standard_normal((samples, *shape)) * scales + offsets).astype(np.float32)
    return [{name: data[start:start + batch_size]} for start in range(0, samples, batch_size)]


def separate(models: dict, feeds: list, providers: list, threads) -> tuple:
    """score_models's way: ``(creation s, run s, {model: [outputs, all batches]})``."""
    started = time.perf_counter()
    sessions = {name: create_session(model, providers, threads=threads) for name, model in models.items()}
    created = time.perf_counter()
    names = {name: [output.name for output in model.graph.output] for name, model in models.items()}
    collected = {name: [] for name in models}
    for feed in feeds:
        for name, session in sessions.items():
            collected[name].append(session.run(names[name], feed))
    return created - started, time.perf_counter() - created, _joined(collected)


def merged(models: dict, feeds: list, providers: list, threads) -> tuple:
    """One merged session: ``(merge + creation s, run s, {model: [outputs]})``."""
    started = time.perf_counter()
    model, outputs, _ = merge_models_with_statistics(models)
    session = create_session(model, providers, threads=threads)
    del model
    created = time.perf_counter()
    order = [name for names in outputs.values() for name in names]
    collected = {name: [] for name in outputs}
    for feed in feeds:
        values = dict(zip(order, session.run(order, feed)))
        for name, names in outputs.items():
            collected[name].append([values[output] for output in names])
    return created - started, time.perf_counter() - created, _joined(collected)


def _joined(collected: dict) -> dict:
    """``{model: [each output, every batch's concatenated]}`` from ``{model: [[outputs] per batch]}``."""
    return {name: [np.concatenate(parts) for parts in zip(*batches)] for name, batches in collected.items()}


METHODS = {"separate": separate, "merged": merged}


def worker(spec: dict) -> None:
    """One method once in this fresh process; prints its peak RSS over the RSS before it, as JSON."""
    import onnxruntime  # noqa: F401  (counted in the baseline)

    models = {name: onnx.load(path) for name, path in spec["models"].items()}
    feeds = batches_for(models["compressed"], spec["samples"], spec["batch_size"])
    providers = select_providers("cpu")
    gc.collect()
    reset_peak()
    baseline = status_mb("VmRSS")
    METHODS[spec["method"]](models, feeds, providers, spec["threads"])
    print(json.dumps({"peak_mb": status_mb("VmHWM"), "over_mb": status_mb("VmHWM") - baseline}))


def case_models(network: str, folded: bool, reference_kind: str, calibration: int, batch_size: int) -> dict:
    network_model = bench_network(network, BENCH_SIZES[network])
    if folded:
        network_model = bnpass.fold_batchnorms(network_model).model
    model = network_model if reference_kind == "self" else compressed_copy(network_model)
    data = np.concatenate([feed[model.graph.input[0].name] for feed in batches_for(model, calibration, batch_size)])
    return scored_models(model, network_model, data, batch_size=batch_size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(BENCH_SIZES), choices=list(BENCH_SIZES))
    parser.add_argument("--references", nargs="+", default=["self", "compressed"], choices=["self", "compressed"])
    parser.add_argument("--samples", type=int, default=128, help="samples timed (default 128)")
    parser.add_argument("--calibration", type=int, default=64, help="samples the candidates are made from")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0

    providers = select_providers("cpu")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bnpass_scoring_graph_") as folder:
        for network in args.networks:
            for folded in (False, True):
                for reference_kind in args.references:
                    label = f"{network} {'BNs folded' if folded else 'with BN'}, reference {reference_kind}"
                    print(f"preparing {label}", file=sys.stderr, flush=True)
                    models = case_models(network, folded, reference_kind, args.calibration, args.batch_size)
                    _, _, sharing = merge_models_with_statistics(models)
                    feeds = batches_for(models["compressed"], args.samples, args.batch_size, seed=1)
                    times = {method: {"create": [], "run": []} for method in METHODS}
                    identical = True
                    for _ in range(args.repeats):
                        results = {}
                        for method, run in METHODS.items():
                            gc.collect()
                            create, ran, outputs = run(models, feeds, providers, args.threads)
                            times[method]["create"].append(create)
                            times[method]["run"].append(ran)
                            results[method] = outputs
                        identical &= differing_outputs(results["separate"], results["merged"]) == []
                    memory = {}
                    if not args.no_memory:
                        paths = {}
                        for name, model in models.items():
                            paths[name] = str(Path(folder) / f"{name}.onnx")
                            onnx.save(model, paths[name])
                        for method in METHODS:
                            spec = {"method": method, "models": paths, "samples": args.samples,
                                    "batch_size": args.batch_size, "threads": args.threads}
                            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                                                  capture_output=True, text=True, check=True)
                            memory[method] = json.loads(done.stdout.strip().splitlines()[-1])
                    rows.append((label, list(models), sharing, times, identical, memory, len(feeds)))

    print(f"Command: python tools/measure_scoring_graph.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"Batch {args.batch_size}, {args.samples} samples timed, median of {args.repeats} interleaved repetitions, "
          f"threads {args.threads or 'onnxruntime default'}, CPU.")
    print()
    print("| case | models | nodes computed (shared) | method | create s | ms / batch | peak RSS over baseline MB |"
          " outputs |")
    print("|---|---|---|---|---|---|---|---|")
    for label, names, sharing, times, identical, memory, batches in rows:
        for method in METHODS:
            create = statistics.median(times[method]["create"])
            per_batch = 1000 * statistics.median(times[method]["run"]) / batches
            rss = f"{memory[method]['over_mb']:.0f}" if method in memory else "-"
            print(f"| {label} | {len(names)} | {sharing.merged_nodes} of {sharing.nodes} "
                  f"({100 * sharing.shared_fraction:.0f}%) | {method} | {create:.2f} | {per_batch:.1f} | {rss} | "
                  f"{'bit-identical' if identical else 'DIFFER'} |")
        ratio = statistics.median(times["merged"]["run"]) / statistics.median(times["separate"]["run"])
        print(f"| {label} | | | merged / separate | | {ratio:.2f} | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
