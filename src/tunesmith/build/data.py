"""Building the datasets: the train and eval splits (or a mixture of sources) through the data pipeline,
and with them the collator and the columns Trainer keeps (`build_data` does it all)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tunesmith.config import SFTConfig, notice_once
from tunesmith.data.settings import DataSettings

logger = logging.getLogger("tunesmith.trainer")

# Columns of a prepared dataset that the collators read (Trainer drops any other column).
DATASET_COLUMNS = ["input_ids", "labels", "seq_lengths", "example_index", "attention_mask", "position_ids"]
# ... and the rows of a prepared vision dataset (data.vision.VisionDataset)
VISION_ROW_COLUMNS = ["text", "text_ids", "trained", "images", "image_sizes", "length", "image_tokens"]


@dataclass
class BuiltData:
    """What `build_data` hands to Trainer's constructor, and what the trainer keeps of it."""

    train_dataset: object
    eval_dataset: object
    data_collator: object  # wrapped in WithExampleIndex
    skip_prepare: bool  # the datasets were not prepared (skip_prepare_dataset, or TRL's raw vision recipe)
    signature_columns: list[str] | None  # the columns Trainer keeps; None: Trainer's own choice
    stats: dict = field(default_factory=dict)  # per split: examples in/out, truncated, dropped, file reads
    mixture_stats: object = None  # several sources: per-source lines


def build_data(
    train_dataset, eval_dataset, data_collator, model, tokenizer, args: SFTConfig, formatting_func
):
    """The prepared splits and the collator. A user's collator with a processor is TRL's vision recipe:
    it reads the raw rows, so nothing is prepared and every column is kept. Without a collator the
    default one is built, after switching the model to the attention its batches need."""
    from tunesmith.build.collator import WithExampleIndex, build_collator
    from tunesmith.build.model import set_batch_attention
    from tunesmith.data.vision import is_processor

    raw_vision = data_collator is not None and is_processor(tokenizer)
    skip_prepare = bool((args.dataset_kwargs or {}).get("skip_prepare_dataset")) or raw_vision
    stats: dict = {}
    if not skip_prepare:
        train_dataset, eval_dataset = build_datasets(
            train_dataset, eval_dataset, tokenizer, args, formatting_func, stats=stats
        )
    if data_collator is None:
        set_batch_attention(model, tokenizer, args)
        data_collator = build_collator(tokenizer, args)
    no_batch_dispatch_for_streams(args, train_dataset, eval_dataset)
    if not skip_prepare:
        columns = DATASET_COLUMNS + VISION_ROW_COLUMNS
    elif raw_vision:  # the user's collator gets every column (messages, images, ...)
        columns = list(getattr(train_dataset, "column_names", None) or []) + DATASET_COLUMNS
    else:
        columns = None
    return BuiltData(
        train_dataset,
        eval_dataset,
        WithExampleIndex(data_collator),
        skip_prepare,
        columns,
        stats,
        getattr(train_dataset, "mixture_stats", None),
    )


def build_datasets(train_dataset, eval_dataset, tokenizer, args: SFTConfig, formatting_func, stats=None):
    """Both splits through `prepare_dataset`; the eval split packed as `eval_packing` says."""
    from tunesmith.data.mixture import is_mixture

    if args.datasets or is_mixture(train_dataset):
        return build_mixture(train_dataset, eval_dataset, tokenizer, args, formatting_func)
    train_dataset = prepare_split(
        train_dataset, tokenizer, args, formatting_func, args.packing, "train", stats
    )
    return train_dataset, build_eval(eval_dataset, tokenizer, args, formatting_func)


def build_mixture(train_dataset, eval_dataset, tokenizer, args: SFTConfig, formatting_func):
    """Several sources (`args.datasets`, or a dict / DatasetSource list as train_dataset) mixed by weight
    (`data.mixture`); their eval sets become a dict {source name: rows}, so metrics are eval_<name>_loss. A
    given eval_dataset joins them (a single one under the name "main")."""
    from tunesmith.data.mixture import prepare_mixture

    if args.datasets and train_dataset is not None:
        raise ValueError(
            "SFTTrainer: both `datasets` (in the config) and train_dataset are given; pass the sources one way"
        )
    mixture = prepare_mixture(
        args.datasets or train_dataset, tokenizer, DataSettings.from_config(args),
        eval_packing=args.eval_packing, formatting_func=formatting_func,
    )  # fmt: skip
    train = mixture.dataset.add_column("example_index", list(range(len(mixture.dataset))))
    evals = dict(mixture.eval_datasets)
    given = build_eval(eval_dataset, tokenizer, args, formatting_func) if eval_dataset is not None else None
    if isinstance(given, dict):
        evals.update(given)
    elif given is not None:
        evals["main"] = given
    train.mixture_stats = mixture.stats  # read by SFTTrainer.__init__ (the report's per-source lines)
    return train, (evals or None)


