"""eval_generation (exact match and chrF of greedy answers on held-out prompts, inside the evaluation),
early stopping on any eval metric with the best checkpoint kept and named, and the report's evaluation part."""

import json

import pytest

from tests.test_export import build_llama, build_tokenizer
from tunesmith import SFTConfig, SFTTrainer
from tunesmith.config import ConfigError, load_config
from tunesmith.evaluation import (
    GenerationSettings,
    check_best_metric,
    examples_from_rows,
    report_sections,
    score,
    strip_reasoning,
)

PROMPT, ANSWER = "what is the capital of france", "paris"
ROWS = [{"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}]}] * 16


@pytest.fixture
def tiny(tmp_path):
    tok = build_tokenizer(tmp_path / "model")
    build_llama(tmp_path / "model", tok, tie=False)
    return tmp_path


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "run"), model_dtype="float32", use_peft=True, lora_r=8, lora_alpha=16,
        learning_rate=1e-2, max_steps=30, per_device_train_batch_size=8, logging_steps=5, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0, max_length=64, dataset_cache_dir=False,
        memory_policy="none",
    )  # fmt: skip
    values.update(overrides)
    return SFTConfig(**values)


def test_score_and_strip_reasoning():
    assert score(["paris", "lyon "], ["paris", "paris"]) == pytest.approx({"exact_match": 0.5, "chrf": score(
        ["paris", "lyon"], ["paris", "paris"])["chrf"]})  # fmt: skip
    assert score(["paris"], ["paris"])["chrf"] == 100.0
    assert score(["xyz"], ["paris"])["chrf"] == 0.0  # no character n-gram in common
    assert strip_reasoning("<think>hmm</think>\n paris ") == "paris"
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        score(["a"], ["a", "b"])


