"""``python -m bnpass``: the ``bnpass`` command (:mod:`bnpass.entry`, which handles Ctrl-C from the start)."""

from .entry import main

raise SystemExit(main())
