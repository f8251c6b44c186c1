"""Keep what a run writes apart from what it reads: no path written may be a file read, or another
path written, whatever name reaches it (the same name, a symbolic link, a hard link, ``..``).

A path that exists is identified by its device and inode (``os.stat`` follows symbolic links, and
hard links share the inode); one that does not exist yet, by its resolved absolute path.
"""

from __future__ import annotations

import os

from .errors import BnpassError


def _identity(path: str) -> tuple:
    try:
        status = os.stat(path)
    except OSError:
        return ("path", os.path.normcase(os.path.realpath(path)))
    return ("file", status.st_dev, status.st_ino)


def same_file(first, second) -> bool:
    """Whether two paths reach the same file (or, not existing yet, the same resolved path)."""
    return _identity(os.fspath(first)) == _identity(os.fspath(second))


def check_separate(reads: list, writes: list) -> None:
    """Raise a one-line BnpassError when a written path is a read file or another written path.

    ``reads`` and ``writes`` are ``(what, path)`` pairs, ``what`` naming the path's role for the
    message ("the input model", "--report"...).
    """
    read = {}
    for what, path in reads:
        read.setdefault(_identity(path), (what, path))
    written = {}
    for what, path in writes:
        key = _identity(path)
        if key in read:
            role, original = read[key]
            where = "" if os.path.abspath(original) == os.path.abspath(path) else f" ('{original}')"
            raise BnpassError(f"{what} '{path}' is {role}{where}: bnpass never writes over a file it reads")
        if key in written:
            role, other = written[key]
            raise BnpassError(f"{what} '{path}' and {role} '{other}' are the same file: give each its own path")
        written[key] = (what, path)
