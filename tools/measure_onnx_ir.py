"""onnx-ir, measured on the traps bnpass's own graph code is built to pass, on what converting costs,
and on the fold's write written both ways.

bnpass edits the ONNX protobuf through its own index and editor (``bnpass/graph.py``,
``bnpass/rewrite.py``, ``bnpass/protos.py``, ``bnpass/computed_constants.py``) because
onnx-graphsurgeon failed these traps (README, "Layout"). This script runs onnx-ir beside bnpass on
the same models and prints Markdown tables:

1. traps, one row per tool: an IR-3 model (every initializer also a graph input); ``metadata_props``,
   doc strings and producer; an overridable initializer (IR >= 4, an initializer that is also a
   graph input) kept as an input; external data; a ``Constant`` weight; the constants bnpass follows
   (a weight behind Identity nodes, statistics made by ``ConstantOfShape``) and the one it must not
   take for a constant (an overridable default); dead code the model already had (bnpass removes
   only what its edits left dead); the bytes of a model nothing changed;
2. the fold's write of every Conv/Gemm -> BN pair (scale the weight per output channel, write the
   bias, rewire the BN's readers to the layer, remove the BN and its dead initializers), written
   with bnpass's ``GraphEditor`` and with onnx-ir (``ir.Model``,
   ``ir.convenience.replace_all_uses_with``, ``onnx_ir.passes.common.RemoveUnusedNodesPass``) in
   this file: lines of code, onnxruntime's output against the unfolded model's on the bench
   networks, and bnpass's graph code against the protobuf use elsewhere in bnpass;
3. conversion cost, each step in a fresh process: time and peak resident memory of ``onnx.load`` /
   ``onnx.save`` / bnpass's checked load and save against ``ir.load`` / ``ir.save``, of
   ``ir.from_proto`` and ``ir.to_proto`` (onnxruntime takes a ModelProto or its bytes, so every
   pass output, calibration copy and scoring model made in onnx-ir ends as one), of a calibration
   copy and of the fold, on the bench networks (``tools/bench.py``, needs torch) and on the 108 MiB
   model of ``tests/test_fold_memory.py``;
4. the pass infrastructure: each rule of ``bnpass.passes.base`` probed with a broken pass, under
   ``onnx_ir.passes`` and under bnpass;
5. weight memory (not with ``--skip-large``): the peak resident memory, over the process before
   loading, while a model larger than 2 GiB (external data) is loaded, every weight feeding a
   BN-followed Gemm scaled per output channel (what a fold writes) and saved, in a fresh process
   each, against the model's size.

    python tools/measure_onnx_ir.py [--skip-large] [--repeats 3] [--large-gib 2.1]

onnx-ir is a tool here, not a dependency of bnpass (``pip install onnx-ir``). Run on the project's
2-core machine; the models are written to a temporary folder and removed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import bnpass  # noqa: E402
from bnpass.protos import unique_name  # noqa: E402  (a pure helper an onnx-ir port would keep using)
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


# ------------------------------------------------------------------------------------------------
# Constants bnpass reads that onnx-ir's reader does not (and one it reads that bnpass refuses)
# ------------------------------------------------------------------------------------------------


def constant_reading_rows() -> list:
    """``(trap, tool, ok, detail)``: a Conv weight behind two Identity nodes, BN statistics made by
    ``ConstantOfShape`` (onnx's light models), and an overridable default (an IR >= 4 initializer that
    is also a graph input, which the caller may replace: not a constant)."""
    from bnpass.graph import GraphIndex
    from builders import build_constant_of_shape_params_model

    rows = []
    identity = build_producer_bn_model("conv", weight_source="identity_chain")
    constant_of_shape = build_constant_of_shape_params_model("conv")
    overridable = build_producer_bn_model("conv")
    weight = overridable.graph.node[0].input[1]
    tensor = next(t for t in overridable.graph.initializer if t.name == weight)
    overridable.graph.input.append(helper.make_tensor_value_info(weight, tensor.data_type, list(tensor.dims)))
    cases = (("Identity chain to a weight", identity, "Conv", 1, True),
             ("ConstantOfShape statistics", constant_of_shape, "BatchNormalization", 3, True),
             ("overridable default", overridable, "Conv", 1, False))
    for trap, model, op_type, position, constant in cases:
        graph = ir.from_proto(model).graph
        node = next(node for node in graph if node.op_type == op_type)
        read = ir.convenience.get_const_tensor(node.inputs[position]) is not None
        rows.append((trap, "onnx-ir", read == constant,
                     f"ir.convenience.get_const_tensor reads a constant: {read} "
                     f"(it is {'' if constant else 'not '}one)"))
        proto_node = next(node for node in model.graph.node if node.op_type == op_type)
        read = GraphIndex(model).constant(proto_node.input[position]) is not None
        rows.append((trap, "bnpass", read == constant,
                     f"GraphIndex.constant reads a constant: {read} (it is {'' if constant else 'not '}one)"))
    return rows


# ------------------------------------------------------------------------------------------------
# The fold's write of one Conv/Gemm -> BN pair, twice: bnpass's GraphEditor and onnx-ir
# ------------------------------------------------------------------------------------------------
# Both match a BN whose input is made by a Conv or Gemm and read by the BN alone, read the five
# constants, compute the folded weight and bias with bnpass.folding (shared, not counted), then write:
# the weight scaled per output channel, the bias, the layer's output renamed to the BN's (its readers
# and the graph outputs keep their names), the BN removed with its now-dead initializers. A constant
# read only by the layer is overwritten in place, any other gets a fresh initializer (never mutate a
# shared tensor); an IR-3 model lists every initializer as a graph input, new or removed.

LAYER_AXES = {"Conv": lambda node: 0, "Gemm": lambda node: 0 if transposed_b(node) else 1}


def transposed_b(node) -> bool:
    if isinstance(node, onnx.NodeProto):
        return any(a.name == "transB" and a.i for a in node.attribute)
    return bool(node.attributes.get_int("transB", 0))


def folded_pair(layer, weight: np.ndarray, bias, gamma, beta, mean, var, epsilon: float) -> tuple:
    """The folded weight and bias, in the weight's dtype (bnpass.folding's math; shared)."""
    from bnpass.folding import batchnorm_affine, fold_bias, scale_output_channels

    scale, shift = batchnorm_affine(gamma, beta, mean, var, epsilon)
    folded = scale_output_channels(weight, scale, axis=LAYER_AXES[layer.op_type](layer))
    return folded.astype(weight.dtype), fold_bias(bias, scale, shift).astype(weight.dtype)


def fold_pairs_bnpass(model: onnx.ModelProto) -> onnx.ModelProto:
    from bnpass.graph import is_batchnorm
    from bnpass.protos import attribute
    from bnpass.rewrite import GraphEditor

    editor = GraphEditor.on_copy_of(model)
    index = editor.index
    for bn in [node for node in editor.graph.node if is_batchnorm(node)]:
        layer = index.producers.get(bn.input[0])
        if layer is None or layer.op_type not in LAYER_AXES or not index.is_private_to(bn.input[0], bn):
            continue
        has_bias = len(layer.input) > 2 and layer.input[2]
        constants = [index.constant(name) for name in [*bn.input[1:5], *layer.input[1:3 if has_bias else 2]]]
        if None in constants:
            continue
        gamma, beta, mean, var, weight, *bias = (constant.value for constant in constants)
        weight, bias = folded_pair(layer, weight, bias[0] if bias else None, gamma, beta, mean, var,
                                   attribute(bn, "epsilon", 1e-5))
        base = layer.name or bn.output[0]
        editor.set_constant_input(layer, 1, weight, f"{base}.weight_folded")
        editor.set_constant_input(layer, 2, bias, f"{base}.bias_folded")
        editor.remove_node(bn)
        editor.set_output(layer, 0, bn.output[0])
    editor.remove_dead()
    return editor.build()


def fold_pairs_onnx_ir(model: ir.Model) -> None:
    """In place on ``model`` (an onnx-ir pass is in place)."""
    from onnx_ir.passes.common import (
        AddInitializersToInputsPass,
        RemoveInitializersFromInputsPass,
        RemoveUnusedNodesPass,
    )

    graph, names = model.graph, _taken_names(model.graph)
    for bn in [node for node in graph if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")]:
        layer = bn.inputs[0].producer()
        if layer is None or layer.op_type not in LAYER_AXES or len(bn.inputs[0].uses()) != 1 \
                or bn.inputs[0].is_graph_output():
            continue
        has_bias = len(layer.inputs) > 2 and layer.inputs[2] is not None
        constants = [_ir_constant(value, model) for value in [*bn.inputs[1:5], *layer.inputs[1:3 if has_bias else 2]]]
        if any(constant is None for constant in constants):
            continue
        gamma, beta, mean, var, weight, *bias = constants
        weight, bias = folded_pair(layer, weight, bias[0] if bias else None, gamma, beta, mean, var,
                                   bn.attributes.get_float("epsilon", 1e-5))
        base = layer.name or bn.outputs[0].name
        _ir_set_constant_input(model, names, layer, 1, weight, f"{base}.weight_folded")
        _ir_set_constant_input(model, names, layer, 2, bias, f"{base}.bias_folded")
        output, kept, name = bn.outputs[0], layer.outputs[0], bn.outputs[0].name
        ir.convenience.replace_all_uses_with(output, kept, replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        output.name, kept.name = None, name
        if output.type is not None:  # a graph output's declaration is its value's: else it is lost
            kept.type, kept.shape = output.type, output.shape
    cleanup = [RemoveUnusedNodesPass()]  # it keeps an initializer listed as a graph input
    if model.ir_version < 4:  # where every initializer is one: delist, clean up, list again
        cleanup = [RemoveInitializersFromInputsPass(), *cleanup, AddInitializersToInputsPass()]
    ir.passes.Sequential(*cleanup)(model)


def _taken_names(graph: ir.Graph) -> set:
    names = {value.name for value in [*graph.inputs, *graph.initializers.values()]}
    return names | {value.name for node in graph for value in node.outputs} | {node.name for node in graph}


def _ir_constant(value, model: ir.Model):
    """The value's constant as an array; None for what is fed at run time and for an overridable
    default (IR >= 4: an initializer that is also a graph input)."""
    if value is None or (value.is_graph_input() and model.ir_version >= 4):
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _ir_set_constant_input(model: ir.Model, names: set, node, position: int, array: np.ndarray, hint: str) -> None:
    value = node.inputs[position] if position < len(node.inputs) else None
    private = (value is not None and value.is_initializer() and len(value.uses()) == 1
               and not value.is_graph_output() and (not value.is_graph_input() or model.ir_version < 4))
    if private:
        value.const_value = ir.tensor(array, name=value.name)
        return
    new = ir.Value(name=unique_name(hint, names), shape=ir.Shape(array.shape),
                   type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), const_value=ir.tensor(array))
    model.graph.register_initializer(new)  # listed as a graph input in IR-3 by the clean-up
    if position >= len(node.inputs):
        node.resize_inputs(position + 1)
    node.replace_input_with(position, new)


def fold_probe_rows(resnet: Optional[Path]) -> list:
    """What each write leaves besides the fold: dead code the model already had, and the bytes of a
    model nothing changed (an onnx-ir round trip; the fold pass where nothing folds)."""
    rows = []
    model = build_producer_bn_model("conv")
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["unused_relu_out"], name="unused_relu"))
    ir_model = ir.from_proto(model)
    fold_pairs_onnx_ir(ir_model)
    for tool, out in (("onnx-ir", ir.to_proto(ir_model)), ("bnpass", fold_pairs_bnpass(model))):
        kept = any(node.name == "unused_relu" for node in out.graph.node)
        rows.append(("dead code the model had", tool, kept, "a node nothing reads, there before the fold: "
                     + ("kept" if kept else "removed too (RemoveUnusedNodesPass)")))
    models = {"tests' Conv -> BN": build_producer_bn_model("conv")}
    if resnet is not None:
        models["ResNet-style"] = onnx.load(resnet)
    for name, model in models.items():
        out = ir.to_proto(ir.from_proto(model))
        rows.append(("unchanged model, same bytes", "onnx-ir", out.SerializeToString() == model.SerializeToString(),
                     f"ir.to_proto(ir.from_proto(m)), {name}: value_info {len(model.graph.value_info)} -> "
                     f"{len(out.graph.value_info)} entries, {len(model.SerializeToString())} -> "
                     f"{len(out.SerializeToString())} bytes"))
    untouched = build_producer_bn_model("conv", producer_output_also_consumed=True)  # nothing folds
    same = bnpass.fold_batchnorms(untouched).model.SerializeToString() == untouched.SerializeToString()
    rows.append(("unchanged model, same bytes", "bnpass", same,
                 "the fold pass on a model where nothing folds: " + ("the same bytes" if same else "other bytes")))
    return rows


# ------------------------------------------------------------------------------------------------
# Conversion cost: each step in a fresh process, on the bench networks and the 108 MiB model
# ------------------------------------------------------------------------------------------------


def _load(path):
    return onnx.load(path)


def _steps(folder: Path) -> dict:
    """name -> (setup(path) -> state, step(state)): the step is timed and its memory measured; the
    setup's result is in memory before (a ModelProto the caller holds, as every bnpass pass is given)."""
    from bnpass.calibration import build_calibration_model
    from bnpass.model_io import load_model, save_model
    from bnpass.passes import FoldBatchNormPass

    out = folder / "step_out.onnx"

    def ir_pair(path):  # the ModelProto the caller holds, and its ir.Model
        proto = onnx.load(path)
        return proto, ir.from_proto(proto)

    def fold_onnx_ir(proto):
        model = ir.from_proto(proto)
        fold_pairs_onnx_ir(model)
        return ir.to_proto(model)

    return {
        "onnx.load": (lambda path: path, onnx.load),
        "bnpass load_model (onnx.load + checker)": (lambda path: path, load_model),
        "ir.load": (lambda path: path, ir.load),
        "onnx.save": (_load, lambda model: onnx.save(model, out)),
        "bnpass save_model (checked, atomic)": (_load, lambda model: save_model(model, out)),
        "ir.save": (ir.load, lambda model: ir.save(model, out)),
        "ir.from_proto": (_load, ir.from_proto),
        "ir.to_proto": (ir_pair, lambda pair: ir.to_proto(pair[1])),
        "bytes for onnxruntime: ModelProto.SerializeToString": (_load, lambda model: model.SerializeToString()),
        "bytes for onnxruntime: ir.to_proto + SerializeToString":
            (ir_pair, lambda pair: ir.to_proto(pair[1]).SerializeToString()),
        "calibration copy (build_calibration_model)": (_load, build_calibration_model),
        "fold pass today (FoldBatchNormPass, contract checked)": (_load, FoldBatchNormPass()),
        "fold write, bnpass GraphEditor": (_load, fold_pairs_bnpass),
        "fold write, onnx-ir (from_proto + edit + to_proto)": (_load, fold_onnx_ir),
        "fold write, onnx-ir edit alone (on an ir.Model)": (ir_pair, lambda pair: fold_pairs_onnx_ir(pair[1])),
    }


