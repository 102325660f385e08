"""``gapless <stage>``: each sub-command is one library call (the same code serves notebooks and tests).

The parser is in :mod:`pipeline.cli.parsers`, each command's body in :mod:`pipeline.cli.commands`; here
the entry point turns every failure a user can fix into one line and a non-zero exit."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from pipeline import SNAKEMAKE_MARKER_WARNING
from pipeline.cli.commands import COMMANDS
from pipeline.cli.parsers import build_parser  # noqa: F401
from pipeline.errors import GaplessError, one_line, os_error_message


def _terminated(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (Snakemake, a scheduler) cleans up like Ctrl-C: no partial output


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGTERM, _terminated)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="gapless: %(message)s", stream=sys.stderr)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    warnings.filterwarnings("ignore", message=SNAKEMAKE_MARKER_WARNING)
    try:
        COMMANDS[args.command](args)
    except GaplessError as exc:
        return _fail(args, exc.message)
    except OSError as exc:  # a full disk, a read-only folder, a file where a folder should be: one line, not a traceback
        return _fail(args, os_error_message(exc, _output_of(args)))
    except KeyboardInterrupt:
        print(f"gapless {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if type(exc).__name__ != "MlflowException":
            raise  # a bug: the traceback is kept
        cause = one_line(getattr(exc, "message", str(exc)))
        return _fail(args, f"MLflow: {cause}; check the tracking store (mlflow.tracking_uri / MLFLOW_TRACKING_URI), "
                           "its disk space and permissions, then re-run")
    return 0


def _output_of(args) -> Path | None:
    """What a command writes (its --out, else its store), to name in an error that names no file."""
    out = getattr(args, "out", None)
    if isinstance(out, list):
        out = out[0] if out else None
    return out if out is not None else getattr(args, "store", None)


def _fail(args, message: str) -> int:
    print(f"gapless {args.command}: error: {message}", file=sys.stderr)
    return 2
