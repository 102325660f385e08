"""The sample sheet: one CSV row per slide or cell image, with its label.

Columns (**contract**): ``sample_id, path, label`` are required; ``group`` (patient or plate: a split
never puts one group on both sides), ``kind`` (``slide`` | ``image``; inferred from the file when
absent), ``annotations`` (GeoJSON path), ``mpp`` (µm/px for files without it in their metadata) and
``split`` (``train`` | ``val`` | ``test``: a fixed split) are optional. Relative paths are resolved
against the folder of the CSV, so a sheet travels with its data.

The sheet is read with the standard ``csv`` module rather than pandas so that nothing is guessed:
``007`` stays the sample id ``007``, not the number 7.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import SampleSheetError

REQUIRED_COLUMNS = ("sample_id", "path", "label")
OPTIONAL_COLUMNS = ("group", "kind", "annotations", "mpp", "split")
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
KINDS = ("slide", "image")
SPLITS = ("train", "val", "test")

# A sample id names files and folders (results/tiles/{sample_id}.zarr, results/heatmaps/slides/{sample_id})
# and is passed on command lines, so it must be a safe file-name stem on every filesystem: letters,
# digits, '.', '_' and '-', starting with a letter or digit (not '.', which hides a file and makes
# '..', nor '-', which a command line reads as an option). SAMPLE_ID_PATTERN is also the workflow's
# wildcard constraint; check_sample_id adds what a regular expression says badly.
SAMPLE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
SAMPLE_ID_MAX_LENGTH = 100
_SAFE_ID = re.compile(SAMPLE_ID_PATTERN)
# names Windows reserves for devices, with or without an extension (a results folder may be shared)
_RESERVED_NAMES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def check_sample_id(sample_id: str) -> str | None:
    """What is wrong with ``sample_id`` as a sample id, in a few words; ``None`` when it is fine.

    The rule: 1 to 100 characters, letters, digits, '.', '_' and '-' only, starting with a letter or
    a digit, not ending in '.' or in '.partial' (gapless's name for an output being written), and not
    a name Windows reserves (CON, NUL, COM1, ...), nor ``index`` (the viewer's index page). Uniqueness regardless of case is checked by the
    sheet reader, which sees every id.
    """
    if not sample_id:
        return "empty sample_id"
    if len(sample_id) > SAMPLE_ID_MAX_LENGTH:
        return f"sample_id {sample_id[:20]!r}... is {len(sample_id)} characters long: use at most {SAMPLE_ID_MAX_LENGTH}"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", sample_id):
        return f"sample_id {sample_id!r} is not safe as a file name: use only letters, digits, '.', '_' and '-'"
    if not _SAFE_ID.fullmatch(sample_id):
        return (f"sample_id {sample_id!r} starts with {sample_id[0]!r}: start it with a letter or a digit "
                "('.' hides a file or names a folder above, '-' reads as a command-line option)")
    if sample_id.endswith("."):
        return f"sample_id {sample_id!r} ends with '.', which some filesystems drop: end it with a letter, digit, '_' or '-'"
    if sample_id.lower().endswith(".partial"):
        return f"sample_id {sample_id!r} ends with '.partial', the name gapless gives an output while it is written: rename it"
    if sample_id.lower() == "index":
        return "sample_id 'index' is the name of the viewer's index page (results/heatmaps/index.html): rename it"
    if sample_id.split(".")[0].lower() in _RESERVED_NAMES:
        return f"sample_id {sample_id!r} is a device name on Windows ({sample_id.split('.')[0].upper()}): rename it"
    return None


@dataclass(frozen=True)
class Sample:
    """One row of the sample sheet; paths are absolute, optional fields ``None`` when blank."""

    sample_id: str
    path: Path
    label: str
    group: str | None = None
    kind: str | None = None
    annotations: Path | None = None
    mpp: float | None = None
    split: str | None = None


def load_sample_sheet(
    path: str | Path,
    classes: Sequence[str] | None = None,
    check_files: bool = True,
) -> list[Sample]:
    """Read and check a sample sheet; return its samples in file order.

    ``classes``: the allowed labels (config ``classes``); ``None`` accepts any non-empty label.
    ``check_files``: also require that every ``path`` and ``annotations`` file exists.

    Raises ``SampleSheetError`` listing every problem found, not just the first, so a user fixes the
    sheet in one pass. Rows are numbered as a spreadsheet shows them: the header is row 1.
    """
    sheet = Path(path)
    base = Path(os.path.abspath(sheet)).parent
    header, rows = _read_rows(sheet)
    problems: list[str] = []

    columns = [c.strip() for c in header]
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        names = ", ".join(repr(c) for c in unknown)
        problems.append(
            f"unknown column{'s' if len(unknown) > 1 else ''} {names}: "
            f"the allowed columns are {', '.join(COLUMNS)}"
        )
    repeated = sorted({c for c in columns if columns.count(c) > 1 and c})
    if repeated:
        problems.append(f"column{'s' if len(repeated) > 1 else ''} given twice: {', '.join(repeated)}")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        problems.append(
            f"missing required column{'s' if len(missing) > 1 else ''}: {', '.join(missing)} "
            f"(the header must name at least {', '.join(REQUIRED_COLUMNS)})"
        )
        raise SampleSheetError(sheet, problems)
    if not rows:
        problems.append("no samples: the sheet has a header but no rows")
        raise SampleSheetError(sheet, problems)

    samples: list[Sample] = []
    first_row_of: dict[str, tuple[int, str]] = {}  # casefolded id → (row, id as written)
    splits_of_group: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for number, cells in rows:
        row_problems: list[str] = []
        if len(cells) > len(columns):
            row_problems.append(f"{len(cells)} cells but the header has {len(columns)} columns")
        # the first occurrence of a column wins; a repeated column is already reported above
        record: dict[str, str] = {}
        for name, cell in zip(columns, cells):
            record.setdefault(name, cell.strip())
        value = {name: record.get(name, "") for name in COLUMNS}
        sample_id = value["sample_id"]
        where = f"row {number} ({sample_id})" if sample_id else f"row {number}"
        id_problem = _id_problem(sample_id, number, first_row_of)
        row_problems += [id_problem] if id_problem else []
        fields, field_problems = _read_fields(value, base, check_files, classes)
        row_problems += field_problems
        if fields["group"] is not None and fields["split"] is not None:
            splits_of_group[fields["group"]][fields["split"]].append(number)
        problems.extend(f"{where}: {p}" for p in row_problems)
        if not row_problems:
            samples.append(Sample(sample_id, **fields))

    for group, by_split in splits_of_group.items():
        if len(by_split) > 1:
            sides = ", ".join(
                f"{split} (row{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))})"
                for split, numbers in by_split.items()
            )
            problems.append(f"group {group!r} is fixed to more than one split: {sides}; a group must stay on one side")

    if problems:
        raise SampleSheetError(sheet, problems)
    return samples


def _id_problem(sample_id: str, number: int, first_row_of: dict[str, tuple[int, str]]) -> str | None:
    """What is wrong with a row's sample id (the rule, or a repeat regardless of case); ``first_row_of``
    (casefolded id → (row, id as written)) remembers the ids seen."""
    problem = check_sample_id(sample_id)
    if problem:
        return problem
    first = first_row_of.setdefault(sample_id.casefold(), (number, sample_id))
    if first[0] == number:
        return None
    if first[1] == sample_id:
        return f"duplicate sample_id {sample_id!r} (first in row {first[0]})"
    return (f"sample_id {sample_id!r} differs from {first[1]!r} (row {first[0]}) only by case: their outputs "
            "would collide on a case-insensitive filesystem (macOS, Windows); make the ids differ in letters")


def _read_fields(value: dict[str, str], base: Path, check_files: bool,
                 classes: Sequence[str] | None) -> tuple[dict, list[str]]:
    """A row's cells but the sample id, read and checked: ``(Sample keyword arguments, problems)``."""
    problems = []
    file_path = _resolve(value["path"], base)
    if file_path is None:
        problems.append("empty path")
    elif check_files and not file_path.exists():
        problems.append(f"file not found: {file_path}")

    label = value["label"]
    if not label:
        problems.append("empty label")
    elif classes is not None and label not in classes:
        problems.append(f"unknown label {label!r}: the classes are {', '.join(classes)} (config `classes`)")

    kind = value["kind"].lower() or None
    if kind is not None and kind not in KINDS:
        problems.append(f"bad kind {value['kind']!r}: use {' or '.join(KINDS)}, or leave it blank to infer it")

    annotations = _resolve(value["annotations"], base)
    if annotations is not None and check_files and not annotations.exists():
        problems.append(f"annotations file not found: {annotations}")

    mpp = None
    if value["mpp"]:
        try:
            mpp = float(value["mpp"])
        except ValueError:
            mpp = math.nan
        if not (math.isfinite(mpp) and mpp > 0):
            problems.append(f"mpp {value['mpp']!r} is not a positive number of µm per pixel")
            mpp = None

    split = value["split"].lower() or None
    if split is not None and split not in SPLITS:
        problems.append(f"bad split {value['split']!r}: use {', '.join(SPLITS)}, or leave it blank")
        split = None
    fields = {"path": file_path, "label": label, "group": value["group"] or None, "kind": kind,
              "annotations": annotations, "mpp": mpp, "split": split}
    return fields, problems


def write_sample_sheet(samples: Iterable[Sample], path: str | Path) -> Path:
    """Write ``samples`` as a sample sheet that ``load_sample_sheet`` reads back unchanged.

    Paths inside the sheet's folder are written relative to it (the folder can move); others stay
    absolute. Optional columns are written only when some sample uses them.
    """
    sheet = Path(path)
    base = Path(os.path.abspath(sheet)).parent
    samples = list(samples)
    optional = [c for c in OPTIONAL_COLUMNS if any(getattr(s, c) is not None for s in samples)]
    sheet.parent.mkdir(parents=True, exist_ok=True)
    with open(sheet, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*REQUIRED_COLUMNS, *optional])
        for s in samples:
            row = [s.sample_id, _relative(s.path, base), s.label]
            for column in optional:
                cell = getattr(s, column)
                if cell is None:
                    row.append("")
                elif isinstance(cell, Path):
                    row.append(_relative(cell, base))
                else:
                    row.append(str(cell))
            writer.writerow(row)
    return sheet


def _read_rows(sheet: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank rows, each with its spreadsheet row number (header = 1)."""
    try:
        # utf-8-sig: spreadsheets often save a byte-order mark that would stick to the first column name
        with open(sheet, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            lines = [(reader.line_num, cells) for cells in reader]
    except FileNotFoundError:
        raise SampleSheetError(sheet, ["file not found: check the path given as `samples` in the config"]) from None
    except IsADirectoryError:
        raise SampleSheetError(sheet, ["is a folder, not a CSV file"]) from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise SampleSheetError(sheet, [f"cannot read the CSV: {error}"]) from None
    # rows of only empty cells (",,,") are what spreadsheets leave after the last sample
    lines = [(n, cells) for n, cells in lines if any(c.strip() for c in cells)]
    if not lines:
        raise SampleSheetError(sheet, [f"empty file: expected a header line {','.join(REQUIRED_COLUMNS)}"])
    return lines[0][1], lines[1:]


def _resolve(cell: str, base: Path) -> Path | None:
    """A path cell made absolute against the sheet's folder; ``None`` when blank."""
    if not cell:
        return None
    p = Path(cell).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else base / p))


