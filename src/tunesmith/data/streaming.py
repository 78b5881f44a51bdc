"""The streaming path of `prepare_dataset`: a `datasets.IterableDataset` of training rows, each
source example tokenized, truncated and packed as it is read; `DataStats` counts as it goes.

bfd packs each window of `STREAM_PACKING_BUFFER` examples; wrapped carries the partial last row of
a window into the next, so it gives exactly the rows of the map-style path.
"""

from __future__ import annotations

import logging

from tunesmith.common import IGNORE_INDEX
from tunesmith.data import packing as packing_ops
from tunesmith.data.encode import check_loss_format, detect, resolve_settings, tokenize_one
from tunesmith.data.settings import DataSettings
from tunesmith.data.stats import DataStats, PreparedDataset

logger = logging.getLogger("tunesmith.data")

# Streaming + bfd packs this many examples at a time (bigger = fuller rows, more memory).
STREAM_PACKING_BUFFER = 1000


def prepare_stream(
    dataset, tokenizer, stats: DataStats, settings: DataSettings, formatting_func
) -> PreparedDataset:
    import datasets

    if settings.dataset_num_proc and settings.dataset_num_proc > 1:
        logger.info(
            "dataset_num_proc=%s is ignored when streaming: examples are tokenized as they are read",
            settings.dataset_num_proc,
        )
    if settings.shuffle_dataset:
        dataset = dataset.shuffle(seed=settings.seed, buffer_size=STREAM_PACKING_BUFFER)
    stats.format = detect(dataset, settings, formatting_func)
    check_loss_format(stats.format, settings.assistant_only_loss, stats.source, dataset.column_names or [])
    stats.examples_in = stats.examples_out = 0
    stats.dropped = {"longer_than_max_length": 0, "no_trained_token": 0}
    stats.packing_strategy = settings.packing_strategy if settings.packing else None
    rows = datasets.IterableDataset.from_generator(
        _stream_rows,
        gen_kwargs={
            "dataset": dataset,
            "tokenizer": tokenizer,
            "fmt": stats.format,
            "settings": resolve_settings(tokenizer, stats.format, settings),
            "formatting_func": formatting_func,
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


def _stream_rows(dataset, tokenizer, fmt: str, settings: DataSettings, formatting_func, stats: DataStats):
    """Yield training rows from a stream; `stats` is updated in place as examples go by.

    Each pass over the stream (epoch) starts the counts afresh; in DataLoader worker processes the
    counts stay in the workers.
    """
    stats.examples_in = stats.examples_out = stats.rows = stats.tokens = stats.supervised_tokens = 0
    stats.truncated = stats.tokens_truncated = stats.tokens_dropped = 0
    stats.dropped = {"longer_than_max_length": 0, "no_trained_token": 0}

    max_length, mode = settings.max_length, settings.truncation_mode
    strategy = settings.packing_strategy if settings.packing else None
    spreads = strategy in ("bfd_split", "wrapped")
    cut_at = None if spreads and mode != "drop" else max_length
    window: list[dict] = []
    warned = False
    for index, example in enumerate(dataset):
        stats.examples_in += 1
        ids, labels = tokenize_one(example, index, fmt, tokenizer, settings, formatting_func)
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
        stats.supervised_tokens += sum(1 for label in row["labels"] if label != IGNORE_INDEX)
        if stats.packing_strategy:
            stats.packing_efficiency = stats.tokens / (stats.rows * stats.max_length)
        yield row
