"""The built-in quick start: a task the default model cannot do, taught with LoRA in minutes.

The task is turning a date written in words into ISO 8601 (``March 5, 2021`` -> ``2021-03-05``).
SmolLM2-135M-Instruct knows month names but does not produce this exact format reliably, the
answer is ~11 tokens (digits are single tokens in its vocabulary), and the mapping is fully
deterministic, so exact-match accuracy on held-out dates is an honest metric of the skill.

Everything here runs offline: the data is generated from a seed, the model is
`tunesmith.models.load.default_model_path()`.
"""

from __future__ import annotations

import calendar
import datetime as dt
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

INSTRUCTION = "Write this date in ISO format (YYYY-MM-DD):"
# A short system turn: it replaces SmolLM2's 19-token default one (fewer tokens per step), and it
# tells the model to answer with the date alone, so the "before" measurement is a fair one.
SYSTEM = "Reply with the date only."
FIRST_DATE = dt.date(1950, 1, 1)
LAST_DATE = dt.date(2049, 12, 31)

# Spellings of the same date the model sees in the prompt; each is a pure function of the date.
_STYLES = (
    lambda d: f"{calendar.month_name[d.month]} {d.day}, {d.year}",  # March 5, 2021
    lambda d: f"{d.day} {calendar.month_name[d.month]} {d.year}",  # 5 March 2021
    lambda d: f"{calendar.month_abbr[d.month]} {d.day} {d.year}",  # Mar 5 2021
)


def date_example(date: dt.date, style: int) -> dict:
    """One chat example for `date` written in spelling `style` (0, 1 or 2).

    >>> date_example(dt.date(2021, 3, 5), 0)["messages"][2]
    {'role': 'assistant', 'content': '2021-03-05'}
    >>> date_example(dt.date(2021, 3, 5), 1)["messages"][1]["content"]
    'Write this date in ISO format (YYYY-MM-DD): 5 March 2021'
    """
    prompt = f"{INSTRUCTION} {_STYLES[style](date)}"
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": date.isoformat()},
        ]
    }


@dataclass(frozen=True)
class TaskSplits:
    train: list[dict]
    heldout: list[dict]


def make_splits(num_train: int = 2000, num_heldout: int = 100, seed: int = 0) -> TaskSplits:
    """Train and held-out examples with no date in common (so held-out accuracy is not recall).

    Deterministic for a seed: `make_splits(2, 1, seed=0)` returns the same three examples on
    every machine, because the dates come from `random.Random(seed)` over a fixed range.
    """
    span = (LAST_DATE - FIRST_DATE).days + 1
    if num_train + num_heldout > span:
        raise ValueError(f"asked for {num_train + num_heldout} distinct dates; the range holds {span}")
    rng = random.Random(seed)
    offsets = rng.sample(range(span), num_train + num_heldout)
    examples = [date_example(FIRST_DATE + dt.timedelta(days=o), rng.randrange(len(_STYLES))) for o in offsets]
    return TaskSplits(train=examples[:num_train], heldout=examples[num_train:])


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions that are exactly the reference, surrounding whitespace aside.

    The instruction asks for the date and nothing else, so "Sure! 2021-03-05" is not a match;
    `contains_answer` gives the looser reading.

    >>> exact_match(["2021-03-05\\n", "2021-3-5", "Sure! 2021-03-05"], ["2021-03-05"] * 3)
    0.3333333333333333
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("exact_match needs at least one example")
    return sum(p.strip() == r for p, r in zip(predictions, references)) / len(references)


def prompts_and_references(examples: Sequence[dict]) -> tuple[list[list[dict]], list[str]]:
    """Split chat examples into the prompt messages (all but the last turn) and the answer."""
    prompts = [ex["messages"][:-1] for ex in examples]
    references = [ex["messages"][-1]["content"] for ex in examples]
    return prompts, references


