"""The pieces of a vision example (vision.py runs them over a dataset and collates the batches):
detection of image data, loading an image, the example normalised (messages whose content is parts, and
its image references), rendering it with the chat template, and the labels carried over to the
processor's expanded sequence.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tunesmith.common import IGNORE_INDEX
from tunesmith.data.sources import DataError

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
