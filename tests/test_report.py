"""metrics.jsonl, plots and report.md; and tensorboard logs read back from a real (tiny) run."""

import json
from types import SimpleNamespace

import pytest
from transformers import TrainerState

from tunesmith.report import (
    METRICS_FILE,
    MetricsCallback,
    Sample,
    plot_metrics,
    read_metrics,
    series,
    write_report,
)


def log_events(callback, args, events):
    state = TrainerState()
    for step, logs in events:
        state.global_step, state.epoch = step, step / 10
        callback.on_log(args, state, None, logs=logs)
    return state


EVENTS = [
    (1, {"loss": 2.5, "learning_rate": 1e-3, "mean_token_accuracy": 0.1}),
    (2, {"loss": 1.5, "learning_rate": 5e-4, "mean_token_accuracy": 0.4}),
    (2, {"eval_loss": 1.7, "eval_mean_token_accuracy": 0.35, "eval_runtime": 0.1}),
    (3, {"loss": float("nan"), "learning_rate": 0.0, "mean_token_accuracy": 0.6}),
]


def test_callback_writes_one_json_line_per_log_event(tmp_path):
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = log_events(MetricsCallback(), args, EVENTS)
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 4
    assert json.loads(lines[0]) == {
        "step": 1,
        "epoch": 0.1,
        "loss": 2.5,
        "learning_rate": 1e-3,
        "mean_token_accuracy": 0.1,
    }
    # NaN is not valid JSON: the value is left out, the rest of the event is kept
    assert json.loads(lines[3]) == {"step": 3, "epoch": 0.3, "learning_rate": 0.0, "mean_token_accuracy": 0.6}

    records = read_metrics(tmp_path / METRICS_FILE)
    assert series(records, "loss") == ([1, 2], [2.5, 1.5])
    assert series(records, "eval_loss") == ([2], [1.7])

    # a resumed run (global_step > 0 at the start) keeps the file; a fresh one (step 0) starts over
    MetricsCallback().on_train_begin(args, state, None)
    assert len(read_metrics(tmp_path / METRICS_FILE)) == 4
    MetricsCallback().on_train_begin(args, TrainerState(), None)
    assert not (tmp_path / METRICS_FILE).exists()
    state = log_events(MetricsCallback(), args, EVENTS)

    # a second process (rank > 0) writes nothing
    state.is_world_process_zero = False
    MetricsCallback().on_log(args, state, None, logs={"loss": 9.0})
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 4


def test_plots_are_pngs_of_the_logged_series(tmp_path):
    import matplotlib.image

    args = SimpleNamespace(output_dir=str(tmp_path))
    state = log_events(MetricsCallback(), args, EVENTS)
    MetricsCallback().on_train_end(args, state, None)
    for name in ("loss.png", "learning_rate.png", "token_accuracy.png"):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.shape[:2] == (350, 600), name  # figsize (6, 3.5) at 100 dpi


def test_plot_metrics_skips_plots_without_data(tmp_path):
    written = plot_metrics([{"step": 1, "loss": 1.0}], tmp_path)
    assert [p.name for p in written] == ["loss.png"]


def test_report_has_the_before_after_table_and_samples(tmp_path):
    plot_metrics([{"step": 1, "loss": 1.0}], tmp_path)
    path = write_report(
        tmp_path,
        title="Quick start",
        metrics={"exact match": (0.05, 0.84)},
        samples=[Sample("March 5, 2021", "2021-03-05", "March 5|2021", "2021-03-05")],
        notes=["50 held-out dates"],
    )
    text = path.read_text()
    assert "| exact match | 5.0% | 84.0% |" in text
    assert "| March 5, 2021 | 2021-03-05 | March 5\\|2021 | 2021-03-05 |" in text
    assert "- 50 held-out dates" in text
    assert "![loss.png](loss.png)" in text and "token_accuracy.png" not in text


def test_tensorboard_and_metrics_jsonl_from_a_tiny_run(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.tiny import tiny_model, tiny_tokenizer
    from tunesmith import SFTConfig, SFTTrainer

    data = [{"prompt": "what is the capital of france", "completion": "paris"}] * 8
    args = SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=4,
        logging_steps=1,
        learning_rate=1e-2,
        report_to=["tensorboard"],
        save_strategy="no",
        use_peft=False,
        use_kernels=False,  # kernels and memory policy are not what this test is about
        memory_policy="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        tiny_model("llama"),
        args=args,
        train_dataset=data,
        processing_class=tiny_tokenizer(),
        callbacks=[MetricsCallback()],
    )
    trainer.train()

    train_logs = [r for r in read_metrics(tmp_path / "run" / METRICS_FILE) if "loss" in r]
    assert [r["step"] for r in train_logs] == [1, 2, 3]
    # transformers writes under output_dir/runs/<date>_<host>/ unless TENSORBOARD_LOGGING_DIR is set
    (event_dir,) = {p.parent for p in (tmp_path / "run" / "runs").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(event_dir)).Reload()
    assert "train/loss" in events.Tags()["scalars"]
    board = [(e.step, e.value) for e in events.Scalars("train/loss")]
    # the same three losses in both places (tensorboard stores float32)
    assert [s for s, _ in board] == [1, 2, 3]
    assert [v for _, v in board] == pytest.approx([r["loss"] for r in train_logs], rel=1e-6)
    assert (tmp_path / "run" / "loss.png").exists()
