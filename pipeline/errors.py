"""One error type for everything a user can fix: it names the file, the cause and the fix."""

from __future__ import annotations

from pathlib import Path


class GaplessError(Exception):
    """An input problem the user can fix. ``str()`` is one line: ``file: cause; fix``.

    The command line prints it without a traceback and exits non-zero; a traceback is kept for bugs.
    """

    def __init__(self, path: str | Path | None, cause: str, fix: str | None = None):
        self.path = None if path is None else str(path)
        self.cause = cause
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        head = f"{self.path}: " if self.path else ""
        tail = f"; {self.fix}" if self.fix else ""
        return f"{head}{self.cause}{tail}"


class SampleSheetError(GaplessError):
    """Every problem of a sample sheet at once, one line each after the first."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        cause = f"{n} problem{'s' if n != 1 else ''} in the sample sheet:\n" + "\n".join(
            f"  {p}" for p in self.problems
        )
        super().__init__(path, cause, None)
