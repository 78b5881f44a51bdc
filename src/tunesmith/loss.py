"""The trainer's loss helpers: final hidden states without logits, the plain full-logits loss, the LM
head's effective weights through PEFT, the per-log token counters and the token-weighted metrics
read from their sums."""

from __future__ import annotations

import math

import torch

from tunesmith.common import IGNORE_INDEX
from tunesmith.config import SFTConfig
from tunesmith.models.introspect import decoder as find_decoder
from tunesmith.models.introspect import unwrap

__all__ = ["final_hidden_states", "lm_head_parameters", "logits_loss_sum"]


# Batch keys the model's forward takes; the rest (labels, shift_labels, ...) are for the loss.
FORWARD_KEYS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
    # vision-language batches (data.vision.VisionCollator): whatever the family's processor gives the model
    "pixel_values",
    "pixel_attention_mask",
    "image_grid_thw",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
)


def final_hidden_states(model, inputs: dict) -> torch.Tensor:
    """(B, T, H) hidden states after the final norm, without computing logits.

    The forward goes through the (possibly DDP / PEFT) wrapper so that gradient synchronisation and
    adapters work as usual; `logits_to_keep` = no position makes the LM head project nothing. The
    hidden states are taken from the decoder's own output by a hook for the length of the call, not
    from `output_hidden_states=True`: that returns every layer's output, which stays alive with the
    outputs (defeating activation checkpointing), and under bf16 mixed precision accelerate copies
    each of them to fp32 (measured on SmolLM2 on the CPU: the loss then ran its matmuls in fp32).
    """
    forward = {k: inputs[k] for k in FORWARD_KEYS if k in inputs}
    no_position = torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device)
    decoder = find_decoder(model)
    if decoder is None:
        outputs = model(
            **forward,
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=no_position,
            return_dict=True,
        )
        return outputs.hidden_states[-1]  # transformers ties it to last_hidden_state (after the final norm)
    captured: list[torch.Tensor] = []
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(**forward, use_cache=False, logits_to_keep=no_position, return_dict=True)
    finally:
        handle.remove()
    return captured[-1]


def logits_loss_sum(
    model, inputs: dict, dft: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain path: full (B, T, V) logits from the model's forward (its soft-capping included),
    then the summed cross-entropy against `shift_labels`, the argmax hits and the summed entropy of
    the softmax at the supervised positions (detached)."""
    forward = {k: inputs[k] for k in FORWARD_KEYS if k in inputs}
    logits = model(**forward, use_cache=False, return_dict=True).logits.float()  # (B, T, V)
    targets = inputs["shift_labels"]  # (B, T)
    per_token = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    if dft:  # each token's loss weighted by the probability of its target, without gradient through it
        per_token = per_token * torch.exp(-per_token).detach()
    supervised = targets != IGNORE_INDEX
    num_correct = ((logits.argmax(-1) == targets) & supervised).sum().detach()
    with torch.no_grad():
        log_p = torch.log_softmax(logits[supervised], dim=-1)  # (n, V)
        entropy_sum = -(log_p.exp() * log_p).sum()
    return per_token.sum(), num_correct, entropy_sum


def lm_head_parameters(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's effective (weight (V, H), bias (V,) or None), through PEFT's wrappers.

    - `modules_to_save=["lm_head"]`: the trained copy of the active adapter;
    - LoRA on the head: base weight + the adapter's delta (dropout on the head's input is not applied);
    - tied embeddings: the head's weight is the embedding matrix, which is what we return.
    """
    head = unwrap(model).get_output_embeddings()
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):
        active = head.active_adapters[0] if head.active_adapters else None
        head = (
            head.original_module
            if head.disable_adapters or active not in head.modules_to_save
            else head.modules_to_save[active]
        )
    if hasattr(head, "base_layer") and hasattr(head, "get_delta_weight"):
        weight = head.base_layer.weight
        if not head.disable_adapters and not head.merged:
            for name in head.active_adapters:
                if name in head.lora_A:
                    weight = weight + head.get_delta_weight(name)
        return weight, head.base_layer.bias
    return head.weight, getattr(head, "bias", None)