def run_step(name: str, path: str, repeats: int) -> dict:
    """One step, ``repeats`` times (a fresh setup each): the median and best time, and the peak resident
    memory of the first run over the process's RSS before it (the setup's model in memory)."""
    import gc
    import time

    from peak_memory import reset_peak, status_mb

    with tempfile.TemporaryDirectory() as folder:
        setup, step = _steps(Path(folder))[name]
        times, peak = [], None
        for _ in range(repeats):
            state = setup(path)
            gc.collect()
            reset_peak()
            base = status_mb("VmRSS")
            start = time.perf_counter()
            result = step(state)
            times.append(time.perf_counter() - start)
            if peak is None:
                peak = status_mb("VmHWM") - base
            del state, result
            gc.collect()
    return {"median_s": float(np.median(times)), "min_s": min(times), "peak_mb": peak}


def conversion_table(models: dict, repeats: int) -> list:
    """``(model, size MiB, step, median s, min s, peak MiB)`` for every step on every model, each step
    in a fresh process."""
    rows = []
    for label, path in models.items():
        size = os.path.getsize(path) / 2**20
        for name in _steps(Path(tempfile.gettempdir())):
            done = subprocess.run([sys.executable, __file__, "--step", name, str(path), "--repeats", str(repeats)],
                                  capture_output=True, text=True, timeout=1800)
            if done.returncode:
                raise RuntimeError(f"step {name!r} on {label} failed: {done.stderr.strip()[-400:]}")
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((label, size, name, figures["median_s"], figures["min_s"], figures["peak_mb"]))
    return rows