def _relative(p: Path, base: Path) -> str:
    absolute = Path(os.path.abspath(p))
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        return str(absolute)


def with_kinds(samples: Sequence[Sample], sheet: str | Path) -> list[Sample]:
    """The samples with every blank ``kind`` inferred from the file (slide or image).

    Raises ``SampleSheetError`` listing every sample whose kind cannot be told, before any work.
    """
    if all(s.kind is not None for s in samples):
        return list(samples)  # nothing to infer: the readers are not even imported
    from dataclasses import replace

    from pipeline.errors import GaplessError
    from pipeline.io import infer_kind

    out, problems = [], []
    for s in samples:
        try:
            out.append(s if s.kind is not None else replace(s, kind=infer_kind(s.path)))
        except GaplessError as error:
            problems.append(f"{s.sample_id}: {error} (or set `kind` in the sheet)")
    if problems:
        raise SampleSheetError(sheet, problems)
    return out


def check_sources(samples: Sequence[Sample], sheet: str | Path, cache: str | Path | None = None) -> list[Sample]:
    """The samples with every blank ``kind`` inferred, once every file has passed a cheap check.

    Each file's header is opened (not its pixels; a slide's coarsest level is read a little) and its
    µm/px resolved, as tiling will (:func:`pipeline.io.probe_source`), so a corrupt file or a row
    without µm/px is found now, with every other bad row, instead of failing a job later. Raises
    ``SampleSheetError`` listing every problem. ``cache``: a JSON file remembering files that passed
    (by path, size, modification time, kind and µm/px), so a large sheet is checked once.
    """
    import json
    from dataclasses import replace

    from pipeline.errors import GaplessError
    from pipeline.io import probe_source

    known: dict = {}
    if cache is not None:
        try:
            known = json.loads(Path(cache).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            known = {}
    passed, out, problems = {}, [], []
    for s in samples:
        try:
            stat = s.path.stat()
            key = json.dumps([str(s.path), stat.st_size, stat.st_mtime_ns, s.kind, s.mpp])
            kind = known.get(key) or probe_source(s.path, s.kind, s.mpp)
            passed[key] = kind
            out.append(s if s.kind == kind else replace(s, kind=kind))
        except GaplessError as error:
            fix = "" if s.kind else " (or set `kind` in the sheet)"
            problems.append(f"{s.sample_id}: {error.message}{fix}")
        except OSError as error:
            problems.append(f"{s.sample_id}: {s.path}: {error.strerror or error}")
    if problems:
        raise SampleSheetError(sheet, problems)
    if cache is not None and passed != known:
        from pipeline.files import atomic_write_text

        try:
            atomic_write_text(cache, json.dumps(passed))
        except OSError:
            pass  # the cache only saves time
    return out
