"""Batches from tokenized or packed rows: padded, or padding-free (one flat row).

Both collators take rows `{"input_ids", "labels"?, "seq_lengths"?}` (a row without
`seq_lengths` is one document; a row without `labels` trains every token) and emit the
batch of docs/ARCHITECTURE.md, including `shift_labels`, which only `shift_labels()` below
computes: it is the one place in tunesmith where labels are shifted.

    What the model is asked to predict, for a row holding two documents [a b c] [d e]
    (labels -100 on `a` and `d`, the prompts):

        input_ids      a    b    c    d    e
        position_ids   0    1    2    0    1
        labels        -100  b    c   -100  e        (unshifted, Hugging Face convention)
        shift_labels   b    c   -100  e   -100      (target at t = token t+1 of the same document)

    `c` is the last token of its document, so it predicts nothing (-100), not `d`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tunesmith.common import IGNORE_INDEX


def shift_labels(labels: torch.Tensor, seq_lengths: Sequence[Sequence[int]]) -> torch.Tensor:
    """The training targets: `labels` moved one step left, never across a document boundary.

    labels (B, T) unshifted; `seq_lengths[b]` lists the lengths of the consecutive segments
    of row b from its first position (documents, and a left-padding segment if any). Tokens
    after the listed segments form one more segment (right padding). Position t of the
    result holds `labels[b, t + 1]` when t + 1 is in the same segment as t, else -100. So
    the last token of every document, and of the row, has no target.

        labels        [-100, 7, 8, -100, 9]     seq_lengths [[3, 2]]
        shift_labels  [7, 8, -100, 9, -100]

    >>> shift_labels(torch.tensor([[-100, 7, 8, -100, 9]]), [[3, 2]]).tolist()
    [[7, 8, -100, 9, -100]]
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (batch, time), got shape {tuple(labels.shape)}")
    batch, time = labels.shape
    if len(seq_lengths) != batch:
        raise ValueError(f"seq_lengths has {len(seq_lengths)} rows but labels has {batch}")
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    rows, ends = [], []
    for b, lengths in enumerate(seq_lengths):
        end = 0
        for length in lengths:
            end += int(length)
            if end > time:
                raise ValueError(
                    f"row {b}: seq_lengths {list(lengths)} add up to more than the row's {time} tokens"
                )
            if length:
                rows.append(b)
                ends.append(end - 1)  # last token of this segment: its "next token" is in another one
    if rows:
        shifted[torch.tensor(rows), torch.tensor(ends)] = IGNORE_INDEX
    return shifted


def position_ids_for(seq_lengths: Sequence[int], total: int | None = None) -> torch.Tensor:
    """Positions that restart at 0 at every document start; tokens after the documents count on.

    >>> position_ids_for([3, 2]).tolist()
    [0, 1, 2, 0, 1]
    """
    lengths = torch.tensor([int(n) for n in seq_lengths if n], dtype=torch.long)
    used = int(lengths.sum()) if len(lengths) else 0
    total = used if total is None else total
    positions = torch.arange(total, dtype=torch.long)
    if len(lengths):
        starts = torch.cumsum(lengths, 0) - lengths
        positions[:used] -= torch.repeat_interleave(starts, lengths)
    if total > used:
        positions[used:] -= used
    return positions


def num_supervised_tokens(batch: dict) -> int:
    """How many positions have a training target (shift_labels != -100).

    >>> num_supervised_tokens({"shift_labels": torch.tensor([[7, 8, -100]])})
    2
    """
    return int((batch["shift_labels"] != IGNORE_INDEX).sum())


