"""Unsloth's loader names, so an Unsloth script switches to tunesmith by changing its import:

    from tunesmith import FastLanguageModel          # was: from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained("default", max_seq_length=2048, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=16)

Differences from Unsloth, on purpose:
- `load_in_4bit=True` on a machine without CUDA warns once and loads the 16-bit model: almost every
  Unsloth script carries it, and they should run on a CPU too (and fast: the 16-bit matmuls are the
  CPU's quickest). With CUDA it loads NF4 through bitsandbytes (and fails clearly when bitsandbytes
  is missing). `quantization="int4"` / `"int8"` (tunesmith's own, `tunesmith.ops.quant`) quantizes
  the frozen base on any device, for a model that would not fit otherwise.
- Nothing is patched: these are plain functions over `load_model`, `load_tokenizer` and `apply_lora`.
- `use_gradient_checkpointing="unsloth"` (Unsloth's offloaded checkpointing) turns on ordinary
  non-reentrant gradient checkpointing; CPU offload of activations is `SFTConfig.activation_offloading`.
- `target_modules=None` means all linear layers of the decoder (Unsloth's seven projections on
  Llama-like models; the fused qkv_proj / gate_up_proj on Phi-3).
"""

from __future__ import annotations

import logging
import warnings

import torch

from tunesmith.common import once
from tunesmith.models.adapters import EMBEDDING_NAMES, apply_lora
from tunesmith.models.introspect import unwrap
from tunesmith.models.load import load_model, load_tokenizer, resolve_dtype

logger = logging.getLogger(__name__)

# The attribute the trainer reads (through `max_seq_length_of`) to use as its default max_length.
MAX_SEQ_LENGTH_ATTR = "tunesmith_max_seq_length"

# Unsloth options with no meaning here (vLLM, its own patching, vision layers); accepted and logged.
_UNSLOTH_ONLY = {
    "fix_tokenizer",
    "fast_inference",
    "gpu_memory_utilization",
    "float8_kv_cache",
    "max_lora_rank",
    "disable_log_stats",
    "use_exact_model_name",
    "resize_model_vocab",
    "load_in_16bit",
    "random_state",
    "use_gradient_checkpointing",
    "offload_embedding",
    "unsloth_vllm_standby",
    "unsloth_tiled_mlp",
    "temporary_location",
    "finetune_vision_layers",
    "finetune_language_layers",
    "finetune_attention_modules",
    "finetune_mlp_modules",
}


def max_seq_length_of(model) -> int | None:
    """The max_seq_length given to `FastLanguageModel.from_pretrained` / `get_peft_model`, or None.
    Works on a PeftModel too (it forwards unknown attributes to the model it wraps)."""
    return getattr(model, MAX_SEQ_LENGTH_ATTR, None)


def _set_max_seq_length(model, max_seq_length) -> None:
    if max_seq_length is None:
        return
    target = unwrap(model)
    setattr(target, MAX_SEQ_LENGTH_ATTR, int(max_seq_length))
    # Unsloth scripts read model.max_seq_length.
    target.max_seq_length = int(max_seq_length)


def _drop_unsloth_only(kwargs: dict, where: str) -> dict:
    ignored = sorted(set(kwargs) & _UNSLOTH_ONLY)
    if ignored:
        logger.info("%s: ignoring Unsloth-only options %s (no effect in tunesmith)", where, ignored)
    return {k: v for k, v in kwargs.items() if k not in _UNSLOTH_ONLY}


