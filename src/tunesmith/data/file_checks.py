"""Data files checked before `datasets` parses them, so a bad line is reported as `data.jsonl:17: ...`
with the parser's reason instead of an Arrow stack trace; what a readable file does unusually (a
byte-order mark, CRLF line ends) for the data summary; and, after `datasets` failed on JSON, the row and
field that made it fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tunesmith.data.errors import DataError


def _validate_file(path: Path) -> str | dict | None:
    """Check one file before `datasets` reads it. For a .json file returns the `field` that
    holds the rows when it is an object wrapping one list of records (`{"data": [...]}`), or
    the parsed columns when it is column-oriented (`{"prompt": [...], "completion": [...]}`)."""
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return None  # binary; pyarrow's own error is the best we have, wrapped in _load_path
    if suffix == ".jsonl":
        _validate_jsonl(path)
        return None
    text = _read_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if suffix == ".json":
        return _validate_json(path, text)
    if len([line for line in text.splitlines() if line.strip()]) < 2:
        raise DataError(f"{path}: has no rows, only a header line; there is nothing to train on")
    return None  # .csv: UTF-8 checked; the CSV parser reports its own problems


_BOM = b"\xef\xbb\xbf"


def _has_bom(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(3) == _BOM


def file_notes(source) -> list[str]:
    """How a local file (or the files of a folder) deviates from plain UTF-8 with \\n line ends in ways
    that are read fine but worth a line in the data summary: a byte-order mark, CRLF line ends.

    >>> file_notes([{"text": "a list, not a file"}])
    []
    """
    if not isinstance(source, (str, os.PathLike)) or not os.path.exists(source):
        return []
    path = Path(source)
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    files = [p for p in files if p.suffix.lower() in (".jsonl", ".json", ".csv")]
    with_bom = [p.name for p in files if _has_bom(p)]
    crlf = []
    for p in files:
        with open(p, "rb") as f:
            if b"\r\n" in f.read(1 << 16):
                crlf.append(p.name)
    notes = []
    if with_bom:
        notes.append(f"UTF-8 byte-order mark at the start of {_names(with_bom)}: skipped")
    if crlf:
        notes.append(f"Windows (CRLF) line ends in {_names(crlf)}: read as line ends")
    return notes


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _read_utf8(path: Path) -> str:
    data = path.read_bytes().removeprefix(_BOM)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: byte {data[err.start]:#04x} at column {column} is not valid UTF-8; "
            "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _validate_jsonl(path: Path) -> None:
    rows = 0
    first_seen: dict[str, tuple[str, int, object]] = {}  # field -> (JSON type, line, value) where first seen
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(_BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: byte {raw[err.start]:#04x} at column {err.start + 1} is not valid "
                    "UTF-8; re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
                ) from None
            if not line.strip():
                continue  # blank lines (often a trailing newline) carry no row
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON: {err.msg} (column {err.colno}): {line.strip()[:80]!r}"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{lineno}: each line must be a JSON object ({{...}}), got {type(row).__name__}"
                )
            _check_same_types(f"{path}:{lineno}", f"line {lineno}", row, first_seen)
            rows += 1
    if rows == 0:
        raise DataError(f"{path}: the file is empty (no JSON lines)")


def _json_kind(value) -> str | None:
    """ "string", "number" or "boolean" for a JSON scalar; None for null, objects and arrays (not compared)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return None


def _check_same_types(where: str, place: str, row: dict, first_seen: dict) -> None:
    """A field that is a string on one line and a number on another: Arrow would silently turn the whole
    column into one type ("4" becomes 4), and a later error would blame a row that was right. Named here,
    at the line where the type changes, with the line that set it."""
    for key, value in row.items():
        kind = _json_kind(value)
        if kind is None:
            continue
        seen = first_seen.setdefault(key, (kind, place, value))
        if seen[0] != kind:
            raise DataError(
                f"{where}: field {key!r} is a {kind} here ({value!r}) but a {seen[0]} in {seen[1]} "
                f"({seen[2]!r}); give every row's {key!r} the same type (quote the numbers to make them text)"
            )


def _validate_json(path: Path, text: str) -> str | dict | None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        hint = ""
        if err.msg.startswith("Extra data"):
            hint = "; one JSON object per line is JSON Lines: name the file .jsonl"
        raise DataError(
            f"{path}:{err.lineno}: not valid JSON: {err.msg} (column {err.colno}){hint}"
        ) from None
    if isinstance(data, list):
        if not data:
            raise DataError(f"{path}: the file is empty (an empty JSON array)")
        first_seen: dict = {}
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}: element {i} of the JSON array is a {type(row).__name__}, not an object"
                )
            _check_same_types(f"{path}: element {i}", f"element {i}", row, first_seen)
        return None
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if len(data) == 1 and len(lists) == 1:
            ((key, rows),) = lists.items()
            if rows and all(isinstance(r, dict) for r in rows):
                return key  # {"data": [{...}, ...]}
        if data and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1:
            if not next(iter(lists.values())):
                raise DataError(f"{path}: the file is empty (columns with no values)")
            return data  # columnar: {"prompt": [...], "completion": [...]}
    raise DataError(
        f"{path}: expected a JSON array of objects ([{{...}}, ...]), an object of equal-length columns, "
        f"or an object holding one list of objects; got {type(data).__name__}"
    )


# Rows _explain_json_failure reads at most (it runs only after the file already failed to load).
_EXPLAIN_MAX_ROWS = 200_000


def _explain_json_failure(files: list[Path]) -> None:
    """After `datasets` failed on JSON / JSONL files: read the rows with the json module and normalise
    each, so that a row whose field has another type than the rows before it (which Arrow, in older
    `datasets`, refuses as a whole file) is reported as `file:line: example i, field: ...`. Returns
    when every row normalises (the caller then reports datasets' own error)."""
    from tunesmith.data.formats import detect_format, normalize_example

    fmt, index = None, 0
    for file in files:
        try:
            if file.suffix.lower() == ".jsonl":
                rows = [
                    (line_no, json.loads(line))
                    for line_no, line in enumerate(file.read_text(encoding="utf-8-sig").splitlines(), start=1)
                    if line.strip()
                ]
            else:
                data = json.loads(file.read_text(encoding="utf-8-sig"))
                rows = [(None, row) for row in data] if isinstance(data, list) else []
        except (OSError, ValueError):
            return  # not readable as JSON either: datasets' error says enough
        for line_no, row in rows:
            if index >= _EXPLAIN_MAX_ROWS or not isinstance(row, dict):
                return
            try:
                fmt = fmt or detect_format(list(row), first_example=row)
                normalize_example(row, fmt, index=index)
            except DataError as err:
                where = f"{file}:{line_no}" if line_no is not None else str(file)
                raise DataError(f"{where}: {err}") from None
            index += 1
