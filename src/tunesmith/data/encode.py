"""Source rows to `(input_ids, labels)`, as `DataSettings` say: the format of a dataset detected,
each example normalised (formats.py), given its system prompt and tokenized with its labels
(tokenize.py). The chat template is resolved once per dataset (`resolve_settings`), not per example.

Used by both paths of `prepare_dataset`: a whole map-style dataset (`tokenize_dataset`, a
batched `datasets.map`) and a stream, one example at a time (`tokenize_one`).
"""

from __future__ import annotations

import functools
import logging

import pyarrow as pa

from tunesmith.common import once
from tunesmith.data.formats import (
    CONVERSATIONAL_FORMATS,
    detect_format,
    normalize_example,
    with_system_prompt,
)
from tunesmith.data.settings import DataSettings

logger = logging.getLogger("tunesmith.data")


def check_formatting_func_options(completion_only_loss) -> None:
    """completion_only_loss=True cannot apply to a formatting_func's output: a string has no
    prompt/completion boundary. TRL refuses the pair; so do we, naming the setting."""
    if completion_only_loss is True:
        raise ValueError(
            "completion_only_loss=True cannot be used with a formatting_func: the function returns one string, "
            "which has no prompt/completion boundary. Drop formatting_func and give prompt/completion columns "
            "(the loss is then on the completion), or set completion_only_loss=False (or leave it unset) to "
            "train on the whole formatted text."
        )


def check_loss_format(fmt: str, assistant_only_loss, source: str, columns) -> None:
    """assistant_only_loss=True needs conversations; on any other format it would train every token
    without saying so. `fmt` is the detected (or forced) source format."""
    if assistant_only_loss is True and fmt not in CONVERSATIONAL_FORMATS:
        raise ValueError(
            f"{source}: assistant_only_loss=True needs conversational data (a `messages` column, ShareGPT "
            f"`conversations`, or prompt/completion holding message lists), but the data was detected as "
            f"{fmt!r} (columns: {', '.join(map(str, columns)) or 'none'}). Set assistant_only_loss=False (or "
            "leave it unset); for prompt/completion data completion_only_loss (on by default) already trains "
            "the completion only."
        )


def detect(dataset, settings: DataSettings, formatting_func) -> str:
    """The format of `dataset` (forced by `settings.dataset_format`, else from its columns and first row)."""
    first = next(iter(dataset.take(1)), None) if hasattr(dataset, "take") else None
    return detect_format(
        dataset.column_names or list(first or {}),
        dataset_text_field=settings.dataset_text_field,
        formatting_func=formatting_func,
        override=settings.dataset_format,
        first_example=first,
    )


def resolve_settings(tokenizer, fmt: str, settings: DataSettings) -> DataSettings:
    """`settings` with the chat template resolved (a file read, a built-in name looked up) once."""
    if fmt == "tokenized":  # labels as given, or every token; train_on_inputs=True: every token
        return settings
    if tokenizer is None:
        raise ValueError(
            f"the data is in the {fmt!r} format and needs a tokenizer; pass one (or pre-tokenized input_ids)"
        )
    if settings.chat_template_path or settings.chat_template is not None:
        from tunesmith.data.templates import resolve_chat_template

        resolved = resolve_chat_template(
            tokenizer, chat_template=settings.chat_template, chat_template_path=settings.chat_template_path
        )
        return settings.replace(chat_template=resolved, chat_template_path=None)
    return settings


def tokenize_dataset(dataset, tokenizer, fmt: str, settings: DataSettings, formatting_func) -> pa.Table:
    """Normalise and tokenize every example: a table of input_ids, labels (one row per example)."""
    import datasets

    function = functools.partial(
        _tokenize_batch,
        fmt=fmt,
        tokenizer=tokenizer,
        settings=resolve_settings(tokenizer, fmt, settings),
        formatting_func=formatting_func,
    )
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
        }
    )
    num_proc = settings.dataset_num_proc
    tokenized = dataset.map(
        function,
        batched=True,
        batch_size=500,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=features,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        load_from_cache_file=False,  # our own cache sits above this step
        keep_in_memory=True,
        desc="tokenizing",
    )
    return tokenized.with_format("arrow")[:]


def _tokenize_batch(
    batch: dict, indices: list[int], *, fmt: str, tokenizer, settings, formatting_func
) -> dict:
    """datasets.map(batched=True) body: source rows -> {"input_ids": [...], "labels": [...]}."""
    input_ids, labels = [], []
    columns = list(batch)
    for j, index in enumerate(indices):
        example = {column: batch[column][j] for column in columns}
        for ids, example_labels in tokenize_rows(example, index, fmt, tokenizer, settings, formatting_func):
            input_ids.append(ids)
            labels.append(example_labels)
    return {"input_ids": input_ids, "labels": labels}


def tokenize_one(
    example: dict, index: int, fmt: str, tokenizer, settings, formatting_func
) -> tuple[list, list]:
    """One source row -> (input_ids, labels): normalise, then tokenize; pre-tokenized rows pass through.
    (Streaming keeps one example per row: a conversation's extra per-turn examples are not made there.)"""
    rows = tokenize_rows(example, index, fmt, tokenizer, settings, formatting_func)
    if len(rows) > 1 and once(("data", "stream-extra")):
        logger.warning(
            "streaming: train_on_reasoning=all would also train each earlier turn whose reasoning the template "
            "drops as an example of its own; a stream keeps one example per row, so those turns train their "
            "answers only"
        )
    return rows[0]


def tokenize_rows(
    example: dict, index: int, fmt: str, tokenizer, settings: DataSettings, formatting_func
) -> list[tuple[list, list]]:
    """One source row -> [(input_ids, labels), ...]: one example, plus, with train_on_reasoning=all on a
    template that drops past reasoning, one per earlier turn whose reasoning it dropped (tokenize.py).
    `settings` come through `resolve_settings` (the chat template is the template's text)."""
    from tunesmith.data.tokenize import tokenize_example

    if fmt == "tokenized":  # labels as given, or every token; train_on_inputs=True: every token
        normalized = normalize_example(example, fmt, index=index)
        out = tokenize_example(normalized, tokenizer, index=index, train_on_inputs=settings.train_on_inputs)
    else:
        normalized = normalize_example(
            example,
            fmt,
            dataset_text_field=settings.dataset_text_field,
            formatting_func=formatting_func,
            index=index,
        )
        if settings.system_prompt:
            normalized = with_system_prompt(normalized, settings.system_prompt, fmt, index)
        out = tokenize_example(
            normalized,
            tokenizer,
            index=index,
            completion_only_loss=settings.completion_only_loss,
            assistant_only_loss=settings.assistant_only_loss,
            train_on_inputs=settings.train_on_inputs,
            chat_template=settings.chat_template,
            eos_token=settings.eos_token,
            chat_template_kwargs=settings.chat_template_kwargs,
            train_on_reasoning=settings.train_on_reasoning,
        )
    extra = [(e["input_ids"], e["labels"]) for e in out.get("extra_examples", ())]
    return [(out["input_ids"], out["labels"]), *extra]
