"""Progress bars for the long steps (calibration, verification), on stderr.

Every bar is registered until closed, so that the command line can close them all before it prints
an error (:func:`close_progress_bars`): a bar left open when Ctrl-C or an error stops a step would
otherwise hold the cursor at its end, and the ``error:`` line would be glued onto it.
"""

from __future__ import annotations

import weakref
from typing import Optional

_OPEN = weakref.WeakSet()  # the bars not yet closed


def progress_bar(total: Optional[int], enabled: bool, description: str):
    """A tqdm bar counting batches; ``total`` None when the number of batches is unknown (a loader).

    ``disable=None`` lets tqdm turn itself off when stderr is not a terminal (CI logs).
    """
    from tqdm import tqdm

    bar = tqdm(total=total, unit="batch", desc=description, disable=None if enabled else True, leave=False)
    _OPEN.add(bar)
    return bar


def close_progress_bars() -> None:
    """Close every bar still open (each clears its line), so that what is printed next starts a line."""
    for bar in list(_OPEN):
        bar.close()
        _OPEN.discard(bar)
