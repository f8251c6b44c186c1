"""Memory figures of the running process from Linux's /proc/self/status, in MiB.

The one reader that tools/bench.py and the memory tests (tests/test_memory.py,
tests/test_fold_memory.py) use; it lives in tools/ because the benchmark must run without the
tests, and the tests' subprocesses put this folder on their path. VmHWM (the peak resident set),
not ``ru_maxrss``: Linux carries ``ru_maxrss`` over exec() from the forking parent, and VmHWM can
be reset after the imports (:func:`reset_peak`) to measure one step alone.
"""

from __future__ import annotations


def status_mb(field: str) -> float:
    """``field`` of /proc/self/status (``VmRSS`` now, ``VmHWM`` the peak) in MiB; NaN when absent."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
