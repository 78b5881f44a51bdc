"""Evaluation people read: greedy generations on held-out prompts, scored by exact match and chrF,
inside the trainer's evaluation (so early stopping and the best checkpoint can use them).

The prompts and references come from the prepared eval rows themselves: in each eval document the
last run of trained tokens is the reference and everything before it the prompt, token for token what
training used (chat template, template variables, system prompt included):

    eval document   <|im_start|>user\\n5 May 1999<|im_end|>\\n<|im_start|>assistant\\n 1999-05-05<|im_end|>
    labels          -100 ...                                                     trained  trained
    prompt          <|im_start|>user\\n5 May 1999<|im_end|>\\n<|im_start|>assistant\\n
    reference       "1999-05-05"  (decoded without special tokens; a leading <think> block is set aside)

Documents with nothing before their trained tokens (plain text) have no prompt and are skipped, counted.

    eval_generation: {steps: 40, num_prompts: 16, max_new_tokens: 64}   # or `true` for these defaults

logs `eval_exact_match` (fraction) and `eval_chrf` (sacrebleu's chrF, 0-100), `eval_<name>_...` per
eval set of a dict / per source of a mixture, at the evaluations on multiples of `steps` (every
evaluation when `steps` is unset; evaluation is turned on every `steps` when it is off) and once more
when training ends; the outputs are appended to `output_dir/generations.jsonl`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

IGNORE = -100
GENERATIONS_FILE = "generations.jsonl"
METRICS = ("exact_match", "chrf")


@dataclass(frozen=True)
class GenerationSettings:
    steps: int | None = None  # None: at every evaluation
    num_prompts: int = 16
    max_new_tokens: int = 64

    @classmethod
    def parse(cls, value, where: str = "eval_generation") -> GenerationSettings | None:
        """`true` / a mapping {steps, num_prompts, max_new_tokens} / None or false (off)."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if not isinstance(value, dict):
            raise ValueError(
                f"{where}: expected true or a mapping {{steps, num_prompts, max_new_tokens}}, got {value!r}"
            )
        known = ("steps", "num_prompts", "max_new_tokens")
        unknown = [k for k in value if k not in known]
        if unknown:
            import difflib

            close = difflib.get_close_matches(str(unknown[0]), known, n=1)
            hint = f" Did you mean `{where}.{close[0]}`?" if close else f" Keys: {', '.join(known)}."
            raise ValueError(f"{where}: unknown key `{unknown[0]}`.{hint}")
        for key in known:
            v = value.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{where}.{key}: expects an int >= 1, got {v!r}")
        return cls(**{k: v for k, v in value.items() if v is not None})


@dataclass
class GenerationExample:
    prompt_ids: list[int]
    reference: str


def examples_from_rows(rows, tokenizer, k: int) -> tuple[list[GenerationExample], int]:
    """The first `k` generation examples of prepared eval rows (packed rows are split into their
    documents), and how many documents were skipped for having no prompt."""
    out, skipped = [], 0
    for row in rows:
        start = 0
        for length in row.get("seq_lengths") or [len(row["input_ids"])]:
            ids, labels = row["input_ids"][start : start + length], row["labels"][start : start + length]
            start += length
            example = _split_document(ids, labels, tokenizer)
            if example is None:
                skipped += 1
                continue
            out.append(example)
            if len(out) == k:
                return out, skipped
    return out, skipped


def _split_document(ids, labels, tokenizer) -> GenerationExample | None:
    trained = [i for i, label in enumerate(labels) if label != IGNORE]
    if not trained:
        return None
    end = trained[-1] + 1
    begin = end - 1
    while begin > 0 and labels[begin - 1] != IGNORE:  # the last run of trained tokens
        begin -= 1
    if begin == 0:
        return None  # nothing to prompt with (plain text trains every token)
    reference = strip_reasoning(tokenizer.decode(ids[begin:end], skip_special_tokens=True))
    return GenerationExample(list(ids[:begin]), reference)


def strip_reasoning(text: str) -> str:
    """The answer of a generation: a leading `<think>...</think>` block set aside, whitespace stripped.

    >>> strip_reasoning("<think>\\n2+2 is 4\\n</think>\\n\\n4 ")
    '4'
    """
    stripped = text.strip()
    if stripped.startswith("<think>") and "</think>" in stripped:
        stripped = stripped.split("</think>", 1)[1]
    return stripped.strip()


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    """{"exact_match": fraction equal after stripping whitespace, "chrf": sacrebleu's corpus chrF (0-100)}.

    >>> score(["Paris", "Lyon"], ["Paris", "Paris"])["exact_match"]
    0.5
    """
    from sacrebleu.metrics import CHRF

    if not references or len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)
    return {"exact_match": exact, "chrf": float(CHRF().corpus_score(predictions, [references]).score)}