# The quick start's settings: the fast CPU recipe (LoRA on all linear layers, packing, bf16 where the
# CPU runs it). `configs/quickstart.yaml` holds the same values; a test keeps the two equal.
QUICKSTART_CONFIG = {
    "output_dir": "runs/quickstart",
    "model": {"name_or_path": "default"},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
    # ~45 tokens per example: a packed row of 384 holds about 8 of them
    "data": {"max_length": 384, "packing": True, "assistant_only_loss": True},
    "training": {
        "use_peft": True,
        "learning_rate": 2.0e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 10,
        "max_steps": 120,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 120,
        "save_total_limit": 1,
        "overwrite_output_dir": True,  # a demo: running it again replaces the last one
        "seed": 0,
        "report_to": "none",
    },
    # exact match and chrF of greedy answers on 10 held-out dates at steps 0, 40, 80 and 120: the
    # generation metric moving during training (eval_exact_match in metrics.jsonl, exact_match.png)
    "eval": {
        "eval_generation": {"steps": 40, "num_prompts": 10, "max_new_tokens": 14},
        "eval_on_start": True,
        "per_device_eval_batch_size": 8,
    },
}
NUM_TRAIN, NUM_HELDOUT = 2000, 50


@dataclass
class QuickstartResult:
    before: float
    after: float
    before_any: float  # correct date anywhere in the answer: a looser reading, reported beside exact match
    after_any: float
    report: object  # Path of report.md


