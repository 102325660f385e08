"""Writing files and folders so that a reader never sees half of one: write a temporary sibling, then rename.

The writers here can only ever remove their own ``.partial`` sibling and the exact output they replace:
a target that is not a name of its own (``results/heatmaps/slides/..``), that contains the working
directory, or (for a folder) that exists but does not hold what this kind of output holds, is refused
before anything is touched.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from pipeline.errors import GaplessError


def check_output_target(path: str | Path) -> Path:
    """``path`` as given, once it is safe to replace; a ``GaplessError`` otherwise.

    Refused: a path whose last part is not a name of its own (empty, ``.`` or ``..``: it would name
    its parent or grandparent, e.g. a results folder full of other outputs), and a path that is the
    working directory, the filesystem root or one of their ancestors.
    """
    path = Path(path)
    text = os.fspath(path)
    last = text.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    if last in ("", ".", ".."):
        raise GaplessError(text, "not an output name of its own (it ends in '/', '.' or '..', so it names a folder above)",
                           "give a file or folder name as the output, e.g. results/tiles/S1.zarr")
    absolute = Path(os.path.abspath(text))
    cwd = Path(os.getcwd())
    if absolute == Path(absolute.anchor) or absolute == cwd or absolute in cwd.parents:
        raise GaplessError(text, "is the working directory, the filesystem root or a folder above them, not an output",
                           "give an output inside the results folder, e.g. results/tiles/S1.zarr")
    return path


class OutputSet:
    """Outputs that appear together or not at all: each is made in a partial sibling of its own, and
    all are renamed into place by ``commit`` once every one is complete (``abort`` removes the partials).

    Use it through :func:`outputs`; :func:`atomic_write` and :func:`atomic_directory` are sets of one,
    or join the set of an enclosing ``outputs()`` block, so that a command's several files (a report's
    tables and plots, a page and its summary) appear together. The files are renamed in the order
    they were added, so the last one added (e.g. a JSON that a workflow waits for) appears last.
    """

    def __init__(self):
        self._staged: list[tuple[Path, Path]] = []  # (partial, final)

    def file(self, path: str | Path, write: Callable[[Path], object]) -> Path:
        """Call ``write(tmp)`` on a temporary sibling of ``path``; ``path`` itself is written at commit.

        An existing folder at ``path`` is refused (a file never replaces a folder).
        """
        path = check_output_target(path)
        if path.is_dir():
            raise GaplessError(path, "a folder stands where a file is to be written", "remove or rename that folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        self._staged.append((tmp, path))
        write(tmp)
        return path

    def directory(self, path: str | Path, holds: str) -> Path:
        """A new, empty ``<path>.partial`` folder to fill; it replaces ``path`` at commit.

        ``holds``: a file that every output of this kind has at its top (``zarr.json`` for a zarr
        store, ``slide.dzi`` for a Deep Zoom pyramid). An existing ``path`` is replaced only when it
        holds that file (an older output of the same kind) or is empty; anything else — a folder of
        other outputs, a user's folder — is refused before anything is written or removed. A
        leftover ``.partial`` from a killed run is removed first.
        """
        path = check_output_target(path)
        if path.exists() or path.is_symlink():
            if not path.is_dir() or path.is_symlink():
                raise GaplessError(path, "a file or link stands where an output folder is to be written", "remove or rename it")
            if not (path / holds).is_file() and any(path.iterdir()):
                raise GaplessError(path, f"exists and is not an output of this kind (it has no {holds}), so it is not replaced",
                                   "remove it by hand if it is an old output, or choose another output path")
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        self._staged.append((partial, path))
        partial.mkdir(parents=True)
        return partial

    def commit(self) -> None:
        for partial, final in self._staged:
            if partial.is_dir() and final.is_dir():
                shutil.rmtree(final)
            os.replace(partial, final)
        self._staged = []

    def abort(self) -> None:
        for partial, _ in self._staged:
            if partial.is_dir() and not partial.is_symlink():
                shutil.rmtree(partial, ignore_errors=True)
            elif partial.exists():
                partial.unlink()
        self._staged = []


_open_set: ContextVar[OutputSet | None] = ContextVar("gapless_output_set", default=None)


@contextmanager
def outputs() -> Iterator[OutputSet]:
    """An :class:`OutputSet` committed when the block completes and aborted when it raises.

    Inside the block, :func:`atomic_write` and :func:`atomic_directory` stage into this set (an
    enclosing block's, when blocks nest), so their files appear only when the outermost block ends:
    code inside must not read back what it wrote.
    """
    enclosing = _open_set.get()
    if enclosing is not None:
        yield enclosing
        return
    staged = OutputSet()
    token = _open_set.set(staged)
    try:
        yield staged
        staged.commit()
    except BaseException:
        staged.abort()
        raise
    finally:
        _open_set.reset(token)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place.

    The rename is atomic on one filesystem, so an interrupted write leaves the old file (or none),
    never a partial one; the temporary file is removed whatever happens.
    """
    with outputs() as staged:
        return staged.file(path, write)


def atomic_write_text(path: str | Path, text: str, newline: str | None = None) -> Path:
    """``atomic_write`` of UTF-8 text; ``newline`` as for ``open`` ("" writes line endings as given)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=newline))


@contextmanager
def atomic_directory(path: str | Path, holds: str) -> Iterator[Path]:
    """Fill ``<path>.partial`` (yielded), which replaces ``path`` only when the block completes.

    ``holds`` and what may be replaced: :meth:`OutputSet.directory`. On any failure the partial
    folder is removed and ``path`` (an older complete one, or none) is left as it was.
    """
    with outputs() as staged:
        yield staged.directory(path, holds)
