"""SFTTrainer's surface: TRL's constructor and old spellings, formats, eval, optimizer groups,
metrics, saving, the NaN guard."""

import json
import math
import warnings

import pytest
import torch
from transformers import TrainingArguments

from tests.tiny import tiny_model, tiny_tokenizer
from tunesmith import SFTConfig, SFTTrainer, UnslothTrainer
from tunesmith.callbacks import NonFiniteLossError
from tunesmith.common import reset_once

PAIRS = [
    ("What is the capital of France?", "Paris."),
    ("Who wrote Hamlet?", "William Shakespeare."),
    ("What color is the sky?", "Blue."),
    ("Say yes.", "Yes."),
]


def config(tmp_path, **overrides) -> SFTConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        dataset_cache_dir=False,
        memory_policy="none",
    )
    values.update(overrides)
    return SFTConfig(**values)


@pytest.fixture(autouse=True)
def _fresh_notices():
    reset_once("notice")


# Every documented dataset format, as a user would write it.
FORMATS = {
    "text": [{"text": f"{p} {c}"} for p, c in PAIRS],
    "prompt_response": [{"prompt": p, "response": c} for p, c in PAIRS],
    "prompt_completion": [{"prompt": p, "completion": c} for p, c in PAIRS],
    "conversational_prompt_completion": [
        {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
        for p, c in PAIRS
    ],
    "alpaca": [{"instruction": p, "input": "", "output": c} for p, c in PAIRS],
    "messages": [
        {
            "messages": [
                {"role": "system", "content": "Be short."},
                {"role": "user", "content": p},
                {"role": "assistant", "content": c},
            ]
        }
        for p, c in PAIRS
    ],
    "sharegpt": [
        {"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": c}]} for p, c in PAIRS
    ],
    "tokenized": [
        {"input_ids": [7 + i, 8 + i, 9 + i, 2], "labels": [-100, 8 + i, 9 + i, 2]} for i in range(4)
    ],
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_dataset_format_reaches_the_trainer_and_trains(tmp_path, name):
    trainer = SFTTrainer(
        tiny_model("llama"),
        args=config(tmp_path),
        train_dataset=FORMATS[name],
        processing_class=tiny_tokenizer(),
    )
    row = trainer.train_dataset[0]
    assert len(row["input_ids"]) == len(row["labels"]) and any(label != -100 for label in row["labels"])
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))


def test_formatting_func(tmp_path):
    data = [{"q": p, "a": c} for p, c in PAIRS]
    trainer = SFTTrainer(
        tiny_model("llama"),
        args=config(tmp_path),
        train_dataset=data,
        processing_class=tiny_tokenizer(),
        formatting_func=lambda ex: f"{ex['q']} {ex['a']}",
    )
    tok = tiny_tokenizer()
    # the whole formatted text is trained, eos appended
    assert trainer.train_dataset[0]["input_ids"] == tok(f"{PAIRS[0][0]} {PAIRS[0][1]}").input_ids + [
        tok.eos_token_id
    ]


def test_old_spellings_work_with_one_notice_each(tmp_path):
    data = [{"prompt": p, "response": c} for p, c in PAIRS]
    with pytest.warns(FutureWarning) as caught:
        trainer = SFTTrainer(
            model=tiny_model("llama"),
            tokenizer=tiny_tokenizer(),
            train_dataset=[{"prompt": p + " " + c} for p, c in PAIRS],
            dataset_text_field="prompt",
            max_seq_length=7,
            packing=False,
            dataset_num_proc=1,
            args=TrainingArguments(output_dir=str(tmp_path), report_to="none", max_steps=1),
        )
    messages = " ".join(str(w.message) for w in caught)
    for old in ("tokenizer=", "dataset_text_field=", "max_seq_length=", "packing=", "dataset_num_proc="):
        assert old in messages
    assert trainer.args.max_length == 7 and trainer.args.dataset_text_field == "prompt"
    assert max(len(r["input_ids"]) for r in trainer.train_dataset) == 7  # truncated to the old max_seq_length
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        SFTTrainer(tiny_model("llama"), tokenizer=tiny_tokenizer(), train_dataset=data, args=config(tmp_path))
    assert [w for w in again if "tokenizer=" in str(w.message)] == []  # once per process