def test_prompts_and_references_come_from_the_prepared_rows(tiny):
    from transformers import AutoTokenizer

    from tunesmith.data.pipeline import prepare_dataset

    tok = AutoTokenizer.from_pretrained(tiny / "model")
    rows = ROWS[:3]
    packed = prepare_dataset(rows, tok, packing=True, max_length=256, cache_dir=False).dataset
    assert len(packed) == 1  # three short conversations in one packed row
    examples, skipped = examples_from_rows(packed, tok, k=2)
    assert (len(examples), skipped) == (2, 0)
    # the prompt is the document up to the generation prompt; the reference its trained answer
    assert tok.decode(examples[0].prompt_ids).endswith(f"{PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    assert examples[0].reference == ANSWER
    text = prepare_dataset([{"text": "the quick brown fox"}], tok, cache_dir=False).dataset
    assert examples_from_rows(text, tok, k=2) == ([], 1)  # every token trained: no prompt


def test_generation_metric_moves_during_training_and_is_in_the_report(tiny):
    from tunesmith.report import MetricsCallback, read_metrics

    args = config(
        tiny, eval_generation={"steps": 10, "num_prompts": 2, "max_new_tokens": 8}, eval_on_start=True
    )
    assert (args.eval_strategy, args.eval_steps) == ("steps", 10)  # turned on by eval_generation.steps
    trainer = SFTTrainer(
        str(tiny / "model"),
        args=args,
        train_dataset=ROWS,
        eval_dataset=ROWS[:2],
        callbacks=[MetricsCallback()],
    )
    trainer.train()
    exact = {r["step"]: r["eval_exact_match"] for r in trainer.state.log_history if "eval_exact_match" in r}
    # the random model never says "paris"; after 30 steps at lr 1e-2 LoRA has memorised the one answer
    # (as in test_cli, where the adapter then generates it)
    assert sorted(exact) == [0, 10, 20, 30]
    assert exact[0] == 0.0 and exact[30] == 1.0
    chrf = [r["eval_chrf"] for r in trainer.state.log_history if "eval_chrf" in r]
    assert chrf[-1] == 100.0 and chrf[0] < 50.0
    lines = (tiny / "run" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 2 and json.loads(lines[-1])["output"].strip() == ANSWER
    assert (tiny / "run" / "exact_match.png").exists() and (tiny / "run" / "chrf.png").exists()
    sections = "\n".join(
        report_sections(read_metrics(tiny / "run" / "metrics.jsonl"), samples=trainer.generation_eval.samples)
    )
    assert "| eval | " in sections and "100.0%" in sections  # the last exact match
    assert "## Generations at step 30" in sections and f"| {ANSWER} | {ANSWER} |" in sections


def test_early_stopping_keeps_and_names_the_best_checkpoint(tiny):
    # learning rate 0: the eval loss never improves, so with patience 1 training stops at the second
    # evaluation after the first (step 10), and the best checkpoint is the first evaluation's (step 5)
    args = config(tiny, learning_rate=0.0, eval_strategy="steps", eval_steps=5, early_stopping_patience=1,
                  save_total_limit=1)  # fmt: skip
    assert args.load_best_model_at_end and args.save_strategy == "steps" and args.save_steps == 5
    trainer = SFTTrainer(str(tiny / "model"), args=args, train_dataset=ROWS, eval_dataset=ROWS[:2])
    trainer.train()
    assert trainer.state.global_step == 10
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-5")
    assert (tiny / "run" / "checkpoint-5").is_dir()  # kept although save_total_limit is 1
    sections = report_sections(
        trainer.state.log_history, best_checkpoint=trainer.state.best_model_checkpoint,
        best_metric=trainer.state.best_metric, metric_name=args.metric_for_best_model,
    )  # fmt: skip
    assert any(line.startswith("Best checkpoint: `") and "checkpoint-5` (loss " in line for line in sections)


def test_early_stopping_on_a_named_eval_set_needs_its_metric(tiny):
    args = config(tiny, eval_strategy="steps", eval_steps=5, early_stopping_patience=2)
    evals = {"capitals": ROWS[:2]}
    with pytest.raises(
        ValueError, match="no evaluation logs 'eval_loss'; the eval metrics are eval_capitals_loss"
    ):
        SFTTrainer(str(tiny / "model"), args=args, train_dataset=ROWS, eval_dataset=evals)
    args = config(tiny, eval_strategy="steps", eval_steps=5, early_stopping_patience=2,
                  metric_for_best_model="eval_capitals_loss")  # fmt: skip
    SFTTrainer(str(tiny / "model"), args=args, train_dataset=ROWS, eval_dataset=evals)  # accepted


def test_config_errors():
    with pytest.raises(
        ConfigError,
        match=r"eval_generation: unknown key `num_prompt`. Did you mean `eval_generation.num_prompts`",
    ):
        load_config({"eval_generation": {"num_prompt": 4}})
    with pytest.raises(ConfigError, match=r"eval_generation.steps: expects an int >= 1, got 0"):
        load_config({"eval_generation": {"steps": 0}})
    with pytest.raises(ConfigError, match="early_stopping_patience needs evaluations to compare"):
        load_config({"early_stopping_patience": 3})
    assert GenerationSettings.parse(True) == GenerationSettings(steps=None, num_prompts=16, max_new_tokens=64)


def test_check_best_metric_accepts_generation_metrics_only_when_they_are_computed():
    from types import SimpleNamespace

    from tunesmith.evaluation import GenerationEvaluator

    args = SimpleNamespace(load_best_model_at_end=True, metric_for_best_model="eval_exact_match",
                           eval_strategy="steps", eval_steps=10)  # fmt: skip
    with pytest.raises(ValueError, match="no evaluation logs 'eval_exact_match'"):
        check_best_metric(args, [1], None)
    check_best_metric(args, [1], None, compute_metrics=lambda p: {"exact_match": 1.0})  # its own metric names
    evaluator = GenerationEvaluator(GenerationSettings(steps=10), {"eval": []})
    check_best_metric(args, [1], evaluator)  # computed at every evaluation
    evaluator = GenerationEvaluator(GenerationSettings(steps=20), {"eval": []})
    with pytest.raises(
        ValueError, match="computed every eval_generation.steps=20, but evaluation runs every 10"
    ):
        check_best_metric(args, [1], evaluator)


def test_generation_metrics_per_named_eval_set_and_per_source_report(tiny):
    from tunesmith.data.mixture import DatasetSource

    other = [
        {
            "messages": [
                {"role": "user", "content": "the quick brown fox"},
                {"role": "assistant", "content": "dog"},
            ]
        }
    ]
    sources = {
        "capitals": DatasetSource(ROWS, eval=ROWS[:1]),
        "animals": DatasetSource(other * 4, eval=other),
    }
    args = config(tiny, max_steps=2, eval_generation={"num_prompts": 1, "max_new_tokens": 4})
    trainer = SFTTrainer(str(tiny / "model"), args=args, train_dataset=sources)
    assert sorted(trainer.generation_eval.sets) == ["eval_animals", "eval_capitals"]
    trainer.train()
    last = {k: v for r in trainer.state.log_history for k, v in r.items()}
    assert {
        "eval_capitals_exact_match",
        "eval_capitals_chrf",
        "eval_animals_exact_match",
        "eval_animals_loss",
    } <= set(last)
    rows = [
        line
        for line in "\n".join(report_sections(trainer.state.log_history)).splitlines()
        if line.startswith("| ")
    ]
    assert rows[0] == "| eval set | loss | mean_token_accuracy | exact_match | chrf |"
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| animals", "| capitals"]


def test_cli_train_with_datasets_reports_each_source(tiny, capsys):
    from tunesmith.cli import main

    other = [
        {
            "messages": [
                {"role": "user", "content": "the quick brown fox"},
                {"role": "assistant", "content": "dog"},
            ]
        }
    ]
    for name, rows in (("capitals", ROWS), ("animals", other * 8)):
        (tiny / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tiny / "run.yaml").write_text(
        f"""
output_dir: {tiny / "run"}
model: {{name_or_path: {tiny / "model"}, dtype: float32}}
datasets:
  - {{path: {tiny / "capitals.jsonl"}, weight: 1, eval_examples: 2}}
  - {{path: {tiny / "animals.jsonl"}, weight: 1, eval_examples: 2}}
lora: {{r: 8, alpha: 16}}
data: {{max_length: 64, dataset_cache_dir: false}}
eval: {{eval_generation: {{num_prompts: 2, max_new_tokens: 4}}}}
training: {{use_peft: true, learning_rate: 1.0e-2, max_steps: 4, per_device_train_batch_size: 4, logging_steps: 2,
  save_strategy: "no", report_to: none, use_cpu: true, disable_tqdm: true, seed: 0}}
"""
    )
    assert main(["train", str(tiny / "run.yaml")]) == 0, capsys.readouterr().err
    report = (tiny / "run" / "report.md").read_text()
    # the data summary has a line per source (14 + 6 examples after the held-out ones: 10 each at equal weights)
    assert (
        "capitals (capitals.jsonl, messages): examples 16 in, 16 out, 2 held out for eval; 10 in the mixture"
        in report
    )
    assert (
        "animals (animals.jsonl, messages): examples 8 in, 8 out, 2 held out for eval; 10 in the mixture"
        in report
    )
    rows = [line.split(" | ")[0] for line in report.splitlines() if line.startswith("| ")]
    assert "| animals" in rows and "| capitals" in rows  # the evaluation table: one row per source
    assert "## Generations at step 4" in report
