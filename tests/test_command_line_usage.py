"""What a new user hit on the command line, round 4 (issue 22): bad flag combinations exit 2 with one
useful line and one pointing to --help; Ctrl-C says one line from the first instant, on a line of its
own under a progress bar; messages count in good grammar; ``--seed`` alone shuffles."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import tqdm
from PIL import Image

from bnpass.cli import main
from bnpass.data import plural
from bnpass.errors import INTERRUPTED
from refused_models import conv_bn_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "digits"
HELP_LINE = "see 'bnpass --help' for the options"


@pytest.fixture
def workspace(tmp_path):
    """A copy of the shipped example (a 1-channel 8x8 model, 512 samples in 8 files), plus a loader."""
    shutil.copy(EXAMPLE / "model_compressed.onnx", tmp_path / "model.onnx")
    shutil.copy(EXAMPLE / "model.onnx", tmp_path / "reference.onnx")
    shutil.copytree(EXAMPLE / "calib", tmp_path / "calib")
    (tmp_path / "loader.py").write_text(
        "import numpy as np\ndef samples():\n    return [np.zeros((1, 8, 8), np.float32)] * 64\n")
    return tmp_path


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "bnpass", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def snapshot(folder: Path) -> dict:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


USAGE_CASES = [
    # (arguments after IN OUT, the error line)
    (["--data", "calib", "--no-fold", "--verify"],
     "--verify compares the unfolded and folded models; it needs folding (drop --no-fold)"),
    (["--loader", "loader.py:samples", "--shuffle"], "--shuffle applies to --data folders; a --loader decides its own "
                                                    "order"),
    (["--loader", "loader.py:samples", "--shuffle", "--seed", "3"],
     "--shuffle and --seed apply to --data folders; a --loader decides its own order"),
    (["--loader", "loader.py:samples", "--mean", "0.5"],
     "--mean applies to image files; a --loader prepares its own samples"),
    (["--data", "calib", "--mean", "0.5"],
     "--mean applies to image files; 'calib' holds arrays (.npy/.npz), fed as they are"),
    ([], "--data DIR (or --loader) is required to re-estimate statistics (or use --fold-only)"),
    (["--fold-only", "--reference", "reference.onnx"], "--reference needs re-estimated statistics: drop --fold-only"),
    (["--data", "calib", "--candidate", "matched"],
     "--candidate matched chooses between the candidates of --reference; give --reference ORIGINAL.onnx"),
    (["--data", "calib", "--plot", "p.jpg"], "--plot 'p.jpg': name the picture .png, .svg or .pdf"),
    # argparse's own: the useful line and the --help line, not the 12 lines of usage before it
    (["--data", "calib", "--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
    (["--fold-only", "--no-fold"], "argument --no-fold: not allowed with argument --fold-only"),
    (["--data", "calib", "--std", "-0.2"], "argument --std: expected positive numbers, got '-0.2'"),
    (["--data", "calib", "--stats", "median"], "argument --stats: invalid choice: 'median'"),
]


@pytest.mark.parametrize("arguments, line", USAGE_CASES, ids=[" ".join(case[0]) or "no data" for case in USAGE_CASES])
def test_a_bad_command_line_exits_2_with_the_useful_line_then_help(workspace, arguments, line):
    """Issue 22, item 11: bad combinations exited 1 (the README says 2), argparse printed its usage first."""
    before = snapshot(workspace)
    done = run_cli("model.onnx", "out.onnx", *arguments, cwd=workspace)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"error: {line}") and lines[1] == HELP_LINE, done.stderr
    assert snapshot(workspace) == before


def test_counts_and_verbs_agree_through_the_one_plural_helper(workspace, capsys, monkeypatch):
    """Issue 22, item 12: "--mean apply", "takes 1 channels", "1 file ... that are"."""
    assert [plural(n, "sample") for n in (0, 1, 2)] == ["0 samples", "1 sample", "2 samples"]
    assert plural(2, "batch") == "2 batches" and plural(1, "applies", "apply", counted=False) == "applies"
    assert plural(3, "file that is", "files that are") == "3 files that are"

    monkeypatch.chdir(workspace)
    (workspace / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((8, 8), 100, np.uint8)).save(workspace / "images" / name)
    assert main(["model.onnx", "out.onnx", "--data", "images", "--mean", "0.5,0.4,0.3"]) == 1
    assert capsys.readouterr().err.strip() == "error: --mean has 3 values; the model takes 1 channel"

    (workspace / "calib" / "notes.txt").write_text("taken on 2026-12-03")
    assert main(["model.onnx", "out.onnx", "--data", "calib", "--num-samples", "32", "--device", "cpu"]) == 0
    assert "warning: ignoring 1 file that is neither an array (.npy/.npz) nor an image in 'calib' (first: notes.txt)" \
        in capsys.readouterr().err


def test_seed_alone_shuffles_as_shuffle_with_that_seed_does(workspace, capsys, monkeypatch):
    """Planted bug (issue 22): ``shuffle=args.shuffle or args.seed is not None`` -> ``shuffle=args.shuffle``
    made --seed alone read the folder in file order, against the README ("--seed implies --shuffle")."""
    monkeypatch.chdir(workspace)
    common = ["--data", "calib", "--num-samples", "64", "--device", "cpu"]
    assert main(["model.onnx", "seed.onnx", *common, "--seed", "7"]) == 0
    assert "shuffled (seed 7)" in capsys.readouterr().err
    assert main(["model.onnx", "shuffle.onnx", *common, "--shuffle", "--seed", "7"]) == 0
    assert main(["model.onnx", "ordered.onnx", *common]) == 0
    assert (workspace / "seed.onnx").read_bytes() == (workspace / "shuffle.onnx").read_bytes()
    assert (workspace / "seed.onnx").read_bytes() != (workspace / "ordered.onnx").read_bytes()


# --- Ctrl-C ---------------------------------------------------------------------------------------------------

def test_the_console_script_and_python_m_go_through_the_entry_that_handles_ctrl_c():
    scripts = (REPO / "pyproject.toml").read_text().split("[project.scripts]\n")[1].split("\n\n")[0]
    assert scripts.strip() == 'bnpass = "bnpass.entry:main"'
    assert "from .entry import main" in (REPO / "bnpass" / "__main__.py").read_text()


# The command as the console script runs it (``from bnpass.entry import main``: a few milliseconds, the
# interpreter's start aside), saying "ready" before it calls main: a SIGINT after that lands in the
# imports of the command line (onnx, numpy, onnxruntime: a second or more) or just after them.
STARTER = ("import sys; sys.argv = ['bnpass', *sys.argv[1:]]; from bnpass.entry import main; "
           "sys.stdout.write('ready\\n'); sys.stdout.flush(); raise SystemExit(main())")


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])
def test_ctrl_c_during_the_imports_says_the_one_line(workspace, delay):
    """Issue 22, item 5: Ctrl-C in the first second printed a KeyboardInterrupt traceback from the imports."""
    process = subprocess.Popen([sys.executable, "-c", STARTER, "model.onnx", "out.onnx", "--data", "calib"],
                               cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.stdout.readline() == "ready\n"
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and stderr.strip().splitlines()[-1] == INTERRUPTED, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert not any(path.name.startswith(("out.onnx", ".out.onnx")) for path in workspace.iterdir())


def screen(text: str) -> list:
    """The lines a terminal shows for ``text``: each carriage return goes back to the start of its line."""
    lines = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        shown = ""
        for part in raw.split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown.rstrip())
    return lines


class Terminal(io.StringIO):
    """stderr as a terminal: tqdm draws its bars on it."""

    def isatty(self) -> bool:
        return True


def test_ctrl_c_under_a_progress_bar_prints_the_error_on_a_line_of_its_own(tmp_path, monkeypatch):
    """Issue 22, item 6: a bar left open (here --reference's "comparing" reading, whose loop does not
    close its bar on the way out) held the cursor at its end: ``...11.41batch/s]error: interrupted``."""
    onnx.save(conv_bn_model(), tmp_path / "model.onnx")
    onnx.save(conv_bn_model(seed=1), tmp_path / "reference.onnx")
    (tmp_path / "calib").mkdir()
    np.save(tmp_path / "calib" / "a.npy", np.random.default_rng(2).standard_normal((64, 3, 8, 8)).astype(np.float32))
    real_run = onnxruntime.InferenceSession.run
    runs = []

    def interrupted_while_comparing(session, *args, **kwargs):
        if any(bar.desc == "comparing" for bar in list(tqdm.tqdm._instances)):
            runs.append(1)
            if len(runs) == 5:
                raise KeyboardInterrupt
        return real_run(session, *args, **kwargs)

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", interrupted_while_comparing)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.chdir(tmp_path)
    code = main(["model.onnx", "out.onnx", "--data", "calib", "--reference", "reference.onnx", "--batch-size", "8"])
    shown = screen(terminal.getvalue())
    assert code == 130 and len(runs) == 5, shown
    assert "comparing" in terminal.getvalue(), shown  # the bar was drawn
    assert INTERRUPTED in shown, shown  # the error's line starts with it: nothing of the bar before it
    assert not (tmp_path / "out.onnx").exists()
