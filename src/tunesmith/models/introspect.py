"""Model introspection: the base model under DDP / PEFT wrappers, its decoder stack, its name."""

from __future__ import annotations

import torch

__all__ = ["decoder", "model_name", "unwrap"]


def unwrap(model) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP / DataParallel
        model = model.module
    get_base = getattr(model, "get_base_model", None)  # PeftModel / LoraModel
    return get_base() if callable(get_base) else model


def decoder(model) -> torch.nn.Module | None:
    """The base model's decoder stack (whose output is the final-norm hidden states), if it has one."""
    base = unwrap(model)
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not base else None


def model_name(model) -> str:
    config = getattr(unwrap(model), "config", None)
    return getattr(config, "_name_or_path", None) or "model"
