"""The command line, in-process and as a subprocess: the main job, the report, and each error path.

Every error path must print one ``error:`` line (no traceback), exit non-zero, create no output
file and leave the input model byte for byte as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnpass.cli import main
from builders import count_ops, run_onnxruntime

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "digits"


@pytest.fixture
def workspace(tmp_path):
    """A copy of the shipped example, so no test can touch the repository's files."""
    shutil.copy(EXAMPLE / "model_compressed.onnx", tmp_path / "model.onnx")
    shutil.copytree(EXAMPLE / "calib", tmp_path / "calib")
    return tmp_path


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "bnpass", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def calibration_batch(workspace, count=32):
    files = sorted((workspace / "calib").glob("*.npy"))
    return np.concatenate([np.load(f) for f in files])[:count]


def test_main_job_in_process_writes_a_model_without_bn_that_matches_the_reestimated_one(workspace, capsys):
    output, report = workspace / "out.onnx", workspace / "report.json"
    # --device cpu: the verify bound 1e-5 is a CPU figure (tests/test_cuda.py covers CUDA).
    assert main([str(workspace / "model.onnx"), str(output), "--data", str(workspace / "calib"),
                 "--report", str(report), "--verify", "--device", "cpu", "-q"]) == 0
    assert capsys.readouterr().out == ""  # -q: nothing but warnings and errors
    folded = onnx.load(output)
    onnx.checker.check_model(folded, full_check=True)
    assert count_ops(folded, "BatchNormalization") == 0
    records = json.loads(report.read_text())
    assert records["samples"] == 512 and records["stats"] == "pooled"
    assert all(bn["reestimated"] and bn["folded_into"] for bn in records["batchnorms"])
    assert records["verify"]["max_rel"] < 1e-5

    # Same function as the re-estimated, unfolded model (run by onnxruntime, BN kept).
    unfolded = workspace / "unfolded.onnx"
    assert main([str(workspace / "model.onnx"), str(unfolded), "--data", str(workspace / "calib"),
                 "--no-fold", "--device", "cpu", "-q"]) == 0
    assert count_ops(onnx.load(unfolded), "BatchNormalization") == 3
    batch = {"input": calibration_batch(workspace)}
    expected = run_onnxruntime(onnx.load(unfolded), batch)[0]
    got = run_onnxruntime(folded, batch)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_subprocess_prints_a_summary_and_one_clean_device_line(workspace):
    before = (workspace / "model.onnx").read_bytes()
    done = run_cli("model.onnx", "out.onnx", "--data", "calib", "--num-samples", "100", "--batch-size", "50", "--threads", "1",
                   cwd=workspace)
    assert done.returncode == 0, done.stderr
    assert "re-estimated 3 of 3" in done.stdout and "folded 3 of 3" in done.stdout
    assert "from 100 samples" in done.stdout
    assert "Traceback" not in done.stderr and "[E:onnxruntime" not in done.stderr
    assert "Failed to load" not in done.stderr
    assert (workspace / "model.onnx").read_bytes() == before


def test_fold_only_needs_no_data_and_keeps_the_statistics(workspace):
    done = run_cli("model.onnx", "out.onnx", "--fold-only", cwd=workspace)
    assert done.returncode == 0, done.stderr
    batch = {"input": calibration_batch(workspace)}
    expected = run_onnxruntime(onnx.load(workspace / "model.onnx"), batch)[0]
    got = run_onnxruntime(onnx.load(workspace / "out.onnx"), batch)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_the_same_inputs_give_a_byte_identical_model(workspace):
    # On CPU: cuDNN may pick other convolution algorithms in another process (other roundings).
    for name in ("a.onnx", "b.onnx"):
        assert run_cli("model.onnx", name, "--data", "calib", "--device", "cpu", "-q", cwd=workspace).returncode == 0
    assert (workspace / "a.onnx").read_bytes() == (workspace / "b.onnx").read_bytes()


def _write_bad_shape(workspace):
    np.save(workspace / "calib" / "zz_bad.npy", np.zeros((4, 1, 9, 9), np.float32))


def _write_not_onnx(workspace):
    (workspace / "model.onnx").write_text("this is not a model")


