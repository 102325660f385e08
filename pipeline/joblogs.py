"""After a failed workflow run: each failed job's own error line, on the console.

Snakemake reports a failed job as "Error in rule tile ... check log file(s)", the cause being in the
job's log. Every gapless command ends a failure with one line, ``gapless <command>: error: <file>:
<cause>; <fix>``; :func:`failed_job_errors` finds the failed jobs in Snakemake's own log and that line
in each job's log, so the console says what went wrong in every failed job, not only that one did.
"""

from __future__ import annotations

import re
from pathlib import Path

_ERROR_BLOCK = re.compile(r"^Error in rule (?P<rule>\S+):\s*$")
_LOG_LINE = re.compile(r"^\s+log: (?P<logs>.+?)(?: \(check log file\(s\) for error details\))?\s*$")
_GAPLESS_ERROR = re.compile(r"^gapless [\w-]+(?: \w+)?: (?:error|interrupted)")


def failed_job_errors(snakemake_log: str | Path | list | None) -> list[tuple[str, str, str]]:
    """``(rule, job log, error line)`` for every failed job named in ``snakemake_log``.

    The error line is the job log's ``gapless …: error: …`` line (with any lines indented under it),
    else the log's last line; jobs without a log are left out.
    """
    if isinstance(snakemake_log, (list, tuple)):  # Snakemake 9 passes the list of its log files
        return [item for log in snakemake_log for item in failed_job_errors(log)]
    try:
        lines = Path(snakemake_log).read_text(encoding="utf-8", errors="replace").splitlines()
    except (OSError, TypeError):
        return []
    found, rule = [], None
    for line in lines:
        start = _ERROR_BLOCK.match(line)
        if start:
            rule = start["rule"]
            continue
        if rule is None:
            continue
        if not line.strip():
            rule = None
            continue
        logs = _LOG_LINE.match(line)
        if logs:
            for log in logs["logs"].split(", "):
                found.append((rule, log, _error_in(Path(log))))
            rule = None
    seen, unique = set(), []
    for item in found:
        if item[1] not in seen:
            seen.add(item[1])
            unique.append(item)
    return unique


def _error_in(log: Path) -> str:
    try:
        lines = [line.rstrip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return "(no log file)"
    for i, line in enumerate(lines):
        if _GAPLESS_ERROR.match(line):
            more = [f"  {extra.strip()}" for extra in lines[i + 1 :] if extra.startswith("  ")]
            return "\n".join([line, *more])
    last = [line for line in lines if line.strip()]
    return last[-1] if last else "(empty log)"


def print_failed_job_errors(snakemake_log: str | Path | list | None) -> None:
    """Print :func:`failed_job_errors` as a short section of the console output."""
    import sys

    errors = failed_job_errors(snakemake_log)
    if not errors:
        return
    print(f"\ngapless: {len(errors)} job{'s' if len(errors) != 1 else ''} failed:", file=sys.stderr)
    for rule, log, error in errors:
        print(f"  {rule} ({log}): {error}", file=sys.stderr)
    print("Fix the cause, then run the same command again: finished outputs are kept "
          "(after a crash or kill, first: snakemake --unlock).", file=sys.stderr)
