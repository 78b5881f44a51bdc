"""Building the trainer's config: TrainingArguments or None to an SFTConfig, TRL's old keyword arguments,
the checks made before anything loads, the optimizer fallback and the seed (`build_args` does them all)."""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from tunesmith.config import SFTConfig, deprecation_notice
from tunesmith.models.introspect import model_name

logger = logging.getLogger("tunesmith.trainer")


# Old keyword arguments of SFTTrainer (TRL < 0.20, Unsloth notebooks) -> SFTConfig field.
OLD_TRAINER_KWARGS = {
    "dataset_text_field": "dataset_text_field",
    "max_seq_length": "max_length",
    "packing": "packing",
    "dataset_num_proc": "dataset_num_proc",
    "dataset_kwargs": "dataset_kwargs",
}


def as_sft_config(args, model) -> SFTConfig:
    if isinstance(args, SFTConfig):
        return args
    if args is None:
        name = (
            str(model)
            if isinstance(model, (str, os.PathLike))
            else model_name(model)
            if model is not None
            else "tunesmith"
        )
        return SFTConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-SFT")
    if not isinstance(args, TrainingArguments):
        raise TypeError(
            f"SFTTrainer: args must be an SFTConfig or a TrainingArguments, got {type(args).__name__}"
        )
    # A plain TrainingArguments keeps its own values (lr 5e-5, no bf16, ...) and gets SFTConfig's data defaults.
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    if values.get("fp16") and not torch.cuda.is_available():
        logger.warning(
            "fp16=True needs a GPU; this machine has none, so training runs in the model's own dtype"
        )
        values["fp16"] = False
    return SFTConfig(**values)


def apply_old_kwargs(args: SFTConfig, processing_class, old_kwargs: dict):
    """Move TRL's old trainer keyword arguments onto `args` (each noticed once); return the tokenizer."""
    if "tokenizer" in old_kwargs:
        deprecation_notice(
            "SFTTrainer.tokenizer",
            "SFTTrainer(tokenizer=...) is the old spelling of processing_class=...; rename it.",
        )
        tokenizer = old_kwargs.pop("tokenizer")
        processing_class = processing_class if processing_class is not None else tokenizer
    for old, new in OLD_TRAINER_KWARGS.items():
        if old in old_kwargs:
            value = old_kwargs.pop(old)
            deprecation_notice(
                f"SFTTrainer.{old}",
                f"SFTTrainer({old}=...) is deprecated: set it on the config, SFTConfig({new}=...). Using {new}={value!r}.",
            )
            setattr(args, new, value)
    if old_kwargs:
        raise TypeError(
            f"SFTTrainer got unexpected keyword argument(s) {sorted(old_kwargs)}; "
            "SFTConfig fields go in args=SFTConfig(...)"
        )
    return processing_class


def check_before_work(args: SFTConfig, train_dataset, formatting_func) -> None:
    """The settings TRL refuses when the trainer is built, refused here too, before anything loads."""
    if train_dataset is None and not args.datasets:
        raise ValueError(
            "SFTTrainer: `train_dataset` is required (got None). Pass train_dataset=... (a datasets.Dataset, a "
            "list of dicts, a file or folder path, or a Hub dataset name); to only evaluate, pass the eval data "
            "as train_dataset too, or use `tunesmith train` with a `dataset:` section in the config."
        )
    if formatting_func is not None:
        from tunesmith.data.pipeline import check_formatting_func_options

        check_formatting_func_options(args.completion_only_loss)


def fall_back_from_bitsandbytes(args: SFTConfig) -> None:
    name = OptimizerNames(args.optim).value
    needs_bnb = "8bit" in name or "bnb" in name or name.startswith("paged_")
    if not needs_bnb:
        return
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        return
    logger.warning(
        "optim=%r needs bitsandbytes on a CUDA GPU, which this machine lacks; using adamw_torch instead "
        "(same update, 32-bit optimizer state)",
        name,
    )
    args.optim = OptimizerNames.ADAMW_TORCH


def seed_everything(args: SFTConfig) -> None:
    from transformers.trainer_utils import enable_full_determinism, set_seed

    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)


def build_args(args, model, processing_class, train_dataset, formatting_func, old_kwargs: dict):
    """SFTTrainer's `args` as an SFTConfig, with TRL's old keyword arguments applied, the checks made
    before anything loads, `max_length` taken from a FastLanguageModel's `max_seq_length` (unless
    given), the bitsandbytes optimizer fallback and the seed. Returns (args, processing_class)."""
    args = as_sft_config(args, model)
    max_length_given = "max_seq_length" in old_kwargs
    processing_class = apply_old_kwargs(args, processing_class, old_kwargs)
    check_before_work(args, train_dataset, formatting_func)
    model_max_length = getattr(model, "max_seq_length", None)  # set by FastLanguageModel
    if model_max_length and args.max_length == SFTConfig.max_length and not max_length_given:
        logger.info("using the model's max_seq_length=%d as max_length", model_max_length)
        args.max_length = int(model_max_length)
    fall_back_from_bitsandbytes(args)
    # Seed before anything random is made (LoRA's initialisation, a model loaded by name), not only in
    # Trainer.__init__, which runs after: two runs of one config then agree from step 1.
    seed_everything(args)
    return args, processing_class
