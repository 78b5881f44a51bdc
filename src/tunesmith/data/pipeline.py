"""prepare_dataset(): raw training data in, rows ready for a collator out, cached on disk.

    source ─► load_source ─► detect_format ─► normalize + tokenize ─► truncate / drop ─► pack
              (sources.py)   (formats.py)     (formats.py, tokenize.py)  (packing.py)      (packing.py)

Every keyword argument is named exactly as the `SFTConfig` field it comes from, so the
trainer passes them through by name. The result is a `PreparedDataset`: `.dataset` has the
columns `input_ids`, `labels`, `seq_lengths` (docs/ARCHITECTURE.md, "Packed row"), and
`.stats` says what happened to the data (`.stats.summary()` for people).

    >>> import logging
    >>> rows = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}, {"input_ids": [6, 7, 8, 9, 10]}]
    >>> prepared = prepare_dataset(rows, None, max_length=4, packing=True, cache_dir=False)
    >>> prepared.dataset.to_list()  # doctest: +NORMALIZE_WHITESPACE
    [{'input_ids': [6, 7, 8, 9], 'labels': [6, 7, 8, 9], 'seq_lengths': [4]},
     {'input_ids': [1, 2, 3], 'labels': [1, 2, 3], 'seq_lengths': [3]},
     {'input_ids': [4, 5], 'labels': [4, 5], 'seq_lengths': [2]}]
    >>> prepared.stats.truncated, prepared.stats.tokens_truncated, prepared.stats.rows
    (1, 1, 3)

The cache key covers the source (file path, size, mtime and content hash; a Dataset's
fingerprint; a list's content), the tokenizer (its full serialised vocabulary, special
tokens and chat template), the settings and the code of the data modules; a second call
with the same key loads the result from disk and logs "reusing prepared data from ...".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tunesmith.common import file_sha256, sha256_hex
from tunesmith.data import packing as packing_ops
from tunesmith.data.formats import detect_format, normalize_example, with_system_prompt
from tunesmith.data.settings import DataSettings
from tunesmith.data.sources import describe_source, file_notes, load_source

logger = logging.getLogger("tunesmith.data")

# Bump when the on-disk layout or the meaning of a prepared dataset changes.
_CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path("~/.cache/tunesmith/data")
# Streaming + bfd packs this many examples at a time (bigger = fuller rows, more memory).
STREAM_PACKING_BUFFER = 1000
# Upper edges of the length histogram buckets (the last bucket is open-ended).
HISTOGRAM_EDGES = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass
class DataStats:
    """What prepare_dataset did to the data. Token counts are after truncation unless named otherwise."""

    source: str = ""
    format: str = ""
    examples_in: int | None = None  # rows read from the source (None until a stream is read)
    examples_out: int | None = None  # examples that made it into the training rows
    truncated: int = 0  # examples cut to max_length
    tokens_truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> examples removed
    tokens_dropped: int = 0
    split_documents: int = 0  # documents spread over several rows (bfd_split, wrapped)
    tokens: int = 0  # tokens in the training rows
    supervised_tokens: int = 0  # of which trained (labels != -100)
    rows: int = 0
    max_length: int | None = None
    packing_strategy: str | None = None  # None when not packed
    packing_efficiency: float | None = None  # tokens / (rows * max_length), packed data only
    # tokenized lengths before truncation: counts[i] examples with edges[i-1] <= length < edges[i]
    # (edges[-1] is the longest length, inclusive); e.g. {"edges": [32, 64, 70], "counts": [1, 2, 1]}
    length_histogram: dict = field(default_factory=dict)
    length_percentiles: dict = field(default_factory=dict)  # {"p50", "p90", "max"} of tokenized lengths
    cache_hit: bool = False
    cache_path: str | None = None
    seconds: float = 0.0
    streaming: bool = False
    read_notes: list = field(
        default_factory=list
    )  # how the file was read: a byte-order mark, CRLF (sources.file_notes)

    def summary(self) -> str:
        """A few lines for the log and the CLI."""
        lines = [f"data: {self.source} ({self.format})" + (", streaming" if self.streaming else "")]
        if self.cache_hit:
            lines.append(f"  reused from cache {self.cache_path}")
        lines += [f"  read: {note}" for note in self.read_notes]
        counted = " so far" if self.streaming else ""
        lines.append(f"  examples: {self.examples_in} in, {self.examples_out} out{counted}")
        if self.truncated:
            lines.append(
                f"  truncated: {self.truncated} examples to {self.max_length} tokens ({self.tokens_truncated} tokens lost)"
            )
        for reason, count in self.dropped.items():
            if count:
                lines.append(f"  dropped: {count} examples ({reason.replace('_', ' ')})")
        if self.split_documents:
            lines.append(f"  split across rows: {self.split_documents} documents")
        share = f" ({100 * self.supervised_tokens / self.tokens:.1f}%)" if self.tokens else ""
        lines.append(f"  tokens: {self.tokens}, of which trained: {self.supervised_tokens}{share}")
        if self.packing_strategy:
            lines.append(
                f"  packed ({self.packing_strategy}) into {self.rows} rows of {self.max_length}: "
                f"efficiency {100 * (self.packing_efficiency or 0):.1f}%"
            )
        else:
            lines.append(f"  rows: {self.rows} (not packed)")
        if self.length_percentiles:
            p = self.length_percentiles
            lines.append(f"  example length: median {p['p50']}, p90 {p['p90']}, max {p['max']} tokens")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DataStats:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class PreparedDataset:
    dataset: object  # datasets.Dataset, or datasets.IterableDataset when streaming
    stats: DataStats


def prepare_dataset(
    source,
    tokenizer,
    settings: DataSettings | None = None,
    *,
    split=None,
    dataset_text_field=None,
    formatting_func=None,
    dataset_format=None,
    chat_template=None,
    chat_template_path=None,
    eos_token=None,
    completion_only_loss=None,
    assistant_only_loss=None,
    train_on_inputs=False,
    chat_template_kwargs=None,
    train_on_reasoning="last",
    column_mapping=None,
    system_prompt=None,
    max_length=1024,
    truncation_mode="keep_start",
    packing=False,
    packing_strategy="bfd",
    dataset_num_proc=None,
    cache_dir=None,
    streaming=False,
    shuffle_dataset=False,
    seed=42,
    dataset_kwargs=None,
) -> PreparedDataset:
    """Load, tokenize, truncate and (optionally) pack `source` for training.

    `source`: anything `sources.load_source` reads (file, folder, Dataset, list of dicts,
    Hub name). `tokenizer` may be None only for pre-tokenized data (`input_ids` column).
    `cache_dir`: where prepared data is kept (default ~/.cache/tunesmith/data); `False`
    turns the cache off. `dataset_kwargs`: `{"skip_prepare_dataset": True}` returns the
    loaded data untouched (as TRL does); other keys go to `load_source`.

    Truncation (`truncation_mode`): `keep_start` / `keep_end` cut an example to
    `max_length`, `drop` removes it. With packing_strategy `bfd_split` or `wrapped` long
    examples are not cut but spread over rows (unless `drop`). Examples with no trained
    token are removed. All of it is counted in `.stats` and logged on "tunesmith.data".
    """
    if settings is not None:  # the typed form (data.settings); the keywords stay for Python callers
        return prepare_dataset(source, tokenizer, formatting_func=formatting_func, **settings.as_kwargs())
    started = time.perf_counter()
    _check_settings(max_length, truncation_mode, packing, packing_strategy)
    _check_reasoning_settings(chat_template_kwargs, train_on_reasoning)
    if formatting_func is not None:
        check_formatting_func_options(completion_only_loss)
    dataset_kwargs = dict(dataset_kwargs or {})
    skip = bool(dataset_kwargs.pop("skip_prepare_dataset", False))
    settings = {
        "split": split,
        "dataset_text_field": dataset_text_field,
        "dataset_format": dataset_format,
        "chat_template": chat_template,
        "chat_template_path": file_sha256(chat_template_path) if chat_template_path else None,
        "eos_token": eos_token,
        "completion_only_loss": completion_only_loss,
        "assistant_only_loss": assistant_only_loss,
        "train_on_inputs": train_on_inputs,
        "chat_template_kwargs": chat_template_kwargs,
        "train_on_reasoning": train_on_reasoning,
        "column_mapping": column_mapping,
        "system_prompt": system_prompt,
        "max_length": max_length,
        "truncation_mode": truncation_mode,
        "packing": packing,
        "packing_strategy": packing_strategy if packing else None,
        "shuffle_dataset": shuffle_dataset,
        "seed": seed if shuffle_dataset else None,
        "dataset_kwargs": dataset_kwargs,
    }
    options = {
        "dataset_text_field": dataset_text_field,
        "formatting_func": formatting_func,
        "dataset_format": dataset_format,
        "chat_template": chat_template,
        "chat_template_path": chat_template_path,
        "eos_token": eos_token,
        "completion_only_loss": completion_only_loss,
        "assistant_only_loss": assistant_only_loss,
        "train_on_inputs": train_on_inputs,
        "chat_template_kwargs": chat_template_kwargs,
        "train_on_reasoning": train_on_reasoning,
        "system_prompt": system_prompt,
    }
    stats = DataStats(source=describe_source(source), max_length=max_length, streaming=streaming)
    stats.read_notes = file_notes(source)
    if skip:
        dataset = load_source(source, split=split, streaming=streaming, **dataset_kwargs)
        stats.format = "skipped (dataset_kwargs.skip_prepare_dataset)"
        logger.info(
            "skip_prepare_dataset is set: %s is used as given, without tokenizing or packing", stats.source
        )
        return PreparedDataset(dataset, stats)

    if streaming:
        dataset = load_source(source, split=split, streaming=True, **dataset_kwargs)
        dataset = rename_columns(dataset, column_mapping, stats.source)
        return _prepare_stream(dataset, tokenizer, stats, options, settings, dataset_num_proc)

    cache_path = None
    dataset = None
    if cache_dir is not False:
        key, dataset = _cache_key(source, tokenizer, settings, formatting_func, dataset_kwargs)
        if key is not None:
            cache_path = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / key
            cached = _load_cached(cache_path)
            if cached is not None:
                return cached
    if dataset is None:
        dataset = load_source(source, split=split, streaming=False, **dataset_kwargs)
    dataset = rename_columns(dataset, column_mapping, stats.source)

    stats.examples_in = len(dataset)
    stats.format = _detect(dataset, options)
    check_loss_format(stats.format, assistant_only_loss, stats.source, dataset.column_names)
    table = _tokenize_dataset(dataset, tokenizer, stats.format, options, dataset_num_proc)
    if len(table) > stats.examples_in:
        logger.info(
            "%s: %d examples from %d rows: train_on_reasoning=all and the chat template drops the reasoning of "
            "earlier turns, so each such turn is also trained as the last turn of an example of its own",
            stats.source, len(table), stats.examples_in,
        )  # fmt: skip
    table = _truncate_and_pack(table, stats, settings)
    if len(table) == 0:
        raise ValueError(
            f"{stats.source}: no example is left to train on after truncation and dropping "
            f"({stats.examples_in} read; dropped: {stats.dropped}). Check max_length={max_length}, "
            f"truncation_mode={truncation_mode!r} and that the examples have trained tokens (labels not all -100)."
        )
    result = _to_dataset(table)
    stats.seconds = round(time.perf_counter() - started, 3)
    if cache_path is not None:
        _save_cached(cache_path, result, stats)
    logger.info("%s", stats.summary())
    return PreparedDataset(result, stats)


def rename_columns(dataset, column_mapping, source: str):
    """The dataset with columns renamed by `column_mapping` ({source column: new name}, e.g.
    {question: prompt, answer: completion}); a column it names that is missing is an error."""
    if not column_mapping:
        return dataset
    from tunesmith.data.sources import DataError

    columns = list(dataset.column_names or [])
    missing = [c for c in column_mapping if c not in columns]
    if missing and columns:
        raise DataError(
            f"{source}: the column mapping names column(s) {', '.join(map(repr, missing))} that the data does "
            f"not have; columns found: {', '.join(columns)}"
        )
    clashes = [new for old, new in column_mapping.items() if new in columns and new not in column_mapping]
    if clashes:
        raise DataError(
            f"{source}: the column mapping renames to {', '.join(map(repr, clashes))}, which the data already has; "
            "map that column away too or leave it out of the mapping"
        )
    return dataset.rename_columns(dict(column_mapping))


# Source formats whose examples are conversations (what assistant_only_loss needs)
CONVERSATIONAL_FORMATS = ("messages", "sharegpt", "conversational_prompt_completion")


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


def _check_reasoning_settings(chat_template_kwargs, train_on_reasoning) -> None:
    from tunesmith.data.templates import check_template_kwargs
    from tunesmith.data.tokenize import TRAIN_ON_REASONING

    check_template_kwargs(chat_template_kwargs)
    if train_on_reasoning not in TRAIN_ON_REASONING:
        raise ValueError(
            f"train_on_reasoning={train_on_reasoning!r} is not one of {', '.join(TRAIN_ON_REASONING)}"
        )


def _check_settings(max_length, truncation_mode, packing, packing_strategy) -> None:
    if truncation_mode not in packing_ops.TRUNCATION_MODES:
        raise ValueError(
            f"truncation_mode={truncation_mode!r} is not one of {', '.join(packing_ops.TRUNCATION_MODES)}"
        )
    if packing and packing_strategy not in packing_ops.PACKING_STRATEGIES:
        raise ValueError(
            f"packing_strategy={packing_strategy!r} is not one of {', '.join(packing_ops.PACKING_STRATEGIES)}"
        )
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    if packing and max_length is None:
        raise ValueError("packing=True needs max_length (the row length); set max_length, e.g. 1024")


# --------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------


def _detect(dataset, options) -> str:
    first = next(iter(dataset.take(1)), None) if hasattr(dataset, "take") else None
    return detect_format(
        dataset.column_names or list(first or {}),
        dataset_text_field=options["dataset_text_field"],
        formatting_func=options["formatting_func"],
        override=options["dataset_format"],
        first_example=first,
    )


def _tokenize_dataset(dataset, tokenizer, fmt: str, options: dict, num_proc) -> pa.Table:
    """Normalise and tokenize every example: a table of input_ids, labels (one row per example)."""
    import datasets

    function = functools.partial(
        _tokenize_batch, fmt=fmt, tokenizer=tokenizer, options=_tokenize_options(tokenizer, fmt, options)
    )
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
        }
    )
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


def _tokenize_options(tokenizer, fmt: str, options: dict) -> dict:
    """Keyword arguments for tokenize_example, with the chat template resolved once."""
    if fmt == "tokenized":  # labels as given, or every token; train_on_inputs=True: every token
        return {"train_on_inputs": options["train_on_inputs"]}
    if tokenizer is None:
        raise ValueError(
            f"the data is in the {fmt!r} format and needs a tokenizer; pass one (or pre-tokenized input_ids)"
        )
    chat_template = options["chat_template"]
    if options["chat_template_path"] or chat_template is not None:
        from tunesmith.data.templates import resolve_chat_template

        chat_template = resolve_chat_template(
            tokenizer, chat_template=chat_template, chat_template_path=options["chat_template_path"]
        )
    return {
        "completion_only_loss": options["completion_only_loss"],
        "assistant_only_loss": options["assistant_only_loss"],
        "train_on_inputs": options["train_on_inputs"],
        "chat_template": chat_template,
        "eos_token": options["eos_token"],
        "chat_template_kwargs": options["chat_template_kwargs"],
        "train_on_reasoning": options["train_on_reasoning"],
        "system_prompt": options["system_prompt"],
        "dataset_text_field": options["dataset_text_field"],
        "formatting_func": options["formatting_func"],
    }


def _tokenize_batch(batch: dict, indices: list[int], *, fmt: str, tokenizer, options: dict) -> dict:
    """datasets.map(batched=True) body: source rows -> {"input_ids": [...], "labels": [...]}."""
    input_ids, labels = [], []
    columns = list(batch)
    for j, index in enumerate(indices):
        example = {column: batch[column][j] for column in columns}
        for ids, example_labels in _tokenize_rows(example, index, fmt, tokenizer, options):
            input_ids.append(ids)
            labels.append(example_labels)
    return {"input_ids": input_ids, "labels": labels}


def _tokenize_one(example: dict, index: int, fmt: str, tokenizer, options: dict) -> tuple[list, list]:
    """One source row -> (input_ids, labels): normalise, then tokenize; pre-tokenized rows pass through.
    (Streaming keeps one example per row: a conversation's extra per-turn examples are not made there.)"""
    rows = _tokenize_rows(example, index, fmt, tokenizer, options)
    if len(rows) > 1 and "stream-extra" not in _NOTED:
        _NOTED.add("stream-extra")
        logger.warning(
            "streaming: train_on_reasoning=all would also train each earlier turn whose reasoning the template "
            "drops as an example of its own; a stream keeps one example per row, so those turns train their "
            "answers only"
        )
    return rows[0]


_NOTED: set[str] = set()


def _tokenize_rows(example: dict, index: int, fmt: str, tokenizer, options: dict) -> list[tuple[list, list]]:
    """One source row -> [(input_ids, labels), ...]: one example, plus, with train_on_reasoning=all on a
    template that drops past reasoning, one per earlier turn whose reasoning it dropped (tokenize.py)."""
    normalized = normalize_example(
        example,
        fmt,
        dataset_text_field=options.get("dataset_text_field"),
        formatting_func=options.get("formatting_func"),
        index=index,
    )
    from tunesmith.data.tokenize import tokenize_example

    if options.get("system_prompt"):
        normalized = with_system_prompt(normalized, options["system_prompt"], fmt, index)
    kwargs = {
        k: v
        for k, v in options.items()
        if k not in ("dataset_text_field", "formatting_func", "system_prompt")
    }
    out = tokenize_example(normalized, tokenizer, index=index, **kwargs)
    extra = [(e["input_ids"], e["labels"]) for e in out.get("extra_examples", ())]
    return [(out["input_ids"], out["labels"]), *extra]


def _truncate_and_pack(table: pa.Table, stats: DataStats, settings: dict) -> pa.Table:
    """Truncate / drop, shuffle, pack; fills `stats`. Works on whole columns."""
    max_length, mode = settings["max_length"], settings["truncation_mode"]
    strategy = settings["packing_strategy"]
    lengths = (
        pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False) if len(table) else np.zeros(0)
    )
    stats.length_histogram, stats.length_percentiles = _length_summary(lengths)

    # bfd_split and wrapped spread long examples over rows instead of cutting them
    spreads = strategy in ("bfd_split", "wrapped")
    cut_at = None if spreads and mode != "drop" else max_length
    table, truncation = packing_ops.truncate(table, max_length=cut_at, truncation_mode=mode)
    stats.truncated, stats.tokens_truncated = truncation.truncated, truncation.tokens_truncated
    stats.dropped = {
        "longer_than_max_length": truncation.dropped_overlong,
        "no_trained_token": truncation.dropped_no_supervised,
    }
    stats.tokens_dropped = truncation.tokens_dropped
    stats.examples_out = truncation.examples_out

    if settings["shuffle_dataset"] and len(table):
        # before packing, so a row mixes examples from all over the dataset
        table = table.take(np.random.default_rng(settings["seed"]).permutation(len(table)))

    if strategy is None:
        lengths = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False)
        seq_lengths = pa.ListArray.from_arrays(
            pa.array(np.arange(len(lengths) + 1, dtype=np.int32)), pa.array(lengths, pa.int32())
        )
        table = table.append_column("seq_lengths", seq_lengths)
    else:
        table, packed = packing_ops.pack(table, max_length=max_length, packing_strategy=strategy)
        stats.split_documents = packed.split_documents
        stats.packing_strategy = strategy
        stats.packing_efficiency = round(packed.efficiency, 6)

    stats.rows = len(table)
    labels = pc.list_flatten(table["labels"])
    stats.tokens = len(labels)
    stats.supervised_tokens = int(pc.sum(pc.not_equal(labels, packing_ops.IGNORE_INDEX)).as_py() or 0)
    return table