def final_logit_softcap(model) -> float | None:
    config = unwrap(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "final_logit_softcapping", None) or None


def ensure_shift_labels(inputs: dict) -> None:
    """A user's own collator may give only `labels` (B, T): shift them once here, one document per row."""
    if "shift_labels" in inputs:
        return
    if "labels" not in inputs:
        raise ValueError(
            "SFTTrainer: the batch has neither shift_labels nor labels; a custom data_collator must return "
            "labels (B, T) with -100 on the tokens not trained (tunesmith.data.collate gives both)"
        )
    from tunesmith.data.collate import shift_labels

    labels = inputs["labels"]
    inputs["shift_labels"] = shift_labels(labels, [[labels.shape[1]]] * labels.shape[0])


def real_tokens(inputs: dict) -> torch.Tensor:
    """Non-padding tokens in the batch (a padding-free batch's padding is its last `padding_tokens`)."""
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum()
    real = inputs["input_ids"].numel() - int(inputs.get("padding_tokens", 0))
    return torch.tensor(real, device=inputs["input_ids"].device)


class TokenCounters:
    """Local sums since the last log: loss, correct, supervised tokens, real tokens, entropy (one
    tensor, one reduce)."""

    def __init__(self, device):
        self._sums = torch.zeros(5, dtype=torch.float64, device=device)

    def add(self, loss_sum, correct, supervised, tokens, entropy):
        values = [loss_sum.detach(), correct, supervised, tokens, entropy]
        self._sums += torch.stack([torch.as_tensor(v, device=self._sums.device).double() for v in values])

    def totals(self) -> torch.Tensor:
        return self._sums.clone()

    def reset(self):
        self._sums.zero_()


def train_log_metrics(totals: list[float], last: dict, seconds: float, log_entropy: bool) -> dict:
    """A training log's token metrics from the `TokenCounters` sums since the last log (reduced over
    processes) and the last log that had running totals (`last`, {} at the start)."""
    loss_sum, correct, supervised, tokens, entropy = totals
    logs = {"mean_token_accuracy": correct / supervised if supervised else 0.0}
    if log_entropy:  # mean entropy of the predicted next-token distribution (as TRL)
        logs["entropy"] = entropy / supervised if supervised else 0.0
    logs["num_tokens"] = last.get("num_tokens", 0) + int(tokens)
    logs["num_supervised_tokens"] = last.get("num_supervised_tokens", 0) + int(supervised)
    logs["tokens_per_second"] = round(tokens / max(seconds, 1e-9), 2)
    return logs


def eval_metrics(totals: list[float], prefix: str, log_entropy: bool) -> dict:
    """Eval metrics weighted by tokens from the sums over every eval batch (loss, correct tokens,
    supervised tokens, entropy); {} when nothing was supervised. Trainer's own eval loss is a mean of
    per-batch means, which depends on the batch size; this is the mean over tokens."""
    loss_sum, correct, supervised, entropy = totals
    if supervised <= 0:
        return {}
    eval_loss = loss_sum / supervised
    metrics = {f"{prefix}_loss": eval_loss, f"{prefix}_mean_token_accuracy": correct / supervised}
    if log_entropy:
        metrics[f"{prefix}_entropy"] = entropy / supervised
    metrics[f"{prefix}_perplexity"] = math.exp(min(eval_loss, 700.0))
    metrics[f"{prefix}_num_supervised_tokens"] = int(supervised)
    return metrics


def loss_impl(args: SFTConfig) -> str:
    """The fused loss's impl: the full-logits reference without kernels, the chunked PyTorch path with
    triton_kernels=False, else "auto" (its Triton kernel on CUDA once checked, ops.selfcheck)."""
    if not args.use_kernels:
        return "reference"
    return "auto" if args.triton_kernels else "chunked"
