"""tools/bench.py runs (here on CPU, as ``--device cuda`` runs on a GPU machine): every statistics
form gets its own timed row built in that form, a model given without data gets random samples
of its input shape, and the ratios are reported. Timings are not asserted (see BENCHMARKS.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from builders import GraphBuilder, add_batchnorm, random_bn_params, random_weight

REPO = Path(__file__).resolve().parents[1]


def conv_bn_model() -> onnx.ModelProto:
    builder = GraphBuilder(opset=13)
    builder.add_input("x", np.float32, ["N", 3, 8, 8])
    rng = np.random.default_rng(0)
    builder.add_initializer("w", random_weight((4, 3, 3, 3), rng))
    builder.add_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])
    add_batchnorm(builder, "c", random_bn_params((4,), rng))
    builder.add_output("y")
    return builder.build()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_bench_measures_every_form_on_a_given_model_and_a_generated_network(tmp_path):
    onnx.save(conv_bn_model(), tmp_path / "tiny.onnx")
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench.py"), "--device", "cpu", "--model", str(tmp_path / "tiny.onnx"),
         "--networks", "resnet", "--size", "16", "--samples", "16", "--batch-size", "8", "--repeats", "1",
         "--no-memory", "--forms", "pooling", "layernorm", "training"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for case, bns in (("tiny", 1), ("resnet", 20)):
        for form in ("reduce", "pooling", "layernorm", "training"):
            assert f"| {case} | (b) bnpass statistics loop, {form} form ({bns} BN {form}) |" in out, (case, form)
        for method in ("(a) plain ORT inference", "(c) bnpass end to end"):
            assert f"| {case} | {method} |" in out
        ratios = re.search(rf"^- `{case}`: (\*\*b/a .*)$", out, flags=re.M).group(1)
        for name in ("b/a reduce", "pooling/reduce", "layernorm/reduce", "training/reduce", "c/a"):
            assert f"{name} = " in ratios, name
    assert "| resnet | (d) torch update_bn |" in out and "| tiny | (d) torch update_bn |" not in out
    assert "**c/d = " in out
    for case in ("tiny", "resnet"):  # the --reference pass and its cost against plain re-estimation
        assert f"| {case} | (g) --reference pass from folder (a compressed copy against the model) |" in out
        assert re.search(rf"^- `{case}`: .*\*\*g/\(b\+\) = [\d.]+ .*\*\*: first reading [\d.]+x, scoring [\d.]+x",
                         out, flags=re.M), case  # split into its two readings


def test_measure_forms_reports_each_forms_error_against_numpy_and_the_cpu():
    def run(*arguments):
        done = subprocess.run([sys.executable, str(REPO / "tools" / "measure_forms.py"), *arguments],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr
        return done.stdout

    rows = re.findall(r"^\| (\w+) \| (\w+) \| ([\d.e+-]+) \| ([\d.e+-]+) \| [\d.]+ \| ([\d.]+) \|$",
                      run("--shape", "4x8x16x16", "--repeats", "2"), flags=re.M)
    assert [(form, built) for form, built, *_ in rows] == [(form, form) for form in
                                                          ("reduce", "pooling", "layernorm", "training")]
    for form, _, mean_error, var_error, _ in rows:
        assert float(mean_error) < 1e-4 and float(var_error) < 1e-5, form  # exact on hard data
    assert rows[0][4] == "1.00"
    network = run("--network", "resnet", "--size", "16", "--batch-size", "4", "--forms", "pooling")
    assert re.search(r"^\| pooling \| CPU \| off \| 20 pooling \| [\d.e+-]+ \| [\d.e+-]+ \|$", network, flags=re.M)


def test_measure_onnx_ir_runs_every_trap_fold_and_probe_on_both():
    """tools/measure_onnx_ir.py (the README's onnx-ir figures) runs; the >2 GiB trap and the conversion cost (a
    fresh process per step: a measurement, not a behaviour) are skipped here. bnpass passes every trap, onnx-ir
    the five the README lists; both writes fold the ResNet-style network's 20 BNs exactly; bnpass's pass
    contract catches each broken pass."""
    pytest.importorskip("onnx_ir")  # a tool's dependency, not bnpass's
    done = subprocess.run([sys.executable, str(REPO / "tools" / "measure_onnx_ir.py"), "--skip-large", "--skip-cost",
                           "--models", "resnet"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    traps = re.findall(r"^\| ([^|]+) \| (onnx-ir|bnpass) \| (pass|FAIL) \|", out, flags=re.M)
    assert len(traps) == 21, out
    assert [trap for trap, tool, result in traps if tool == "bnpass" and result != "pass"] == [], out
    listed = ("IR-3 initializers as inputs", "metadata and doc strings", "overridable initializer", "external data",
              "Constant weights")
    assert {trap for trap, tool, result in traps if tool == "onnx-ir" and result == "pass"} == set(listed), out
    fold = re.search(r"^- resnet: 20 BNs; bnpass: 0 left, max \|output - unfolded\| (\S+) in onnxruntime, "
                     r"checker passes; onnx-ir: 0 left, max \|output - unfolded\| (\S+) in onnxruntime, "
                     r"checker passes; the bnpass write equals the fold pass's output byte for byte: True$",
                     out, flags=re.M)
    assert fold and max(float(diff) for diff in fold.groups()) < 1e-5, out
    probes = re.findall(r"^\| ([^|]+) \| (\w+(?: error)?) \| (\w+(?: error)?) \|$", out, flags=re.M)
    assert [bnpass for _, _, bnpass in probes] == ["no error", *["PassContractError"] * 4, "ModelError", "ModelError",
                                                  "no error"], out
