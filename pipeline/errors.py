"""One error type for everything a user can fix: it names the file, the cause and the fix."""

from __future__ import annotations

from pathlib import Path


class GaplessError(Exception):
    """An input problem the user can fix. ``str()`` is one line: ``file: cause; fix``.

    The command line prints it without a traceback and exits non-zero; a traceback is kept for bugs.
    """

    def __init__(self, path: str | Path | None = None, cause: str | None = None, fix: str | None = None, *,
                 message: str | None = None):
        if message is not None and cause is None:
            # torch's DataLoader re-raises a worker's exception as ``type(message=text)`` (for a class
            # with a ``message`` attribute), the text holding the worker's whole traceback: keep the
            # one line the worker raised, so the main process still reports one line
            path, cause, fix = None, _raised_line(type(self), message), None
        self.path = None if path is None else str(path)
        self.cause = "" if cause is None else cause
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        head = f"{self.path}: " if self.path else ""
        tail = f"; {self.fix}" if self.fix else ""
        return f"{head}{self.cause}{tail}"


def _raised_line(cls: type, text: str) -> str:
    """The message of the last ``cls`` exception in formatted traceback ``text`` (all of ``text`` if none)."""
    names = {f"{cls.__module__}.{cls.__qualname__}", cls.__qualname__}
    found = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        name, sep, rest = line.partition(": ")
        if sep and name in names:
            found = "\n".join([rest, *lines[i + 1 :]]).strip()
    return found if found is not None else text.strip()


class SampleSheetError(GaplessError):
    """Every problem of a sample sheet at once, one line each after the first."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        cause = f"{n} problem{'s' if n != 1 else ''} in the sample sheet:\n" + "\n".join(
            f"  {p}" for p in self.problems
        )
        super().__init__(path, cause, None)


# The fix for an OSError, by its errno: what a user does about a full disk, a read-only folder, ...
_OS_FIXES = {
    "ENOSPC": "free space on that filesystem, or write the results to another one (config `results`, or --out)",
    "EDQUOT": "the disk quota is used up: free space or ask for a larger quota, or write elsewhere",
    "EFBIG": "the file is larger than this filesystem or process allows (ulimit -f): write elsewhere or raise the limit",
    "EACCES": "check the permissions of that file or folder (ls -ld), or write the results elsewhere",
    "EPERM": "check the permissions of that file or folder (ls -ld), or write the results elsewhere",
    "EROFS": "the filesystem is read-only: write the results to a writable folder",
    "ENOTDIR": "a file stands where a folder is expected in that path: remove or rename it",
    "EISDIR": "a folder stands where a file is expected: remove or rename it",
    "EEXIST": "something already exists there: remove it, or choose another output",
    "ENOENT": "check the path",
    "EMFILE": "too many open files: raise the limit (ulimit -n) or use fewer workers",
    "ENFILE": "too many open files on this machine: use fewer workers or retry later",
    "EIO": "the disk or network filesystem reported an input/output error: check it, then re-run",
    "ENAMETOOLONG": "the path is too long for the filesystem: use a shorter results folder or sample id",
}


def os_error_message(error: OSError, context: str | Path | None = None) -> str:
    """One line for an ``OSError``: ``path: cause; fix``. ``context`` names the output when the error does not."""
    import errno as errno_names

    path = error.filename if error.filename is not None else context
    if error.filename2 is not None:
        path = f"{error.filename} -> {error.filename2}"
    cause = error.strerror or one_line(str(error)) or type(error).__name__
    name = errno_names.errorcode.get(error.errno or -1, "")
    fix = _OS_FIXES.get(name, "check the path and the filesystem, then re-run")
    if path is not None and error.filename is None:
        cause = f"while writing it: {cause}"
    return GaplessError(path, cause, fix).message


def one_line(text: str) -> str:
    """The last non-empty line of ``text``: an error re-raised from a worker process carries the
    worker's whole traceback, whose last line is the original error."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else ""