def _length_summary(lengths: np.ndarray) -> tuple[dict, dict]:
    if len(lengths) == 0:
        return {}, {}
    edges = [e for e in HISTOGRAM_EDGES if e < lengths.max()] + [int(lengths.max())]
    counts = np.histogram(lengths, bins=[0, *edges[:-1], edges[-1] + 1])[0]
    percentiles = {
        "p50": int(np.percentile(lengths, 50)),
        "p90": int(np.percentile(lengths, 90)),
        "max": int(lengths.max()),
    }
    return {"edges": [int(e) for e in edges], "counts": counts.tolist()}, percentiles


def _to_dataset(table: pa.Table):
    import datasets

    return datasets.Dataset(datasets.table.InMemoryTable(table))


# --------------------------------------------------------------------------------------
# Streaming: lazy tokenization, on-the-fly truncation and packing
# --------------------------------------------------------------------------------------


def _prepare_stream(
    dataset, tokenizer, stats: DataStats, options: dict, settings: dict, num_proc
) -> PreparedDataset:
    import datasets

    if num_proc and num_proc > 1:
        logger.info(
            "dataset_num_proc=%s is ignored when streaming: examples are tokenized as they are read", num_proc
        )
    if settings["shuffle_dataset"]:
        dataset = dataset.shuffle(seed=settings["seed"], buffer_size=STREAM_PACKING_BUFFER)
    stats.format = _detect(dataset, options)
    check_loss_format(stats.format, options["assistant_only_loss"], stats.source, dataset.column_names or [])
    stats.examples_in = stats.examples_out = 0
    stats.dropped = {"longer_than_max_length": 0, "no_trained_token": 0}
    stats.packing_strategy = settings["packing_strategy"]
    tokenize_options = _tokenize_options(tokenizer, stats.format, options)
    rows = datasets.IterableDataset.from_generator(
        _stream_rows,
        gen_kwargs={
            "dataset": dataset,
            "tokenizer": tokenizer,
            "fmt": stats.format,
            "options": tokenize_options,
            "settings": settings,
            "stats": stats,
        },
        features=datasets.Features(
            {
                "input_ids": datasets.Sequence(datasets.Value("int32")),
                "labels": datasets.Sequence(datasets.Value("int32")),
                "seq_lengths": datasets.Sequence(datasets.Value("int32")),
            }
        ),
    )
    logger.info(
        "streaming %s: examples are tokenized and packed as they are read; .stats counts as it goes",
        stats.source,
    )
    return PreparedDataset(rows, stats)


