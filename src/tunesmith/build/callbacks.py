"""Building the callbacks SFTTrainer adds to Trainer's: the signal checkpoint (always, first), host
memory release on the CPU, and sample generation when `sample_prompts` is set."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from tunesmith.callbacks import ReleaseHostMemoryCallback, SampleGenerationCallback, SignalCheckpointCallback
from tunesmith.config import SFTConfig


def build_callbacks(args: SFTConfig, device: torch.device) -> list[TrainerCallback]:
    """The callbacks in the order the trainer adds them; the first is the `SignalCheckpointCallback`
    (the trainer keeps it: `stopped_by` reads it)."""
    callbacks: list[TrainerCallback] = [SignalCheckpointCallback()]
    if device.type == "cpu":
        callbacks.append(ReleaseHostMemoryCallback())
    if args.sample_prompts:
        callbacks.append(
            SampleGenerationCallback(
                args.sample_prompts,
                args.sample_max_new_tokens,
                chat_template_kwargs=args.chat_template_kwargs,
            )
        )
    return callbacks
