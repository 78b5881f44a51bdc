"""SFTConfig: TrainingArguments + the section mixins of `fields`, checked and resolved in `__post_init__`,
and its serialised (YAML) form."""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from tunesmith.config.errors import ConfigError, deprecation_notice, notice_once
from tunesmith.config.fields import (
    SECTIONS,
    DataFields,
    EvalFields,
    KernelFields,
    LoraFields,
    ModelFields,
    TrainingFields,
)

# Secrets are never written to a resolved config file.
_SECRET_FIELDS = {"hub_token", "push_to_hub_token", "hub_private_repo_token", "trackio_token"}


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


# reversed MRO gives the field order: TrainingArguments', then model, lora, data, kernels, eval
@dataclass
class SFTConfig(EvalFields, KernelFields, DataFields, LoraFields, ModelFields, TrainingFields):
    """Configuration of `SFTTrainer`: TrainingArguments + TRL 1.x's SFT fields + tunesmith's own.

    Defaults that differ from TrainingArguments, as in TRL (they change the trained model, so a TRL
    user gets the same result): `learning_rate=2e-5`, `logging_steps=10`, `bf16` on where the GPU
    runs it. One TRL default is NOT kept: `gradient_checkpointing` is False here and
    `memory_policy="auto"` decides instead; checkpointing changes memory and time, never the result.
    """

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
        _check_choice("model_quantization", self.model_quantization, (None, "4bit", "8bit", "int8", "int4"))
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