def _quantization(load_in_4bit: bool, load_in_8bit: bool, full_finetuning: bool, quantization=None):
    if quantization is not None:  # tunesmith's own spelling (load_model's), which wins
        if full_finetuning:
            raise ValueError(
                f"quantization={quantization!r} freezes the base weights, which full_finetuning=True trains: "
                "drop one of them"
            )
        return quantization
    if not (load_in_4bit or load_in_8bit):
        return None
    if full_finetuning:
        logger.warning("full_finetuning=True trains every weight, so the model loads in 16-bit, not 4/8-bit")
        return None
    if not torch.cuda.is_available():
        if once(("fast", "no-cuda-4bit")):
            warnings.warn(
                "load_in_4bit/load_in_8bit needs a CUDA GPU and this machine has none: loading the model "
                "in 16-bit instead (LoRA trains the same way; it only uses more memory). For a model that "
                'does not fit in 16-bit, pass quantization="int4" or "int8" (tunesmith\'s CPU quantization)',
                stacklevel=3,
            )
        return None
    return "4bit" if load_in_4bit else "8bit"


def is_bfloat16_supported() -> bool:
    """Unsloth's helper (`bf16=is_bfloat16_supported()` in its scripts): True where "auto" picks bf16,
    on the GPU or, unlike Unsloth, on a CPU with native bf16."""
    return resolve_dtype("auto") == torch.bfloat16


class FastLanguageModel:
    """Unsloth's `FastLanguageModel` entry points, on top of tunesmith's loader and LoRA."""

    @staticmethod
    def from_pretrained(
        model_name="default",
        max_seq_length=2048,
        dtype=None,
        load_in_4bit=False,
        load_in_8bit=False,
        full_finetuning=False,
        token=None,
        trust_remote_code=False,
        **kwargs,
    ):
        """(model, tokenizer) for `model_name` (a folder, Hub id, .gguf file or "default").

        dtype None means "auto" (bf16 where the hardware runs it fast). `max_seq_length` is stored on
        the model (`model.max_seq_length`, `max_seq_length_of(model)`) for the trainer's max_length,
        and as the tokenizer's `model_max_length`.
        """
        kwargs = _drop_unsloth_only(kwargs, "FastLanguageModel.from_pretrained")
        hub = {"token": token} if token is not None else {}
        for key in ("revision", "cache_dir", "local_files_only"):
            if key in kwargs:
                hub[key] = kwargs[key]
        model = load_model(
            model_name,
            dtype="auto" if dtype is None else dtype,
            trust_remote_code=trust_remote_code,
            quantization=_quantization(
                load_in_4bit, load_in_8bit, full_finetuning, kwargs.pop("quantization", None)
            ),
            **hub,
            **{k: v for k, v in kwargs.items() if k not in hub},
        )
        tokenizer = load_tokenizer(
            model_name, trust_remote_code=trust_remote_code, gguf_file=kwargs.get("gguf_file"), **hub
        )
        _set_max_seq_length(model, max_seq_length)
        if max_seq_length is not None:
            tokenizer.model_max_length = int(max_seq_length)
        if full_finetuning:
            for param in model.parameters():
                param.requires_grad_(True)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model,
        r=16,
        target_modules=None,
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=False,
        modules_to_save=None,
        loftq_config=None,
        max_seq_length=None,
        **kwargs,
    ):
        """A PeftModel with LoRA on `target_modules` (None: all linear layers except the LM head).

        As in Unsloth, "embed_tokens" / "lm_head" listed in target_modules are trained in full
        (moved to modules_to_save), `random_state` seeds the adapter initialisation, and
        `use_gradient_checkpointing` (True or "unsloth") turns on gradient checkpointing.
        """
        kwargs = _drop_unsloth_only(kwargs, "FastLanguageModel.get_peft_model")
        saved = list(modules_to_save or [])
        if target_modules is None:
            targets = "all-linear"
        elif isinstance(target_modules, str):
            targets = target_modules
        else:
            targets = [t for t in target_modules if t not in EMBEDDING_NAMES]
            moved = [t for t in target_modules if t in EMBEDDING_NAMES and t not in saved]
            if moved:
                logger.info("training %s in full (modules_to_save), as Unsloth does", moved)
                saved += moved
        if loftq_config:
            kwargs.setdefault("init_lora_weights", "loftq")
            kwargs["loftq_config"] = loftq_config
        if use_gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        torch.manual_seed(random_state)
        peft_model = apply_lora(
            model,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=targets,
            modules_to_save=saved or None,
            bias=bias,
            use_rslora=use_rslora,
            **kwargs,
        )
        _set_max_seq_length(peft_model, max_seq_length or max_seq_length_of(model))
        return peft_model

    @staticmethod
    def for_inference(model):
        """Eval mode with the KV cache on (generation)."""
        model.eval()
        config = getattr(model, "config", None)
        if config is not None:
            config.use_cache = True
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing=True):
        """Train mode; the KV cache off, since training never reuses it."""
        model.train()
        config = getattr(model, "config", None)
        if config is not None:
            config.use_cache = False
        return model


