"""Truncation and packing: worked examples, counts, and properties over random datasets."""

import doctest
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunesmith.data import packing, truncation
from tunesmith.data.packing import bfd_bins, pack, packing_efficiency, split_long, truncate


def test_docstring_examples_hold():
    # the worked examples in the docstrings are part of the contract
    results = [doctest.testmod(module) for module in (packing, truncation)]
    assert sum(r.attempted for r in results) >= 10 and sum(r.failed for r in results) == 0


def _examples(lengths, prompt=1):
    """Example i has tokens 1000*i + position (unique, so loss/duplication shows); the first
    `prompt` tokens are untrained."""
    rows = []
    for i, n in enumerate(lengths):
        ids = [1000 * i + t for t in range(n)]
        rows.append({"input_ids": ids, "labels": [-100 if t < prompt else x for t, x in enumerate(ids)]})
    return rows


# ---- truncation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, expected_ids, truncated, dropped",
    [
        # keep_start keeps tokens 0..3 of the 6-token example
        ("keep_start", [[0, 1], [1000, 1001, 1002, 1003]], 1, 0),
        # keep_end keeps the last 4: 1002..1005
        ("keep_end", [[0, 1], [1002, 1003, 1004, 1005]], 1, 0),
        # drop removes the overlong example entirely
        ("drop", [[0, 1]], 0, 1),
    ],
)
def test_truncation_modes_count_and_log(mode, expected_ids, truncated, dropped, caplog):
    caplog.set_level(logging.INFO, logger="tunesmith.data")
    table, stats = truncate(_examples([2, 6]), max_length=4, truncation_mode=mode)
    assert [row["input_ids"] for row in table.to_pylist()] == expected_ids
    assert (stats.truncated, stats.dropped_overlong, stats.examples_out) == (truncated, dropped, 2 - dropped)
    # 6 tokens, max 4: 2 tokens cut (keep_*) or the 6 tokens of the dropped example
    assert stats.tokens_truncated == (2 if truncated else 0)
    assert stats.tokens_dropped == (6 if dropped else 0)
    message = (
        "truncated 1 of 2 examples to max_length=4" if truncated else "dropped 1 of 2 examples longer than"
    )
    assert message in caplog.text


def test_examples_without_trained_tokens_are_dropped_and_counted(caplog):
    caplog.set_level(logging.INFO, logger="tunesmith.data")
    # example 0: prompt of 3 tokens then 2 trained -> keep_start at 3 leaves only prompt -> dropped
    # example 1: all -100 from the start -> dropped; example 2: fine
    rows = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, -100, 4, 5]},
        {"input_ids": [6, 7], "labels": [-100, -100]},
        {"input_ids": [8, 9], "labels": [-100, 9]},
    ]
    table, stats = truncate(rows, max_length=3)
    assert table.to_pylist() == [{"input_ids": [8, 9], "labels": [-100, 9]}]
    assert (stats.truncated, stats.dropped_no_supervised, stats.examples_out) == (1, 2, 1)
    assert stats.tokens_dropped == 5 + 2  # counted at their original lengths
    assert "dropped 2 of 3 examples with no trained token" in caplog.text


def test_truncation_rejects_mismatched_labels_with_the_example_index():
    with pytest.raises(ValueError, match="example 1: input_ids has 2 tokens but labels has 1"):
        truncate([{"input_ids": [1], "labels": [1]}, {"input_ids": [1, 2], "labels": [2]}], max_length=4)


def test_no_max_length_keeps_everything():
    table, stats = truncate(_examples([3, 50]), max_length=None)
    assert [len(r["input_ids"]) for r in table.to_pylist()] == [3, 50]
    assert stats.truncated == 0 and stats.dropped == 0


# ---- best-fit decreasing -----------------------------------------------------------------


def test_bfd_worked_example():
    # 9 -> row 0 (room 1); 7 -> row 1 (room 3); 5 -> row 2 (room 5);
    # 3 -> row 1 (room 3 is the tightest fit) ; 1 -> row 0 (room 1)
    assert bfd_bins([3, 9, 5, 7, 1], 10).tolist() == [1, 0, 2, 1, 0]


def test_bfd_is_deterministic_and_matches_a_naive_best_fit():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=500)
    rows = bfd_bins(lengths, 64)
    # naive O(n^2) best fit decreasing with the same tie rules: longest first (stable),
    # tightest room, among equal rooms the row that got that room most recently
    rooms, by_room, naive = [], {}, np.empty(len(lengths), int)
    for i in np.argsort(-lengths, kind="stable"):
        fits = [r for r, stack in by_room.items() if stack and r >= lengths[i]]
        if fits:
            row = by_room[min(fits)].pop()
        else:
            row = len(rooms)
            rooms.append(64)
        rooms[row] -= lengths[i]
        by_room.setdefault(rooms[row], []).append(row)
        naive[i] = row
    assert rows.tolist() == naive.tolist()


def test_bfd_rejects_an_item_longer_than_max_length():
    with pytest.raises(ValueError, match="item 1 has length 9"):
        bfd_bins([3, 9], 8)


# ---- packing: worked examples and counts ---------------------------------------------------


def test_bfd_truncates_overflow_and_logs(caplog):
    caplog.set_level(logging.INFO, logger="tunesmith.data")
    rows, stats = pack(_examples([7, 2]), max_length=4, packing_strategy="bfd")
    # example 0 is cut to 4 tokens (3 lost); example 1 fits in a row of its own (room 0 left)
    assert [r["input_ids"] for r in rows.to_pylist()] == [[0, 1, 2, 3], [1000, 1001]]
    assert (stats.truncated, stats.tokens_truncated, stats.rows) == (1, 3, 2)
    assert "cut 1 documents longer than max_length=4, losing 3 tokens" in caplog.text


