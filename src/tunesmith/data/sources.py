"""Read training rows from wherever they live: files, folders, `datasets` objects, Python lists,
or the Hugging Face Hub.

Files are checked line by line *before* `datasets` parses them (file_checks.py), so a bad line is
reported as `data.jsonl:17: ...` with the parser's reason instead of an Arrow stack trace. Nothing here
looks at what the columns mean; that is `formats.py`.

    >>> ds = load_source([{"text": "hello"}, {"text": "world"}])
    >>> ds.column_names, len(ds)
    (['text'], 2)
    >>> describe_source([{"text": "hello"}, {"text": "world"}])
    '<list of 2 dicts>'
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from tunesmith.data.errors import DataError
from tunesmith.data.file_checks import _explain_json_failure, _has_bom, _validate_file, file_notes  # noqa: F401

logger = logging.getLogger(__name__)

# file suffix -> the `datasets` builder that reads it
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# "train", "train[:100]", "train[10:20]", "test[:10%]"
_SPLIT_RE = re.compile(
    r"^\s*(?P<name>[\w.-]+)\s*(?:\[\s*(?P<start>-?\d+%?)?\s*:\s*(?P<end>-?\d+%?)?\s*\])?\s*$"
)


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