def _stream_rows(dataset, tokenizer, fmt: str, options: dict, settings: dict, stats: DataStats):
    """Yield training rows from a stream; `stats` is updated in place as examples go by.

    bfd packs each window of STREAM_PACKING_BUFFER examples. wrapped carries the partial
    last row of a window into the next one, so it gives exactly the rows of the
    non-streaming path. Each pass over the stream (epoch) starts the counts afresh; in
    DataLoader worker processes the counts stay in the workers.
    """
    stats.examples_in = stats.examples_out = stats.rows = stats.tokens = stats.supervised_tokens = 0
    stats.truncated = stats.tokens_truncated = stats.tokens_dropped = 0
    stats.dropped = {"longer_than_max_length": 0, "no_trained_token": 0}

    max_length, mode, strategy = (
        settings["max_length"],
        settings["truncation_mode"],
        settings["packing_strategy"],
    )
    spreads = strategy in ("bfd_split", "wrapped")
    cut_at = None if spreads and mode != "drop" else max_length
    window: list[dict] = []
    warned = False
    for index, example in enumerate(dataset):
        stats.examples_in += 1
        ids, labels = _tokenize_one(example, index, fmt, tokenizer, options)
        table, truncation = packing_ops.truncate(
            {"input_ids": [ids], "labels": [labels]}, max_length=cut_at, truncation_mode=mode, log=False
        )
        stats.truncated += truncation.truncated
        stats.tokens_truncated += truncation.tokens_truncated
        stats.dropped["longer_than_max_length"] += truncation.dropped_overlong
        stats.dropped["no_trained_token"] += truncation.dropped_no_supervised
        stats.tokens_dropped += truncation.tokens_dropped
        if (truncation.truncated or truncation.dropped) and not warned:
            warned = True
            logger.warning(
                "example %d of the stream was truncated or dropped (max_length=%s, truncation_mode=%s); "
                "the totals are logged when the stream ends and counted in .stats as it goes",
                index,
                max_length,
                mode,
            )
        if not truncation.examples_out:
            continue
        stats.examples_out += 1
        example = table.to_pylist()[0]
        if strategy is None:
            yield from _count_rows([{**example, "seq_lengths": [len(example["input_ids"])]}], stats)
            continue
        window.append(example)
        if len(window) >= STREAM_PACKING_BUFFER:
            rows, window = _pack_window(window, max_length, strategy, stats, final=False)
            yield from _count_rows(rows, stats)
    if window:
        rows, _ = _pack_window(window, max_length, strategy, stats, final=True)
        yield from _count_rows(rows, stats)
    totals = packing_ops.TruncationStats(
        examples_in=stats.examples_in,
        truncated=stats.truncated,
        tokens_truncated=stats.tokens_truncated,
        dropped_overlong=stats.dropped["longer_than_max_length"],
        dropped_no_supervised=stats.dropped["no_trained_token"],
    )
    packing_ops.log_truncation(totals, cut_at, mode)
    logger.info("%s", stats.summary())


