"""Building the model: load it (if given by name), add LoRA, swap in fast modules, set the memory policy
and the attention the batches need."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from tunesmith.config import SFTConfig, notice_once
from tunesmith.models.introspect import unwrap

logger = logging.getLogger("tunesmith.trainer")


def build_model(model, args: SFTConfig, peft_config):
    """Load (if given by name), add LoRA, swap in fast modules and set the memory policy."""
    full_ft = peft_config is None and not args.use_peft
    if full_ft and args.model_quantization is not None and not hasattr(model, "peft_config"):
        raise ValueError(
            f"model_quantization={args.model_quantization!r} freezes the base weights, so only adapters can "
            "train: set use_peft: true (or pass peft_config=LoraConfig(...)), or drop model_quantization to "
            "fine-tune every weight"
        )
    if model is None or isinstance(model, (str, os.PathLike)):
        from tunesmith.models.load import default_model_path, load_model

        name = str(model or args.model_name_or_path or default_model_path())
        kwargs = load_kwargs(args)
        if full_ft:
            fp32_master_weights(args, kwargs)
        model = load_model(name, **kwargs)
    else:
        from tunesmith.ops.quant import FORMATS, quantize_model

        if args.attention not in ("auto", "tunesmith_varlen"):
            unwrap(model).set_attn_implementation(args.attention)
        if args.model_quantization in FORMATS:
            # tunesmith's quantization applies to a model passed in as well (before LoRA wraps its layers)
            quantize_model(model, args.model_quantization)

    is_peft = hasattr(model, "peft_config") and hasattr(model, "get_base_model")
    if peft_config is not None or (args.use_peft and not is_peft):
        from tunesmith.models.adapters import apply_lora

        if peft_config is not None:
            model = apply_lora(
                model,
                peft_config,
                vision_tower=args.lora_vision_tower,
                train_projector=args.lora_train_projector,
            )
        else:
            model = apply_lora(
                model,
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                target_modules=args.lora_target_modules or "all-linear",
                modules_to_save=args.lora_modules_to_save,
                vision_tower=args.lora_vision_tower,
                train_projector=args.lora_train_projector,
            )
    if full_ft:
        warn_if_16bit_full_finetune(model, args)
    if args.use_kernels:
        from tunesmith.ops.apply import optimize

        optimize(model, impl="auto" if args.triton_kernels else "torch")
    handle = None
    if not args.gradient_checkpointing:
        policy = "offload" if args.activation_offloading else args.memory_policy
        if policy != "none":
            from tunesmith.ops.offload import apply_memory_policy

            # upper bound of the tokens in one micro-batch, for the "auto" memory estimate
            batch_tokens = args.per_device_train_batch_size * (args.max_length or 2048)
            budget = args.activation_memory_budget_gb
            handle = apply_memory_policy(
                model,
                policy,
                batch_tokens=batch_tokens,
                device=args.device,
                activation_budget=None if budget is None else int(budget * 2**30),
            )
    return model, handle


def load_kwargs(args: SFTConfig) -> dict[str, Any]:
    """`load_model` keyword arguments: tunesmith's choices from the config, then TRL's
    `model_init_kwargs`, which win (`dtype` / `torch_dtype`, `attn_implementation`, `device_map`,
    `revision`, `trust_remote_code`, `quantization_config`, ... all go to `from_pretrained`)."""
    attn = None if args.attention in ("auto", "tunesmith_varlen") else args.attention
    kwargs: dict[str, Any] = {
        "dtype": args.model_dtype,
        "trust_remote_code": args.trust_remote_code,
        "attn_implementation": attn,
        "quantization": args.model_quantization,
        "gguf_file": args.model_gguf_file,
    }
    init = dict(args.model_init_kwargs or {})
    if "dtype" in init or "torch_dtype" in init:
        # The user's dtype (either spelling) replaces `model_dtype`. It goes to load_model as
        # `torch_dtype`, a from_pretrained argument (its own `dtype` parameter is tunesmith's: there
        # "auto" is the hardware's choice, while here "auto" means the checkpoint's dtype, as in TRL).
        kwargs.pop("dtype")
        init["torch_dtype"] = init.pop("dtype") if "dtype" in init else init["torch_dtype"]
    if init.get("attn_implementation") is not None and args.attention == "auto":
        # their attention also decides what padding-free batches use (see build_collator)
        args.attention = init["attn_implementation"]
    kwargs.update(init)
    return kwargs


def fp32_master_weights(args: SFTConfig, load_kwargs: dict[str, Any]) -> None:
    """Full fine-tuning keeps its updates: where `model_dtype="auto"` means bf16, load fp32 weights and
    compute in bf16 through autocast instead (args.bf16 on).

    Why: AdamW on bf16 weights rounds every update to the weight's 8-bit mantissa, so an update
    smaller than about 1/256 of the weight is lost. At fine-tuning learning rates (1e-5) most are: on a
    tiny Llama, 20 steps moved the weights 0.52x as far as fp32 weights did, in a direction with cosine
    0.35 to theirs (bench/RESULTS.md, "Full fine-tuning keeps its updates"). LoRA is unaffected (its
    adapters are fp32 and its base frozen). The cost: fp32 weights and gradients (2x the weight memory
    of bf16) and AdamW state in fp32. `fp32_master_weights=False` or an explicit dtype keeps bf16."""
    from tunesmith.models.load import resolve_dtype

    if (
        not args.fp32_master_weights
        or args.model_quantization is not None
        or args.model_dtype != "auto"
        or "torch_dtype" in load_kwargs  # model_init_kwargs chose the dtype
    ):
        return
    if resolve_dtype("auto", args.device) != torch.bfloat16:
        return  # fp32 already (or fp16 on pre-Ampere GPUs, where autocast would need a loss scaler)
    load_kwargs["dtype"] = torch.float32
    if not args.bf16:
        args.bf16 = True  # accelerate then runs the forward under bf16 autocast, on the CPU too
        args.mixed_precision = "bf16"
    logger.info(
        "full fine-tuning: fp32 master weights, bf16 compute (autocast); fp32_master_weights=False "
        "loads bf16 weights instead (half the weight memory, small updates rounded away)"
    )


def warn_if_16bit_full_finetune(model, args: SFTConfig) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    low = [p for p in trainable if p.dtype in (torch.bfloat16, torch.float16)]
    if low and len(low) * 2 > len(trainable):
        dtype = str(low[0].dtype).removeprefix("torch.")
        notice_once(
            "full_finetune_16bit",
            f"full fine-tuning with {dtype} weights: AdamW's updates smaller than about 1/256 of a weight "
            f"are rounded away (at learning_rate={args.learning_rate:g} most are). Load the model in fp32 "
            "(dtype=torch.float32; the trainer's own loader does that by default, with bf16 compute) or "
            "train LoRA.",
        )


def set_batch_attention(model, tokenizer, args: SFTConfig) -> None:
    """The attention that the default collator's batches need: padding-free text batches (the default)
    carry per-document boundaries, read by tunesmith's varlen attention unless `attention` names another."""
    from tunesmith.data.vision import is_processor

    if is_processor(tokenizer) or args.padding_free is False:
        return
    if args.attention in ("auto", "tunesmith_varlen"):
        from tunesmith.ops.attention import use_varlen_attention

        use_varlen_attention(model)
