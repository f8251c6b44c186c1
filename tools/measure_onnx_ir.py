"""onnx-ir, measured on the traps bnpass's own graph code is built to pass.

bnpass edits the ONNX protobuf through its own index and editor (``bnpass/graph.py``,
``bnpass/rewrite.py``, ``bnpass/protos.py``, ``bnpass/computed_constants.py``) because
onnx-graphsurgeon failed these traps (README, "Layout"). This script runs onnx-ir through the same
ones, beside bnpass on the same models, and prints one line per trap:

1. an IR-3 model (every initializer also a graph input): round trip, ONNX checker, inputs kept;
2. ``metadata_props``, ``doc_string``, producer: kept by a round trip;
3. an overridable initializer (IR >= 4, an initializer that is also a graph input): still an input;
4. external data: a model saved with external data round-trips with its tensors outside;
5. ``Constant`` weights: the weight of a Conv given by a ``Constant`` node is readable as a constant;
6. weight memory: the peak resident memory, over the process before loading, while a model larger than 2 GiB
   (external data) is loaded, every weight feeding a BN-followed Gemm scaled per output channel (what
   a fold writes) and saved, in a fresh process each, against the model's size;
7. the pass infrastructure: what ``onnx_ir.passes.PassBase`` checks around ``call``.

    python tools/measure_onnx_ir.py [--large-gib 2.1] [--skip-large]

Run on the project's 2-core machine; the large model is written to a temporary folder and removed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import bnpass  # noqa: E402
from builders import build_producer_bn_model  # noqa: E402


def onnx_ir_round_trip(model: onnx.ModelProto) -> onnx.ModelProto:
    return ir.to_proto(ir.from_proto(model))


def bnpass_round_trip(model: onnx.ModelProto) -> onnx.ModelProto:
    """bnpass's own editor: the fold pass on the model (a BN folds, so the editor writes)."""
    return bnpass.fold_batchnorms(model).model


def checks(model: onnx.ModelProto) -> str:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as error:  # noqa: BLE001 - the checker's reason is the figure
        return f"checker fails ({str(error).splitlines()[0][:80]})"
    return "checker passes"


def trap_ir3(round_trip) -> tuple[bool, str]:
    model = build_producer_bn_model("conv", opset=7, ir_version=3)
    out = round_trip(model)
    inputs = {value.name for value in out.graph.input}
    missing = [t.name for t in out.graph.initializer if t.name not in inputs]
    ok = not missing and checks(out) == "checker passes"
    return ok, f"{checks(out)}; {len(missing)} of {len(out.graph.initializer)} initializers missing from the inputs"


def trap_metadata(round_trip) -> tuple[bool, str]:
    model = build_producer_bn_model("conv")
    onnx.helper.set_model_props(model, {"author": "me", "license": "Apache-2.0"})
    model.doc_string = "a model's doc string"
    model.graph.doc_string = "a graph's doc string"
    out = round_trip(model)
    kept = {p.key: p.value for p in out.metadata_props}
    lost = [what for what, ok in (("metadata_props", {"author", "license"} <= set(kept)),
                                  ("model doc_string", out.doc_string == model.doc_string),
                                  ("graph doc_string", out.graph.doc_string == model.graph.doc_string),
                                  ("producer_name", out.producer_name == model.producer_name)) if not ok]
    return not lost, "all kept" if not lost else "lost: " + ", ".join(lost)


def trap_overridable(round_trip) -> tuple[bool, str]:
    model = build_producer_bn_model("conv")
    weight = model.graph.node[0].input[1]
    tensor = next(t for t in model.graph.initializer if t.name == weight)
    model.graph.input.append(helper.make_tensor_value_info(weight, tensor.data_type, list(tensor.dims)))
    out = round_trip(model)
    still_input = weight in {value.name for value in out.graph.input}
    still_initializer = any(t.name == weight for t in out.graph.initializer)
    # bnpass must not fold into an overridable weight: the Conv keeps reading it
    reads = any(weight in node.input for node in out.graph.node)
    ok = still_input and still_initializer and reads
    return ok, (f"graph input kept: {still_input}, initializer kept: {still_initializer}, "
                f"the Conv still reads it: {reads}")


