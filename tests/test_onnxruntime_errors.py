"""Whatever onnxruntime refuses, on any session bnpass opens, is one ``error:`` line naming the node and
what onnxruntime said; exit 1, nothing written, the input untouched (issue 22, item 1: these printed
26-32 lines of traceback ending in ``Fail: [ONNXRuntimeError] : 1 : FAIL : ...``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

import bnpass
from bnpass.runtime import CPU, NodeIndex, create_session, session_error
from refused_models import conv_bn_model

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "bnpass", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def snapshot(folder: Path) -> dict:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def calibration_folder(folder: Path, size=(8, 8)) -> str:
    (folder / "calib").mkdir()
    np.save(folder / "calib" / "a.npy", np.random.default_rng(3).standard_normal((64, 3, *size)).astype(np.float32))
    return "calib"


CASES = [
    # (id, model, data size, extra arguments, words the error line must hold)
    ("custom op, at session creation", conv_bn_model(plugin="before"), (8, 8), [],
     ["onnxruntime cannot load the model: node 'plugin' (custom.ops:MyPlugin):",
      "custom.ops:MyPlugin(-1) is not a registered function/op"]),
    ("opset 99, at session creation", conv_bn_model(opset=99), (8, 8), [],
     ["onnxruntime cannot load the model:", "Opset 99 is under development"]),
    ("free H/W fed 10x10 into an 11x11 kernel, at run time", conv_bn_model(kernel=11, size=("H", "W")), (10, 10), [],
     ["onnxruntime failed on a batch of 'x' float32[32, 3, 10, 10]: node 'conv' (Conv): Invalid input shape: {10,10}"]),
    ("custom op after the last BN, in the --verify session", conv_bn_model(plugin="after"), (8, 8), ["--verify"],
     ["onnxruntime cannot load the model: node 'plugin' (custom.ops:MyPlugin)"]),
    ("custom op after the last BN, in the --reference sessions", conv_bn_model(plugin="after"), (8, 8),
     ["--reference", "reference.onnx"], ["onnxruntime cannot load the model: node 'plugin' (custom.ops:MyPlugin)"]),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_what_onnxruntime_refuses_is_one_error_line_and_nothing_is_written(tmp_path, case):
    _, model, size, extra, words = case
    onnx.save(model, tmp_path / "model.onnx")
    onnx.save(conv_bn_model(plugin="after", seed=1), tmp_path / "reference.onnx")
    data = calibration_folder(tmp_path, size)
    before = snapshot(tmp_path)
    done = run_cli("model.onnx", "out.onnx", "--data", data, *extra, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert lines[-1].startswith("error: ") and all(word in lines[-1] for word in words), done.stderr
    assert "Traceback" not in done.stderr and "[E:onnxruntime" not in done.stderr, done.stderr
    assert "/onnxruntime_src/" not in done.stderr  # onnxruntime's source locations are not for users
    assert snapshot(tmp_path) == before


def test_a_model_onnxruntime_can_run_after_the_last_bn_is_still_written(tmp_path):
    """The custom op after the last BN is left out of calibration: without --verify the run succeeds."""
    onnx.save(conv_bn_model(plugin="after"), tmp_path / "model.onnx")
    done = run_cli("model.onnx", "out.onnx", "--data", calibration_folder(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [node.op_type for node in onnx.load(tmp_path / "out.onnx").graph.node] == ["Conv", "MyPlugin"]


def test_the_api_raises_a_session_error_naming_the_node():
    data = [np.zeros((4, 3, 10, 10), np.float32)]
    with pytest.raises(bnpass.SessionError, match=r"node 'conv' \(Conv\): Invalid input shape") as raised:
        bnpass.reestimate_batchnorms(conv_bn_model(kernel=11, size=("H", "W")), data, device="cpu")
    assert isinstance(raised.value, bnpass.ModelError) and raised.value.node == "conv"


@pytest.mark.parametrize("optimize", [True, False])
def test_a_session_names_the_models_node_even_when_onnxruntime_renamed_it(optimize):
    """With graph optimizations on, onnxruntime's CPU provider may run the Conv as 'c_nchwc' (its NCHWc
    layout, named after the Conv's output 'c'): the message names the model's own node."""
    session = create_session(conv_bn_model(kernel=11, size=("H", "W")), [CPU], optimize=optimize)
    with pytest.raises(bnpass.SessionError, match=r"^onnxruntime failed on a batch of 'x' float32\[2, 3, 10, 10\]: "
                                                  r"node 'conv' \(Conv\): Invalid input shape: \{10,10\}$"):
        session.run(None, {"x": np.zeros((2, 3, 10, 10), np.float32)})
    assert NodeIndex.of(conv_bn_model()).resolve("c_nchwc") == "conv"


def test_messages_of_other_shapes_name_their_node_and_lose_the_source_locations():
    """Three more of onnxruntime's formats: an invalid-model tuple, a kernel's message with a C++
    location and signature inside it, an op known to no domain."""
    def refused(nodes, *inputs, opset=13):
        graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info(name, kind, shape)
                                                    for name, kind, shape in inputs],
                                       [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
        model.ir_version = 10
        return model

    unknown = refused([onnx.helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery")],
                      ("x", onnx.TensorProto.FLOAT, [1, 3]))
    with pytest.raises(bnpass.SessionError) as raised:
        create_session(unknown, [CPU])
    assert str(raised.value) == ("onnxruntime cannot load the model: node 'mystery' (NoSuchOp): No Op registered for "
                                 "NoSuchOp with domain_version of 13")

    reshape = refused([onnx.helper.make_node("Reshape", ["x", "s"], ["y"], name="flatten")],
                      ("x", onnx.TensorProto.FLOAT, [1, 3]), ("s", onnx.TensorProto.INT64, [1]))
    session = create_session(reshape, [CPU])
    with pytest.raises(bnpass.SessionError) as raised:
        session.run(None, {"x": np.ones((1, 3), np.float32), "s": np.array([7], np.int64)})
    message = str(raised.value)
    assert message.startswith("onnxruntime failed on a batch of 'x' float32[1, 3], 's' int64[1]: node 'flatten' "
                              "(Reshape): "), message
    assert "cannot be reshaped to the requested shape" in message and ".h:" not in message and "::" not in message

    # What onnxruntime raises is recognised by its type's module; anything else is a bug and passes as it is.
    error = onnxruntime.capi.onnxruntime_pybind11_state.Fail("[ONNXRuntimeError] : 1 : FAIL : something")
    assert str(session_error(error, NodeIndex(), "failed")) == "onnxruntime failed: something"
