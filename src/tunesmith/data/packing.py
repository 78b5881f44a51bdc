"""Truncation and packing of tokenized examples into rows of at most `max_length` tokens.

Truncation and the columnar layout live in truncation.py (re-exported here). Everything works
on whole columns: a tokenized dataset is held as one flat array of token ids plus one length per
example (Arrow's list layout), so truncating, splitting and
packing 10,000 examples is a handful of numpy operations, not 10,000 Python loops. The one
per-item Python loop is the best-fit search, which touches only lengths.

A packed row is `{"input_ids", "labels", "seq_lengths"}` with
`sum(seq_lengths) == len(input_ids) <= max_length` (docs/ARCHITECTURE.md). Documents keep
their own boundaries through `seq_lengths`; the collators turn those into position ids and
attention boundaries, so packed documents never see each other.

    Three examples (lengths 5, 3, 2), max_length 6, packing_strategy="bfd":

        example 0:  a a a a a          row 0:  a a a a a        seq_lengths [5]
        example 1:  b b b        ──►   row 1:  b b b c c        seq_lengths [3, 2]
        example 2:  c c
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tunesmith.common import IGNORE_INDEX  # noqa: F401 (re-exported)
from tunesmith.data.truncation import (  # noqa: F401 (truncation is re-exported: callers import it from here)
    _INT,
    _LIST_INT,
    TRUNCATION_MODES,
    TruncationStats,
    _check_same_lengths,
    _flat,
    _list_array,
    _ragged_index,
    _segment_sums,
    _starts,
    as_table,
    log_truncation,
    truncate,
)

logger = logging.getLogger("tunesmith.data")

PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")

# --------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------


def bfd_bins(lengths: Sequence[int] | np.ndarray, max_length: int) -> np.ndarray:
    """Best-fit decreasing: the row each item goes into. O(n log max_length), deterministic.

    Items are placed longest first (ties by position); each goes into the open row with the
    *least* room that still fits it, or opens a new row. Rows are numbered in the order they
    were opened. Every length must be <= max_length.

        lengths [5, 3, 2, 6], max_length 6:
          6 -> new row 0 (room 0);  5 -> new row 1 (room 1);  3 -> new row 2 (room 3);
          2 -> row 2 (room 3 is the tightest fit; row 1 has only 1)

    >>> bfd_bins([5, 3, 2, 6], 6).tolist()
    [1, 2, 2, 0]

    How: rows are grouped by their remaining room r (0..max_length). A max-segment-tree over
    r holds r where some row has room exactly r, else -1, so "the smallest r >= length with a
    row" is one walk down the tree.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > max_length or lengths.min() < 0):
        bad = int(np.flatnonzero((lengths > max_length) | (lengths < 0))[0])
        raise ValueError(f"item {bad} has length {lengths[bad]}, outside 0..max_length={max_length}")
    size = 1
    while size < max_length + 1:
        size *= 2
    tree = [-1] * (2 * size)  # tree[size + r] = r if some open row has room r
    rows_with_room: list[list[int]] = [[] for _ in range(max_length + 1)]
    assignment = np.empty(len(lengths), dtype=np.int64)
    n_rows = 0

    def set_leaf(room: int, value: int) -> None:
        node = size + room
        tree[node] = value
        node //= 2
        while node:
            best = max(tree[2 * node], tree[2 * node + 1])
            if tree[node] == best:
                break
            tree[node] = best
            node //= 2

    # longest first; a stable sort keeps equal lengths in dataset order (determinism)
    order = np.argsort(-lengths, kind="stable")
    for item, length in zip(order.tolist(), lengths[order].tolist()):
        if tree[1] >= length:
            # leftmost leaf with value >= length, i.e. the tightest room that fits
            node = 1
            while node < size:
                node = 2 * node if tree[2 * node] >= length else 2 * node + 1
            room = node - size
            row = rows_with_room[room].pop()
            if not rows_with_room[room]:
                set_leaf(room, -1)
        else:
            row, room = n_rows, max_length
            n_rows += 1
        assignment[item] = row
        left = room - length
        rows_with_room[left].append(row)
        if tree[size + left] < 0:
            set_leaf(left, left)
    return assignment