def _row(example: dict) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One row as (input_ids (T,), labels (T,), document lengths)."""
    input_ids = torch.as_tensor(example["input_ids"], dtype=torch.long).reshape(-1)
    labels = example.get("labels")
    labels = input_ids.clone() if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.shape != input_ids.shape:
        raise ValueError(f"a row has {len(input_ids)} input_ids but {len(labels)} labels; they must match")
    seq_lengths = example.get("seq_lengths")
    seq_lengths = [len(input_ids)] if seq_lengths is None else [int(n) for n in seq_lengths]
    if sum(seq_lengths) != len(input_ids):
        raise ValueError(
            f"a row has {len(input_ids)} tokens but seq_lengths {seq_lengths} add up to {sum(seq_lengths)}"
        )
    return input_ids, labels, seq_lengths


class PaddedCollator:
    """Pad rows to the longest in the batch (rounded up to `pad_to_multiple_of`).

    Rows [a b] [c] (packed: two documents) and [d e f g] (labels -100 on the prompt d),
    pad token P, padding_side="right":

        row 0:  input_ids       a     b     c     P
                position_ids    0     1     0     0      padding is a segment of its own
                attention_mask  1     1     1     0
                labels          a     b     c   -100
                shift_labels    b   -100  -100  -100
        row 1:  input_ids       d     e     f     g
                position_ids    0     1     2     3
                attention_mask  1     1     1     1
                labels        -100    e     f     g
                shift_labels    e     f     g   -100

    With padding_side="left" the padding comes first (row 0 = P a b c) and the rest is the same.

    Documents packed in one padded row are separated in `position_ids` and `shift_labels`
    but share `attention_mask`; only an attention that reads document boundaries (the
    padding-free collator's `cu_seq_lens_*`) keeps them from seeing each other, so packed
    data belongs with `PaddingFreeCollator`.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, padding_side: str = "right"):
        if pad_token_id is None:
            raise ValueError(
                "PaddedCollator needs a pad_token_id (set tokenizer.pad_token, e.g. to the eos token)"
            )
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        rows = [_row(example) for example in examples]
        time = max(len(ids) for ids, _, _ in rows)
        if self.pad_to_multiple_of:
            time = -(-time // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(rows)
        input_ids = torch.full((batch, time), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, time), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, time), dtype=torch.long)
        position_ids = torch.zeros((batch, time), dtype=torch.long)
        segments = []
        for b, (ids, row_labels, seq_lengths) in enumerate(rows):
            n, pad = len(ids), time - len(ids)
            real = slice(pad, time) if self.padding_side == "left" else slice(0, n)
            input_ids[b, real] = ids
            labels[b, real] = row_labels
            attention_mask[b, real] = 1
            if self.padding_side == "left":
                position_ids[b, real] = position_ids_for(seq_lengths)
                segments.append([pad, *seq_lengths])  # the padding is a segment of its own
            else:
                position_ids[b] = position_ids_for(seq_lengths, time)
                segments.append(seq_lengths)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "labels": labels,
            "shift_labels": shift_labels(labels, segments),
        }


class PaddingFreeCollator:
    """Concatenate all rows of the batch into one row (1, N): no padding at all.

    Every document keeps its boundaries: `position_ids` restart at 0, `cu_seq_lens_q/k`
    (int32, cumulative document lengths) and `max_length_q/k` (longest document) tell a
    variable-length attention where each document starts, and `shift_labels` never asks
    the last token of a document to predict the next document's first.

    Rows [a b c] (labels -100 on a) and, packed, [d e] [f]:

        input_ids     a     b    c    d    e    f           shape (1, 6)
        position_ids  0     1    2    0    1    0
        labels       -100   b    c    d    e    f
        shift_labels  b     c  -100   e  -100 -100
        cu_seq_lens_q = cu_seq_lens_k = [0, 3, 5, 6]   max_length_q = max_length_k = 3
        padding_tokens = 0

    With `pad_to_multiple_of` the row is completed to a multiple of it by a segment of
    `pad_token_id` that is a document of its own, trains nothing and is counted in
    `padding_tokens`. On the CPU the trainer pads to 64s: the matrix libraries cache one kernel per
    shape, and rows of ever-new lengths fill those caches (memory) and keep building kernels (time).
    """

    def __init__(self, pad_token_id: int | None = None, pad_to_multiple_of: int | None = None):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict]) -> dict:
        rows = [_row(example) for example in examples]
        seq_lengths = [n for _, _, lengths in rows for n in lengths if n]
        pieces = [(ids, row_labels) for ids, row_labels, _ in rows]
        padding = 0
        if self.pad_to_multiple_of:
            total = sum(seq_lengths)
            padding = -(-total // self.pad_to_multiple_of) * self.pad_to_multiple_of - total
        if padding:  # one more segment of its own: attended alone, never trained
            pieces.append((torch.full((padding,), self.pad_token_id), torch.full((padding,), IGNORE_INDEX)))
            seq_lengths.append(padding)
        input_ids = torch.cat([ids for ids, _ in pieces]).unsqueeze(0)  # (1, N)
        labels = torch.cat([row_labels for _, row_labels in pieces]).unsqueeze(0)  # (1, N)
        lengths = torch.tensor(seq_lengths, dtype=torch.int32)
        cu_seq_lens = torch.zeros(len(seq_lengths) + 1, dtype=torch.int32)
        cu_seq_lens[1:] = torch.cumsum(lengths, 0, dtype=torch.int32)
        longest = max(seq_lengths, default=0)
        return {
            "input_ids": input_ids,
            "position_ids": position_ids_for(seq_lengths).unsqueeze(0),
            "labels": labels,
            "shift_labels": shift_labels(labels, [seq_lengths]),
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens.clone(),
            "max_length_q": longest,
            "max_length_k": longest,
            "padding_tokens": padding,
        }