def trap_external_data(save, load, folder: Path) -> tuple[bool, str]:
    model = build_producer_bn_model("conv", in_channels=64, out_channels=64)
    source = folder / "external.onnx"
    onnx.save(model, source, save_as_external_data=True, all_tensors_to_one_file=True, location="external.onnx.data",
              size_threshold=0)
    target = folder / "external_out.onnx"
    save(load(source), target)
    outside = sum(1 for t in onnx.load(target, load_external_data=False).graph.initializer
                  if t.data_location == onnx.TensorProto.EXTERNAL)
    files = sorted(p.name for p in folder.iterdir() if p.name.startswith("external_out"))
    return outside > 0, f"{outside} tensors outside the model file ({', '.join(files)})"


def trap_constant_weight_onnx_ir() -> tuple[bool, str]:
    model = build_producer_bn_model("conv", param_source="constant_node")
    graph = ir.from_proto(model).graph
    conv = next(node for node in graph if node.op_type == "Conv")
    weight = conv.inputs[1]
    direct = weight.const_value is not None
    via_convenience = ir.convenience.get_const_tensor(weight) is not None
    return via_convenience, (f"Value.const_value set: {direct}; ir.convenience.get_const_tensor reads it: "
                             f"{via_convenience}")


def trap_constant_weight_bnpass() -> tuple[bool, str]:
    model = build_producer_bn_model("conv", param_source="constant_node")
    result = bnpass.fold_batchnorms(model)
    return bool(result.folded), f"{len(result.folded)} BN folded into a Conv whose weight is a Constant node"


LARGE = r"""
import json, os, sys
sys.path[:0] = sys.argv[1:3]
import numpy as np
from peak_memory import reset_peak, status_mb
which, path, out = sys.argv[3:6]
if which == "onnx_ir":
    import onnx_ir as ir
    reset_peak(); base = status_mb("VmRSS")
    model = ir.load(path)
    for node in list(model.graph):
        if node.op_type == "Gemm":
            weight = node.inputs[1]
            scale = np.linspace(0.5, 1.5, weight.shape[0], dtype=np.float32)[:, None]
            folded = ir.Value(name=weight.name + "_folded", const_value=ir.tensor(weight.const_value.numpy() * scale))
            model.graph.register_initializer(folded)
            node.replace_input_with(1, folded)
    for name in [n for n, v in model.graph.initializers.items() if not v.uses()]:
        model.graph.initializers.pop(name)
    edited = status_mb("VmHWM")
    ir.save(model, out, external_data=os.path.basename(out) + ".data")
else:
    import onnx, bnpass
    from bnpass.model_io import save_model
    reset_peak(); base = status_mb("VmRSS")
    model = onnx.load(path)
    folded = bnpass.fold_batchnorms(model)
    edited = status_mb("VmHWM")
    save_model(folded.model, out, check=which == "bnpass")
print(json.dumps({"base_mb": base, "edited_mb": edited, "peak_mb": status_mb("VmHWM")}))
"""


def large_model(path: Path, gib: float) -> float:
    """Gemm (W: F x F) -> BatchNormalization, repeated until the weights pass ``gib`` GiB; external data."""
    features = 8192
    layers = int(np.ceil(gib * 2**30 / (features * features * 4)))
    rng = np.random.default_rng(0)
    nodes, initializers, x = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((features, features), dtype=np.float32)
        initializers.append(numpy_helper.from_array(w, f"w{i}"))
        del w
        params = [rng.standard_normal(features).astype(np.float32) for _ in range(3)]
        params.append((np.abs(rng.standard_normal(features)) + 0.5).astype(np.float32))
        names = [f"bn{i}.{p}" for p in ("scale", "bias", "mean", "var")]
        initializers += [numpy_helper.from_array(v, n) for v, n in zip(params, names)]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}"], [f"g{i}"], name=f"gemm{i}", transB=1))
        nodes.append(helper.make_node("BatchNormalization", [f"g{i}", *names], [f"y{i}"], name=f"bn{i}"))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                             ["N", features])],
                              [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["N", features])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 10
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data")
    return (os.path.getsize(path) + os.path.getsize(str(path) + ".data")) / 2**20


