"""SFTConfig: every option of a tunesmith run, with its help text, and its YAML form.

`SFTConfig` is a `transformers.TrainingArguments` with TRL 1.x's SFT fields (same names, same
meaning) and tunesmith's own (model, LoRA, kernels, memory). It is the single source of truth:
the YAML file the CLI reads is its serialised form, and `load_config` checks a file against its
fields (unknown key -> the closest valid one; wrong type -> the key, the type and the value).

YAML may group keys in sections; a section only prefixes or groups, it holds no other meaning:

    model:                      # model.X -> model_X when that field exists, else X
      name_or_path: ./my-model  #   -> model_name_or_path
      trust_remote_code: false  #   -> trust_remote_code
    lora: {r: 16, alpha: 32}    # -> lora_r, lora_alpha
    data: {max_length: 512}     # -> max_length
    training: {learning_rate: 2.0e-4}

and `load_config(path, ["lora.r=8", "learning_rate=1e-4"])` applies dotted overrides, each value
read with `yaml.safe_load` (so `1e-4`, `true`, `[q_proj, v_proj]` mean what they look like).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import logging
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from tunesmith.common import once

__all__ = [
    "SFTConfig",
    "UnslothTrainingArguments",
    "ConfigError",
    "load_config",
    "config_fields",
    "deprecation_notice",
    "SECTIONS",
]

# YAML section -> the prefix its keys take when a field of that name exists.
SECTIONS = {"model": "model_", "lora": "lora_", "data": "", "training": "", "kernels": "", "eval": ""}

# Secrets are never written to a resolved config file.
_SECRET_FIELDS = {"hub_token", "push_to_hub_token", "hub_private_repo_token", "trackio_token"}


logger = logging.getLogger(__name__)


def deprecation_notice(key: str, message: str) -> None:
    """Warn once per process per `key` (a FutureWarning, like TRL's own deprecations)."""
    if once(("notice", key)):
        warnings.warn(message, FutureWarning, stacklevel=3)


def notice_once(key: str, message: str) -> None:
    """Log `message` once per process per `key` (a setting accepted and mapped, not deprecated)."""
    if once(("notice", key)):
        logger.warning(message)


class ConfigError(ValueError):
    """A configuration problem, with where it is and how to fix it."""


def _help(text: str, group: str) -> dict:
    return {"help": text, "group": group}


def _bf16_supported() -> bool:
    # Mixed bf16 through TrainingArguments needs a GPU that runs it fast (Ampere+) or an explicit
    # `use_cpu`; on a plain CPU TrainingArguments refuses bf16=True, so the default stays off there
    # (the model's own dtype, chosen by `model_dtype="auto"`, still gives bf16 weights on CPU).
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _has_accelerator() -> bool:
    import torch

    return (
        torch.cuda.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
        or torch.backends.mps.is_available()
    )


@dataclass
class SFTConfig(TrainingArguments):
    """Configuration of `SFTTrainer`: TrainingArguments + TRL 1.x's SFT fields + tunesmith's own.

    Defaults that differ from TrainingArguments, as in TRL (they change the trained model, so a TRL
    user gets the same result): `learning_rate=2e-5`, `logging_steps=10`, `bf16` on where the GPU
    runs it. One TRL default is NOT kept: `gradient_checkpointing` is False here and
    `memory_policy="auto"` decides instead; checkpointing changes memory and time, never the result.
    """

    # ---- TrainingArguments fields whose defaults change (as TRL's) ----
    learning_rate: float = field(
        default=2e-5, metadata=_help("Peak learning rate of AdamW (TRL's default 2e-5).", "training")
    )
    logging_steps: float = field(
        default=10,
        metadata=_help("Log every N optimizer steps (a float < 1 is a fraction of the run).", "training"),
    )
    gradient_checkpointing: bool | None = field(
        # None (not False): transformers warns that `gradient_checkpointing` is deprecated whenever it is
        # set, so only a user who sets it sees that warning; unset it resolves to False
        default=None,
        metadata=_help(
            "Recompute activations in the backward to save memory (TRL defaults to True). Only memory and "
            "time change, never the result; leave it unset (False) and let `memory_policy` decide.",
            "training",
        ),
    )
    bf16: bool | None = field(
        default=None,
        metadata=_help(
            "bf16 mixed precision. None: on where the GPU runs bf16 and fp16 is off (as TRL); off on CPU, "
            "where `model_dtype=auto` already loads bf16 weights.",
            "training",
        ),
    )

    resume_from_checkpoint: str | bool | None = field(
        default=None,
        metadata=_help(
            "Resume training: true = the newest complete checkpoint in output_dir (incomplete ones, from a "
            "killed save, are skipped and named); a path = that checkpoint (refused if incomplete); "
            "null/false = start afresh.",
            "training",
        ),
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata=_help(
            "`tunesmith train`: start afresh in an output_dir that holds a finished run or checkpoints "
            "(its checkpoints are removed). False: such a folder is refused unless resume_from_checkpoint "
            "is set.",
            "training",
        ),
    )

    # ---- model (TRL's model fields + the loader's) ----
    model_name_or_path: str | None = field(
        default=None,
        metadata=_help(
            "Model to fine-tune: a local folder, a Hub id, a .gguf file, or None for the built-in default "
            "(SmolLM2-135M-Instruct). Used when the trainer is given no model object.",
            "model",
        ),
    )
    model_dtype: str = field(
        default="auto",
        metadata=_help(
            "Weights dtype: auto (bf16 where the hardware runs it fast), bfloat16, float16, float32.", "model"
        ),
    )
    fp32_master_weights: bool = field(
        default=True,
        metadata=_help(
            "Full fine-tuning of a model loaded with model_dtype=auto where that means bf16: load the weights "
            "in fp32 (AdamW updates them in fp32) and compute in bf16 (autocast). False: bf16 weights, half "
            "the weight memory, but updates smaller than about 1/256 of a weight are rounded away.",
            "model",
        ),
    )
    model_quantization: str | None = field(
        default=None,
        metadata=_help(
            "Load the base weights quantized: None, '4bit' (QLoRA NF4) or '8bit'. CUDA only.", "model"
        ),
    )
    model_gguf_file: str | None = field(
        default=None,
        metadata=_help("GGUF file inside `model_name_or_path` to load (dequantised for training).", "model"),
    )
    model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata=_help(
            "Extra keyword arguments for `from_pretrained` when the model is given by name (TRL).", "model"
        ),
    )
    trust_remote_code: bool = field(
        default=False,
        metadata=_help("Allow models and tokenizers that ship their own Python code (off: safe).", "model"),
    )
    chat_template_path: str | None = field(
        default=None,
        metadata=_help(
            "A Jinja chat template file, or a tokenizer folder whose template to use (TRL).", "data"
        ),
    )
    chat_template: str | None = field(
        default=None,
        metadata=_help(
            "A built-in template name (chatml, llama-3, mistral-instruct, gemma, phi-3, alpaca) or Jinja text, "
            "for tokenizers without one.",
            "data",
        ),
    )

    # ---- LoRA ----
    use_peft: bool = field(
        default=False,
        metadata=_help(
            "Train a LoRA adapter instead of all weights (a `peft_config` passed to the trainer wins).",
            "lora",
        ),
    )
    lora_r: int = field(default=16, metadata=_help("LoRA rank.", "lora"))
    lora_alpha: int = field(default=32, metadata=_help("LoRA scaling numerator (scale = alpha / r).", "lora"))
    lora_dropout: float = field(
        default=0.0,
        metadata=_help(
            "Dropout on the LoRA input (TRL's ModelConfig uses 0.05; 0 as PEFT and Unsloth: dropout costs about "
            "an eighth of a CPU LoRA step).",
            "lora",
        ),
    )
    lora_target_modules: list[str] | None = field(
        default=None, metadata=_help("Modules to adapt; None = all linear layers except the LM head.", "lora")
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata=_help("Modules trained in full next to the adapter, e.g. [embed_tokens, lm_head].", "lora"),
    )
    lora_vision_tower: bool = field(
        default=False,
        metadata=_help(
            "Vision-language models: also add LoRA to the vision tower's linear layers (default: language model only).",
            "lora",
        ),
    )
    lora_train_projector: bool = field(
        default=False,
        metadata=_help(
            "Vision-language models: train the projector between vision tower and language model in full "
            "(default: frozen).",
            "lora",
        ),
    )

    # ---- data (TRL's SFT fields) ----
    dataset_text_field: str = field(
        default="text", metadata=_help("Column holding plain text (TRL).", "data")
    )
    dataset_format: str | None = field(
        default=None,
        metadata=_help(
            "Force the dataset format instead of detecting it from the columns: text, prompt_response, "
            "prompt_completion, conversational_prompt_completion, alpaca, messages, sharegpt, tokenized, "
            "formatting_func.",
            "data",
        ),
    )
    dataset_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata=_help("Extra dataset-preparation options; `skip_prepare_dataset: true` (TRL).", "data"),
    )
    datasets: list[Any] | dict[str, Any] | None = field(
        default=None,
        metadata=_help(
            "Several training sources mixed by weight, each {path, name, split, format, columns, system_prompt, "
            "weight | fraction | max_examples, eval | eval_split | eval_examples} (tunesmith.data.mixture); used "
            "instead of a single train dataset. Eval sets per source log eval_<name>_loss.",
            "data",
        ),
    )
    dataset_num_proc: int | None = field(default=None, metadata=_help("Processes for tokenization.", "data"))
    dataset_cache_dir: str | bool | None = field(
        default=None,
        metadata=_help(
            "Where prepared data is cached (None: ~/.cache/tunesmith/data; false: no cache).", "data"
        ),
    )
    eos_token: str | None = field(
        default=None,
        metadata=_help("Token that ends a turn or a text; None: the tokenizer's eos (TRL).", "data"),
    )
    pad_token: str | None = field(
        default=None, metadata=_help("Padding token; None: the tokenizer's pad (TRL).", "data")
    )
    max_length: int | None = field(
        default=1024,
        metadata=_help(
            "Longest tokenized example (and packed row); longer ones are truncated. None: no limit.", "data"
        ),
    )
    max_seq_length: int | None = field(
        default=None, metadata=_help("Deprecated spelling of `max_length` (older TRL / Unsloth).", "data")
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata=_help("keep_start, keep_end, or drop (drop overlong examples).", "data"),
    )
    shuffle_dataset: bool = field(
        default=False, metadata=_help("Shuffle the prepared dataset once (TRL).", "data")
    )
    packing: bool = field(
        default=False, metadata=_help("Pack several examples per row of `max_length` (TRL).", "data")
    )
    packing_strategy: str = field(
        default="bfd",
        metadata=_help("bfd (best-fit decreasing), bfd_split (split overflow), or wrapped.", "data"),
    )
    padding_free: bool | None = field(
        default=None,
        metadata=_help(
            "Concatenate a batch into one row without padding. None: on for unpacked and packed data (exact, "
            "only faster); False: pad to the longest row.",
            "data",
        ),
    )
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata=_help(
            "Pad batches to a multiple of this many tokens (padding-free: the one row). None: no padding, "
            "except padding-free batches on the CPU, padded to 64s so that oneDNN's per-shape kernels are reused.",
            "data",
        ),
    )
    eval_packing: bool | None = field(
        default=None, metadata=_help("Pack the eval set; None: as `packing`.", "data")
    )
    completion_only_loss: bool | None = field(
        default=None,
        metadata=_help("Loss on the completion only for prompt/completion data; None: yes (TRL).", "data"),
    )
    assistant_only_loss: bool | None = field(
        default=None,
        metadata=_help(
            "Loss on assistant turns only for conversations; None: yes (TRL's default is False, which trains "
            "on user and system turns too). tunesmith finds the assistant spans for any chat template.",
            "data",
        ),
    )
    train_on_inputs: bool = field(
        default=False,
        metadata=_help("Train on every token, prompts included (overrides the two above).", "data"),
    )
    chat_template_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata=_help(
            "Extra variables for the chat template, e.g. {enable_thinking: false}, wherever it renders "
            "(training, inspect, generation); a `chat_template_kwargs` column of the data wins per example.",
            "data",
        ),
    )
    train_on_reasoning: str = field(
        default="last",
        metadata=_help(
            "Which assistant turns' reasoning (reasoning_content / thinking, as the template renders it) is "
            "trained: last (the final turn's), all, or none. Answers and end-of-turn tokens always train.",
            "data",
        ),
    )

    # ---- loss, kernels, memory ----
    loss_type: str = field(
        default="nll",
        metadata=_help("nll, or dft (each token's loss weighted by its detached probability).", "kernels"),
    )
    log_entropy: bool = field(
        default=True,
        metadata=_help(
            "Log `entropy` (mean entropy of the predicted next-token distribution over supervised tokens, as "
            "TRL), computed inside the fused loss. Costs about 15% of the loss's time (a few % of a LoRA step "
            "on a small model with a large vocabulary); False skips it.",
            "kernels",
        ),
    )
    use_kernels: bool = field(
        default=True,
        metadata=_help(
            "Fast kernels and the fused LM-head loss (exact, only faster). False: plain modules.", "kernels"
        ),
    )
    triton_kernels: bool = field(
        default=True,
        metadata=_help(
            "On CUDA, run the Triton kernels (RMSNorm, RoPE, SwiGLU/GeGLU, the fused loss), each only after it "
            "passes a one-time check against its PyTorch reference on the device. False: the PyTorch versions of "
            "the same ops (as TUNESMITH_KERNELS=off does for every run).",
            "kernels",
        ),
    )
    attention: str = field(
        default="auto",
        metadata=_help(
            "auto: per-document attention for padding-free batches (tunesmith_varlen) and the model's own "
            "otherwise; or a transformers attn_implementation (sdpa, eager, flex_attention, flash_attention_2).",
            "kernels",
        ),
    )
    memory_policy: str = field(
        default="auto",
        metadata=_help(
            "auto (pick from the estimated memory), none, checkpoint (activation checkpointing) or offload "
            "(checkpointing with activations kept on the CPU).",
            "kernels",
        ),
    )
    activation_memory_budget_gb: float | None = field(
        default=None,
        metadata=_help(
            "memory_policy=auto: keep each micro-batch's activations under this many GiB by checkpointing as "
            "few decoder layers as needed (short micro-batches: none). None: twice the model's weight size, "
            "at least 0.25 GiB, at most 70% of the free memory.",
            "kernels",
        ),
    )
    activation_offloading: bool = field(
        default=False,
        metadata=_help("Offload activations to the CPU (TRL); same as memory_policy=offload.", "kernels"),
    )
    embedding_learning_rate: float | None = field(
        default=None,
        metadata=_help(
            "A separate learning rate for the embeddings and LM head (as Unsloth's trainer).", "training"
        ),
    )

    # ---- evaluation samples ----
    sample_prompts: list[str] | None = field(
        default=None, metadata=_help("Prompts to generate from at every evaluation (logged).", "eval")
    )
    sample_max_new_tokens: int = field(
        default=64, metadata=_help("Tokens to generate per sample prompt.", "eval")
    )
    eval_generation: dict[str, Any] | bool | None = field(
        default=None,
        metadata=_help(
            "Greedy generation on held-out prompts of the eval set(s), scored by exact match and chrF "
            "(eval_exact_match, eval_chrf; eval_<name>_... per eval set): true, or {steps: N (every N steps; "
            "default every evaluation), num_prompts: K (16), max_new_tokens: 64}. Also runs at the last step.",
            "eval",
        ),
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata=_help(
            "Stop after this many evaluations without improvement of metric_for_best_model (any eval metric, "
            "generation ones included; default eval_loss); turns on load_best_model_at_end, so the best "
            "checkpoint is kept and loaded at the end.",
            "eval",
        ),
    )
    early_stopping_threshold: float = field(
        default=0.0,
        metadata=_help("How much metric_for_best_model must improve to count as an improvement.", "eval"),
    )

    def __post_init__(self):
        self._evaluation_settings()
        if self.max_seq_length is not None:
            deprecation_notice(
                "SFTConfig.max_seq_length",
                "SFTConfig(max_seq_length=...) is the old spelling of max_length; using max_length="
                f"{self.max_seq_length}. Rename it to max_length.",
            )
            self.max_length = self.max_seq_length
            self.max_seq_length = None
        self._kernels_from_peer_spellings()
        if self.bf16 is None:
            self.bf16 = not self.fp16 and _bf16_supported()
        if self.bf16 and not self.use_cpu and not _has_accelerator():
            # TrainingArguments refuses bf16=True on a GPU-less machine unless told `use_cpu`; CPUs run bf16
            # autocast fine, so a script written for a GPU (bf16=True) runs here as written
            self.use_cpu = True
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
            # accelerate runs data parallelism on CPUs (gloo) only when told `cpu`; without it each of
            # the launched processes would train alone on its own shard of nothing
            self.use_cpu = True
        _check_choice("truncation_mode", self.truncation_mode, ("keep_start", "keep_end", "drop"))
        _check_choice("packing_strategy", self.packing_strategy, ("bfd", "bfd_split", "wrapped"))
        _check_choice("loss_type", self.loss_type, ("nll", "dft"))
        _check_choice("train_on_reasoning", self.train_on_reasoning, ("last", "all", "none"))
        _check_choice("memory_policy", self.memory_policy, ("auto", "none", "checkpoint", "offload"))
        _check_choice("model_quantization", self.model_quantization, (None, "4bit", "8bit"))
        self._check_ranges()
        if self.dataloader_pin_memory and not _has_accelerator():
            # pinned memory only speeds up copies to a GPU; without one torch warns on every DataLoader
            self.dataloader_pin_memory = False
        super().__post_init__()

    def _evaluation_settings(self) -> None:
        """eval_generation and early stopping need evaluations (and saved checkpoints) to act on; turn on
        what they need, with a notice, or say what to set."""
        from tunesmith.evaluation import GenerationSettings

        try:
            generation = GenerationSettings.parse(self.eval_generation)
        except ValueError as err:
            raise ConfigError(f"SFTConfig: {err}") from None
        strategy = str(getattr(self.eval_strategy, "value", self.eval_strategy))
        if generation is not None and generation.steps and strategy == "no":
            notice_once(
                "eval_generation.steps",
                f"eval_generation.steps={generation.steps}: evaluating every {generation.steps} steps "
                "(eval_strategy=steps); the generation metrics are computed inside the evaluation",
            )
            self.eval_strategy, self.eval_steps, strategy = "steps", generation.steps, "steps"
        patience = self.early_stopping_patience
        if patience is None:
            return
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ConfigError(f"SFTConfig: `early_stopping_patience` expects an int >= 1, got {patience!r}")
        if strategy == "no":
            raise ConfigError(
                "SFTConfig: early_stopping_patience needs evaluations to compare: set eval_strategy: steps and "
                "eval_steps: N (or eval_generation.steps: N), and an eval set"
            )
        if not self.load_best_model_at_end:
            notice_once(
                "early_stopping.best",
                "early_stopping_patience: load_best_model_at_end is turned on, so the best checkpoint is kept "
                "and loaded when training ends",
            )
            self.load_best_model_at_end = True
        save = str(getattr(self.save_strategy, "value", self.save_strategy))
        save_steps_default = self.save_steps == TrainingArguments.save_steps or save != strategy
        if save != strategy:
            notice_once(
                "early_stopping.save",
                f"early_stopping_patience: save_strategy={save!r} becomes {strategy!r} (a checkpoint at every "
                "evaluation, so the best one exists)",
            )
            self.save_strategy = strategy
        eval_steps = self.eval_steps or self.logging_steps
        if strategy == "steps" and eval_steps and (self.save_steps % eval_steps or save_steps_default):
            notice_once(
                "early_stopping.save_steps",
                f"early_stopping_patience: save_steps={self.save_steps} becomes eval_steps={eval_steps} (a "
                "checkpoint at every evaluation, so the best one is saved when it is evaluated)",
            )
            self.save_steps = eval_steps

    def _check_ranges(self) -> None:
        """Values that would fail only after the model is loaded (or divide by zero in the training loop),
        refused when the config is read."""
        at_least = {
            "per_device_train_batch_size": 1,
            "per_device_eval_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "lora_r": 1,
            "sample_max_new_tokens": 1,
        }
        for key, low in at_least.items():
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"SFTConfig: `{key}` must be a whole number >= {low}, got {value!r}")
        for key in ("learning_rate", "weight_decay", "max_grad_norm", "warmup_ratio"):
            value = getattr(self, key, None)
            if value is not None and not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"SFTConfig: `{key}` must be >= 0, got {value!r}")
        if self.embedding_learning_rate is not None and self.embedding_learning_rate < 0:
            raise ConfigError(
                f"SFTConfig: `embedding_learning_rate` must be >= 0, got {self.embedding_learning_rate!r}"
            )
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(
                f"SFTConfig: `max_length` must be >= 1 (or null: no limit), got {self.max_length!r}"
            )

    def _kernels_from_peer_spellings(self) -> None:
        """TRL's kernel switches mean tunesmith's own kernels: `use_liger_kernel=True` (TRL ≤ 1.15, a
        TrainingArguments field that would make Trainer import liger-kernel) and `use_kernels` given as
        a kernel source name (TRL 1.16, e.g. "liger"). One notice each; no Liger dependency."""
        if self.use_liger_kernel:
            notice_once(
                "use_liger_kernel",
                "use_liger_kernel=True: tunesmith uses its own kernels instead of Liger's (fused LM-head loss "
                "that never builds the logits, fused RMSNorm / SwiGLU / RoPE / LoRA); liger-kernel is not "
                "needed. Same as use_kernels=True.",
            )
            self.use_liger_kernel = False
            self.liger_kernel_config = None
            self.use_kernels = True
        if isinstance(self.use_kernels, str):
            value = self.use_kernels
            off = value.strip().lower() in ("false", "no", "none", "off", "0", "")
            notice_once(
                f"use_kernels={value}",
                f"use_kernels={value!r}: tunesmith has no kernel sources to choose from; "
                + (
                    "kernels are off (use_kernels=False)."
                    if off
                    else "its own kernels are used (use_kernels=True)."
                ),
            )
            self.use_kernels = not off

    # ---- serialised form ----
    def to_yaml_dict(self) -> dict[str, dict[str, Any]]:
        """The resolved configuration grouped in sections (model, lora, data, kernels, eval, training)."""
        grouped: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for f in config_fields().values():
            if f.name in _SECRET_FIELDS or f.name == "max_seq_length":
                continue
            group = f.metadata.get("group", "training")
            key = (
                f.name[len(SECTIONS[group]) :]
                if f.name.startswith(SECTIONS[group]) and SECTIONS[group]
                else f.name
            )
            grouped[group][key] = _plain(getattr(self, f.name))
        return {name: values for name, values in grouped.items() if values}

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_yaml_dict(), sort_keys=False, allow_unicode=True)

    def save_resolved(self, directory: str | Path) -> Path:
        """Write the resolved configuration to `directory/tunesmith_config.yaml`; return the path."""
        from tunesmith.checkpoint import atomic_file

        path = Path(directory) / "tunesmith_config.yaml"
        with atomic_file(path) as partial:  # a crash leaves the old file or the new one
            partial.write_text(self.to_yaml())
        return path


