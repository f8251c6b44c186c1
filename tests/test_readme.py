"""The README's two commands stay true: the main job runs as written, CI runs the test command."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list:
    blocks = re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_ci_runs_the_readme_test_command():
    _, test_command = readme_commands()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_readme_main_command_runs_and_shows_the_recovery(tmp_path):
    """Runs the first command as written (pip as a dry run, so the test leaves the environment alone)."""
    main_command, _ = readme_commands()
    steps = main_command.split(" && ")
    assert steps[0] == "pip install '.[gpu]'"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--quiet", str(REPO)],
                   check=True, timeout=600)
    # The rest runs in a scratch copy of the paths it names, so the repo gets no output file.
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    shutil.copytree(REPO / "tools", tmp_path / "tools")
    outputs = []
    for step in steps[1:]:
        argv = shlex.split(step)
        assert argv[0] == "python"
        done = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    accuracies = [float(a) for a in re.findall(r"^\s*([\d.]+)%", outputs[-1], flags=re.M)]
    # The figures the README's table shows (half a point of slack for another CPU's rounding).
    table = re.findall(r"\| ([\d.]+)% \| (\d) \|", (REPO / "README.md").read_text())
    assert [int(bns) for _, bns in table] == [3, 3, 0]
    for measured, (shown, _) in zip(accuracies, table):
        assert abs(measured - float(shown)) <= 0.5, (accuracies, table)
    assert "folded 3 of 3" in outputs[0]


def test_the_option_table_lists_every_option():
    from bnpass.cli import build_parser

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Command line"):readme.index("Exit codes")]
    flags = [flag for action in build_parser()._actions for flag in action.option_strings
             if flag.startswith("--") and flag != "--help"]
    missing = [flag for flag in flags if not re.search(rf"[`, ]{flag}\b", table)]
    assert not missing, missing


def test_every_pip_install_of_bnpass_is_one_that_works_from_a_checkout():
    """Issue 22, item 7: the install table said ``pip install 'bnpass[cpu]'``, and bnpass is not on PyPI.
    Every ``pip install`` of bnpass the README shows installs this checkout (``.``), with extras that
    pyproject.toml defines (the README's first command, run above, shows that ``.`` installs)."""
    readme = (REPO / "README.md").read_text()
    extras = set(re.findall(r"^(\w+) = \[", (REPO / "pyproject.toml").read_text().split(
        "[project.optional-dependencies]")[1].split("\n[")[0], flags=re.M))
    assert {"gpu", "cpu", "test", "plot"} <= extras
    table = readme[readme.index("| you have | install |"):readme.index("At start-up bnpass checks")]
    assert re.findall(r"`(pip install [^`]*)`", table) == ["pip install '.[gpu]'", "pip install '.[cpu]'",
                                                           "pip install ."]
    targets = [argument for command in re.findall(r"pip install ([^`&\n]*)", readme)
               for argument in shlex.split(command) if not argument.startswith("-")]
    ours = [target for target in targets if target.startswith((".", "bnpass"))]  # not nncf, onnxruntime...
    assert ours and all(re.fullmatch(r"\.(\[[\w,]+\])?", target) for target in ours), ours
    for target in ours:
        assert set(re.findall(r"\w+", target)) <= extras, target
