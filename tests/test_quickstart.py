"""The quick-start task: its data, its split, its metric, and how the real tokenizer sees it."""

import datetime as dt
import json

import pytest

from tunesmith.quickstart import (
    INSTRUCTION,
    contains_answer,
    date_example,
    exact_match,
    make_splits,
    prompts_and_references,
)


def test_examples_are_system_user_assistant_with_the_iso_answer():
    ex = date_example(dt.date(1999, 12, 31), 2)
    assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"]
    assert ex["messages"][1]["content"] == f"{INSTRUCTION} Dec 31 1999"
    assert ex["messages"][2]["content"] == "1999-12-31"
    assert date_example(dt.date(2001, 2, 3), 1)["messages"][1]["content"].endswith(" 3 February 2001")


def test_splits_are_deterministic_and_share_no_date():
    a, b = make_splits(300, 50, seed=0), make_splits(300, 50, seed=0)
    assert a == b
    assert make_splits(300, 50, seed=1) != a
    train_dates = {ex["messages"][2]["content"] for ex in a.train}
    held_dates = {ex["messages"][2]["content"] for ex in a.heldout}
    assert len(train_dates) == 300 and len(held_dates) == 50 and not train_dates & held_dates
    # all three spellings appear in a split of this size (each has probability 1/3 per example)
    spellings = {ex["messages"][1]["content"][len(INSTRUCTION) :].count(",") for ex in a.train}
    assert spellings == {0, 1}


def test_metrics():
    refs = ["2021-03-05", "1960-01-24", "2045-08-07", "1999-12-31"]
    preds = ["2021-03-05", " 1960-01-24\n", "August 7, 2045", "The date is 1999-12-31."]
    assert exact_match(preds, refs) == 0.5  # the first two; the last has extra words
    assert contains_answer(preds, refs) == 0.75
    prompts, references = prompts_and_references(make_splits(2, 1).heldout)
    assert [m["role"] for m in prompts[0]] == ["system", "user"] and len(references) == 1
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


def test_on_the_smollm2_tokenizer_only_the_answer_and_end_of_turn_are_trained(smollm2_tokenizer):
    from tunesmith.data.pipeline import prepare_dataset

    prepared = prepare_dataset(
        make_splits(20, 1).train, smollm2_tokenizer, assistant_only_loss=True, max_length=384, cache_dir=False
    )
    end_of_turn = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, ex in zip(prepared.dataset, make_splits(20, 1).train):
        trained = [t for t in row["labels"] if t != -100]
        # SmolLM2 splits digits one per token: "2021-03-05" is 10 tokens, then <|im_end|>
        assert smollm2_tokenizer.decode(trained[:-1]) == ex["messages"][2]["content"]
        assert len(trained) == 11 and trained[-1] == end_of_turn
        assert 40 <= len(row["input_ids"]) <= 60  # short: many steps fit in the quick start's minutes


def test_run_quickstart_wiring_on_a_tiny_model(tmp_path, monkeypatch):
    """The whole quick-start flow (measure, train, measure, report) on a tiny random Llama: the numbers
    mean nothing here, the files and the table are what is checked. The real run is `tunesmith train`."""
    import tunesmith.quickstart
    from tests.test_export import build_llama, build_tokenizer
    from tunesmith.config import load_config
    from tunesmith.quickstart import QUICKSTART_CONFIG, run_quickstart

    # leave the test process's torch thread count alone
    monkeypatch.setattr(tunesmith.quickstart, "threads_for_a_busy_cpu", lambda out: None)
    tok = build_tokenizer(tmp_path / "model")
    build_llama(tmp_path / "model", tok)
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"model.name_or_path={tmp_path / 'model'}",
        "max_steps=2",
        "save_steps=2",
        "logging_steps=1",
        "warmup_steps=0",
        "use_cpu=true",
        "disable_tqdm=true",
    ]
    lines = []
    result = run_quickstart(
        config=load_config(QUICKSTART_CONFIG, overrides), num_train=24, num_heldout=3, out=lines.append
    )
    # a random model writes no date: 0 of 3 before; after 2 steps of training it still cannot
    assert (result.before, result.before_any) == (0.0, 0.0)
    assert 0.0 <= result.after <= 1.0
    text = result.report.read_text()
    assert "| exact match | 0.0% |" in text and "## Sample generations" in text
    assert "| exact match | 0.0% |" in "\n".join(lines)  # the table printed on the console
    # the report and the console say how to run the result in Ollama and llama.cpp
    run_dir = tmp_path / "run"
    assert f"`tunesmith export {run_dir} --ollama {run_dir}/ollama --type q8_0`" in text
    assert f"`llama-cli -m {run_dir}/ollama/run-q8_0.gguf -cnv`" in "\n".join(lines)
    # the generation metric during training: before the first step and at the last (eval_generation)
    during = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if "eval_exact_match" in r]  # fmt: skip
    assert during == [0, 2]
    assert any(
        line.startswith("  exact match during training (3 held-out dates): step 0: 0%") for line in lines
    )
    assert "## Generations at step 2" in text
    for name in ("adapter_config.json", "checkpoint-2", "metrics.jsonl", "loss.png", "tunesmith_config.yaml",
                 "exact_match.png", "generations.jsonl"):  # fmt: skip
        assert (tmp_path / "run" / name).exists(), name


def test_one_thread_only_when_the_cpu_is_oversubscribed(monkeypatch):
    import os

    import torch

    from tunesmith.quickstart import threads_for_a_busy_cpu

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    assert threads_for_a_busy_cpu(out=lambda _: None) is None and chosen == []  # load below the 2 cores
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 5.0, 4.0))
    assert threads_for_a_busy_cpu(out=lambda _: None) == 1 and chosen == [1]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's explicit choice wins
    assert threads_for_a_busy_cpu(out=lambda _: None) is None and chosen == [1]
