"""The command line, in-process and as a subprocess: the main job, the report, and each error path.

Every error path must print one ``error:`` line (no traceback), exit non-zero, create no output
file and leave the input model byte for byte as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import bnpass
from bnpass.cli import main
from builders import (
    build_bn_after_op_model,
    build_conv_bn_relu_chain_model,
    build_qdq_conv_bn_model,
    count_ops,
    run_onnxruntime,
)

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
    done = run_cli("model.onnx", "out.onnx", "--data", "calib", "--num-samples", "100", "--batch-size", "50",
                   "--threads", "1", cwd=workspace)
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


def _external_data(location):
    """The model re-saved with its weights in the file ``location`` beside it."""
    def setup(workspace):
        model = onnx.load(workspace / "model.onnx")
        onnx.save(model, workspace / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                  location=location, size_threshold=0)
    return setup


def _linked(name, target, kind):
    def setup(workspace):
        (os.link if kind == "hard" else os.symlink)(workspace / target, workspace / name)
    return setup


def _write_config(workspace):
    (workspace / "nncf.json").write_text('{"input_info": {"sample_size": [1, 1, 8, 8]}}')


def _gray_images(workspace, truncate=None):
    folder = workspace / "images"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.fromarray(pixels).save(folder / name, quality=95)
    if truncate:  # the header stays whole, the scan data ends early: only decoding finds it
        data = (folder / truncate).read_bytes()
        (folder / truncate).write_bytes(data[:-200])


def _pickled(workspace):
    folder = workspace / "pickled"
    folder.mkdir()
    np.save(folder / "a.npy", np.array([np.zeros((1, 8, 8), np.float32), None], dtype=object), allow_pickle=True)


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
    # Data loss: nothing written may be something read, or another written path, by any name.
    ("report is the input", ["model.onnx", "out.onnx", "--data", "calib", "--report", "model.onnx"], None,
     "--report 'model.onnx' is the input model: bnpass never writes over a file it reads"),
    ("report is the output", ["model.onnx", "out.onnx", "--data", "calib", "--report", "out.onnx"], None,
     "--report 'out.onnx' and the output 'out.onnx' are the same file"),
    ("report is a data file", ["model.onnx", "out.onnx", "--data", "calib", "--report", "calib/calib_003.npy"], None,
     "--report 'calib/calib_003.npy' is a calibration data file"),
    ("report is the config", ["model.onnx", "out.onnx", "--data", "calib", "--config", "nncf.json", "--report",
                              "nncf.json"], _write_config, "--report 'nncf.json' is the --config file"),
    ("report is the loader", ["model.onnx", "out.onnx", "--loader", "loader.py:broken", "--report", "loader.py"],
     _write_loader, "--report 'loader.py' is the --loader file"),
    ("output is the input's external data", ["model.onnx", "weights.bin", "--fold-only"], _external_data("weights.bin"),
     "the output 'weights.bin' is the input model's external data"),
    ("output's data is the input's external data", ["model.onnx", "out.onnx", "--fold-only"],
     _external_data("out.onnx.data"), "the output's external data 'out.onnx.data' is the input model's external data"),
    ("output hard-linked to the input", ["model.onnx", "alias.onnx", "--fold-only"],
     _linked("alias.onnx", "model.onnx", "hard"), "the output 'alias.onnx' is the input model ('model.onnx')"),
    ("output symlinked to the input", ["model.onnx", "alias.onnx", "--fold-only"],
     _linked("alias.onnx", "model.onnx", "symbolic"), "the output 'alias.onnx' is the input model ('model.onnx')"),
    ("report symlinked to the output", ["model.onnx", "out.onnx", "--fold-only", "--report", "link.json"],
     _linked("link.json", "out.onnx", "symbolic"), "--report 'link.json' and the output 'out.onnx' are the same file"),
    # Bad data, named by file, before or during calibration.
    ("pickled array", ["model.onnx", "out.onnx", "--data", "pickled"], _pickled,
     "a.npy: holds Python objects (dtype object), not numbers"),
    ("truncated JPEG", ["model.onnx", "out.onnx", "--data", "images", "--batch-size", "1"],
     lambda w: _gray_images(w, truncate="b.jpg"), "b.jpg: cannot read as an image (image file is truncated"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[case[0] for case in ERROR_CASES])
def test_bad_input_gives_one_error_line_and_writes_nothing(workspace, case):
    _, arguments, setup, message = case
    if setup:
        setup(workspace)
    before = _snapshot(workspace)
    done = run_cli(*arguments, cwd=workspace)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], done.stderr
    assert "Traceback" not in done.stderr
    assert _snapshot(workspace) == before  # no output, no leftovers, every input byte-identical


def _snapshot(folder: Path) -> dict:
    """Every file below ``folder`` (links as links) and its bytes."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            files[str(path.relative_to(folder))] = ("link", os.readlink(path))
        elif path.is_file():
            files[str(path.relative_to(folder))] = path.read_bytes()
    return files


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
    process = subprocess.Popen([sys.executable, "-m", "bnpass", "model.onnx", "out.onnx",
                                "--loader", "slow.py:samples"], cwd=workspace, stderr=subprocess.PIPE, text=True,
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
    assert done.returncode == 0 and "warning: ignoring 1 file that is neither" in done.stderr


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
    assert 'export it with BN kept (README: "Exporting with BN kept")' in done.stderr  # the likely cause, the fix
    assert onnx.load(tmp_path / "out.onnx").SerializeToString() == model.SerializeToString()


# --- messages, verify, provenance (issue 8) --------------------------------------------------------

def test_verify_compares_like_with_like_on_a_qdq_model(tmp_path):
    """onnxruntime's integer QDQ kernels on one side only looked like a 1% fold error."""
    from bnpass.verify import compare_models

    model = build_qdq_conv_bn_model()
    folded = bnpass.fold_batchnorms(model)
    assert folded.folded == [("bn", "conv")]
    feeds = [{"x": np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)}]
    difference = compare_models(model, folded.model, feeds, ["CPUExecutionProvider"])
    assert difference.batches == 1 and difference.max_rel < 1e-6
    # The CLI: the same model, verified on its calibration batches.
    onnx.save(model, tmp_path / "model.onnx")
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "a.npy", feeds[0]["x"])
    done = run_cli("model.onnx", "out.onnx", "--data", "calib", "--fold-only", "--verify", "--report", "r.json",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "r.json").read_text())["verify"]["max_rel"] < 1e-6


