"""End to end on a tiny random model: LoRA and full fine-tuning memorise a few short answers
(loss near zero), and greedy generation then gives back exactly the trained answer."""

import pytest

from tests.tiny import tiny_model, tiny_tokenizer
from tunesmith import SFTConfig, SFTTrainer, generate

QA = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("What color is the sky?", "The sky is blue."),
    ("Name a fruit.", "A banana."),
]
DATA = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]


def train(tmp_path, steps, lr, **overrides):
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        dataset_cache_dir=False,
        memory_policy="none",
        assistant_only_loss=True,  # a memorisable target: the answers, not the questions' first words
        **overrides,
    )
    # initializer_range 0.5: with the default 0.02 the frozen random LM head bounds the logits (the final
    # RMSNorm fixes |h|), so LoRA alone could not make any token's probability approach 1
    trainer = SFTTrainer(
        tiny_model("llama", initializer_range=0.5),
        args=args,
        train_dataset=DATA,
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    return trainer


def assert_answers_memorised(trainer):
    tok = trainer.processing_class
    outputs = generate(
        trainer.model, tok, [[{"role": "user", "content": q}] for q, _ in QA], max_new_tokens=12
    )
    # the word-level tokenizer decodes with single spaces between tokens ("Paris is ... France .")
    assert outputs == [tok.decode(tok(a).input_ids, skip_special_tokens=True) for _, a in QA]
    assert "<unk>" not in tok.decode(tok(" ".join(a for _, a in QA)).input_ids)


def test_lora_drives_the_loss_near_zero_and_generation_reproduces_the_answers(tmp_path):
    trainer = train(tmp_path, steps=20, lr=1e-2, use_peft=True, lora_r=16, lora_alpha=16, lora_dropout=0.0)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    assert 0 < trainable < total / 2  # only the adapter trains
    last = trainer.state.log_history[-2]  # the last step's log ([-1] is the run summary)
    assert last["loss"] < 0.05 and last["mean_token_accuracy"] == 1.0
    assert_answers_memorised(trainer)
    # the saved adapter is a PEFT adapter folder (not the full model)
    trainer.save_model(str(tmp_path / "adapter"))
    names = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tunesmith_config.yaml"} <= names
    assert "model.safetensors" not in names


def test_full_fine_tuning_memorises_too(tmp_path):
    trainer = train(tmp_path, steps=20, lr=3e-3)
    assert all(p.requires_grad for p in trainer.model.parameters())
    assert trainer.state.log_history[-2]["loss"] < 0.05
    assert_answers_memorised(trainer)


@pytest.mark.parametrize("packing", [True])
def test_packed_training_memorises(tmp_path, packing):
    # all four conversations in one packed row: they must not see each other to memorise each answer
    trainer = train(tmp_path, steps=20, lr=3e-3, packing=packing, max_length=128)
    assert len(trainer.train_dataset) == 1 and len(trainer.train_dataset[0]["seq_lengths"]) == 4
    assert trainer.state.log_history[-2]["loss"] < 0.05
    assert_answers_memorised(trainer)