@dataclass
class UnslothTrainingArguments(SFTConfig):
    """Unsloth's name for the training arguments; `embedding_learning_rate` is an SFTConfig field."""


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"SFTConfig: `{key}` must be one of {shown}, got {value!r}")


def _plain(value):
    """A YAML-safe copy: enums to their values, dataclasses/objects with to_dict to dicts."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value))
    return str(value)


def config_fields() -> dict[str, dataclasses.Field]:
    """SFTConfig's user-facing fields by name (init fields only)."""
    return {f.name: f for f in dataclasses.fields(SFTConfig) if f.init}


# ---------------------------------------------------------------- YAML loading


def load_config(source: str | Path | dict | None = None, overrides: typing.Iterable[str] = ()) -> SFTConfig:
    """Build an SFTConfig from a YAML file (or a dict) plus dotted `key=value` overrides.

    >>> load_config({"lora": {"r": 8}, "learning_rate": 1e-4}, ["model.name_or_path=./m"]).lora_r
    8

    Unknown keys, wrong types and invalid values raise `ConfigError` naming the file and key.
    """
    import yaml

    where = "<dict>"
    if source is None:
        raw: dict = {}
        where = "<defaults>"
    elif isinstance(source, dict):
        raw = source
    else:
        where = str(source)
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"{where}: no such config file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{where}: the top level must be a mapping of keys to values, got {type(raw).__name__}"
            )

    flat = _flatten(raw, where)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(
                f"override {item!r}: write it as key=value, e.g. learning_rate=1e-4 or lora.r=8"
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {err}") from None
        flat.update(_flatten(_nest(key.strip(), value), f"override {item!r}"))

    hints = typing.get_type_hints(SFTConfig)
    for key, value in list(flat.items()):
        flat[key] = _check_type(key, value, hints.get(key, Any), where)
    try:
        return SFTConfig(**flat)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except ValueError as err:
        raise ConfigError(f"{where}: invalid configuration: {err}") from None


def _nest(dotted: str, value) -> dict:
    head, _, rest = dotted.partition(".")
    return {head: _nest(rest, value) if rest else value}


def _flatten(raw: dict, where: str) -> dict[str, Any]:
    """Map YAML keys (top-level or inside a section) to SFTConfig field names."""
    valid = config_fields()
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key in valid:
            flat[key] = value
        elif key == "model" and isinstance(value, str):
            flat["model_name_or_path"] = value
        elif key in SECTIONS and isinstance(value, dict):
            for sub, sub_value in value.items():
                name = _section_key(key, str(sub))
                if name is None:
                    raise ConfigError(_unknown(f"{key}.{sub}", where))
                flat[name] = sub_value
        elif key in SECTIONS:
            raise ConfigError(f"{where}: `{key}` is a section and holds key: value pairs, got {value!r}")
        else:
            raise ConfigError(_unknown(key, where))
    return flat


def _section_key(section: str, sub: str) -> str | None:
    valid = config_fields()
    prefixed = SECTIONS[section] + sub
    if prefixed in valid:
        return prefixed
    return sub if sub in valid else None


def _all_spellings() -> list[str]:
    names = list(config_fields())
    for section, prefix in SECTIONS.items():
        if prefix:
            names += [f"{section}.{n[len(prefix) :]}" for n in config_fields() if n.startswith(prefix)]
    return names


def _unknown(key: str, where: str) -> str:
    close = difflib.get_close_matches(key, _all_spellings(), n=1, cutoff=0.6)
    hint = f" Did you mean `{close[0]}`?" if close else " `tunesmith train --help` lists the valid keys."
    return f"{where}: unknown key `{key}`.{hint}"


def _check_type(key: str, value, annotation, where: str):
    """Return `value` (numeric strings made numbers) if it fits `annotation`, else raise ConfigError."""
    ok, converted = _fits(value, annotation)
    if ok:
        return converted
    expected = _type_name(annotation)
    raise ConfigError(f"{where}: `{key}` expects {expected}, got {value!r} ({type(value).__name__})")


def _fits(value, annotation) -> tuple[bool, Any]:
    origin = typing.get_origin(annotation)
    if annotation is Any or annotation is object:
        return True, value
    if origin in (typing.Union, types.UnionType):
        # try the non-str members first so "1e-4" for `float | str` becomes a float
        members = sorted(typing.get_args(annotation), key=lambda a: a is str)
        for member in members:
            ok, converted = _fits(value, member)
            if ok:
                return True, converted
        return False, value
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(annotation)
        if not args:
            return True, list(value)
        results = [_fits(v, args[0]) for v in value]
        return all(ok for ok, _ in results), [v for _, v in results]
    if origin is dict or annotation is dict:
        return isinstance(value, dict), value
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = [m.value for m in annotation]
        return value in values or isinstance(value, annotation), value
    return True, value  # a type we do not check (e.g. a config object): TrainingArguments validates it


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in annotation)
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))
