"""prepare_dataset(): raw training data in, rows ready for a collator out, cached on disk.

    source ─► load_source ─► detect_format ─► normalize + tokenize ─► truncate / drop ─► pack
              (sources.py)   (encode.py,      (encode.py, tokenize.py)  (packing.py)      (packing.py)
                              formats.py)

The settings come as one `DataSettings` (settings.py; the trainer builds it from `SFTConfig` by
`DataSettings.from_config`), or as keyword arguments named as its fields, from which one is built
at the entry. The result is a `PreparedDataset` (stats.py): `.dataset` has the columns `input_ids`,
`labels`, `seq_lengths` (docs/ARCHITECTURE.md, "Packed row"), and `.stats` says what happened to
the data (`.stats.summary()` for people). The on-disk cache is cache.py, the streaming path
streaming.py.

    >>> import logging
    >>> rows = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}, {"input_ids": [6, 7, 8, 9, 10]}]
    >>> prepared = prepare_dataset(rows, None, max_length=4, packing=True, cache_dir=False)
    >>> prepared.dataset.to_list()  # doctest: +NORMALIZE_WHITESPACE
    [{'input_ids': [6, 7, 8, 9], 'labels': [6, 7, 8, 9], 'seq_lengths': [4]},
     {'input_ids': [1, 2, 3], 'labels': [1, 2, 3], 'seq_lengths': [3]},
     {'input_ids': [4, 5], 'labels': [4, 5], 'seq_lengths': [2]}]
    >>> prepared.stats.truncated, prepared.stats.tokens_truncated, prepared.stats.rows
    (1, 1, 3)
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tunesmith.common import IGNORE_INDEX
from tunesmith.data import packing as packing_ops
from tunesmith.data.cache import DEFAULT_CACHE_DIR, cache_key, cache_path, load_cached, save_cached
from tunesmith.data.encode import (
    CONVERSATIONAL_FORMATS,
    check_formatting_func_options,
    check_loss_format,
    detect,
)
from tunesmith.data.encode import tokenize_dataset as _tokenize_dataset
from tunesmith.data.settings import DataSettings
from tunesmith.data.sources import describe_source, file_notes, load_source
from tunesmith.data.stats import HISTOGRAM_EDGES, DataStats, PreparedDataset, length_summary
from tunesmith.data.streaming import STREAM_PACKING_BUFFER, prepare_stream

# re-exported: imported from here by the trainer, mixture, vision and tests
__all__ = [
    "CONVERSATIONAL_FORMATS",
    "DEFAULT_CACHE_DIR",
    "HISTOGRAM_EDGES",
    "STREAM_PACKING_BUFFER",
    "DataStats",
    "PreparedDataset",
    "check_formatting_func_options",
    "check_loss_format",
    "prepare_dataset",
    "rename_columns",
]
_length_summary = length_summary

logger = logging.getLogger("tunesmith.data")


def prepare_dataset(
    source,
    tokenizer,
    settings: DataSettings | None = None,
    *,
    formatting_func=None,
    **keywords,
) -> PreparedDataset:
    """Load, tokenize, truncate and (optionally) pack `source` for training.

    `source`: anything `sources.load_source` reads (file, folder, Dataset, list of dicts,
    Hub name). `tokenizer` may be None only for pre-tokenized data (`input_ids` column).
    `settings`: a `DataSettings`; without one, `keywords` are its fields (`max_length=512, packing=True`).
    `cache_dir`: where prepared data is kept (default ~/.cache/tunesmith/data); `False`
    turns the cache off. `dataset_kwargs`: `{"skip_prepare_dataset": True}` returns the
    loaded data untouched (as TRL does); other keys go to `load_source`.

    Truncation (`truncation_mode`): `keep_start` / `keep_end` cut an example to
    `max_length`, `drop` removes it. With packing_strategy `bfd_split` or `wrapped` long
    examples are not cut but spread over rows (unless `drop`). Examples with no trained
    token are removed. All of it is counted in `.stats` and logged on "tunesmith.data".
    """
    if settings is None:  # the keyword form, for Python callers
        settings = DataSettings(**keywords)
    started = time.perf_counter()
    _check_settings(settings)
    if formatting_func is not None:
        check_formatting_func_options(settings.completion_only_loss)
    stats = DataStats(
        source=describe_source(source), max_length=settings.max_length, streaming=settings.streaming
    )
    stats.read_notes = file_notes(source)
    if settings.skip_prepare:
        dataset = load_source(
            source, split=settings.split, streaming=settings.streaming, **settings.load_kwargs
        )
        stats.format = "skipped (dataset_kwargs.skip_prepare_dataset)"
        logger.info(
            "skip_prepare_dataset is set: %s is used as given, without tokenizing or packing", stats.source
        )
        return PreparedDataset(dataset, stats)

    if settings.streaming:
        dataset = load_source(source, split=settings.split, streaming=True, **settings.load_kwargs)
        dataset = rename_columns(dataset, settings.column_mapping, stats.source)
        return prepare_stream(dataset, tokenizer, stats, settings, formatting_func)

    path = None
    dataset = None
    if settings.cache_dir is not False:
        key, dataset = cache_key(source, tokenizer, settings, formatting_func)
        if key is not None:
            path = cache_path(settings, key)
            cached = load_cached(path)
            if cached is not None:
                return cached
    if dataset is None:
        dataset = load_source(source, split=settings.split, streaming=False, **settings.load_kwargs)
    dataset = rename_columns(dataset, settings.column_mapping, stats.source)

    stats.examples_in = len(dataset)
    stats.format = detect(dataset, settings, formatting_func)
    check_loss_format(stats.format, settings.assistant_only_loss, stats.source, dataset.column_names)
    table = _tokenize_dataset(dataset, tokenizer, stats.format, settings, formatting_func)
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
            f"({stats.examples_in} read; dropped: {stats.dropped}). Check max_length={settings.max_length}, "
            f"truncation_mode={settings.truncation_mode!r} and that the examples have trained tokens (labels not all -100)."
        )
    result = _to_dataset(table)
    stats.seconds = round(time.perf_counter() - started, 3)
    if path is not None:
        save_cached(path, result, stats)
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


def _check_settings(settings: DataSettings) -> None:
    from tunesmith.data.templates import check_template_kwargs
    from tunesmith.data.tokenize import TRAIN_ON_REASONING

    if settings.truncation_mode not in packing_ops.TRUNCATION_MODES:
        raise ValueError(
            f"truncation_mode={settings.truncation_mode!r} is not one of {', '.join(packing_ops.TRUNCATION_MODES)}"
        )
    if settings.packing and settings.packing_strategy not in packing_ops.PACKING_STRATEGIES:
        raise ValueError(
            f"packing_strategy={settings.packing_strategy!r} is not one of "
            f"{', '.join(packing_ops.PACKING_STRATEGIES)}"
        )
    max_length = settings.max_length
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    if settings.packing and max_length is None:
        raise ValueError("packing=True needs max_length (the row length); set max_length, e.g. 1024")
    check_template_kwargs(settings.chat_template_kwargs)
    if settings.train_on_reasoning not in TRAIN_ON_REASONING:
        raise ValueError(
            f"train_on_reasoning={settings.train_on_reasoning!r} is not one of {', '.join(TRAIN_ON_REASONING)}"
        )


def _truncate_and_pack(table: pa.Table, stats: DataStats, settings: DataSettings) -> pa.Table:
    """Truncate / drop, shuffle, pack; fills `stats`. Works on whole columns."""
    max_length, mode = settings.max_length, settings.truncation_mode
    strategy = settings.packing_strategy if settings.packing else None
    lengths = (
        pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False) if len(table) else np.zeros(0)
    )
    stats.length_histogram, stats.length_percentiles = length_summary(lengths)

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

    if settings.shuffle_dataset and len(table):
        # before packing, so a row mixes examples from all over the dataset
        table = table.take(np.random.default_rng(settings.seed).permutation(len(table)))

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
    stats.supervised_tokens = int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0)
    return table


def _to_dataset(table: pa.Table):
    import datasets

    return datasets.Dataset(datasets.table.InMemoryTable(table))
