"""Collators: the docstring batches exactly, and properties over random packed rows."""

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tunesmith.data import collate
from tunesmith.data.collate import PaddedCollator, PaddingFreeCollator, num_supervised_tokens, shift_labels

A, B, C, D, E, F, G, P = 11, 12, 13, 14, 15, 16, 17, 0
X = -100


def test_docstring_examples_hold():
    result = doctest.testmod(collate)
    assert (
        result.attempted == 3 and result.failed == 0
    )  # shift_labels, position_ids_for, num_supervised_tokens


def test_padded_collator_docstring_batch():
    rows = [
        {"input_ids": [A, B, C], "labels": [A, B, C], "seq_lengths": [2, 1]},
        {"input_ids": [D, E, F, G], "labels": [X, E, F, G]},  # no seq_lengths: one document
    ]
    batch = PaddedCollator(pad_token_id=P)(rows)
    assert batch["input_ids"].tolist() == [[A, B, C, P], [D, E, F, G]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0], [0, 1, 2, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[A, B, C, X], [X, E, F, G]]
    # b's next token c starts another document, so b has no target
    assert batch["shift_labels"].tolist() == [[B, X, X, X], [E, F, G, X]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert num_supervised_tokens(batch) == 4


def test_padded_collator_left_padding_and_multiple():
    rows = [{"input_ids": [A, B], "labels": [A, B]}, {"input_ids": [C, D, E], "labels": [X, D, E]}]
    batch = PaddedCollator(pad_token_id=P, pad_to_multiple_of=4, padding_side="left")(rows)
    # longest is 3, rounded up to 4
    assert batch["input_ids"].tolist() == [[P, P, A, B], [P, C, D, E]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 2]]
    assert batch["labels"].tolist() == [[X, X, A, B], [X, X, D, E]]
    # the last padding position must not be asked to predict the first real token
    assert batch["shift_labels"].tolist() == [[X, X, B, X], [X, D, E, X]]


def test_padding_free_collator_docstring_batch():
    rows = [
        {"input_ids": [A, B, C], "labels": [X, B, C]},
        {"input_ids": [D, E, F], "labels": [D, E, F], "seq_lengths": [2, 1]},
    ]
    batch = PaddingFreeCollator()(rows)
    assert batch["input_ids"].tolist() == [[A, B, C, D, E, F]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert batch["labels"].tolist() == [[X, B, C, D, E, F]]
    assert batch["shift_labels"].tolist() == [[B, C, X, E, X, X]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 6] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 6] and batch["cu_seq_lens_k"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 3
    assert "attention_mask" not in batch


def test_rows_without_labels_train_every_token():
    batch = PaddingFreeCollator()([{"input_ids": [A, B]}])
    assert batch["labels"].tolist() == [[A, B]] and batch["shift_labels"].tolist() == [[B, X]]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"input_ids": [A, B], "labels": [A]}, "2 input_ids but 1 labels"),
        ({"input_ids": [A, B], "labels": [A, B], "seq_lengths": [1, 2]}, r"seq_lengths \[1, 2\] add up to 3"),
    ],
)
def test_malformed_rows_are_explained(row, message):
    with pytest.raises(ValueError, match=message):
        PaddingFreeCollator()([row])


# ---- properties ---------------------------------------------------------------------------

documents = st.lists(
    st.lists(st.tuples(st.integers(20, 99), st.booleans()), min_size=1, max_size=8), min_size=1, max_size=4
)
rows_strategy = st.lists(documents, min_size=1, max_size=5)


def _rows(raw):
    """raw: rows -> documents -> (token, trained) pairs."""
    rows = []
    for docs in raw:
        ids = [t for doc in docs for t, _ in doc]
        labels = [t if trained else X for doc in docs for t, trained in doc]
        rows.append({"input_ids": ids, "labels": labels, "seq_lengths": [len(doc) for doc in docs]})
    return rows


def _reference_targets(raw):
    """Naive, per document: target of token i is token i+1's label inside the document."""
    out = []
    for docs in raw:
        row = []
        for doc in docs:
            labels = [t if trained else X for t, trained in doc]
            row.extend(labels[1:] + [X])
        out.append(row)
    return out


