"""Read training rows from wherever they live: files, folders, `datasets` objects, Python lists,
or the Hugging Face Hub.

Files are checked line by line *before* `datasets` parses them, so a bad line is reported as
`data.jsonl:17: ...` with the parser's reason instead of an Arrow stack trace. Nothing here
looks at what the columns mean; that is `formats.py`.

    >>> ds = load_source([{"text": "hello"}, {"text": "world"}])
    >>> ds.column_names, len(ds)
    (['text'], 2)
    >>> describe_source([{"text": "hello"}, {"text": "world"}])
    '<list of 2 dicts>'
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

# file suffix -> the `datasets` builder that reads it
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# "train", "train[:100]", "train[10:20]", "test[:10%]"
_SPLIT_RE = re.compile(
    r"^\s*(?P<name>[\w.-]+)\s*(?:\[\s*(?P<start>-?\d+%?)?\s*:\s*(?P<end>-?\d+%?)?\s*\])?\s*$"
)


class DataError(ValueError):
    """A problem with the user's data, worded for the user: what, where, and how to fix it."""


def describe_source(source) -> str:
    """A short human name for `source`, used in messages and cache fingerprints.

    `"data/train.jsonl"` -> `"train.jsonl"`, a folder -> `"data/"`, `[{...}, {...}, {...}]` ->
    `"<list of 3 dicts>"`, a `Dataset` of 10 rows -> `"<Dataset of 10 rows>"`, a Hub name
    -> the name itself.
    """
    import datasets

    if isinstance(source, os.PathLike) or (isinstance(source, str) and os.path.exists(source)):
        path = Path(source)
        return f"{path.name}/" if path.is_dir() else path.name
    if isinstance(source, str):
        return source
    if isinstance(source, list):
        return f"<list of {len(source)} dicts>"
    if isinstance(source, datasets.Dataset):
        return f"<Dataset of {len(source)} rows>"
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        kind = type(source).__name__
        return f"<{kind} with splits {', '.join(source)}>"
    if isinstance(source, datasets.IterableDataset):
        return "<IterableDataset>"
    return f"<{type(source).__name__}>"


def load_source(source, *, split=None, streaming=False, data_files=None, **load_kwargs):
    """Turn `source` into a `datasets.Dataset` (or an `IterableDataset` when streaming).

    `source` may be a path to a `.jsonl` / `.json` (array of objects, or an object holding one) /
    `.csv` / `.parquet` file, a folder of such files (all of one kind), a `Dataset`,
    `DatasetDict` / `IterableDatasetDict` (the `split`, default `"train"`, is taken),
    `IterableDataset`, a list of dicts, or a dataset name on the Hub. `split` accepts slices:
    `"train[:100]"`, `"train[10:20]"`, `"train[:10%]"` (percentages not when streaming).
    `data_files` goes with a Hub name or a builder name (`load_source("json", data_files=...)`,
    whose files are checked like a path source); `load_kwargs` go to `datasets.load_dataset`.

        >>> load_source([{"prompt": "2+2=", "completion": "4"}]).to_list()
        [{'prompt': '2+2=', 'completion': '4'}]

    Raises `DataError` on a malformed line (`file:line: reason`), bytes that are not UTF-8,
    an empty file or an empty dataset.
    """
    import datasets

    if isinstance(source, (str, os.PathLike)) and (
        isinstance(source, os.PathLike) or os.path.exists(source) or _looks_like_path(source)
    ):
        ds = _load_path(Path(source), split=split, streaming=streaming, **load_kwargs)
    elif isinstance(source, str):
        ds = _load_hub(source, split=split, streaming=streaming, data_files=data_files, **load_kwargs)
    elif isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        name, start, end = _parse_split(split or "train")
        if name not in source:
            raise DataError(
                f"the dataset has no split {name!r}; it has: {', '.join(source)}. Pick one with `split=`."
            )
        ds = _slice(source[name], start, end, what=f"split {name!r}")
    elif isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        ds = source
        if split is not None:
            _, start, end = _parse_split(split)
            ds = _slice(ds, start, end, what="the dataset")
    elif isinstance(source, list):
        ds = _from_list(source)
    else:
        raise DataError(
            f"cannot read training data from a {type(source).__name__}; pass a file or folder path, a "
            "datasets.Dataset / DatasetDict / IterableDataset, a list of dicts, or a Hub dataset name"
        )

    if streaming and isinstance(ds, datasets.Dataset):
        ds = ds.to_iterable_dataset()
    _check_not_empty(ds, describe_source(source))
    return ds


def _looks_like_path(text: str) -> bool:
    # A Hub name is "owner/name" or "name"; anything with a file suffix or that starts like a
    # filesystem path is meant as a local file, and its absence is a "no such file" error.
    return Path(text).suffix.lower() in FILE_BUILDERS or text.startswith((".", "/", "~"))


def _check_not_empty(ds, name: str) -> None:
    import datasets

    if isinstance(ds, datasets.Dataset):
        if len(ds) == 0:
            raise DataError(f"{name}: the dataset has no rows; there is nothing to train on")
        return
    # Streaming: peek at one row (sources are re-iterable, so this consumes nothing).
    try:
        next(iter(ds.take(1)))
    except StopIteration:
        raise DataError(f"{name}: the dataset has no rows; there is nothing to train on") from None


