"""Reading CSV files: `read_rows` (header and non-blank rows, with one-line errors) for every CSV a
source reads, and `read_index`, the index CSV of the file-based sources (one row per image, `file`
relative to data.root)."""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath

from privmed.errors import DataError


def read_rows(path: Path, expected: str, fix: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(stripped header, [(line number, fields)] of the non-blank rows) of a UTF-8 CSV file.
    DataError for an unreadable or empty file; `expected` says what its header should be, `fix`
    what to do about a file that is not UTF-8."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            body = [(reader.line_num, row) for row in reader if any(v.strip() for v in row)]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file; {fix}") from None
    except (csv.Error, OSError) as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    if not header:
        raise DataError(f"{path}: empty CSV; expected {expected}")
    return [h.strip() for h in header], body


def read_index(path: Path, required: tuple[str, ...], optional: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows as {column: stripped value} for the required and present optional columns.

    `file` is normalised to a POSIX relative path. Raises DataError for a missing or unreadable
    file, a missing required column, an empty value or a file listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data.csv: {path} not found (expected a CSV with columns {', '.join(required)})"
        )
    header, body = read_rows(
        path, expected=f"a header with columns {', '.join(required)}", fix="save the CSV as UTF-8"
    )
    header = [h.lower() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing column '{missing[0]}'; found columns {header}, required "
            f"{list(required)}, optional {list(optional)}"
        )
    wanted = {c: header.index(c) for c in (*required, *optional) if c in header}

    rows: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for line, raw in body:
        row = {}
        for col, i in wanted.items():
            value = raw[i].strip() if i < len(raw) else ""
            if not value:
                raise DataError(f"{path}: line {line}: empty '{col}' value; every row needs one")
            row[col] = value
        row["file"] = PurePosixPath(row["file"].replace("\\", "/")).as_posix()
        name = row["file"]
        if name in seen:
            raise DataError(f"{path}: line {line}: file '{name}' is already listed on line {seen[name]}")
        seen[row["file"]] = line
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows below the header")
    return rows


SPLITS = ("train", "test")


def check_splits(rows: list[dict[str, str]], path: Path, allowed: tuple[str, ...] = SPLITS) -> None:
    """DataError naming the file and the value when a row's `split` is not one of `allowed` (any
    case). Where 'val' is not allowed, validation patients are drawn by each site
    (data.val_fraction), and a 'val' row is refused with that reason."""
    for r in rows:
        value = r.get("split")
        if value is None or value.lower() in allowed:
            continue
        why = ""
        if value.lower() in ("val", "valid", "validation"):
            why = (" (validation rows are marked 'val')" if "val" in allowed else
                   " (each site draws its validation patients from its training rows: data.val_fraction)")
        raise DataError(f"{path}: file '{r['file']}' has split '{value}'; allowed: {', '.join(allowed)}{why}")