def contains_answer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions that contain the reference date anywhere (a looser metric than exact match).

    >>> contains_answer(["Sure: 2021-03-05!", "2021-3-5"], ["2021-03-05", "2021-03-05"])
    0.5
    """
    return sum(r in p for p, r in zip(predictions, references)) / len(references)


def evaluate(
    model, tokenizer, examples: Sequence[dict], max_new_tokens: int = 14
) -> tuple[float, float, list[str]]:
    """(exact match, contains answer, generations) of greedy answers to the held-out prompts.

    14 new tokens: the answer is 10 digit/dash tokens + the end-of-turn token; anything longer is
    wrong under exact match anyway."""
    from tunesmith.generation import generate

    prompts, references = prompts_and_references(examples)
    predictions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return exact_match(predictions, references), contains_answer(predictions, references), predictions


def threads_for_a_busy_cpu(out=print) -> int | None:
    """Use one torch thread when other processes already keep every core busy (`tunesmith.threads`, the
    rule every command follows); return the count set, None when left alone."""
    from tunesmith.threads import apply_thread_rule

    choice = apply_thread_rule()
    if not choice.changed:
        return None
    out("  the CPU is busy with other processes: using 1 thread (set OMP_NUM_THREADS to choose)")
    return 1


def run_elsewhere(output_dir) -> list[str]:
    """How to run the trained adapter in llama.cpp and Ollama: the report's last notes.

    >>> run_elsewhere("runs/quickstart")[0]
    'Run it in Ollama: `tunesmith export runs/quickstart --ollama runs/quickstart/ollama --type q8_0`, then `ollama create dates -f runs/quickstart/ollama/Modelfile && ollama run dates`'
    """
    folder = f"{output_dir}/ollama"
    gguf = f"{folder}/{Path(output_dir).name}-q8_0.gguf"  # the name `export --ollama` gives it
    return [
        f"Run it in Ollama: `tunesmith export {output_dir} --ollama {folder} --type q8_0`, then "
        f"`ollama create dates -f {folder}/Modelfile && ollama run dates`",
        f"Run it in llama.cpp: the same export writes `{gguf}`; `llama-cli -m {gguf} -cnv` (or `llama-server -m ...`)",
    ]


def run_quickstart(
    overrides: Sequence[str] = (),
    *,
    config=None,
    num_train: int = NUM_TRAIN,
    num_heldout: int = NUM_HELDOUT,
    out=print,
    resume_command: str = "tunesmith train resume_from_checkpoint=true",
):
    """Measure the default model on held-out dates, train LoRA on the generated task, measure again.

    Prints a before/after table and sample generations, and leaves in `output_dir`: the adapter,
    a checkpoint, the resolved config, metrics.jsonl, plots and report.md. Returns a QuickstartResult.
    `config`: a ready SFTConfig (from `configs/quickstart.yaml`); else QUICKSTART_CONFIG + `overrides`.
    """
    import time

    from tunesmith.build.tokenizer import load_by_name
    from tunesmith.callbacks import no_save_progress_bars, progress_lines_only
    from tunesmith.config import load_config
    from tunesmith.models.load import load_model
    from tunesmith.report import MetricsCallback, Sample, markdown_table, write_report
    from tunesmith.trainer import SFTTrainer

    if config is None:
        config = load_config(QUICKSTART_CONFIG, overrides)
    from tunesmith.checkpoint import check_output_dir

    check_output_dir(
        config.output_dir, overwrite=config.overwrite_output_dir, resume=config.resume_from_checkpoint
    )
    splits = make_splits(num_train, num_heldout, seed=config.seed)
    started = time.perf_counter()
    from tunesmith.models.load import DEFAULT_ALIASES

    shown = config.model_name_or_path
    shown = "SmolLM2-135M-Instruct (built in)" if str(shown).lower() in DEFAULT_ALIASES else shown
    out(f"quick start: teaching {shown} to write dates as YYYY-MM-DD")
    out(
        f"  {len(splits.train)} training examples, {len(splits.heldout)} held-out dates, output in {config.output_dir}"
    )
    threads_for_a_busy_cpu(out)
    tokenizer = load_by_name(config.model_name_or_path, config, vision=False)
    model = load_model(config.model_name_or_path, dtype=config.model_dtype)

    out("measuring the model before training ...")
    before, before_any, before_text = evaluate(model, tokenizer, splits.heldout)
    out(f"  exact match before training: {before:.1%}")

    trainer = SFTTrainer(
        model,
        args=config,
        train_dataset=splits.train,
        eval_dataset=splits.heldout if config.eval_generation else None,
        processing_class=tokenizer,
        callbacks=[MetricsCallback()],
    )
    progress_lines_only(trainer)  # one progress display: a line per log, as `tunesmith train CONFIG`
    with no_save_progress_bars():
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    if trainer.stopped_by:
        from tunesmith.callbacks import TrainingStopped

        stop = TrainingStopped(
            trainer.stopped_by, trainer.state.global_step, trainer.state.max_steps, resume_command
        )
        write_report(
            config.output_dir,
            title="tunesmith quick start (STOPPED EARLY)",
            notes=[f"**{stop}**", f"exact match before training: {before:.1%}"],
        )
        raise stop
    with no_save_progress_bars():
        trainer.save_model()
    during = [
        (r["step"], r["eval_exact_match"]) for r in trainer.state.log_history if "eval_exact_match" in r
    ]
    if during:
        shown = ", ".join(f"step {step}: {value:.0%}" for step, value in during)
        out(
            f"  exact match during training ({len(trainer.generation_eval.sets['eval'])} held-out dates): {shown}"
        )

    out("measuring the model after training ...")
    after, after_any, after_text = evaluate(trainer.model, tokenizer, splits.heldout)
    minutes = (time.perf_counter() - started) / 60

    prompts, references = prompts_and_references(splits.heldout)
    metrics = {"exact match": (before, after), "correct date anywhere in the answer": (before_any, after_any)}
    samples = [
        Sample(p[-1]["content"].removeprefix(INSTRUCTION).strip(), r, b, a)
        for p, r, b, a in list(zip(prompts, references, before_text, after_text))[:5]
    ]
    from tunesmith.threads import last_choice

    notes = [
        f"{len(splits.heldout)} held-out dates (none of them in the {len(splits.train)} training examples), greedy decoding",
        f"LoRA r={config.lora_r}, {config.max_steps} steps, learning rate {config.learning_rate}; "
        f"{minutes:.1f} minutes in all",
    ]
    if last_choice() is not None:
        notes.append(last_choice().line())
    if during:
        notes.append(
            "exact match during training (eval_generation, greedy, "
            f"{len(trainer.generation_eval.sets['eval'])} held-out dates): "
            + ", ".join(f"step {step}: {value:.0%}" for step, value in during)
        )
    notes += run_elsewhere(config.output_dir)
    from tunesmith.evaluation import report_sections

    report = write_report(
        config.output_dir,
        title="tunesmith quick start: dates to ISO 8601",
        metrics=metrics,
        samples=samples,
        notes=notes,
        sections=report_sections(
            trainer.state.log_history,
            samples=trainer.generation_eval.samples if trainer.generation_eval is not None else (),
        ),
    )
    rows = [[name, f"{b:.1%}", f"{a:.1%}"] for name, (b, a) in metrics.items()]
    out("")
    out(markdown_table(["metric (held-out)", "before", "after"], rows))
    out("")
    out(
        markdown_table(
            ["prompt", "expected", "before", "after"],
            [[s.prompt, s.reference, s.before, s.after] for s in samples],
        )
    )
    out(f"\n{minutes:.1f} minutes. Adapter, metrics, plots and report.md in {config.output_dir}")
    for line in run_elsewhere(config.output_dir):
        out(f"  {line}")
    return QuickstartResult(before, after, before_any, after_any, report)
