"""SFTConfig's own fields, one dataclass per YAML section; each field's metadata holds its help text
and its section (`_help(text, group)`), the one source of `tunesmith config --list` and the YAML layout.

`SFTConfig` inherits these mixins with `TrainingArguments`; a field sits in the mixin of the block it
was written in (field order is part of the config's interface), and its `group` names its section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

# YAML section -> the prefix its keys take when a field of that name exists.
SECTIONS = {"model": "model_", "lora": "lora_", "data": "", "training": "", "kernels": "", "eval": ""}


def _help(text: str, group: str) -> dict:
    return {"help": text, "group": group}


@dataclass
class TrainingFields(TrainingArguments):
    """TrainingArguments fields whose defaults change (as TRL's), and the run-control fields of `tunesmith train`."""

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


@dataclass
class ModelFields:
    """model: TRL's model fields and the loader's (the chat-template fields belong to the data section)."""

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
            "Load the frozen base weights quantized, for LoRA: None; '4bit' (QLoRA NF4) or '8bit' through "
            "bitsandbytes, CUDA only; 'int8' or 'int4': tunesmith's weight-only quantization of the "
            "decoder's linear layers (tunesmith.ops.quant), any device, the CPU's QLoRA.",
            "model",
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


@dataclass
class LoraFields:
    """lora: the adapter."""

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


@dataclass
class DataFields:
    """data: TRL's SFT dataset fields and tunesmith's own."""

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


@dataclass
class KernelFields:
    """kernels: loss, kernels, memory (and `embedding_learning_rate`, a training key)."""

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


@dataclass
class EvalFields:
    """eval: samples, generation metrics and early stopping."""

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
