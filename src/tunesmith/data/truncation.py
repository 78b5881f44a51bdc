"""Truncation of tokenized examples to `max_length` (keep the start, keep the end, or drop), and the
columnar layout it and packing.py work on: one flat array of token ids plus one length per example
(Arrow's list layout), so cutting 10,000 examples is a handful of numpy operations.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tunesmith.common import IGNORE_INDEX

logger = logging.getLogger("tunesmith.data")

TRUNCATION_MODES = ("keep_start", "keep_end", "drop")

# Token ids and labels fit in int32 (vocabularies are far below 2**31); half the disk and
# memory of int64. The collators turn them into torch.long.
_INT = pa.int32()
_LIST_INT = pa.list_(_INT)


# --------------------------------------------------------------------------------------
# Columns <-> flat arrays
# --------------------------------------------------------------------------------------


def as_table(examples) -> pa.Table:
    """Tokenized examples as an Arrow table with columns input_ids, labels (and seq_lengths if given).

    Accepts a `pa.Table`, a `dict` of columns, or a list of row dicts. A missing `labels`
    column means every token is trained (labels = input_ids), as for pre-tokenized data.

    >>> as_table([{"input_ids": [5, 6]}]).to_pylist()
    [{'input_ids': [5, 6], 'labels': [5, 6]}]
    """
    if isinstance(examples, pa.Table):
        table = examples
    elif isinstance(examples, Mapping):
        table = pa.table({k: v for k, v in examples.items()})
    elif isinstance(examples, Sequence):
        if len(examples) == 0:
            return pa.table({"input_ids": pa.array([], _LIST_INT), "labels": pa.array([], _LIST_INT)})
        columns = {key: [row[key] for row in examples] for key in examples[0]}
        table = pa.table(columns)
    else:
        raise TypeError(
            f"expected tokenized examples as a pyarrow Table, a dict of columns or a list of dicts, "
            f"got {type(examples).__name__}"
        )
    if "input_ids" not in table.column_names:
        raise ValueError(
            f"tokenized examples need an 'input_ids' column; columns found: {table.column_names}"
        )
    columns = {"input_ids": table["input_ids"].cast(_LIST_INT)}
    columns["labels"] = (table["labels"] if "labels" in table.column_names else table["input_ids"]).cast(
        _LIST_INT
    )
    if "seq_lengths" in table.column_names:
        columns["seq_lengths"] = table["seq_lengths"].cast(_LIST_INT)
    return pa.table(columns)


def _flat(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (values, lengths): values (total,), lengths (n,)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return values, lengths


def _list_array(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, _INT))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, _INT))


def _starts(lengths: np.ndarray) -> np.ndarray:
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def _ragged_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat positions of the spans [start, start + length), concatenated in order.

    >>> _ragged_index(np.array([10, 0]), np.array([2, 3])).tolist()
    [10, 11, 0, 1, 2]
    """
    total = int(lengths.sum())
    out_starts = _starts(lengths)
    # position within its span = global position - where that span starts in the output
    return np.repeat(starts - out_starts, lengths) + np.arange(total, dtype=np.int64)