@dataclass
class GenerationEvaluator:
    """Generation examples per eval set (prefix "eval" for a single set, "eval_<name>" for each named
    one) and what was generated from them."""

    settings: GenerationSettings
    sets: dict[str, list[GenerationExample]]  # metric prefix -> examples
    samples: list[dict] = field(default_factory=list)  # {"step", "set", "prompt", "reference", "output"}
    final: bool = False  # the evaluation after training: always generate

    @classmethod
    def from_eval_datasets(cls, settings: GenerationSettings, eval_dataset, tokenizer) -> GenerationEvaluator:
        named = eval_dataset if isinstance(eval_dataset, dict) else {None: eval_dataset}
        sets = {}
        for name, rows in named.items():
            prefix = "eval" if name is None else f"eval_{name}"
            examples, skipped = examples_from_rows(rows, tokenizer, settings.num_prompts)
            if skipped:
                logger.warning(
                    "eval_generation: %d documents of %s have no prompt before their trained tokens (plain text) "
                    "and are not used", skipped, prefix,
                )  # fmt: skip
            if not examples:
                logger.warning(
                    "eval_generation: %s has no document with a prompt; no generation metric for it", prefix
                )
                continue
            sets[prefix] = examples
            logger.info("eval_generation: %d held-out prompts from %s", len(examples), prefix)
        if not sets:
            raise ValueError(
                "eval_generation needs eval documents with a prompt and an answer (prompt/completion or "
                "conversations); the eval data has none"
            )
        return cls(settings, sets)

    def due(self, step: int) -> bool:
        return self.final or self.settings.steps is None or step % self.settings.steps == 0

    def run(
        self, model, tokenizer, prefix: str, step: int, output_dir=None, chat_template_kwargs=None
    ) -> dict:
        """Greedy generations for the set `prefix`: {prefix_exact_match, prefix_chrf}; {} when not due."""
        examples = self.sets.get(prefix)
        if not examples or not self.due(step):
            return {}
        from tunesmith.generation import generate_from_ids

        outputs = generate_from_ids(
            model, tokenizer, [e.prompt_ids for e in examples], max_new_tokens=self.settings.max_new_tokens
        )
        predictions = [strip_reasoning(o) for o in outputs]
        metrics = score(predictions, [e.reference for e in examples])
        records = [
            {"step": step, "set": prefix, "prompt": tokenizer.decode(e.prompt_ids), "reference": e.reference,
             "output": o}
            for e, o in zip(examples, outputs)
        ]  # fmt: skip
        self.samples.extend(records)
        if output_dir is not None:
            path = Path(output_dir) / GENERATIONS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in records)
        return {f"{prefix}_{k}": v for k, v in metrics.items()}


# --------------------------------------------------------------------------- report


def report_sections(records: list[dict], *, samples=(), best_checkpoint=None, best_metric=None,
                    metric_name=None, num_samples: int = 5) -> list[str]:  # fmt: skip
    """Markdown for report.md: the last eval metrics per eval set (one row each), the best checkpoint,
    and a few generations of the last generation evaluation."""
    from tunesmith.report import markdown_table

    parts = []
    last: dict[str, dict[str, float]] = {}
    for record in records:
        for key, value in record.items():
            prefix, metric = _split_metric(key)
            if prefix is not None and isinstance(value, (int, float)):
                last.setdefault(prefix, {})[metric] = value
    columns = [c for c in ("loss", "mean_token_accuracy", *METRICS) if any(c in m for m in last.values())]
    if last and columns:
        rows = [
            [prefix.removeprefix("eval").lstrip("_") or "eval", *(_fmt(c, metrics.get(c)) for c in columns)]
            for prefix, metrics in sorted(last.items())
        ]
        parts += ["## Evaluation (last)", "", markdown_table(["eval set", *columns], rows), ""]
    if best_checkpoint:
        shown = f" ({metric_name} {best_metric:.4g})" if best_metric is not None and metric_name else ""
        parts += [f"Best checkpoint: `{best_checkpoint}`{shown}.", ""]
    samples = list(samples)
    if samples:
        step = samples[-1]["step"]
        final = [s for s in samples if s["step"] == step][:num_samples]
        parts += [f"## Generations at step {step}", ""]
        parts.append(
            markdown_table(
                ["set", "prompt (end)", "reference", "output"],
                [[s["set"], s["prompt"][-80:], s["reference"], s["output"]] for s in final],
            )
        )
        parts.append("")
    return parts