def test_bfd_split_keeps_overflow_as_documents():
    rows, stats = pack(_examples([7, 2]), max_length=4, packing_strategy="bfd_split")
    # documents: pieces 4 and 3 of example 0, then example 1 (2). Longest first: 4 opens row 0
    # (room 0), 3 opens row 1 (room 1), 2 fits in neither and opens row 2.
    assert [(r["input_ids"], r["seq_lengths"]) for r in rows.to_pylist()] == [
        ([0, 1, 2, 3], [4]),
        ([4, 5, 6], [3]),
        ([1000, 1001], [2]),
    ]
    assert stats.split_documents == 1 and stats.tokens == 9
    assert split_long(np.array([9, 4, 0]), 4).tolist() == [4, 4, 1, 4, 0]


def test_wrapped_cuts_documents_across_rows():
    rows, stats = pack(_examples([3, 4, 1]), max_length=3, packing_strategy="wrapped")
    assert [(r["input_ids"], r["seq_lengths"]) for r in rows.to_pylist()] == [
        ([0, 1, 2], [3]),
        ([1000, 1001, 1002], [3]),
        ([1003, 2000], [1, 1]),
    ]
    assert stats.split_documents == 1  # example 1 crosses the cut after row 1
    assert stats.efficiency == pytest.approx(8 / 9)
    assert packing_efficiency([3, 3, 2], 3) == pytest.approx(8 / 9)


def test_already_packed_rows_are_refused():
    with pytest.raises(ValueError, match="example 0 is already packed"):
        pack({"input_ids": [[1, 2]], "seq_lengths": [[1, 1]]}, max_length=4)


# ---- packing: properties ------------------------------------------------------------------

datasets_of_lengths = st.lists(st.integers(min_value=1, max_value=40), min_size=0, max_size=60)


@settings(max_examples=60, deadline=None)
@given(
    lengths=datasets_of_lengths,
    max_length=st.integers(1, 32),
    strategy=st.sampled_from(["bfd_split", "wrapped"]),
)
def test_lossless_strategies_keep_every_token_once(lengths, max_length, strategy):
    examples = _examples(lengths)
    rows, stats = pack(examples, max_length=max_length, packing_strategy=strategy)
    rows = rows.to_pylist()
    for row in rows:
        assert len(row["input_ids"]) <= max_length
        assert sum(row["seq_lengths"]) == len(row["input_ids"]) == len(row["labels"])
        assert all(n > 0 for n in row["seq_lengths"])
    packed = [(t, lab) for row in rows for t, lab in zip(row["input_ids"], row["labels"])]
    original = [(t, lab) for ex in examples for t, lab in zip(ex["input_ids"], ex["labels"])]
    # nothing lost, nothing duplicated, every token keeps its own label
    assert sorted(packed) == sorted(original)
    assert stats.tokens == sum(lengths)
    if strategy == "wrapped":
        # wrapped keeps the order exactly and fills every row but the last
        assert packed == original
        assert all(len(row["input_ids"]) == max_length for row in rows[:-1])


@settings(max_examples=60, deadline=None)
@given(lengths=datasets_of_lengths, max_length=st.integers(1, 32))
def test_bfd_documents_are_intact_contiguous_spans(lengths, max_length):
    examples = _examples(lengths)
    rows, _ = pack(examples, max_length=max_length, packing_strategy="bfd_split")
    seen = []
    for row in rows.to_pylist():
        start = 0
        for n in row["seq_lengths"]:
            doc = row["input_ids"][start : start + n]
            start += n
            # one document = consecutive tokens of one example
            assert len({t // 1000 for t in doc}) == 1 and doc == list(range(doc[0], doc[0] + n))
            seen.append(doc)
    assert sum(len(d) for d in seen) == sum(lengths)
    # bfd is never worse than one row per piece, and rows are only opened when needed:
    # no two rows could be merged (their sum exceeds max_length) for the two emptiest rows
    totals = sorted(sum(r) for r in rows.to_pydict()["seq_lengths"])
    if len(totals) >= 2:
        assert totals[0] + totals[1] > max_length


@settings(max_examples=60, deadline=None)
@given(
    examples=st.lists(st.lists(st.tuples(st.integers(0, 50), st.booleans()), max_size=12), max_size=12),
    max_length=st.integers(1, 10),
    mode=st.sampled_from(["keep_start", "keep_end", "drop"]),
)
def test_truncate_matches_naive_slicing(examples, max_length, mode):
    rows = [
        {"input_ids": [t for t, _ in ex], "labels": [t if keep else -100 for t, keep in ex]}
        for ex in examples
    ]
    table, stats = truncate(rows, max_length=max_length, truncation_mode=mode)
    expected = []
    for row in rows:
        if len(row["input_ids"]) > max_length:
            if mode == "drop":
                continue
            cut = (
                slice(0, max_length)
                if mode == "keep_start"
                else slice(len(row["input_ids"]) - max_length, None)
            )
            row = {key: value[cut] for key, value in row.items()}
        if any(label != -100 for label in row["labels"]):
            expected.append(row)
    assert table.to_pylist() == expected
    assert stats.examples_out == len(expected)
    overlong = [r for r in rows if len(r["input_ids"]) > max_length]
    assert stats.truncated == (0 if mode == "drop" else len(overlong))
    assert stats.tokens_truncated == (
        0 if mode == "drop" else sum(len(r["input_ids"]) - max_length for r in overlong)
    )
    assert stats.examples_in == stats.examples_out + stats.dropped
