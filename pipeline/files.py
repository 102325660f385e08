"""Writing files and folders so that a reader never sees half of one: write a temporary sibling, then rename."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place.

    The rename is atomic on one filesystem, so an interrupted write leaves the old file (or none),
    never a partial one; the temporary file is removed whatever happens.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str, newline: str | None = None) -> Path:
    """``atomic_write`` of UTF-8 text; ``newline`` as for ``open`` ("" writes line endings as given)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=newline))


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Fill ``<path>.partial`` (yielded), which replaces ``path`` only when the block completes.

    A leftover ``.partial`` from a killed run is removed first; on any failure the partial folder is
    removed and ``path`` (an older complete one, or none) is left as it was.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        if path.exists():
            shutil.rmtree(path)
        os.replace(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