def trap_memory(folder: Path, gib: float) -> dict:
    path = folder / "large.onnx"
    size = large_model(path, gib)
    figures = {"model_mb": size}
    for which in ("bnpass", "bnpass_unchecked", "onnx_ir"):
        out = folder / f"large_{which}.onnx"
        done = subprocess.run([sys.executable, "-c", LARGE, str(REPO), str(REPO / "tools"), which, str(path),
                               str(out)], capture_output=True, text=True, timeout=1800)
        if done.returncode:
            figures[which] = f"failed: {done.stderr.strip().splitlines()[-1][:120]}"
            continue
        run = json.loads(done.stdout.strip().splitlines()[-1])
        figures[which] = (f"{(run['edited_mb'] - run['base_mb']) / size:.2f}x after the edit, "
                          f"{(run['peak_mb'] - run['base_mb']) / size:.2f}x with the save")
        for leftover in folder.glob(f"large_{which}.onnx*"):
            leftover.unlink()
    return figures


def pass_infrastructure() -> str:
    from onnx_ir.passes import PassBase
    checked = [name for name in ("requires", "ensures", "in_place", "changes_input") if hasattr(PassBase, name)]
    return ("onnx_ir.passes.PassBase declares " + ", ".join(checked) + "; __call__ runs requires(model), call(model), "
            "ensures(model) and raises PreconditionError/PostconditionError; PassManager/Sequential compose passes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large-gib", type=float, default=2.1, help="size of the large model's weights (GiB)")
    parser.add_argument("--skip-large", action="store_true", help="skip the >2 GiB memory trap")
    args = parser.parse_args()
    print(f"onnx-ir {ir.__version__}, onnx {onnx.__version__}, bnpass {bnpass.__version__}")
    rows = []
    for name, trap in (("IR-3 initializers as inputs", trap_ir3), ("metadata and doc strings", trap_metadata),
                       ("overridable initializer", trap_overridable)):
        rows.append((name, "onnx-ir", *trap(onnx_ir_round_trip)))
        rows.append((name, "bnpass", *trap(bnpass_round_trip)))
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        rows.append(("external data", "onnx-ir",
                     *trap_external_data(lambda m, p: ir.save(m, p, external_data=p.name + ".data"), ir.load, folder)))
        from bnpass.model_io import load_model, save_model
        rows.append(("external data", "bnpass",
                     *trap_external_data(lambda m, p: save_model(bnpass.fold_batchnorms(m).model, p,
                                                                 external_data=True), load_model, folder)))
        rows.append(("Constant weights", "onnx-ir", *trap_constant_weight_onnx_ir()))
        rows.append(("Constant weights", "bnpass", *trap_constant_weight_bnpass()))
        for trap, tool, ok, detail in rows:
            print(f"{trap:30s} {tool:8s} {'pass' if ok else 'FAIL'}  {detail}")
        if not args.skip_large:
            figures = trap_memory(folder, args.large_gib)
            print(f"{'weight memory, >2 GiB model':30s} model {figures['model_mb']:.0f} MiB; peak resident memory "
                  "over the process before loading, x the model:")
            print(f"    bnpass (onnx.load + fold + save_model, checked): {figures['bnpass']}")
            print(f"    bnpass, without the ONNX checker on the written file: {figures['bnpass_unchecked']}")
            print("    onnx-ir (ir.load + every Gemm weight scaled per output channel + ir.save): "
                  f"{figures['onnx_ir']}")
    print(pass_infrastructure())


if __name__ == "__main__":
    main()