MODELS = ("resnet", "mobilenet", "chain")  # the bench networks, and the 108 MiB model of tests/test_fold_memory.py


def bench_models(folder: Path, names=MODELS) -> dict:
    """The bench networks (tools/bench.py; needs torch) and the 108 MiB model of
    tests/test_fold_memory.py ("chain"), those of ``names``, saved in ``folder``; label -> path."""
    sys.path.insert(0, str(REPO / "tools"))
    import bench
    import test_fold_memory

    models = {}
    for name in names:
        if name == "chain":
            models["108 MiB Conv chain"] = folder / "chain.onnx"
            test_fold_memory.conv_chain_model(models["108 MiB Conv chain"])
            continue
        net, shape = bench.build_network(name)
        models[name] = folder / f"{name}.onnx"
        bench.export_network(net, shape, models[name])
    return models


def code_lines(*functions) -> int:
    """Lines of code of ``functions``: no blank lines, comments or docstrings."""
    import ast
    import inspect
    import textwrap

    total = 0
    for function in functions:
        source = textwrap.dedent(inspect.getsource(function))
        tree = ast.parse(source).body[0]
        skipped = set()
        body = tree.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            skipped.update(range(body[0].lineno, body[0].end_lineno + 1))
        total += sum(1 for number, line in enumerate(source.splitlines(), 1)
                     if line.strip() and not line.strip().startswith("#") and number not in skipped)
    return total