def _pack_window(window: list[dict], max_length: int, strategy: str, stats: DataStats, *, final: bool):
    """Pack one window; for wrapped, hand back the unfinished last row's pieces as the next window's start."""
    table, _ = packing_ops.pack(window, max_length=max_length, packing_strategy=strategy)
    rows = table.to_pylist()
    carry: list[dict] = []
    if strategy == "wrapped" and not final and rows and len(rows[-1]["input_ids"]) < max_length:
        last = rows.pop()
        start = 0
        for n in last["seq_lengths"]:
            carry.append(
                {
                    "input_ids": last["input_ids"][start : start + n],
                    "labels": last["labels"][start : start + n],
                }
            )
            start += n
    return rows, carry


def _count_rows(rows: list[dict], stats: DataStats):
    for row in rows:
        stats.rows += 1
        stats.tokens += len(row["input_ids"])
        stats.supervised_tokens += sum(1 for label in row["labels"] if label != packing_ops.IGNORE_INDEX)
        if stats.packing_strategy:
            stats.packing_efficiency = stats.tokens / (stats.rows * stats.max_length)
        yield row


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------


def _cache_key(source, tokenizer, settings: dict, formatting_func, dataset_kwargs: dict):
    """(key, loaded dataset or None). The key is None when the source cannot be fingerprinted."""
    import datasets

    loaded = None
    if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
        source_key = _path_fingerprint(Path(source))
    elif isinstance(source, list):
        source_key = "list:" + sha256_hex(json.dumps(source, sort_keys=True, default=repr).encode())
    elif isinstance(source, datasets.Dataset):
        source_key = "dataset:" + source._fingerprint
    elif isinstance(source, datasets.DatasetDict):
        source_key = "datasetdict:" + ",".join(
            f"{name}={ds._fingerprint}" for name, ds in sorted(source.items())
        )
    else:
        # a Hub name (or anything else load_source reads): the loaded dataset's fingerprint
        loaded = load_source(source, split=settings["split"], streaming=False, **dataset_kwargs)
        if not isinstance(loaded, datasets.Dataset):
            return None, loaded
        source_key = "dataset:" + loaded._fingerprint
    func_key = None
    if formatting_func is not None:
        try:
            from datasets.fingerprint import Hasher

            func_key = Hasher.hash(formatting_func)
        except Exception as error:  # an unpicklable function: correct results matter more than the cache
            logger.warning(
                "formatting_func cannot be fingerprinted (%s); prepared data will not be cached", error
            )
            return None, loaded
    parts = {
        "version": _CACHE_VERSION,
        "source": source_key,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "settings": settings,
        "formatting_func": func_key,
        "code": _code_fingerprint(),
    }
    return sha256_hex(json.dumps(parts, sort_keys=True, default=repr).encode())[:24], loaded