def test_plain_training_arguments_keep_their_values(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=5e-5, report_to="none", max_steps=1)
    trainer = SFTTrainer(
        tiny_model("llama"),
        args=args,
        train_dataset=FORMATS["prompt_completion"],
        processing_class=tiny_tokenizer(),
    )
    assert isinstance(trainer.args, SFTConfig)
    assert (
        trainer.args.learning_rate == 5e-5 and trainer.args.max_length == 1024
    )  # SFT fields get TRL's defaults


def test_unknown_keyword_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['max_lenght'\]"):
        SFTTrainer(
            tiny_model("llama"),
            args=config(tmp_path),
            train_dataset=FORMATS["text"],
            processing_class=tiny_tokenizer(),
            max_lenght=4,
        )


def test_unsloth_trainer_is_sft_trainer():
    assert UnslothTrainer is SFTTrainer


def test_metrics_are_logged(tmp_path):
    trainer = SFTTrainer(
        tiny_model("llama"),
        args=config(tmp_path),
        train_dataset=FORMATS["prompt_completion"],
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    first, second = trainer.state.log_history[:2]
    for key in (
        "loss",
        "grad_norm",
        "learning_rate",
        "mean_token_accuracy",
        "num_tokens",
        "num_supervised_tokens",
        "tokens_per_second",
    ):
        assert key in first
    rows = [trainer.train_dataset[i] for i in range(4)]
    # running totals: after two steps of two rows, all four rows' tokens were seen
    assert second["num_tokens"] == sum(len(r["input_ids"]) for r in rows)
    assert second["num_supervised_tokens"] == sum(sum(lab != -100 for lab in r["labels"]) for r in rows)
    assert 0.0 <= first["mean_token_accuracy"] <= 1.0


def test_eval_loss_does_not_depend_on_eval_batch_size(tmp_path):
    extra = [
        ("Hi", "Hello! How can I help you today?"),
        ("Tell a story.", "The cat and the dog were friends for a long time."),
        ("Two?", "Two."),
    ]
    data = [{"prompt": p, "completion": c} for p, c in PAIRS + extra]  # 7 rows of different lengths
    losses = {}
    for eval_batch in (1, 3, 7):
        trainer = SFTTrainer(
            tiny_model("llama", initializer_range=0.5),
            args=config(tmp_path, per_device_eval_batch_size=eval_batch),
            train_dataset=data,  # required, as in TRL; only evaluated here
            eval_dataset=data,
            processing_class=tiny_tokenizer(),
        )
        metrics = trainer.evaluate()
        losses[eval_batch] = metrics["eval_loss"]
        assert metrics["eval_perplexity"] == pytest.approx(
            torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-6
        )
        assert 0.0 <= metrics["eval_mean_token_accuracy"] <= 1.0
    assert losses[3] == pytest.approx(losses[1], rel=1e-6) and losses[7] == pytest.approx(losses[1], rel=1e-6)


def test_eval_dataset_dict_gets_one_prefix_each(tmp_path):
    trainer = SFTTrainer(
        tiny_model("llama"),
        args=config(tmp_path),
        train_dataset=FORMATS["prompt_completion"],
        eval_dataset={"a": FORMATS["prompt_completion"], "b": FORMATS["messages"]},
        processing_class=tiny_tokenizer(),
    )
    metrics = trainer.evaluate()
    assert "eval_a_loss" in metrics and "eval_b_loss" in metrics and "eval_b_perplexity" in metrics


def test_embedding_learning_rate_gets_its_own_group(tmp_path):
    trainer = SFTTrainer(
        tiny_model("llama"),
        args=config(tmp_path, learning_rate=1e-3, embedding_learning_rate=1e-5, weight_decay=0.1),
        train_dataset=FORMATS["prompt_completion"],
        processing_class=tiny_tokenizer(),
    )
    optimizer = trainer.create_optimizer()
    by_name = {g["name"]: g for g in optimizer.param_groups}
    embed = trainer.model.get_input_embeddings().weight
    assert by_name["embedding"]["lr"] == 1e-5 and any(p is embed for p in by_name["embedding"]["params"])
    norm = trainer.model.model.norm.weight
    assert by_name["no_decay"]["weight_decay"] == 0.0 and any(
        p is norm for p in by_name["no_decay"]["params"]
    )
    assert by_name["decay"]["lr"] == 1e-3 and by_name["decay"]["weight_decay"] == 0.1


def test_adamw_8bit_falls_back_on_a_machine_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: 8-bit AdamW would be used")
    trainer = SFTTrainer(
        tiny_model("llama"),
        args=config(tmp_path, optim="adamw_8bit"),
        train_dataset=FORMATS["prompt_completion"],
        processing_class=tiny_tokenizer(),
    )
    assert trainer.args.optim.value == "adamw_torch"
    assert type(trainer.create_optimizer()).__name__ == "AdamW"


def test_nan_loss_stops_with_the_step_and_rows(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    trainer = SFTTrainer(
        model,
        args=config(tmp_path),
        train_dataset=FORMATS["prompt_completion"],
        processing_class=tiny_tokenizer(),
    )
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train()
    message = str(err.value)
    assert "loss is nan at optimizer step 1" in message
    # two rows in the first batch, named by their index in the prepared training set
    rows = json.loads(message.split("rows ")[1].split("]")[0] + "]")
    assert len(rows) == 2 and set(rows) <= {0, 1, 2, 3}


def test_save_model_writes_model_tokenizer_template_and_config(tmp_path):
    trainer = SFTTrainer(
        tiny_model("llama"),
        args=config(tmp_path),
        train_dataset=FORMATS["messages"],
        processing_class=tiny_tokenizer(),
    )
    trainer.save_model(str(tmp_path / "final"))
    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tunesmith_config.yaml"} <= files
    saved = json.loads((tmp_path / "final" / "tokenizer_config.json").read_text()).get("chat_template") or (
        (tmp_path / "final" / "chat_template.jinja").read_text()
    )
    assert "<|im_start|>" in saved


def test_model_given_by_path(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    trainer = SFTTrainer(
        str(tmp_path / "tiny"),
        args=config(tmp_path, model_dtype="float32"),
        train_dataset=FORMATS["prompt_completion"],
    )
    assert trainer.model.config.hidden_size == 64 and trainer.processing_class.eos_token == "</s>"
    assert trainer.train().global_step == 2


def test_chat_template_from_config_is_saved_with_the_tokenizer(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = None  # a base model without a template
    trainer = SFTTrainer(
        tiny_model("llama"),
        args=config(tmp_path, chat_template="chatml"),
        train_dataset=FORMATS["messages"],
        processing_class=tok,
    )
    assert "<|im_start|>" in trainer.processing_class.chat_template
    trainer.save_model(str(tmp_path / "final"))
    from transformers import AutoTokenizer

    assert (
        AutoTokenizer.from_pretrained(tmp_path / "final").chat_template
        == trainer.processing_class.chat_template
    )


def test_sample_generations_and_progress_line_callbacks(tmp_path):
    import io

    from tunesmith.callbacks import ProgressLineCallback, SampleGenerationCallback

    stream = io.StringIO()
    trainer = SFTTrainer(
        tiny_model("llama"),
        args=config(
            tmp_path,
            sample_prompts=["Who wrote Hamlet?"],
            sample_max_new_tokens=3,
            eval_strategy="steps",
            eval_steps=2,
        ),
        train_dataset=FORMATS["prompt_completion"],
        eval_dataset=FORMATS["prompt_completion"][:2],
        processing_class=tiny_tokenizer(),
        callbacks=[ProgressLineCallback(stream)],
    )
    trainer.train()
    samples = next(
        cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SampleGenerationCallback)
    ).samples
    assert [(step, prompt) for step, prompt, _ in samples] == [
        (2, "Who wrote Hamlet?")
    ]  # one eval, at step 2
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[1].startswith("step 2/2 | loss ") and "tok/s" in lines[1]
    assert lines[2].startswith("step 2/2 | eval loss ")  # the evaluation at step 2 gets its own line


def test_a_collator_that_gives_only_labels_is_shifted_once(tmp_path):
    # e.g. a user's own padding collator: labels (B, T) unshifted, attention_mask, no shift_labels
    from tunesmith.data.collate import PaddedCollator

    def labels_only(rows):
        batch = PaddedCollator(pad_token_id=0)(rows)
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    data = FORMATS["prompt_completion"]
    ours = SFTTrainer(
        tiny_model("llama", initializer_range=0.5),
        args=config(tmp_path),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tiny_tokenizer(),
    )
    theirs = SFTTrainer(
        tiny_model("llama", initializer_range=0.5),
        args=config(tmp_path),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tiny_tokenizer(),
        data_collator=labels_only,
    )
    assert theirs.evaluate()["eval_loss"] == pytest.approx(ours.evaluate()["eval_loss"], rel=1e-5)


def test_streaming_dataset_trains(tmp_path):
    from datasets import IterableDataset

    stream = IterableDataset.from_generator(lambda: iter(FORMATS["prompt_completion"] * 3))
    trainer = SFTTrainer(
        tiny_model("llama"),
        args=config(tmp_path, max_steps=3),
        train_dataset=stream,
        processing_class=tiny_tokenizer(),
    )
    assert isinstance(trainer.train_dataset, IterableDataset)  # tokenized lazily, never materialised
    assert trainer.train().global_step == 3


@pytest.mark.parametrize(
    "optim, expected", [("adamw_torch", "AdamW"), ("adafactor", "Adafactor"), ("sgd", "SGD")]
)
def test_optimizers_through_optim_keep_the_parameter_groups(tmp_path, optim, expected):
    trainer = SFTTrainer(
        tiny_model("llama"),
        args=config(tmp_path, optim=optim, learning_rate=1e-3, embedding_learning_rate=1e-4, max_steps=1),
        train_dataset=FORMATS["prompt_completion"],
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    assert (
        type(
            trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        ).__name__
        == expected
    )
    lrs = {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}
    assert lrs["embedding"] == 1e-4 and lrs["decay"] == 1e-3


def test_compute_metrics_gets_logits_and_labels(tmp_path):
    seen = {}

    def compute_metrics(prediction):
        seen["logits"], seen["labels"] = prediction.predictions.shape, prediction.label_ids.shape
        return {"rows": float(prediction.label_ids.shape[0])}

    trainer = SFTTrainer(
        tiny_model("llama"),
        args=config(tmp_path, per_device_eval_batch_size=2),
        train_dataset=FORMATS["prompt_completion"],
        eval_dataset=FORMATS["prompt_completion"],
        processing_class=tiny_tokenizer(),
        compute_metrics=compute_metrics,
    )
    metrics = trainer.evaluate()
    # padding-free eval batches are one row each: 2 batches of 2 examples -> 2 rows, vocab 256
    assert metrics["eval_rows"] == 2.0 and seen["logits"][0] == 2 and seen["logits"][2] == 256
    assert seen["labels"][:2] == seen["logits"][:2] and "eval_loss" in metrics


def test_cpu_runs_trim_the_heap_every_few_optimizer_steps(tmp_path, monkeypatch):
    import sys

    from tunesmith import callbacks

    if not sys.platform.startswith("linux"):
        pytest.skip("malloc_trim is glibc's")
    calls = []
    monkeypatch.setattr(callbacks, "_malloc_trim", lambda: calls.append)
    from tests.tiny import tiny_model, tiny_tokenizer
    from tunesmith import SFTConfig, SFTTrainer

    data = [{"prompt": "what is two", "completion": "four"}] * 8
    args = SFTConfig(output_dir=str(tmp_path), max_steps=25, per_device_train_batch_size=2, report_to="none")
    trainer = SFTTrainer(
        model=tiny_model("llama"), args=args, train_dataset=data, processing_class=tiny_tokenizer()
    )
    trainer.train()
    assert calls == [0, 0]  # malloc_trim(0) after optimizer steps 10 and 20


def test_bf16_mixed_precision_gives_the_fused_loss_the_models_own_hidden_states(tmp_path, monkeypatch):
    # With bf16=True accelerate wraps the forward so that its outputs come back in fp32. The fused
    # loss must still get the decoder's bf16 hidden states (a bf16 matmul against the bf16 head), not
    # fp32 copies: those made it cast the (V, H) head to fp32 and run the whole loss in fp32.
    import tunesmith.ops.linear_cross_entropy as lce

    seen = []
    fused = lce.linear_cross_entropy

    def recording(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype, hidden.requires_grad))
        return fused(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(lce, "linear_cross_entropy", recording)
    model = tiny_model("llama").to(torch.bfloat16)
    trainer = SFTTrainer(
        model,
        args=config(tmp_path, bf16=True, use_cpu=True),
        train_dataset=[{"prompt": p, "completion": c} for p, c in PAIRS],
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16, True)}
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_progress_lines_only_leaves_one_progress_display(tmp_path):
    # the CLI and the quick start show ProgressLineCallback's lines only: Trainer's tqdm bar
    # (ProgressCallback) or printed log dicts (PrinterCallback) would repeat the same numbers
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from tunesmith.callbacks import ProgressLineCallback, progress_lines_only

    trainer = SFTTrainer(
        tiny_model("llama"),
        args=config(tmp_path),
        train_dataset=[{"prompt": q, "completion": a} for q, a in PAIRS],
        processing_class=tiny_tokenizer(),
    )
    kinds = lambda: [type(c) for c in trainer.callback_handler.callbacks]  # noqa: E731
    assert ProgressCallback in kinds() or PrinterCallback in kinds()  # Trainer's own display, before
    progress_lines_only(trainer)
    progress_lines_only(trainer)  # twice: still one line display
    assert ProgressCallback not in kinds() and PrinterCallback not in kinds()
    assert kinds().count(ProgressLineCallback) == 1


def test_token_weighted_metrics_from_the_sums():
    from tunesmith.loss import eval_metrics, train_log_metrics

    # 8 supervised tokens, loss sum 4 -> mean 0.5; 6 correct; entropy sum 2
    metrics = eval_metrics([4.0, 6.0, 8.0, 2.0], "eval", log_entropy=True)
    assert metrics == {
        "eval_loss": 0.5,
        "eval_mean_token_accuracy": 0.75,
        "eval_entropy": 0.25,
        "eval_perplexity": pytest.approx(math.exp(0.5)),
        "eval_num_supervised_tokens": 8,
    }
    assert eval_metrics([0.0, 0.0, 0.0, 0.0], "eval", log_entropy=True) == {}  # nothing supervised
    # running totals continue from the last log; 20 tokens in 2 s
    logs = train_log_metrics(
        [4.0, 6.0, 8.0, 20.0, 2.0], {"num_tokens": 100, "num_supervised_tokens": 30}, 2.0, False
    )
    assert logs == {
        "mean_token_accuracy": 0.75,
        "num_tokens": 120,
        "num_supervised_tokens": 38,
        "tokens_per_second": 10.0,
    }