def build_eval(eval_dataset, tokenizer, args: SFTConfig, formatting_func):
    """An eval split (or a dict of them) through `prepare_dataset`, packed as `eval_packing` says;
    one that is already prepared (has `input_ids` and `seq_lengths`) is returned as it is."""
    eval_packing = args.packing if args.eval_packing is None else args.eval_packing
    if isinstance(eval_dataset, dict):
        return {
            name: prepare_eval_split(ds, tokenizer, args, formatting_func, eval_packing, f"eval[{name}]")
            for name, ds in eval_dataset.items()
        }
    return prepare_eval_split(eval_dataset, tokenizer, args, formatting_func, eval_packing, "eval")


def prepare_eval_split(dataset, tokenizer, args, formatting_func, packing, name):
    columns = getattr(dataset, "column_names", None) or []
    if {"input_ids", "seq_lengths"} <= set(columns):
        return dataset  # prepared already (by this trainer's constructor or prepare_dataset)
    from tunesmith.data.vision import VisionDataset

    if isinstance(dataset, VisionDataset):
        return dataset
    return prepare_split(dataset, tokenizer, args, formatting_func, packing, name)


def prepare_split(dataset, tokenizer, args: SFTConfig, formatting_func, packing: bool, name: str, stats=None):
    if dataset is None:
        return None
    import datasets

    from tunesmith.data.pipeline import prepare_dataset
    from tunesmith.data.vision import is_processor, prepare_vision_dataset

    if is_processor(tokenizer):  # a vision-language model: images are processed per batch by the collator
        notice_vision_settings(args)
        prepared = prepare_vision_dataset(dataset, tokenizer, max_length=args.max_length)
        logger.debug("%s dataset: %s", name, prepared.stats)
        if stats is not None:
            stats[name] = prepared.stats  # VisionStats: .summary() as DataStats
        return prepared

    refuse_images_without_processor(dataset, name)
    # an IterableDataset is tokenized (and packed) lazily, as it streams
    settings = DataSettings.from_config(args, packing=packing).replace(
        streaming=isinstance(dataset, datasets.IterableDataset)
    )
    prepared = prepare_dataset(dataset, tokenizer, settings, formatting_func=formatting_func)
    logger.debug("%s dataset: %s", name, prepared.stats)
    if stats is not None:
        stats[name] = prepared.stats
    data = prepared.dataset
    if isinstance(data, datasets.Dataset) and "example_index" not in data.column_names:
        # carried through the collator so that a non-finite loss can name the rows that caused it
        data = data.add_column("example_index", list(range(len(data))))
    return data


def refuse_images_without_processor(dataset, name: str) -> None:
    """Rows with images given with a plain tokenizer: say what to pass, instead of failing in the text path."""
    import datasets

    from tunesmith.data.vision import is_vision_example

    if isinstance(dataset, list) and dataset and isinstance(dataset[0], dict):
        first = dataset[0]
    elif isinstance(dataset, datasets.Dataset) and len(dataset):
        first = dataset[0]
    else:
        return
    if is_vision_example(first):
        raise ValueError(
            f"SFTTrainer: the {name} data has images, but processing_class is a tokenizer; pass the model's "
            "processor (processing_class=AutoProcessor.from_pretrained(...)), or leave it unset for a "
            "vision-language model given by name"
        )


def notice_vision_settings(args: SFTConfig) -> None:
    """Vision data is padded per batch and trains on assistant turns (or the completion) only: say so once
    when the config asks for something else, instead of ignoring it silently."""
    ignored = []
    if args.packing:
        ignored.append("packing=True (vision examples are padded per batch by the processor, not packed)")
    if args.train_on_inputs or args.completion_only_loss is False or args.assistant_only_loss is False:
        ignored.append("training on prompts (vision data trains on assistant turns / the completion only)")
    if args.padding_free:
        ignored.append("padding_free=True (the processor pads each batch)")
    if ignored:
        notice_once("vision_settings", "vision-language data: ignoring " + "; ".join(ignored))


def no_batch_dispatch_for_streams(args: SFTConfig, *datasets_) -> None:
    """accelerate's default for an IterableDataset reads batches on one process and slices every
    tensor of the batch along dim 0, which cuts the (D+1,) `cu_seq_lens` of a padding-free batch
    to its first entry: have each process read its own shard of batches instead."""
    import datasets

    flat = [d for item in datasets_ for d in (item.values() if isinstance(item, dict) else [item])]
    if (
        any(isinstance(d, datasets.IterableDataset) for d in flat)
        and args.accelerator_config.dispatch_batches is None
    ):
        args.accelerator_config.dispatch_batches = False