# Newer Unsloth notebooks load text models through `FastModel`; the same entry points.
FastModel = FastLanguageModel


class FastVisionModel(FastLanguageModel):
    """Unsloth's `FastVisionModel`: a vision-language model and its processor, and LoRA chosen by Unsloth's
    `finetune_*` switches. Unsloth's defaults are kept (all four switches on: LoRA in the vision tower too,
    which is not the trainer's own default of the language model only)."""

    @staticmethod
    def from_pretrained(model_name, max_seq_length=2048, dtype=None, load_in_4bit=False, **kwargs):
        """(model, processor) for a vision-language `model_name` (a folder or Hub id)."""
        from tunesmith.models.vision import is_vision_model, load_processor

        kwargs = _drop_unsloth_only(kwargs, "FastVisionModel.from_pretrained")
        trust_remote_code = kwargs.pop("trust_remote_code", False)
        model = load_model(
            model_name,
            dtype="auto" if dtype is None else dtype,
            trust_remote_code=trust_remote_code,
            quantization=_quantization(
                load_in_4bit,
                kwargs.pop("load_in_8bit", False),
                kwargs.get("full_finetuning"),
                kwargs.pop("quantization", None),
            ),
            **{k: v for k, v in kwargs.items() if k != "full_finetuning"},
        )
        if not is_vision_model(model):
            raise ValueError(
                f"FastVisionModel: {model_name} is not a vision-language model; use FastLanguageModel"
            )
        _set_max_seq_length(model, max_seq_length)
        return model, load_processor(model_name, trust_remote_code=trust_remote_code)

    @staticmethod
    def get_peft_model(
        model,
        finetune_vision_layers=True,
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        random_state=3407,
        use_rslora=False,
        target_modules=None,
        modules_to_save=None,
        **kwargs,
    ):
        """LoRA on the linear layers the switches select (explicit `target_modules` win): the language model's
        and / or the vision tower's, their attention and / or MLP projections. The projector stays frozen
        unless listed in `modules_to_save`."""
        from tunesmith.models.vision import language_model_prefix, lora_targets

        if target_modules is None:
            targets = lora_targets(model, vision_tower=finetune_vision_layers)
            language = language_model_prefix(model) + "."
            if not finetune_language_layers:
                targets = [t for t in targets if not t.startswith(language)]
            kinds = [
                k
                for k, on in (("attention", finetune_attention_modules), ("mlp", finetune_mlp_modules))
                if on
            ]
            targets = [t for t in targets if _module_kind(t) in kinds]
            if not targets:
                raise ValueError("FastVisionModel.get_peft_model: the finetune_* switches select no layer")
            target_modules = targets
        kwargs.pop("use_gradient_checkpointing", None)
        return FastLanguageModel.get_peft_model(
            model,
            r=r,
            target_modules=target_modules,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias=bias,
            use_gradient_checkpointing=False,
            random_state=random_state,
            use_rslora=use_rslora,
            modules_to_save=modules_to_save,
            **kwargs,
        )


def _module_kind(name: str) -> str:
    """ "attention" or "mlp" for a linear layer's full name (by its parent module's name)."""
    parts = name.split(".")
    if any(p in ("self_attn", "attn", "attention", "cross_attn") for p in parts):
        return "attention"
    return "mlp"
