"""Images and text in one SFT example: load, check, render, mask, and collate through the processor.

The pieces of one example (detection, images, rendering, labels) are vision_examples.py; this module
runs them over a dataset (`prepare_vision_dataset`) and collates batches (`VisionCollator`). The text
path tokenizes once and caches; a vision-language model's processor decides how many tokens an
image becomes (its size, tiling, resolution), so here the *text* side is rendered and masked once, and the
processor runs on the fly, per batch, in `VisionCollator`:

    raw example ─► vision_example ─► render (chat template) ─► check placeholders ─► processor (per batch)
    (messages +      messages whose    text + its tokens with        one per image       input_ids with image
     images, or      content is parts  the trained (assistant)                           tokens expanded,
     prompt /        + image refs      tokens marked                                     pixel tensors; labels
     completion)                                                                         from `expand_labels`

Accepted examples (TRL's vision formats):

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}],
     "images": [<PIL image> | "img/1.png" | {"bytes": b"...", "path": ...}]}
    {"prompt": [...messages...] or "text", "completion": [...messages...] or "text", "images": [...]}
    ... or a single image in an `image` column.

Image paths are relative to the data file's folder. An example without `{"type": "image"}` parts gets
them at the start of its first user turn (as TRL does); otherwise the placeholders must match the images
one to one. Only assistant turns (or the completion) are trained: image tokens, padding and the prompt
never are. An example whose processed length exceeds `max_length` is dropped and counted (cutting it
would cut through an image's tokens, which the model cannot run).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.common import IGNORE_INDEX
from tunesmith.data.sources import DataError, describe_source
from tunesmith.data.stats import length_summary

# the pieces of an example, re-exported here: callers import the whole vision path from this module
from tunesmith.data.vision_examples import (  # noqa: F401
    IMAGE_COLUMNS,
    RowImage,
    VisionExample,
    _image_ref,
    _tokenizer,
    expand_labels,
    is_processor,
    is_vision_example,
    load_image,
    placeholder_token_id,
    render,
    vision_example,
)

logger = logging.getLogger("tunesmith.data")

# --------------------------------------------------------------------------- preparation


@dataclass
class VisionStats:
    """What `prepare_vision_dataset` did (the vision counterpart of `pipeline.DataStats`)."""

    source: str = ""
    format: str = "vision"
    examples_in: int = 0
    examples_out: int = 0
    images: int = 0
    image_tokens: int = 0  # tokens the processor made of the images
    tokens: int = 0  # all tokens of the examples kept, image tokens included
    supervised_tokens: int = 0
    dropped: dict | None = None
    max_length: int | None = None
    # processed lengths (images expanded) before dropping, as pipeline.DataStats has them
    length_histogram: dict | None = None
    length_percentiles: dict | None = None

    def summary(self) -> str:
        lines = [f"data: {self.source} ({self.format})"]
        lines.append(f"  examples: {self.examples_in} in, {self.examples_out} out")
        for reason, count in (self.dropped or {}).items():
            if count:
                lines.append(f"  dropped: {count} examples ({reason.replace('_', ' ')})")
        lines.append(f"  images: {self.images} ({self.image_tokens} image tokens)")
        share = f" ({100 * self.supervised_tokens / self.tokens:.1f}%)" if self.tokens else ""
        lines.append(f"  tokens: {self.tokens}, of which trained: {self.supervised_tokens}{share}")
        lines.append(f"  rows: {self.examples_out} (not packed; images are processed per batch)")
        if self.length_percentiles:
            p = self.length_percentiles
            lines.append(f"  example length: median {p['p50']}, p90 {p['p90']}, max {p['max']} tokens")
        return "\n".join(lines)


class VisionDataset(torch.utils.data.Dataset):
    """Prepared vision examples: each row a dict with `text`, `text_ids`, `trained`, `images` (PIL / bytes /
    absolute paths), `length` (processed tokens), `image_tokens`, `image_sizes` and `example_index`."""

    def __init__(self, rows: list[dict], stats: VisionStats):
        self.rows, self.stats = rows, stats

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _rows_and_base_dir(source, split):
    """(iterable of raw examples, folder that relative image paths are read from)."""
    if isinstance(source, list):
        return source, Path.cwd()
    if isinstance(source, torch.utils.data.Dataset) and isinstance(source, VisionDataset):
        return source.rows, None
    from tunesmith.data.sources import load_source

    base = Path.cwd()
    if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
        path = Path(source)
        base = path if path.is_dir() else path.parent
    return load_source(source, split=split), base


def prepare_row(raw: dict, processor, *, where: str, base_dir=None, chat_template=None, lazy=None):
    """One raw example -> (prepared row, its labels over the processed tokens): normalised, images opened
    (errors name `where`), rendered, placeholders checked, processed once for its length and labels.
    `lazy(j)`, when given, is what the row keeps for image j (a `RowImage`) instead of the decoded image."""
    example = vision_example(raw, where)
    refs = [
        _image_ref(value, base_dir, f"{where}, image {j}", lazy(j) if lazy else None)
        for j, value in enumerate(example.images)
    ]
    text, ids, trained = render(processor, example, chat_template=chat_template, where=where)
    placeholder = placeholder_token_id(processor)
    found = ids.count(placeholder)
    if found != len(refs):
        raise DataError(
            f"{where}: the chat template wrote {found} image placeholder(s) for {len(refs)} image(s); "
            "use the model's processor (its chat template renders {'type': 'image'} parts)"
        )
    images = [image for _, image in refs]
    expanded = _process(processor, [text], [images] if images else None)["input_ids"][0].tolist()
    labels = expand_labels(ids, trained, expanded, placeholder, where=where)
    row = {
        "text": text,
        "text_ids": ids,
        "trained": trained,
        "images": [ref for ref, _ in refs],
        "image_sizes": [image.size for _, image in refs],
        "length": len(expanded),
        "image_tokens": len(expanded) - len(ids) + len(refs),
    }
    return row, labels


def prepare_vision_dataset(
    source, processor, *, max_length: int | None = 1024, chat_template=None, split=None
) -> VisionDataset:
    """Normalise, check and render every example of `source`; measure its processed length and drop (and
    count) those longer than `max_length`. The images are opened here (errors name the example) but kept as
    given; the processor runs again per batch in `VisionCollator`."""
    import datasets

    rows_in, base_dir = _rows_and_base_dir(source, split)
    lazy_rows = isinstance(rows_in, datasets.Dataset)  # decoded images are re-read from it, not kept
    if isinstance(rows_in, datasets.IterableDataset):
        logger.warning(
            "%s: a streamed vision data set is read in full once here (every image opened and measured) and kept "
            "in memory; vision data is not streamed",
            describe_source(source),
        )
    name = describe_source(source)
    placeholder_token_id(processor)  # not an image-text processor: say so before reading anything
    stats = VisionStats(
        source=name, max_length=max_length, dropped={"longer_than_max_length": 0, "no_trained_token": 0}
    )
    rows, lengths = [], []
    for index, raw in enumerate(rows_in):
        stats.examples_in += 1
        raw = dict(raw)
        column = next((c for c in IMAGE_COLUMNS if raw.get(c) not in (None, [])), None)
        lazy = functools.partial(RowImage, rows_in, index, column) if column and lazy_rows else None
        row, labels = prepare_row(
            raw,
            processor,
            where=f"{name}: example {index}",
            base_dir=base_dir,
            chat_template=chat_template,
            lazy=lazy,
        )
        row["example_index"] = index
        supervised = sum(label != IGNORE_INDEX for label in labels)
        lengths.append(row["length"])
        if max_length is not None and row["length"] > max_length:
            stats.dropped["longer_than_max_length"] += 1
            continue
        if supervised == 0:
            stats.dropped["no_trained_token"] += 1
            continue
        rows.append(row)
        stats.images += len(row["images"])
        stats.image_tokens += row["image_tokens"]
        stats.tokens += row["length"]
        stats.supervised_tokens += supervised
    stats.examples_out = len(rows)
    import numpy as np

    stats.length_histogram, stats.length_percentiles = length_summary(np.array(lengths, dtype=np.int64))
    if stats.dropped["longer_than_max_length"]:
        logger.warning(
            "%s: dropped %d example(s) longer than max_length=%s after image expansion (cutting one would cut "
            "through an image); raise max_length, or set it to None",
            name,
            stats.dropped["longer_than_max_length"],
            max_length,
        )
    if not rows:
        raise DataError(
            f"{name}: no example is left to train on ({stats.examples_in} read; dropped: {stats.dropped}); "
            f"check max_length={max_length} and that every example has an assistant turn or a completion"
        )
    logger.info("%s", stats.summary())
    return VisionDataset(rows, stats)


def _process(processor, texts: list[str], images, **kwargs) -> dict:
    # The chat template writes the special tokens (bos) itself, as on the text path.
    return processor(text=texts, images=images, return_tensors="pt", add_special_tokens=False, **kwargs)


# --------------------------------------------------------------------------- generation and display


def generation_inputs(processor, messages: list[dict], images: Sequence, chat_template_kwargs=None) -> dict:
    """The processor's model inputs for generating the next assistant turn of `messages` with `images`
    (PIL images or paths), normalised as in training (`vision_example`); `chat_template_kwargs` are
    template variables."""
    example = vision_example({"messages": messages, "images": list(images)}, "prompt")
    loaded = [load_image(value, where=f"image {j}") for j, value in enumerate(example.images)]
    tokenizer = _tokenizer(processor)
    template = resolve_chat_template_of(processor)
    text = tokenizer.apply_chat_template(
        example.messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
        **(chat_template_kwargs or {}),
    )
    return dict(_process(processor, [text], [loaded] if loaded else None))


def resolve_chat_template_of(processor):
    from tunesmith.data.templates import resolve_chat_template

    return resolve_chat_template(
        _tokenizer(processor), chat_template=getattr(processor, "chat_template", None)
    )


def image_token_counts(processor, images: Sequence) -> list[int]:
    """How many tokens the processor makes of each image (one call per image; for display)."""
    counts = []
    for image in images:
        alone = _process(processor, [processor.image_token], [[load_image(image)]])["input_ids"].shape[1]
        counts.append(int(alone))
    return counts


def render_row(processor, row: dict, render_tokens) -> str:
    """A prepared row as text with each image as `[image 1: 448×448 -> 256 tokens]` and the trained tokens
    shown by `render_tokens(ids, labels)` (the CLI's colours or [[...]] markers)."""
    placeholder = placeholder_token_id(processor)
    ids, trained = row["text_ids"], row["trained"]
    counts = image_token_counts(processor, row["images"])
    pieces, start, k = [], 0, 0
    for end in [i for i, t in enumerate(ids) if t == placeholder] + [len(ids)]:
        chunk = ids[start:end]
        labels = [t if flag else IGNORE_INDEX for t, flag in zip(chunk, trained[start:end])]
        if chunk:
            pieces.append(render_tokens(chunk, labels))
        if end < len(ids):
            w, h = row["image_sizes"][k]
            pieces.append(f"[image {k + 1}: {w}×{h} → {counts[k]} tokens]")
            k += 1
        start = end + 1
    return "".join(pieces)


# --------------------------------------------------------------------------- batches


class VisionCollator:
    """Rows of a `VisionDataset` -> a padded batch from the processor, with labels and shift_labels.

    The batch holds whatever the processor gives the model (`input_ids`, `attention_mask`, `pixel_values`,
    and per family `image_grid_thw`, `pixel_attention_mask`, `token_type_ids`, `image_sizes`, ...), right
    padded, plus `labels` (B, T) (-100 on image tokens, padding and the prompt) and `shift_labels`.
    """

    def __init__(self, processor, pad_to_multiple_of: int | None = None):
        self.processor = processor
        self.pad_to_multiple_of = pad_to_multiple_of
        self.placeholder = placeholder_token_id(processor)

    def __call__(self, rows: Sequence[dict]) -> dict:
        from tunesmith.data.collate import shift_labels

        images = [[load_image(ref) for ref in row["images"]] for row in rows]
        extra = {"pad_to_multiple_of": self.pad_to_multiple_of} if self.pad_to_multiple_of else {}
        batch = dict(
            _process(
                self.processor,
                [row["text"] for row in rows],
                images if any(images) else None,
                padding=True,
                padding_side="right",
                **extra,
            )
        )
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for b, row in enumerate(rows):
            length = int(mask[b].sum())
            expanded = input_ids[b, :length].tolist()
            where = f"example {row.get('example_index', b)}"
            row_labels = expand_labels(
                row["text_ids"], row["trained"], expanded, self.placeholder, where=where
            )
            labels[b, :length] = torch.tensor(row_labels, dtype=labels.dtype)
        batch["labels"] = labels
        batch["shift_labels"] = shift_labels(labels, [[labels.shape[1]]] * labels.shape[0])
        return batch


class UnslothVisionDataCollator:
    """Unsloth's name for a collator of *raw* vision rows (its scripts pass it with
    `dataset_kwargs={"skip_prepare_dataset": True}`): each batch's rows are normalised, checked, rendered
    and masked here (`prepare_row`), then batched by `VisionCollator`. Unlike Unsloth's, it trains the
    assistant turns only (as tunesmith's vision path does everywhere); Unsloth-only options are accepted
    and ignored. Rows longer than `max_seq_length` are an error here (a collator cannot drop them; the
    trainer's own preparation drops and counts them instead)."""

    def __init__(self, model, processor, formatting_func=None, max_seq_length=None, **unsloth_options):
        if formatting_func is not None:
            raise ValueError(
                "UnslothVisionDataCollator: formatting_func is not supported; give TRL-format rows"
            )
        if unsloth_options:
            logger.info("UnslothVisionDataCollator: ignoring %s", sorted(unsloth_options))
        self.processor, self.max_length = processor, max_seq_length
        self.collator = VisionCollator(processor)

    def __call__(self, examples: Sequence[dict]) -> dict:
        rows = []
        for i, raw in enumerate(examples):
            row, _ = prepare_row(dict(raw), self.processor, where=f"batch example {i}")
            if self.max_length is not None and row["length"] > self.max_length:
                raise DataError(
                    f"batch example {i}: {row['length']} tokens once its images are expanded, more than "
                    f"max_seq_length={self.max_length}; cutting it would cut through an image"
                )
            rows.append(row)
        return self.collator(rows)