def _from_list(rows: list):
    import datasets

    if not rows:
        raise DataError("<empty list>: the list of examples is empty; there is nothing to train on")
    columns: dict[str, None] = {}  # ordered union of keys: from_list would keep only the first row's
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"example {i}: expected a dict of columns, got {type(row).__name__}: {row!r:.80}")
        columns.update(dict.fromkeys(row))
    table = {col: [row.get(col) for row in rows] for col in columns}
    try:
        return datasets.Dataset.from_dict(table)
    except Exception as err:  # pyarrow raises several unrelated types here
        raise DataError(
            f"<list of {len(rows)} dicts>: could not build a table from the examples ({err}). "
            "Usually one column holds different types in different examples (a string in one, a number "
            "or list in another); make each column one type."
        ) from err


def _parse_split(split: str) -> tuple[str, str | None, str | None]:
    match = _SPLIT_RE.match(split)
    if not match:
        raise DataError(
            f"split {split!r} is not understood; write e.g. 'train', 'train[:100]' or 'test[:10%]'"
        )
    return match["name"], match["start"], match["end"]


def _slice(ds, start: str | None, end: str | None, *, what: str):
    import datasets

    if start is None and end is None:
        return ds
    if isinstance(ds, datasets.IterableDataset):
        if any(b is not None and (b.endswith("%") or b.startswith("-")) for b in (start, end)):
            raise DataError(f"{what}: a streaming dataset can only be sliced by absolute row numbers ([a:b])")
        lo = int(start or 0)
        ds = ds.skip(lo) if lo else ds
        return ds.take(int(end) - lo) if end is not None else ds

    n = len(ds)

    def bound(b: str | None, default: int) -> int:
        if b is None:
            return default
        value = round(n * int(b[:-1]) / 100) if b.endswith("%") else int(b)
        return max(0, min(n, value + n if value < 0 else value))

    lo, hi = bound(start, 0), bound(end, n)
    return ds.select(range(lo, max(lo, hi)))


# --------------------------------------------------------------------------- files


def _load_path(path: Path, *, split, streaming, **load_kwargs):
    import datasets

    path = path.expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in FILE_BUILDERS
            # hidden folders (.cache, .ipynb_checkpoints) hold copies, not training data
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(
                f"{path}/: the folder holds no data files; expected files ending in {', '.join(FILE_BUILDERS)}"
            )
        builders = {FILE_BUILDERS[p.suffix.lower()] for p in files}
        if len(builders) > 1:
            kinds = sorted({p.suffix.lower() for p in files})
            raise DataError(
                f"{path}/: the folder mixes file kinds ({', '.join(kinds)}); keep one kind per folder"
            )
    else:
        suffix = path.suffix.lower()
        if suffix not in FILE_BUILDERS:
            raise DataError(
                f"{path}: unknown file kind {suffix or '(no suffix)'!r}; expected {', '.join(FILE_BUILDERS)}"
            )
        files = [path]

    if any(_has_bom(f) for f in files if f.suffix.lower() != ".parquet"):
        # Windows editors save UTF-8 with a byte-order mark; the readers take it away with utf-8-sig
        load_kwargs.setdefault("encoding", "utf-8-sig")
    field = load_kwargs.pop("field", None)
    columnar = []  # {"col": [...], ...} files: pyarrow would read each as a single row
    for file in files:
        found = _validate_file(file)
        if isinstance(found, dict):
            columnar.append(found)
        field = field or (found if isinstance(found, str) else None)
    builder = FILE_BUILDERS[files[0].suffix.lower()]
    if field is not None:
        load_kwargs["field"] = field

    name, start, end = _parse_split(split or "train")
    if name != "train":
        raise DataError(f"{path}: local files hold a single split named 'train', not {name!r}")
    if columnar and len(columnar) == len(files):
        ds = datasets.concatenate_datasets([datasets.Dataset.from_dict(c) for c in columnar])
        return _slice(ds, start, end, what=str(path))
    if columnar:
        raise DataError(f"{path}/: mixes column-oriented and row-oriented JSON files; use one layout")
    # `datasets` slices non-streaming splits itself ("train[:100]"); streaming we slice after.
    ds_split = "train" if streaming else (split or "train")
    try:
        ds = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split=ds_split, streaming=streaming, **load_kwargs
        )
    except Exception as err:
        if "corresponds to no data" in str(err):  # datasets' words for a split of zero rows
            raise DataError(f"{path}: has no rows; there is nothing to train on") from None
        if builder == "json":
            _explain_json_failure(files)  # names the file, line, example and field when it can
        raise DataError(f"{path}: could not be read as {builder} ({type(err).__name__}: {err})") from err
    return _slice(ds, start, end, what=str(path)) if streaming else ds


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


# --------------------------------------------------------------------------- hub


def _load_hub(name: str, *, split, streaming, data_files, **load_kwargs):
    import datasets

    if name in set(FILE_BUILDERS.values()) and data_files is not None:
        # load_dataset("json", data_files=...) as in the TRL examples: check the files first
        # so a bad line is reported as file:line, as for a path source.
        groups = data_files.values() if isinstance(data_files, dict) else [data_files]
        for group in groups:
            for file in [group] if isinstance(group, (str, os.PathLike)) else group:
                if Path(file).is_file():
                    _validate_file(Path(file))
    try:
        ds = datasets.load_dataset(
            name, split=split or "train", streaming=streaming, data_files=data_files, **load_kwargs
        )
    except Exception as err:
        raise DataError(
            f"{name!r} is not a local file or folder, and loading it as a Hugging Face Hub dataset failed "
            f"({type(err).__name__}: {err}). Check the path, or the dataset name and your network."
        ) from err
    return ds


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
