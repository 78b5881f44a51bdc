"""Images and text in one SFT example: load, check, render, mask, and collate through the processor.

The text path tokenizes once and caches; a vision-language model's processor decides how many tokens an
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
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.common import IGNORE_INDEX
from tunesmith.data.sources import DataError, describe_source

logger = logging.getLogger("tunesmith.data")

IMAGE_COLUMNS = ("images", "image")
# Tokens next to an image placeholder may tokenize differently once the processor expands it (Gemma 3
# writes "\n\n" around the image, which merges with a neighbouring newline): this many tokens on each side
# of a placeholder are not used to place the text in the expanded sequence (they are never trained).
_EDGE = 2


# --------------------------------------------------------------------------- detection


def is_vision_example(example: dict) -> bool:
    """True when an example carries images: an `images` / `image` column with a value, or image parts."""
    if any(example.get(col) not in (None, []) for col in IMAGE_COLUMNS):
        return True
    for field in ("messages", "prompt"):
        value = example.get(field)
        if isinstance(value, list):
            for msg in value:
                content = msg.get("content") if isinstance(msg, dict) else None
                if isinstance(content, list) and any(
                    isinstance(p, dict) and p.get("type") == "image" for p in content
                ):
                    return True
    return False


def is_processor(obj) -> bool:
    """A multimodal processor (has an image processor and a tokenizer), not a plain tokenizer."""
    return hasattr(obj, "image_processor") and hasattr(obj, "tokenizer")


# --------------------------------------------------------------------------- images


def load_image(value, *, base_dir: str | os.PathLike | None = None, where: str = "example"):
    """A PIL image (RGB) from a PIL image, a path (relative to `base_dir`), bytes, or a `datasets.Image`
    dict `{"bytes": ..., "path": ...}`. Errors name `where` and say what to fix."""
    from PIL import Image

    if isinstance(value, RowImage):
        value = value.load()
    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        source, name = io.BytesIO(value), f"{len(value)} bytes"
    elif isinstance(value, str) and value.startswith(("http://", "https://")):
        raise DataError(
            f"{where}: image {value!r} is a URL; tunesmith reads local files only (nothing is downloaded): "
            "download it and give its path"
        )
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.exists():
            relative = f" (relative paths are read from {base_dir})" if base_dir is not None else ""
            raise DataError(f"{where}: image file {str(path)!r} does not exist{relative}; fix the path")
        source, name = path, str(path)
    else:
        raise DataError(
            f"{where}: an image must be a PIL image, a file path, bytes or {{'bytes': ..., 'path': ...}}; "
            f"got {type(value).__name__}"
        )
    try:
        image = Image.open(source)
        image.load()
    except Exception as err:  # PIL raises several kinds (UnidentifiedImageError, OSError, ...)
        raise DataError(f"{where}: cannot read image {name}: {type(err).__name__}: {err}") from err
    return image.convert("RGB")


@dataclass(frozen=True)
class RowImage:
    """Image `j` of column `column` in row `index` of a `datasets.Dataset`, decoded when needed: a prepared
    vision dataset keeps this instead of the decoded image, so its memory does not grow with the images."""

    dataset: object
    index: int
    column: str
    j: int

    def load(self):
        value = self.dataset[self.index][self.column]
        return value[self.j] if self.column == "images" else value


def _image_ref(value, base_dir, where: str, lazy: RowImage | None = None):
    """(what the prepared dataset keeps for an image, the opened image). Kept: the PIL image or bytes as
    given, an absolute path, or `lazy` (a `RowImage`) for a decoded image of a `datasets.Dataset`. The
    image is opened here so that a missing or unreadable one is reported before training."""
    image = load_image(value, base_dir=base_dir, where=where)
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        return str(path if path.is_absolute() or base_dir is None else Path(base_dir) / path), image
    if lazy is not None and not isinstance(value, (bytes, bytearray)):
        return lazy, image
    return value, image


# --------------------------------------------------------------------------- examples


@dataclass
class VisionExample:
    """One normalised example: messages with content parts, the images in order, and which messages train."""

    messages: list[dict]
    images: list  # raw image values (PIL, path, bytes, datasets.Image dict)
    trained_from: int  # messages[i] with role "assistant" and i >= trained_from are trained


# keys under which an image part may hold its image inline ({"type": "image", "image": <PIL or path>})
_INLINE_KEYS = ("image", "path", "url")


def _parts(content, where: str, role: str, inline: list | None = None) -> list[dict]:
    """Content parts, normalised; the inline image of each image part (or None) is appended to `inline`."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise DataError(f"{where}: a {role} message's content must be a string or a list of parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise DataError(
                    f"{where}: {role} content part {j} has type 'text' but no string 'text' field"
                )
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            parts.append({"type": "image"})
            if inline is not None:
                inline.append(next((part[k] for k in _INLINE_KEYS if part.get(k) is not None), None))
        else:
            raise DataError(
                f"{where}: {role} content part {j} must be {{'type': 'image'}} or {{'type': 'text', 'text': ...}}, "
                f"got {part!r:.80}"
            )
    return parts