GRAPH_CODE = ("graph.py", "rewrite.py", "protos.py", "computed_constants.py")
# a protobuf field ir.Node / ir.Graph spell otherwise, a *Proto class, an onnx.helper / numpy_helper call
PROTOBUF_USE = re.compile(r"\.(input|output|attribute|initializer|value_info|dims|raw_data|data_type)\b"
                          r"|graph\.node\b|\b(Node|Graph|Model|Tensor|ValueInfo|Attribute)Proto\b"
                          r"|\bhelper\.make_|numpy_helper\.")


def module_code(path: Path) -> list:
    """The lines of code of a module: no blank lines, comments or docstrings."""
    import ast

    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    return [line for number, line in enumerate(source.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#") and number not in docstrings]


def code_size() -> dict:
    """The graph code's lines of code, and the lines of code elsewhere in bnpass that read or write
    ONNX protobuf messages directly (what moving to onnx-ir would rewrite besides the graph code)."""
    package = REPO / "bnpass"
    others = [module_code(path) for path in sorted(package.rglob("*.py")) if path.name not in GRAPH_CODE]
    using = [sum(1 for line in lines if PROTOBUF_USE.search(line)) for lines in others]
    return {"graph_code": {name: len(module_code(package / name)) for name in GRAPH_CODE},
            "protobuf_lines": sum(using), "protobuf_modules": sum(1 for n in using if n), "modules": len(others),
            "all_lines": sum(len(lines) for lines in others)}


def fold_comparison(path: Path) -> dict:
    """Both writes on ``path``: the BNs left, the largest output difference to the unfolded model in
    onnxruntime (CPU, no graph optimizations, a seeded batch of 2), whether the bnpass write equals
    the fold pass's output byte for byte, and the lines each needs."""
    from bnpass.runtime import create_session

    model = onnx.load(path)
    value = model.graph.input[0]
    shape = [d.dim_value or 2 for d in value.type.tensor_type.shape.dim]
    feed = {value.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}

    def run(m):
        return create_session(m, ["CPUExecutionProvider"], optimize=False).run(None, feed)[0]

    expected = run(model)
    ir_model = ir.from_proto(model)
    fold_pairs_onnx_ir(ir_model)
    outputs = {"bnpass": fold_pairs_bnpass(model), "onnx-ir": ir.to_proto(ir_model)}
    figures = {"batchnorms": sum(node.op_type == "BatchNormalization" for node in model.graph.node)}
    for tool, out in outputs.items():
        failure = checks(out)
        figures[tool] = {"left": sum(node.op_type == "BatchNormalization" for node in out.graph.node),
                         "max_abs_diff": float(np.abs(run(out) - expected).max()), "checker": failure}
    figures["bnpass_equals_pass"] = (outputs["bnpass"].SerializeToString()
                                     == bnpass.fold_batchnorms(model).model.SerializeToString())
    figures["lines"] = {"bnpass": code_lines(fold_pairs_bnpass),
                        "onnx-ir": code_lines(fold_pairs_onnx_ir, _taken_names, _ir_constant,
                                              _ir_set_constant_input),
                        "onnx-ir helpers": code_lines(_taken_names, _ir_constant, _ir_set_constant_input)}
    return figures


# ------------------------------------------------------------------------------------------------
# Pass infrastructure: what onnx_ir.passes.PassBase checks, probed with a pass on ModelProto
# ------------------------------------------------------------------------------------------------


def pass_infrastructure_rows() -> list:
    """``(check, onnx-ir, bnpass)``: each contract rule probed with a small broken pass on a
    ModelProto (onnx-ir's PassBase types say ir.Model, but nothing converts: a ModelProto goes in)."""
    from onnx_ir.passes import FunctionalPass, PassResult, Sequential

    from bnpass.errors import ModelError
    from bnpass.passes.base import Pass
    from bnpass.passes.base import PassResult as BnpassResult
    from bnpass.passes.base import Sequential as BnpassSequential

    def copy(model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out

    def broken(base, result, **hooks):
        """A pass of ``base`` whose call is ``hooks['call']`` (default: a copy, modified=False)."""
        call = hooks.get("call", lambda self, model: result(copy(model), False))
        methods = {"call": call, **{k: v for k, v in hooks.items() if k != "call"}}
        return type("Probe", (base,), methods)()

    def outcome(run) -> str:
        try:
            run()
        except Exception as error:  # noqa: BLE001 - which error, if any, is the figure
            return type(error).__name__
        return "no error"

    model = build_producer_bn_model("conv")

    def mutate(self, model, result):
        model.doc_string = "changed"
        return result(copy(model), True)

    def overwrite_y(self, model, result):
        out = copy(model)
        out.graph.output[0].name = "renamed"
        out.graph.node[-1].output[0] = "renamed"
        return result(out, True)

    def refuse(self, model):
        raise ModelError("a refusal meant for the user")

    cases = (
        ("runs on a ModelProto", lambda base, result: broken(base, result)),
        ("changes its input though declared not to", lambda base, result: broken(
            base, result, call=lambda self, m: mutate(self, m, result))),
        ("modified=True, output equals input", lambda base, result: broken(
            base, result, call=lambda self, m: result(copy(m), True))),
        ("output fails onnx.checker", lambda base, result: broken(
            base, result, call=lambda self, m: result(_unchecked(copy(m)), True))),
        ("renames a graph output", lambda base, result: broken(
            base, result, call=lambda self, m: overwrite_y(self, m, result))),
        ("user error (ModelError) raised in requires", lambda base, result: broken(base, result, requires=refuse)),
    )
    rows = []
    for what, make in cases:
        probed = copy(model)
        rows.append((what, outcome(lambda: make(FunctionalPass, PassResult)(probed)),
                     outcome(lambda: make(Pass, BnpassResult)(copy(model)))))
    rows.append(("user error (ModelError) inside a Sequential",
                 outcome(lambda: Sequential(broken(FunctionalPass, PassResult, call=lambda self, m: refuse(self, m)))(
                     copy(model))),
                 outcome(lambda: BnpassSequential(broken(Pass, BnpassResult, call=lambda self, m: refuse(self, m)))(
                     copy(model)))))
    rows.append(("a Sequential of no passes", outcome(lambda: Sequential()),
                 outcome(lambda: BnpassSequential()(copy(model)))))
    return rows


def _unchecked(model: onnx.ModelProto) -> onnx.ModelProto:
    model.graph.node[0].op_type = "NoSuchOp"
    return model


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


def print_table(header: tuple, rows: list) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large-gib", type=float, default=2.1, help="size of the large model's weights (GiB)")
    parser.add_argument("--skip-large", action="store_true",
                        help="skip the >2 GiB memory trap (a few minutes instead of about ten)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="models of the fold and conversion figures (chain: the 108 MiB model); "
                             "resnet is always built (the byte-for-byte trap reads it)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each conversion step (the median is shown)")
    parser.add_argument("--skip-cost", action="store_true",
                        help="skip the conversion cost (each step in a fresh process: most of a --skip-large run)")
    # one conversion step in its own process (conversion_table runs the script so)
    parser.add_argument("--step", nargs=2, metavar=("NAME", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(run_step(args.step[0], args.step[1], args.repeats)))
        return
    import platform

    print(f"onnx-ir {ir.__version__}, onnx {onnx.__version__}, bnpass {bnpass.__version__}, numpy {np.__version__}, "
          f"Python {platform.python_version()}, {os.cpu_count()} CPUs")
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
        rows += constant_reading_rows()
        models = bench_models(folder, dict.fromkeys(["resnet", *args.models]))
        rows += fold_probe_rows(models["resnet"])
        print("\n## Traps (pass: the tool does what bnpass needs)\n")
        print_table(("trap", "tool", "result", "detail"), [(t, tool, "pass" if ok else "FAIL", detail)
                                                           for t, tool, ok, detail in rows])

        print("\n## The fold's write of every Conv/Gemm -> BN pair, bnpass GraphEditor against onnx-ir\n")
        for name in [name for name in ("resnet", "mobilenet") if name in models]:
            figures = fold_comparison(models[name])
            print(f"- {name}: {figures['batchnorms']} BNs; " + "; ".join(
                f"{tool}: {figures[tool]['left']} left, max |output - unfolded| {figures[tool]['max_abs_diff']:.3g} "
                f"in onnxruntime, {figures[tool]['checker']}" for tool in ("bnpass", "onnx-ir"))
                + f"; the bnpass write equals the fold pass's output byte for byte: {figures['bnpass_equals_pass']}")
        lines = figures["lines"]
        print(f"- lines of code (no blanks, comments, docstrings): bnpass GraphEditor {lines['bnpass']}; onnx-ir "
              f"{lines['onnx-ir']}, of which {lines['onnx-ir helpers']} in the helpers onnx-ir lacks (the names taken, "
              "a constant that is not an overridable default, overwrite-if-private-else-new-initializer)")

        size = code_size()
        print("- bnpass's graph code, lines of code: " + ", ".join(f"{name} {lines}" for name, lines in
                                                                  size["graph_code"].items())
              + f" (total {sum(size['graph_code'].values())}); elsewhere in bnpass {size['protobuf_lines']} lines in "
              f"{size['protobuf_modules']} of {size['modules']} modules ({size['all_lines']} lines of code) read or "
              "write ONNX protobuf messages directly")

        if not args.skip_cost:
            print(f"\n## Conversion cost: median of {args.repeats} runs, each step in a fresh process; peak "
                  "resident memory of the first run over the RSS before it\n")
            table = conversion_table(models, args.repeats)
            print_table(("model", "step", "median s", "min s", "peak MiB", "x model"),
                        [(label, name, f"{median:.4f}", f"{best:.4f}", f"{peak:.1f}", f"{peak / size:.2f}")
                         for label, size, name, median, best, peak in table])
            print("\nmodel sizes (MiB): " + ", ".join(f"{label} {os.path.getsize(p) / 2**20:.1f}"
                                                      for label, p in models.items()))

        print("\n## Pass infrastructure: each rule probed with a broken pass on a ModelProto\n")
        print_table(("probe", "onnx_ir.passes (FunctionalPass, Sequential)", "bnpass.passes.base (Pass, Sequential)"),
                    pass_infrastructure_rows())

        if not args.skip_large:
            figures = trap_memory(folder, args.large_gib)
            print(f"\n## Weight memory, >2 GiB model: {figures['model_mb']:.0f} MiB; peak resident memory over the "
                  "process before loading, x the model\n")
            print(f"- bnpass (onnx.load + fold + save_model, checked): {figures['bnpass']}")
            print(f"- bnpass, without the ONNX checker on the written file: {figures['bnpass_unchecked']}")
            print("- onnx-ir (ir.load + every Gemm weight scaled per output channel + ir.save): "
                  f"{figures['onnx_ir']}")


if __name__ == "__main__":
    main()
