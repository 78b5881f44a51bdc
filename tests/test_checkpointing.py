"""Checkpoints: a resumed run continues the same loss curve; SIGTERM saves and stops cleanly."""

import os
import signal

import pytest
import yaml
from transformers import TrainerCallback

from tests.tiny import tiny_model, tiny_tokenizer
from tunesmith import SFTConfig, SFTTrainer

DATA = [
    {"prompt": f"Count {word}.", "completion": f"{word} one two {word}."}
    for word in "apple banana cat dog sun sky water red green blue day night".split()
]


def args(out, **overrides):
    values = dict(
        output_dir=str(out),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=6,
        logging_steps=1,
        learning_rate=3e-3,
        lr_scheduler_type="linear",
        warmup_steps=1,
        save_strategy="steps",
        save_steps=3,
        report_to="none",
        dataset_cache_dir=False,
        memory_policy="none",
        seed=7,
    )
    values.update(overrides)
    return SFTConfig(**values)


def losses(trainer):
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def test_resume_continues_the_same_loss_curve(tmp_path):
    # shuffled data (RandomSampler), linear schedule with warmup, AdamW: all must resume exactly
    full = SFTTrainer(
        tiny_model("llama"),
        args=args(tmp_path / "full"),
        train_dataset=DATA,
        processing_class=tiny_tokenizer(),
    )
    full.train()
    curve = losses(full)
    assert sorted(curve) == [1, 2, 3, 4, 5, 6]

    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", "tunesmith_config.yaml"} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert any(p.name.startswith("rng_state") for p in checkpoint.iterdir())

    # a fresh model (other random weights: the checkpoint must replace them) resumed at step 3
    resumed = SFTTrainer(
        tiny_model("llama", seed=123),
        args=args(tmp_path / "resumed"),
        train_dataset=DATA,
        processing_class=tiny_tokenizer(),
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = losses(resumed)  # the checkpoint's log history (steps 1-3) is carried over
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(curve[step], rel=1e-5), step
    # the running token counts continue from the checkpoint too
    assert resumed.state.log_history[-2]["num_tokens"] == full.state.log_history[-2]["num_tokens"]
    assert (
        resumed.state.log_history[-2]["num_supervised_tokens"]
        == full.state.log_history[-2]["num_supervised_tokens"]
    )
    # and the curve moved (the test would notice a resume that restarted from scratch)
    assert curve[6] < curve[1]


class SendSignal(TrainerCallback):
    def __init__(self, signum):
        self.signum = signum

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_stops(tmp_path, signum):
    before = signal.getsignal(signum)
    trainer = SFTTrainer(
        tiny_model("llama"),
        args=args(tmp_path, save_strategy="no"),
        train_dataset=DATA,
        processing_class=tiny_tokenizer(),
        callbacks=[SendSignal(signum)],
    )
    out = trainer.train()
    # the signal arrives at the end of step 2: that step finishes, is saved, and training stops there
    assert out.global_step == 2
    assert (tmp_path / "checkpoint-2" / "model.safetensors").exists()
    saved = yaml.safe_load((tmp_path / "checkpoint-2" / "tunesmith_config.yaml").read_text())
    assert saved["training"]["max_steps"] == 6
    assert signal.getsignal(signum) == before  # handlers restored after training
