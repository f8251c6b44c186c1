"""Progress bars for the long steps (calibration, verification), on stderr."""

from __future__ import annotations

from typing import Optional


def progress_bar(total: Optional[int], enabled: bool, description: str):
    """A tqdm bar counting batches; ``total`` None when the number of batches is unknown (a loader).

    ``disable=None`` lets tqdm turn itself off when stderr is not a terminal (CI logs).
    """
    from tqdm import tqdm

    return tqdm(total=total, unit="batch", desc=description, disable=None if enabled else True, leave=False)