def _truncate_model(workspace):
    data = (workspace / "model.onnx").read_bytes()
    (workspace / "model.onnx").write_bytes(data[: len(data) // 2])


def _break_model(workspace):
    model = onnx.load(workspace / "model.onnx")
    model.graph.node[0].input[0] = "no_such_tensor"
    onnx.save(model, workspace / "model.onnx")


def _folder(workspace, name, files):
    folder = workspace / name
    folder.mkdir()
    for file_name, content in files.items():
        if isinstance(content, np.ndarray):
            np.save(folder / file_name, content)
        else:
            (folder / file_name).write_bytes(content)


def _write_loader(workspace):
    (workspace / "loader.py").write_text("def broken():\n    raise ValueError('camera offline')\n")


ERROR_CASES = [
    # (id, arguments, setup, words the last stderr line must contain)
    ("missing model", ["missing.onnx", "out.onnx", "--data", "calib"], None, "missing.onnx' does not exist"),
    ("not onnx", ["model.onnx", "out.onnx", "--data", "calib"], _write_not_onnx, "not a readable ONNX model"),
    ("truncated model", ["model.onnx", "out.onnx", "--data", "calib"], _truncate_model, "not a readable ONNX model"),
    ("model fails checker", ["model.onnx", "out.onnx", "--data", "calib"], _break_model, "fails the ONNX checker"),
    ("missing data", ["model.onnx", "out.onnx", "--data", "nowhere"], None, "'nowhere' does not exist"),
    ("empty data folder", ["model.onnx", "out.onnx", "--data", "empty"],
     lambda w: _folder(w, "empty", {}), "'empty' has no .npy, .npz or image files"),
    ("only unknown files", ["model.onnx", "out.onnx", "--data", "odd"],
     lambda w: _folder(w, "odd", {"notes.txt": b"hello"}), "'odd' has no .npy, .npz or image files"),
    ("no data given", ["model.onnx", "out.onnx"], None, "--data DIR (or --loader) is required"),
    ("output is input", ["model.onnx", "model.onnx", "--data", "calib"], None, "is the input model"),
    ("output is a folder", ["model.onnx", "calib", "--data", "calib"], None, "is a folder"),
    ("output folder missing", ["model.onnx", "no/such/out.onnx", "--data", "calib"], None, "does not exist"),
    ("data shape", ["model.onnx", "out.onnx", "--data", "calib"], _write_bad_shape,
     "zz_bad.npy: array of shape [4, 1, 9, 9] does not fit input 'input' float32[?, 1, 8, 8] (axis 2 is 9"),
    ("data dtype", ["model.onnx", "out.onnx", "--data", "ints"],
     lambda w: _folder(w, "ints", {"a.npy": np.zeros((40, 1, 8, 8), np.int32)}),
     "a.npy: array of dtype int32 does not fit input 'input' float32[?, 1, 8, 8]"),
    ("NaN in data", ["model.onnx", "out.onnx", "--data", "nan"],
     lambda w: _folder(w, "nan", {"a.npy": np.full((40, 1, 8, 8), np.nan, np.float32)}),
     "a.npy: the data contains NaN or Inf"),
    ("fewer samples than a batch", ["model.onnx", "out.onnx", "--data", "calib", "--batch-size", "1000"], None,
     "holds 512 samples, fewer than one batch of 1000"),
    ("unreadable image", ["model.onnx", "out.onnx", "--data", "images"],
     lambda w: _folder(w, "images", {"a.png": b"not a png"}), "a.png: cannot read as an image"),
    ("loader raises", ["model.onnx", "out.onnx", "--loader", "loader.py:broken"], _write_loader,
     "--loader 'loader.py:broken' raised ValueError: camera offline"),
    ("loader missing", ["model.onnx", "out.onnx", "--loader", "nowhere.py:f"], None, "'nowhere.py' does not exist"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[case[0] for case in ERROR_CASES])
def test_bad_input_gives_one_error_line_and_writes_nothing(workspace, case):
    _, arguments, setup, message = case
    if setup:
        setup(workspace)
    before = (workspace / "model.onnx").read_bytes()
    listing = sorted(p.name for p in workspace.iterdir())
    done = run_cli(*arguments, cwd=workspace)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in workspace.iterdir()) == listing  # no output, no leftovers
    assert (workspace / "model.onnx").read_bytes() == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to read-only folders")
def test_unwritable_output_folder_is_an_error(workspace):
    locked = workspace / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    done = run_cli("model.onnx", "locked/out.onnx", "--data", "calib", cwd=workspace)
    assert done.returncode == 1 and "is not writable" in done.stderr


def test_ctrl_c_during_calibration_leaves_no_output(workspace):
    (workspace / "slow.py").write_text(
        "import numpy as np, pathlib, time\n"
        "def samples():\n"
        "    pathlib.Path('started').touch()\n"
        "    for _ in range(1000):\n"
        "        time.sleep(0.05)\n"
        "        yield np.zeros((1, 8, 8), np.float32)\n")
    process = subprocess.Popen([sys.executable, "-m", "bnpass", "model.onnx", "out.onnx", "--loader", "slow.py:samples"],
                               cwd=workspace, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    while not (workspace / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "error: interrupted; no output written" in stderr
    assert "Traceback" not in stderr
    assert not any(p.name.startswith(("out.onnx", ".out.onnx")) for p in workspace.iterdir())


def test_unknown_files_beside_arrays_are_skipped_with_a_warning(workspace):
    (workspace / "calib" / "README.txt").write_text("calibration images of 2026")
    done = run_cli("model.onnx", "out.onnx", "--data", "calib", cwd=workspace)
    assert done.returncode == 0 and "warning: ignoring 1 file(s)" in done.stderr


def test_cuda_asked_for_where_it_cannot_load_is_an_error(workspace):
    from bnpass.runtime import cuda_unavailable_reason

    if cuda_unavailable_reason() is None:
        pytest.skip("this machine has a working CUDA provider")
    done = run_cli("model.onnx", "out.onnx", "--data", "calib", "--device", "cuda", cwd=workspace)
    assert done.returncode == 1 and done.stderr.strip().startswith("error: --device cuda:")
    assert not (workspace / "out.onnx").exists()


def test_a_model_without_batchnorm_is_copied_with_a_notice(tmp_path):
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "relu.onnx")
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "a.npy", np.ones((4, 2), np.float32))
    done = run_cli("relu.onnx", "out.onnx", "--data", "calib", cwd=tmp_path)
    assert done.returncode == 0 and "no BatchNormalization" in done.stderr
    assert onnx.load(tmp_path / "out.onnx").SerializeToString() == model.SerializeToString()