def test_verify_says_when_nothing_folded_and_uses_no_more_batches_than_calibration(tmp_path):
    onnx.save(build_bn_after_op_model("Relu"), tmp_path / "model.onnx")  # BN after Relu, a graph output
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "a.npy", np.random.default_rng(2).standard_normal((200, 4, 6, 6)).astype(np.float32))
    done = run_cli("model.onnx", "out.onnx", "--data", "calib", "--verify", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "verify: nothing was folded" in done.stdout and "max relative" not in done.stdout

    onnx.save(build_conv_bn_relu_chain_model(), tmp_path / "chain.onnx")
    np.save(tmp_path / "calib" / "a.npy", np.random.default_rng(2).standard_normal((200, 4, 6, 6)).astype(np.float32))
    done = run_cli("chain.onnx", "out.onnx", "--data", "calib", "--verify", "--num-samples", "40", "--batch-size",
                   "20", "--report", "r.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["batches"] == 2 and report["verify"]["batches"] == 2  # not 4: calibration used 2


def test_loader_counts_are_the_samples_it_yields(workspace):
    (workspace / "hundred.py").write_text(
        "import numpy as np\n"
        "def samples():\n"
        "    return [np.full((1, 8, 8), i / 100, np.float32) for i in range(100)]\n")
    done = run_cli("model.onnx", "out.onnx", "--loader", "hundred.py:samples", cwd=workspace)
    assert done.returncode == 0, done.stderr
    assert "on up to 2016 samples from the data source (2000 requested, rounded up to whole batches of 32" \
        in done.stderr
    assert "from 100 samples (4 batches of up to 32" in done.stdout
    assert "1 batches" not in done.stdout and "1 samples" not in done.stdout


def test_too_little_data_gets_a_warning(workspace):
    done = run_cli("model.onnx", "out.onnx", "--data", "calib", "--num-samples", "1", "--batch-size", "1",
                   cwd=workspace)
    assert done.returncode == 0, done.stderr
    assert "warning: batches of 1 sample: during calibration every BN normalizes with its batch's statistics" \
        in done.stderr and "1 sample in all is little" in done.stderr
    assert "warning" not in run_cli("model.onnx", "out.onnx", "--data", "calib", cwd=workspace).stderr


def test_the_output_records_what_made_it_and_keeps_the_models_own_metadata(workspace):
    model = onnx.load(workspace / "model.onnx")
    onnx.helper.set_model_props(model, {"author": "someone", "bnpass.stats": "stale"})
    onnx.save(model, workspace / "model.onnx")
    assert run_cli("model.onnx", "out.onnx", "--data", "calib", "--stats", "batch-mean", cwd=workspace).returncode == 0
    written = onnx.load(workspace / "out.onnx")
    assert {p.key: p.value for p in written.metadata_props} == {
        "author": "someone", "bnpass.stats": "batch-mean", "bnpass.version": bnpass.__version__,
        "bnpass.samples": "512", "bnpass.batch_size": "32", "bnpass.folded": "3 of 3"}
    assert (written.producer_name, written.producer_version) == (model.producer_name, model.producer_version)


def test_bns_that_stay_are_grouped_by_reason_and_verbose_lists_each(tmp_path, workspace):
    densenet = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_densenet121.onnx"
    done = run_cli(densenet, tmp_path / "out.onnx", "--fold-only", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "folded 59 of 121 BatchNormalization nodes (59 Conv->BN); 62 left:"
    assert [line.split(" (")[0] for line in lines[1:4]] == ["  58 left", "  3 left", "  1 left"]
    assert "its input comes from Concat '…'" in lines[1] and "... (58 in all)" in lines[1]
    assert len(lines) == 5 and "left" not in done.stderr

    verbose = run_cli("model.onnx", "out.onnx", "--data", "calib", "-v", cwd=workspace)
    per_bn = [line for line in verbose.stdout.splitlines() if "BatchNormalization:" in line]
    assert len(per_bn) == 3 and all("folded into" in line and " -> " in line for line in per_bn)


# --- what a new user hit (round 3): options that cannot apply, messages, files -----------------------------

def _error_in_process(workspace, capsys, monkeypatch, *arguments, code=1) -> str:
    """Run ``main`` in ``workspace``: exit ``code``, the ``error: ...`` line (the last stderr line; for a
    bad command line, exit 2, the line before the one pointing to --help), every file as it was.
    Returns that line."""
    monkeypatch.chdir(workspace)
    before = _snapshot(workspace)
    exit_code = main([str(argument) for argument in arguments])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    if code == 2:
        assert lines[-1] == "see 'bnpass --help' for the options", err
        lines = lines[:-1]
    assert exit_code == code and lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert _snapshot(workspace) == before
    return lines[-1]


IMAGE_OPTIONS = ["--mean", "100", "--std", "50", "--no-scale", "--resize", "10", "--color", "bgr", "--layout", "nhwc"]


@pytest.mark.parametrize("source", [["--data", "calib"], ["--loader", "hundred.py:samples"]], ids=["arrays", "loader"])
def test_image_options_that_cannot_apply_are_an_error(workspace, capsys, monkeypatch, source):
    (workspace / "hundred.py").write_text(
        "import numpy as np\ndef samples():\n    return [np.zeros((1, 8, 8), np.float32)] * 100\n")
    line = _error_in_process(workspace, capsys, monkeypatch, "model.onnx", "out.onnx", *source, *IMAGE_OPTIONS,
                             code=2)
    assert "--resize, --color, --no-scale, --mean, --std, --layout apply to image files" in line, line


def test_data_may_be_one_array_file_holding_a_batch(workspace, capsys, monkeypatch):
    """--data FILE.npy / FILE.npz: the same samples, the same model, as a folder holding that file."""
    monkeypatch.chdir(workspace)
    (workspace / "one").mkdir()
    batch = calibration_batch(workspace, 64)
    np.save(workspace / "one" / "batch.npy", batch)
    np.savez(workspace / "batch.npz", input=batch)
    for data, output in (("one", "folder.onnx"), ("one/batch.npy", "npy.onnx"), ("batch.npz", "npz.onnx")):
        assert main(["model.onnx", output, "--data", data, "--device", "cpu", "-q"]) == 0, capsys.readouterr().err
    assert (workspace / "npy.onnx").read_bytes() == (workspace / "folder.onnx").read_bytes()
    assert (workspace / "npz.onnx").read_bytes() == (workspace / "folder.onnx").read_bytes()
    (workspace / "notes.txt").write_text("hello")
    line = _error_in_process(workspace, capsys, monkeypatch, "model.onnx", "out.onnx", "--data", "notes.txt")
    assert "'notes.txt' is neither a folder nor a .npy or .npz file" in line


def test_a_reference_that_is_the_input_model_is_an_error(workspace, capsys, monkeypatch):
    shutil.copy(workspace / "model.onnx", workspace / "copy.onnx")
    line = _error_in_process(workspace, capsys, monkeypatch, "model.onnx", "out.onnx", "--data", "calib",
                             "--reference", "model.onnx")
    assert "--reference 'model.onnx' is the input model" in line
    line = _error_in_process(workspace, capsys, monkeypatch, "model.onnx", "out.onnx", "--data", "calib",
                             "--reference", "copy.onnx")
    assert "has the same weights and statistics as the model" in line
    with pytest.raises(bnpass.ModelError, match="the same weights and statistics"):
        bnpass.reestimate_batchnorms(workspace / "model.onnx", workspace / "calib", reference=workspace / "copy.onnx")


def test_plot_formats_follow_the_name_or_are_refused(workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    assert main(["model.onnx", "out.onnx", "--data", "calib", "--num-samples", "64", "--plot", "p.svg",
                 "--device", "cpu", "-q"]) == 0
    assert b"<svg" in (workspace / "p.svg").read_bytes()[:1000]
    line = _error_in_process(workspace, capsys, monkeypatch, "model.onnx", "out.onnx", "--data", "calib",
                             "--plot", "p.jpg", code=2)
    assert "--plot 'p.jpg': name the picture .png, .svg or .pdf" in line


@pytest.mark.parametrize("failing", ["out.onnx", "out.onnx.data", "r.json", "p.png"])
def test_a_full_disk_is_one_error_line_and_leaves_no_file(workspace, capsys, monkeypatch, failing):
    """Every file of a run is written under a temporary name and renamed only when all were written."""
    import errno

    from bnpass import model_io

    model = onnx.load(workspace / "model.onnx")
    onnx.save(model, workspace / "model.onnx", save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    real_write = model_io._write_all

    def full_disk(stream, content):
        if re.fullmatch(rf"\.{re.escape(failing)}\.[^.]+\.tmp", os.path.basename(stream.name)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(stream, content)

    monkeypatch.setattr(model_io, "_write_all", full_disk)
    line = _error_in_process(workspace, capsys, monkeypatch, "model.onnx", "out.onnx", "--data", "calib",
                             "--num-samples", "64", "--report", "r.json", "--plot", "p.png", "--device", "cpu")
    assert line.endswith(f"'{failing}': No space left on device"), line


def test_a_loader_with_other_keys_is_told_which_came(workspace, capsys, monkeypatch):
    (workspace / "keyed.py").write_text(
        "import numpy as np\ndef batches():\n    return [{'image': np.zeros((4, 1, 8, 8), np.float32)}]\n")
    line = _error_in_process(workspace, capsys, monkeypatch, "model.onnx", "out.onnx", "--loader", "keyed.py:batches")
    assert "batch 0: no array for model input 'input' (the batch has: image)" in line


def test_reference_without_reestimation_names_the_one_fix(workspace, capsys, monkeypatch):
    shutil.copy(EXAMPLE.parent / "reference" / "model.onnx", workspace / "ref.onnx")
    line = _error_in_process(workspace, capsys, monkeypatch, "model.onnx", "out.onnx", "--fold-only",
                             "--reference", "ref.onnx", code=2)
    assert line == "error: --reference needs re-estimated statistics: drop --fold-only"
    (workspace / "nncf.json").write_text('{"compression": {"initializer": {"batchnorm_adaptation": '
                                         '{"num_bn_adaptation_samples": 0}}}}')
    line = _error_in_process(workspace, capsys, monkeypatch, "model.onnx", "out.onnx", "--data", "calib",
                             "--config", "nncf.json", "--reference", "ref.onnx", code=2)
    assert "'nncf.json' sets num_bn_adaptation_samples to 0" in line and "give --num-samples N" in line


def test_a_forced_candidate_gets_no_warning_about_a_choice(tmp_path, capsys):
    """Shifted images: nothing was chosen, so no warning that agreement may favour the wrong candidate
    (issue 22, item 14), nor advice to choose one with --candidate."""
    example = EXAMPLE.parent / "reference"
    assert main([str(example / "model_compressed.onnx"), str(tmp_path / "out.onnx"), "--data",
                 str(example / "shifted" / "calib"), "--reference", str(example / "model.onnx"), "--batch-size", "64",
                 "--candidate", "reestimated", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "favour the wrong candidate" not in captured.err
    assert "--candidate" not in captured.err, captured.err
    assert "kept the re-estimated statistics: asked for" in captured.out


@pytest.mark.parametrize("flag", ["--report", "--plot"])
def test_report_and_plot_paths_say_why_they_cannot_be_written(workspace, capsys, monkeypatch, flag):
    name = "r.json" if flag == "--report" else "p.png"
    line = _error_in_process(workspace, capsys, monkeypatch, "model.onnx", "out.onnx", "--data", "calib", flag,
                             f"nodir/{name}")
    assert f"{flag} folder '{workspace / 'nodir'}' does not exist" in line, line
    line = _error_in_process(workspace, capsys, monkeypatch, "model.onnx", "out.onnx", "--data", "calib", flag, "calib")
    assert f"{flag} path 'calib' is a folder; give a file name" in line, line


def test_zero_samples_on_the_command_line_points_to_fold_only(capsys):
    with pytest.raises(SystemExit) as exit_code:
        main(["model.onnx", "out.onnx", "--num-samples", "0"])
    assert exit_code.value.code == 2 and "to fold without re-estimating, use --fold-only" in capsys.readouterr().err


def test_the_summary_says_where_every_file_went(workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    assert main(["model.onnx", "out.onnx", "--data", "calib", "--num-samples", "64", "--report", "r.json",
                 "--plot", "p.png", "--device", "cpu"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("wrote out.onnx, the report r.json and the plot p.png in "), last


@pytest.mark.parametrize("gpu", [False, True])
def test_the_cpu_fallback_line_is_said_only_where_a_gpu_is(workspace, capsys, monkeypatch, gpu):
    from bnpass import runtime

    monkeypatch.setattr(runtime, "gpu_present", lambda: gpu)
    monkeypatch.chdir(workspace)
    for verbose in ([], ["-v"]):
        runtime._say_once.cache_clear()
        assert main(["model.onnx", "out.onnx", "--data", "calib", "--num-samples", "64", *verbose]) == 0
        said = "using CPU: the tests run on the CPU" in capsys.readouterr().err
        assert said == (gpu or bool(verbose))