@settings(max_examples=40, deadline=None)
@given(raw=rows_strategy)
def test_padding_free_matches_per_document_reference(raw):
    batch = PaddingFreeCollator()(_rows(raw))
    flat_docs = [doc for docs in raw for doc in docs]
    expected_targets = [t for row in _reference_targets(raw) for t in row]
    assert batch["shift_labels"].tolist() == [expected_targets]
    # positions restart at every document start
    assert batch["position_ids"].tolist() == [[i for doc in flat_docs for i in range(len(doc))]]
    lengths = [len(doc) for doc in flat_docs]
    assert batch["cu_seq_lens_q"].tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert batch["max_length_q"] == max(lengths)
    assert num_supervised_tokens(batch) == sum(t != X for t in expected_targets)


@settings(max_examples=40, deadline=None)
@given(raw=rows_strategy, side=st.sampled_from(["left", "right"]), multiple=st.sampled_from([None, 1, 3, 8]))
def test_padded_matches_per_document_reference(raw, side, multiple):
    batch = PaddedCollator(pad_token_id=P, pad_to_multiple_of=multiple, padding_side=side)(_rows(raw))
    longest = max(sum(len(doc) for doc in docs) for docs in raw)
    width = longest if not multiple else -(-longest // multiple) * multiple
    assert batch["input_ids"].shape == (len(raw), width)
    for b, (docs, targets) in enumerate(zip(raw, _reference_targets(raw))):
        n = len(targets)
        real = slice(width - n, width) if side == "left" else slice(0, n)
        pad = [i for i in range(width) if not (real.start <= i < real.stop)]
        assert batch["shift_labels"][b, real].tolist() == targets
        assert batch["attention_mask"][b, real].tolist() == [1] * n
        assert batch["position_ids"][b, real].tolist() == [i for doc in docs for i in range(len(doc))]
        # padding: never a target, never attended, pad token in input_ids
        assert all(batch["shift_labels"][b, i] == X and batch["labels"][b, i] == X for i in pad)
        assert all(batch["attention_mask"][b, i] == 0 and batch["input_ids"][b, i] == P for i in pad)


@settings(max_examples=50, deadline=None)
@given(raw=rows_strategy)
def test_shift_labels_never_crosses_a_boundary(raw):
    rows = _rows(raw)
    labels = torch.tensor([[t for t in row["labels"]] for row in rows[:1]])
    shifted = shift_labels(labels, [rows[0]["seq_lengths"]])
    ends = torch.cumsum(torch.tensor(rows[0]["seq_lengths"]), 0) - 1
    # the last token of every document has no target
    assert (shifted[0, ends] == X).all()


def test_padding_free_collator_pads_to_a_multiple_with_a_segment_that_trains_nothing():
    # 3 + 3 tokens padded to 8: two pad tokens form a document of their own (positions restart,
    # cu_seq_lens gains an entry), carry no label and are counted in padding_tokens.
    rows = [
        {"input_ids": [A, B, C], "labels": [X, B, C]},
        {"input_ids": [D, E, F], "labels": [D, E, F], "seq_lengths": [2, 1]},
    ]
    batch = PaddingFreeCollator(pad_token_id=0, pad_to_multiple_of=8)(rows)
    assert batch["input_ids"].tolist() == [[A, B, C, D, E, F, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert batch["labels"].tolist() == [[X, B, C, D, E, F, X, X]]
    assert batch["shift_labels"].tolist() == [[B, C, X, E, X, X, X, X]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 8]
    assert batch["padding_tokens"] == 2
    # already a multiple: nothing added, and the batch is the unpadded one
    exact = PaddingFreeCollator(pad_token_id=0, pad_to_multiple_of=3)(rows)
    plain = PaddingFreeCollator()(rows)
    assert exact["padding_tokens"] == plain["padding_tokens"] == 0
    assert exact["input_ids"].tolist() == plain["input_ids"].tolist()
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive int"):
        PaddingFreeCollator(pad_to_multiple_of=0)