def _segment_sums(flags: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sum of `flags` over each consecutive segment of the given lengths (empty segments give 0)."""
    cumulative = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    ends = np.cumsum(lengths)
    return cumulative[ends] - cumulative[ends - lengths]


# --------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------


@dataclass
class TruncationStats:
    """What `truncate` did. Tokens are counted as they were before truncation."""

    examples_in: int = 0
    examples_out: int = 0
    truncated: int = 0  # examples shortened to max_length
    tokens_truncated: int = 0  # tokens cut from those examples
    dropped_overlong: int = 0  # examples longer than max_length removed (truncation_mode="drop")
    dropped_no_supervised: int = 0  # examples with no trained token left, removed
    tokens_dropped: int = 0  # tokens of all removed examples

    @property
    def dropped(self) -> int:
        return self.dropped_overlong + self.dropped_no_supervised


def truncate(
    examples, *, max_length: int | None, truncation_mode: str = "keep_start", log: bool = True
) -> tuple[pa.Table, TruncationStats]:
    """Cut or drop examples longer than `max_length`; drop examples with no trained token.

    `truncation_mode`: `keep_start` keeps the first `max_length` tokens, `keep_end` the
    last, `drop` removes the whole example. An example whose labels are all -100 after
    that (e.g. a long prompt that filled the window) teaches nothing and is removed.
    Everything is counted in the returned stats and logged on "tunesmith.data" (`log=False`
    leaves the logging to a caller that adds counts up, as streaming does).

        max_length 3, keep_start                     max_length 3, keep_end
        ids    [1 2 3 4]  labels [-  -  3 4]  ──►    ids [1 2 3]  labels [- - 3]
        (keep_end gives ids [2 3 4], labels [- 3 4]; drop removes the example)

    >>> table, stats = truncate([{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}], max_length=3)
    >>> table.to_pylist(), stats.truncated, stats.tokens_truncated
    ([{'input_ids': [1, 2, 3], 'labels': [-100, -100, 3]}], 1, 1)
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode={truncation_mode!r} is not one of {TRUNCATION_MODES}")
    table = as_table(examples).select(["input_ids", "labels"])
    ids, lengths = _flat(table["input_ids"])
    labels, label_lengths = _flat(table["labels"])
    _check_same_lengths(lengths, label_lengths)
    stats = TruncationStats(examples_in=len(lengths))

    keep = np.ones(len(lengths), dtype=bool)
    new_lengths = lengths
    starts = _starts(lengths)
    if max_length is not None:
        overlong = lengths > max_length
        if truncation_mode == "drop":
            keep &= ~overlong
            stats.dropped_overlong = int(overlong.sum())
        else:
            stats.truncated = int(overlong.sum())
            stats.tokens_truncated = int((lengths[overlong] - max_length).sum())
            new_lengths = np.minimum(lengths, max_length)
            if truncation_mode == "keep_end":
                starts = starts + (lengths - new_lengths)

    index = _ragged_index(starts, new_lengths)
    ids, labels = ids[index], labels[index]
    supervised = _segment_sums(labels != IGNORE_INDEX, new_lengths)
    no_supervised = keep & (supervised == 0)
    stats.dropped_no_supervised = int(no_supervised.sum())
    keep &= ~no_supervised
    stats.tokens_dropped = int(lengths[~keep].sum())

    if not keep.all():
        index = _ragged_index(_starts(new_lengths)[keep], new_lengths[keep])
        ids, labels, new_lengths = ids[index], labels[index], new_lengths[keep]
    stats.examples_out = len(new_lengths)
    out = pa.table({"input_ids": _list_array(ids, new_lengths), "labels": _list_array(labels, new_lengths)})
    if log:
        log_truncation(stats, max_length, truncation_mode)
    return out, stats


def _check_same_lengths(lengths: np.ndarray, label_lengths: np.ndarray) -> None:
    if not np.array_equal(lengths, label_lengths):
        bad = int(np.flatnonzero(lengths != label_lengths)[0])
        raise ValueError(
            f"example {bad}: input_ids has {lengths[bad]} tokens but labels has {label_lengths[bad]}; "
            "labels must be as long as input_ids (-100 where a token is not trained)"
        )


def log_truncation(stats: TruncationStats, max_length: int | None, mode: str) -> None:
    if stats.truncated:
        logger.warning(
            "truncated %d of %d examples to max_length=%s (truncation_mode=%s), losing %d tokens",
            stats.truncated,
            stats.examples_in,
            max_length,
            mode,
            stats.tokens_truncated,
        )
    if stats.dropped_overlong:
        logger.warning(
            "dropped %d of %d examples longer than max_length=%s (truncation_mode=drop)",
            stats.dropped_overlong,
            stats.examples_in,
            max_length,
        )
    if stats.dropped_no_supervised:
        logger.warning(
            "dropped %d of %d examples with no trained token (all labels -100%s)",
            stats.dropped_no_supervised,
            stats.examples_in,
            " after truncation" if stats.truncated else "",
        )