def split_long(lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Lengths of the pieces when each item longer than `max_length` is cut into consecutive pieces.

    >>> split_long(np.array([7, 2]), 3).tolist()
    [3, 3, 1, 2]
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    pieces = np.maximum(1, -(-lengths // max_length))  # ceil; an empty item stays one piece
    item = np.repeat(np.arange(len(lengths)), pieces)
    piece_index = np.arange(len(item)) - np.repeat(_starts(pieces), pieces)
    return np.minimum(max_length, lengths[item] - piece_index * max_length)


@dataclass
class PackingStats:
    rows: int = 0
    tokens: int = 0
    split_documents: int = 0  # documents cut into several (bfd_split, wrapped)
    tokens_truncated: int = 0  # overflow cut away by plain bfd
    truncated: int = 0
    efficiency: float = 0.0  # tokens / (rows * max_length)


def pack(examples, *, max_length: int, packing_strategy: str = "bfd") -> tuple[pa.Table, PackingStats]:
    """Pack tokenized examples into rows of at most `max_length` tokens, keeping document lengths.

    - `bfd`: best-fit decreasing (see `bfd_bins`); a document longer than `max_length` is
      first cut to `max_length` (counted and logged, as TRL does).
    - `bfd_split`: the same, but a long document is split into pieces of `max_length`
      (and a remainder) that are packed as documents of their own: no token is lost.
    - `wrapped`: all documents concatenated in order and cut every `max_length` tokens; a
      document crossing a cut becomes two documents.

    Within a bfd row, documents keep their dataset order. Examples must be unpacked (one
    document each); already packed rows are an error rather than being merged blindly.

        lengths [4, 2, 3], max_length 5
        bfd / bfd_split:  row 0 = ex0 (4)           seq_lengths [4]
                          row 1 = ex1, ex2 (2 + 3)  seq_lengths [2, 3]
        wrapped:          row 0 = ex0, ex1[:1]      seq_lengths [4, 1]
                          row 1 = ex1[1:], ex2      seq_lengths [1, 3]

    >>> rows, stats = pack({"input_ids": [[1, 1, 1, 1], [2, 2], [3, 3, 3]]}, max_length=5)
    >>> [(r["input_ids"], r["seq_lengths"]) for r in rows.to_pylist()]
    [([1, 1, 1, 1], [4]), ([2, 2, 3, 3, 3], [2, 3])]
    >>> rows, _ = pack({"input_ids": [[1, 1, 1, 1], [2, 2], [3, 3, 3]]}, max_length=5, packing_strategy="wrapped")
    >>> [(r["input_ids"], r["seq_lengths"]) for r in rows.to_pylist()]
    [([1, 1, 1, 1, 2], [4, 1]), ([2, 3, 3, 3], [1, 3])]
    """
    if packing_strategy not in PACKING_STRATEGIES:
        raise ValueError(f"packing_strategy={packing_strategy!r} is not one of {PACKING_STRATEGIES}")
    if max_length is None or max_length < 1:
        raise ValueError(f"packing needs a positive max_length, got max_length={max_length!r}")
    table = as_table(examples)
    if "seq_lengths" in table.column_names and len(table):
        docs = pc.list_value_length(table["seq_lengths"]).to_numpy(zero_copy_only=False)
        if docs.max() > 1:
            bad = int(np.flatnonzero(docs > 1)[0])
            raise ValueError(
                f"example {bad} is already packed ({docs[bad]} documents); pack unpacked examples"
            )
    ids, lengths = _flat(table["input_ids"])
    labels, label_lengths = _flat(table["labels"])
    _check_same_lengths(lengths, label_lengths)
    stats = PackingStats()

    if packing_strategy == "wrapped":
        row_tokens, seq_lengths, docs_per_row = _wrap(lengths, max_length)
        stats.split_documents = int(len(seq_lengths) - np.count_nonzero(lengths))
    else:
        overlong = lengths > max_length
        if packing_strategy == "bfd_split":
            # pieces are contiguous in the flat arrays, so splitting only changes lengths
            stats.split_documents = int(overlong.sum())
            lengths = split_long(lengths, max_length)
        elif overlong.any():
            stats.truncated = int(overlong.sum())
            stats.tokens_truncated = int((lengths[overlong] - max_length).sum())
            kept = np.minimum(lengths, max_length)
            index = _ragged_index(_starts(lengths), kept)
            ids, labels, lengths = ids[index], labels[index], kept
        rows = bfd_bins(lengths, max_length)
        # documents ordered by row, then by dataset position inside the row
        order = np.lexsort((np.arange(len(rows)), rows))
        index = _ragged_index(_starts(lengths)[order], lengths[order])
        ids, labels = ids[index], labels[index]
        seq_lengths = lengths[order]
        docs_per_row = np.bincount(rows, minlength=int(rows.max()) + 1 if len(rows) else 0)
        row_tokens = np.bincount(rows, weights=lengths, minlength=len(docs_per_row)).astype(np.int64)

    out = pa.table(
        {
            "input_ids": _list_array(ids, row_tokens),
            "labels": _list_array(labels, row_tokens),
            "seq_lengths": _list_array(seq_lengths, docs_per_row),
        }
    )
    stats.rows = len(row_tokens)
    stats.tokens = int(row_tokens.sum())
    stats.efficiency = packing_efficiency(row_tokens, max_length)
    _log_packing(stats, max_length, packing_strategy, len(lengths))
    return out, stats


def _wrap(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut the concatenation of documents every `max_length` tokens.

    Returns (tokens per row, document lengths in order, documents per row). The cut points
    are the union of document ends and row ends; each piece between two cut points is one
    document of the row it falls in.
    """
    total = int(lengths.sum())
    n_rows = -(-total // max_length)
    doc_ends = np.cumsum(lengths)
    doc_ends = doc_ends[lengths > 0]  # an empty document has no token to place
    row_ends = np.arange(1, n_rows + 1, dtype=np.int64) * max_length
    row_ends[-1:] = total
    cuts = np.union1d(doc_ends, row_ends)
    pieces = np.diff(cuts, prepend=0)
    piece_row = (cuts - pieces) // max_length
    docs_per_row = np.bincount(piece_row, minlength=n_rows)
    row_tokens = np.diff(row_ends, prepend=0)
    return row_tokens, pieces, docs_per_row


def packing_efficiency(row_tokens: Sequence[int] | np.ndarray, max_length: int) -> float:
    """Real tokens / (rows x max_length): the share of the slots that hold a token.

    >>> packing_efficiency([5, 3], 5)
    0.8
    """
    row_tokens = np.asarray(row_tokens)
    if len(row_tokens) == 0:
        return 0.0
    return float(row_tokens.sum() / (len(row_tokens) * max_length))


def _log_packing(stats: PackingStats, max_length: int, strategy: str, documents: int) -> None:
    if stats.tokens_truncated:
        logger.warning(
            "packing (bfd) cut %d documents longer than max_length=%d, losing %d tokens; "
            "packing_strategy='bfd_split' keeps them as several documents instead",
            stats.truncated,
            max_length,
            stats.tokens_truncated,
        )
    if stats.split_documents:
        logger.info(
            "packing (%s) split %d documents across rows of max_length=%d",
            strategy,
            stats.split_documents,
            max_length,
        )
    logger.info(
        "packed %d documents into %d rows of max_length=%d (%s): efficiency %.1f%%",
        documents,
        stats.rows,
        max_length,
        strategy,
        100 * stats.efficiency,
    )
