"""``python -m bnpass``: the command line of :mod:`bnpass.cli`."""

from .cli import main

raise SystemExit(main())