def _split_metric(key: str) -> tuple[str | None, str]:
    if not key.startswith("eval"):
        return None, key
    for metric in ("loss", "mean_token_accuracy", *METRICS):
        if key == f"eval_{metric}":
            return "eval", metric
        if key.endswith(f"_{metric}") and key.startswith("eval_"):
            return key[: -len(metric) - 1], metric
    return None, key


def _fmt(column: str, value) -> str:
    if value is None:
        return ""
    if column in ("mean_token_accuracy", "exact_match"):
        return f"{value:.1%}"
    return f"{value:.4f}" if column == "loss" else f"{value:.1f}"


# --------------------------------------------------------------------------- trainer hooks


def check_best_metric(
    args, eval_dataset, generation: GenerationEvaluator | None, compute_metrics=None
) -> None:
    """Early stopping / the best checkpoint read `metric_for_best_model` from every evaluation: refuse one
    that no evaluation logs (e.g. the default eval_loss when the eval sets are named, eval_<name>_loss).
    With a `compute_metrics` its names are not known beforehand, so only the generation rule is checked."""
    if not args.load_best_model_at_end or eval_dataset is None:
        return
    metric = args.metric_for_best_model or "loss"
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    prefixes = [f"eval_{name}" for name in eval_dataset] if isinstance(eval_dataset, dict) else ["eval"]
    every = (
        "loss", "mean_token_accuracy", "perplexity", "entropy", "num_supervised_tokens", "runtime",
        "samples_per_second", "steps_per_second",
    )  # fmt: skip
    available = [f"{p}_{m}" for p in prefixes for m in every]
    if generation is not None:
        available += [f"{p}_{m}" for p in generation.sets for m in METRICS]
    if key in available or compute_metrics is not None:
        if generation is not None and key.endswith(METRICS) and generation.settings.steps is not None:
            eval_steps = args.eval_steps
            if args.eval_strategy != "steps" or not eval_steps or generation.settings.steps != eval_steps:
                raise ValueError(
                    f"metric_for_best_model={metric!r} is a generation metric, computed every eval_generation.steps="
                    f"{generation.settings.steps}, but evaluation runs every {eval_steps} steps; make them equal "
                    "(or drop eval_generation.steps: then it runs at every evaluation)"
                )
        return
    shown = ", ".join(k for k in available if k.endswith(("_loss", *METRICS)))
    raise ValueError(
        f"metric_for_best_model={metric!r}: no evaluation logs {key!r}; the eval metrics are {shown} "
        "(set metric_for_best_model to one of them)"
    )


class FinalEvaluationCallback(TrainerCallback):
    """Evaluate (generations included) once more at the last step, whatever eval_strategy says."""

    def __init__(self, evaluator: GenerationEvaluator):
        self.evaluator = evaluator

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            self.evaluator.final = True
            control.should_evaluate = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.evaluator.final = False


def wire_generation_eval(trainer, args, skip_prepare: bool):
    """eval_generation and early stopping wired in: the evaluator (or None), the final evaluation and the
    EarlyStoppingCallback; a metric_for_best_model that no evaluation logs is refused here."""
    evaluator = None
    settings = GenerationSettings.parse(args.eval_generation)
    if settings is not None:
        if trainer.eval_dataset is None or skip_prepare:
            raise ValueError(
                "eval_generation needs a prepared eval set: pass eval_dataset (or give a source of `datasets` an "
                "`eval` / `eval_examples`)"
            )
        evaluator = GenerationEvaluator.from_eval_datasets(
            settings, trainer.eval_dataset, trainer.processing_class
        )
        trainer.add_callback(FinalEvaluationCallback(evaluator))
    check_best_metric(args, trainer.eval_dataset, evaluator, trainer.compute_metrics)
    if args.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(
            EarlyStoppingCallback(args.early_stopping_patience, args.early_stopping_threshold)
        )
    return evaluator
