"""The ``bnpass`` command's entry point (``python -m bnpass`` too): Ctrl-C handled from the first line.

Importing the command line (onnx, numpy, onnxruntime, tqdm) takes a second or two; an interrupt
during that time used to print a ``KeyboardInterrupt`` traceback from the imports. This module and
``bnpass/__init__.py`` import nothing heavy, so the handling below is in place before the heavy
imports start: an interrupt at any moment prints ``error: interrupted; no output written`` and
exits 130, as an interrupt during a run always did (:func:`bnpass.cli.main`). It imports the command
line inside :func:`main` on purpose: that import is what the handling must cover.
"""

from __future__ import annotations

import signal
import sys

from .errors import INTERRUPTED


def main(argv=None) -> int:
    try:
        from .cli import main as command_line

        return command_line(argv)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C cannot break the line in two
        print(INTERRUPTED, file=sys.stderr)
        return 130