def _conversation(value, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user" if field == "prompt" else "assistant", "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
        raise DataError(
            f"{where}: {field!r} must be a list of messages ({{'role': ..., 'content': ...}}) or a string"
        )
    return value


def vision_example(example: dict, where: str = "example") -> VisionExample:
    """Normalise a raw vision example (messages or prompt/completion, `images` or `image`).

    >>> ex = vision_example({"prompt": "What is it?", "completion": "A square.", "image": "a.png"})
    >>> ex.messages  # doctest: +NORMALIZE_WHITESPACE
    [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'What is it?'}]},
     {'role': 'assistant', 'content': [{'type': 'text', 'text': 'A square.'}]}]
    >>> ex.images, ex.trained_from
    (['a.png'], 1)
    """
    if "messages" in example and example["messages"] is not None:
        raw, trained_from = _conversation(example["messages"], where, "messages"), 0
    elif "prompt" in example and "completion" in example:
        prompt = _conversation(example["prompt"], where, "prompt")
        completion = _conversation(example["completion"], where, "completion")
        raw, trained_from = prompt + completion, len(prompt)
    else:
        raise DataError(
            f"{where}: a vision example needs a `messages` column, or `prompt` and `completion`, next to "
            f"`images` (or `image`); it has {sorted(example)}"
        )
    images = example.get("images")
    if images is None:
        images = [] if example.get("image") is None else [example["image"]]
    elif not isinstance(images, (list, tuple)):
        images = [images]
    messages, inline = [], []
    for msg in raw:
        role = msg["role"]
        messages.append({"role": role, "content": _parts(msg.get("content"), where, role, inline)})
    given = [value for value in inline if value is not None]
    if given and images:
        raise DataError(
            f"{where}: images both inside the messages ({{'type': 'image', 'image': ...}}) and in `images`; "
            "give them in one place"
        )
    if given:
        images = given
    placeholders = sum(p["type"] == "image" for m in messages for p in m["content"])
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant" and any(p["type"] == "image" for p in msg["content"]):
            raise DataError(
                f"{where}: message {i} (assistant) holds an image; images go in user or system turns "
                "(an assistant turn is what the model learns to write)"
            )
    if placeholders == 0 and images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise DataError(f"{where}: {len(images)} image(s) but no user message to put them in")
        first_user["content"] = [{"type": "image"} for _ in images] + first_user["content"]
    elif placeholders != len(images):
        raise DataError(
            f"{where}: {placeholders} image placeholder(s) ({{'type': 'image'}} parts) but {len(images)} "
            "image(s) in `images`; give one image per placeholder, in order"
        )
    return VisionExample(messages, list(images), trained_from)


def render(processor, example: VisionExample, *, chat_template=None, where: str = "example"):
    """The chat-templated text of `example`, its tokens (images not expanded) and a 0/1 trained mask.

    Returns `(text, ids, trained)`. The assistant spans are found by the text path's
    `templates.assistant_turns` (the same rules as text SFT), with the processor's chat template.
    """
    from tunesmith.data.templates import assistant_turns, resolve_chat_template

    tokenizer = _tokenizer(processor)
    template = chat_template or getattr(processor, "chat_template", None)
    template = resolve_chat_template(tokenizer, chat_template=template)
    try:
        ids, turns = assistant_turns(tokenizer, example.messages, chat_template=template)
        text = tokenizer.apply_chat_template(example.messages, chat_template=template, tokenize=False)
    except DataError as err:
        raise DataError(f"{where}: {err}") from err
    trained = [int(t >= example.trained_from) for t in turns]
    return text, ids, trained


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def placeholder_token_id(processor) -> int:
    """The token the processor replaces by an image's tokens (`<image>`, `<|image_pad|>`, Gemma 3's
    `<start_of_image>`)."""
    token = getattr(processor, "image_token", None)
    if token is None:
        raise ValueError(f"{type(processor).__name__} has no `image_token`: not an image-text processor")
    return _tokenizer(processor).convert_tokens_to_ids(token)


# --------------------------------------------------------------------------- labels


def expand_labels(
    text_ids: Sequence[int],
    trained: Sequence[int],
    expanded_ids: Sequence[int],
    placeholder_id: int,
    *,
    where: str = "example",
) -> list[int]:
    """Labels for the processor's `expanded_ids`, from the trained mask of the unexpanded `text_ids`.

    The processor replaces each placeholder by the image's tokens; the text between placeholders is
    tokenized the same in both (placeholders are special tokens), except perhaps for the `_EDGE` tokens
    next to a placeholder. So each stretch of text between placeholders is found in `expanded_ids` (the
    first stretch at the start, the last at the end, the others at their first match after the previous)
    and its trained tokens labelled; everything else, image tokens included, is -100.

        text_ids  [u, <image>, p, q, r, A, B]          trained   [0, 0, 0, 0, 0, 1, 1]
        expanded  [u, <image>, <image>, <image>, p, q, r, A, B]
        labels    [-100, -100, -100, -100, -100, -100, -100, A, B]

    >>> expand_labels([4, 9, 5, 6, 7, 8, 3], [0, 0, 0, 0, 0, 1, 1], [4, 9, 9, 9, 5, 6, 7, 8, 3], 9)
    [-100, -100, -100, -100, -100, -100, -100, 8, 3]
    """
    text_ids, expanded_ids = list(text_ids), list(expanded_ids)
    bounds = [-1] + [i for i, t in enumerate(text_ids) if t == placeholder_id] + [len(text_ids)]
    stretches = len(bounds) - 1
    labels = [IGNORE_INDEX] * len(expanded_ids)
    cursor = 0
    for k in range(stretches):
        lo, hi = bounds[k] + 1, bounds[k + 1]
        core_lo = lo + (_EDGE if k > 0 else 0)
        core_hi = hi - (_EDGE if k < stretches - 1 else 0)
        if any(trained[lo:core_lo]) or any(trained[max(core_hi, core_lo) : hi]):
            raise DataError(
                f"{where}: a trained (assistant) token is within {_EDGE} tokens of an image placeholder; "
                "the chat template must separate images from assistant text"
            )
        if core_hi <= core_lo:
            continue  # a few untrained tokens between two images (or at an edge): nothing to place
        core = text_ids[core_lo:core_hi]
        if k == 0:
            at = 0 if expanded_ids[: len(core)] == core else -1
        elif k == stretches - 1:
            at = len(expanded_ids) - len(core)
            at = at if at >= cursor and expanded_ids[at:] == core else -1
        else:
            at = _find(expanded_ids, core, cursor)
        if at < 0:
            raise DataError(
                f"{where}: the processor's tokens do not contain the example's text as the chat template "
                f"renders it (text stretch {k} of {stretches} between images); is the processor's tokenizer "
                "the one the data was rendered with?"
            )
        for offset, flag in enumerate(trained[core_lo:core_hi]):
            if flag:
                labels[at + offset] = expanded_ids[at + offset]
        cursor = at + len(core)
    return labels


def _find(seq: list[int], sub: list[int], start: int) -> int:
    """First index i >= start with seq[i:i+len(sub)] == sub, or -1."""
    first, n = sub[0], len(sub)
    i = start
    while True:
        try:
            i = seq.index(first, i)
        except ValueError:
            return -1
        if seq[i : i + n] == sub:
            return i
        i += 1


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

    from tunesmith.data.pipeline import _length_summary

    stats.length_histogram, stats.length_percentiles = _length_summary(np.array(lengths, dtype=np.int64))
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