def _path_fingerprint(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    entries = []
    for file in files:
        stat = file.stat()
        entries.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns, file_sha256(file)])
    return "files:" + sha256_hex(json.dumps(entries).encode())


def _tokenizer_fingerprint(tokenizer) -> str | None:
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # the whole fast tokenizer: vocabulary, merges, normalizer, pre-tokenizer, added tokens
        vocab = backend.to_str()
    else:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [
        type(tokenizer).__name__,
        sha256_hex(vocab.encode()),
        getattr(tokenizer, "chat_template", None),
        getattr(tokenizer, "special_tokens_map", None),
        sorted(getattr(tokenizer, "all_special_ids", [])),
        getattr(tokenizer, "add_bos_token", None),
        getattr(tokenizer, "add_eos_token", None),
    ]
    return sha256_hex(json.dumps(parts, sort_keys=True, default=repr).encode())


@functools.lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """The data modules' source: a change in how data is prepared invalidates old results."""
    folder = Path(__file__).parent
    names = ("sources.py", "formats.py", "templates.py", "tokenize.py", "packing.py", "pipeline.py")
    return sha256_hex(b"".join((folder / name).read_bytes() for name in names if (folder / name).exists()))


def _load_cached(path: Path) -> PreparedDataset | None:
    import datasets

    if not (path / "stats.json").exists():
        return None
    try:
        dataset = datasets.load_from_disk(str(path / "dataset"))
        stats = DataStats.from_dict(json.loads((path / "stats.json").read_text()))
    except Exception as error:  # a damaged cache entry is rebuilt, not trusted
        logger.warning("ignoring unreadable cache entry %s (%s); preparing the data again", path, error)
        return None
    stats.cache_hit, stats.cache_path = True, str(path)
    logger.info(
        "reusing prepared data from %s (%d rows; delete the folder to prepare again)", path, len(dataset)
    )
    logger.info("%s", stats.summary())
    return PreparedDataset(dataset, stats)


def _save_cached(path: Path, dataset, stats: DataStats) -> None:
    stats.cache_path = str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # write into a sibling folder, then rename: a crash never leaves a half-written entry
    staging = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        dataset.save_to_disk(str(staging / "dataset"))
        (staging / "stats.json").write_text(json.dumps(stats.to_dict(), indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        logger.warning("could not write the data cache to %s (%s); continuing without it", path, error)
        return
    logger.info("saved prepared data to %s", path)
