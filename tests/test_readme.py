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
