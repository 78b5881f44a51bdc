"""What a run leaves behind besides the model: metrics as JSON lines, PNG plots, a markdown report.

    output_dir/
      metrics.jsonl     one JSON object per log event: {"step", "epoch", "loss", "learning_rate", ...}
      loss.png          train loss and eval loss against the optimizer step
      learning_rate.png
      token_accuracy.png  train and eval mean token accuracy
      report.md         before/after table of the task metric, sample generations, the plots

`MetricsCallback` writes the first and, when training ends, the plots; `write_report` the last.
matplotlib is imported inside the plotting function, with the Agg backend, so nothing needs a screen.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"

# plot file -> (title, y label, [(metric key, legend label)])
PLOTS = {
    "loss.png": ("Loss", "loss (nats / supervised token)", [("loss", "train"), ("eval_loss", "eval")]),
    "learning_rate.png": ("Learning rate", "learning rate", [("learning_rate", "train")]),
    "token_accuracy.png": (
        "Mean token accuracy",
        "fraction of supervised tokens predicted right",
        [("mean_token_accuracy", "train"), ("eval_mean_token_accuracy", "eval")],
    ),
    # eval_generation (tunesmith.evaluation); `*` stands for the name of each eval set that has the metric
    "exact_match.png": (
        "Exact match of greedy generations (held-out prompts)",
        "fraction exactly right",
        [("eval_exact_match", "eval"), ("eval_*_exact_match", "eval *")],
    ),
    "chrf.png": (
        "chrF of greedy generations (held-out prompts)",
        "chrF (0-100)",
        [("eval_chrf", "eval"), ("eval_*_chrf", "eval *")],
    ),
}
# eval losses of named eval sets (several sources: eval_<name>_loss) join the loss plot
PLOTS["loss.png"][2].append(("eval_*_loss", "eval *"))


class MetricsCallback(TrainerCallback):
    """Append every log event to `output_dir/metrics.jsonl`; draw the plots when training ends.

    Only the main process writes (the Trainer's logs are already reduced across processes). A
    resumed run appends to the file; a fresh run in the same folder replaces it.
    """

    def __init__(self, output_dir: str | Path | None = None, *, plots: bool = True):
        self.output_dir = Path(output_dir) if output_dir else None
        self.plots = plots

    def _folder(self, args) -> Path:
        return self.output_dir or Path(args.output_dir)

    def on_train_begin(self, args, state, control, **kwargs):
        # a fresh run (step 0) into a used folder starts a new file; a resumed run (step > 0) appends,
        # after dropping what the interrupted run logged past the checkpoint it resumes from (those steps
        # are trained again, so they would be in the file twice)
        self._samples_written = sum("sample_output" in r for r in state.log_history)  # a resume's are written
        path = self._folder(args) / METRICS_FILE
        if not state.is_world_process_zero or not path.exists():
            return
        if state.global_step == 0:
            path.unlink()
            return
        text = path.read_text()
        records = read_metrics(path)
        kept = [r for r in records if r.get("step", 0) <= state.global_step]
        lines = [line for line in text.splitlines() if line.strip()]
        # rewritten also when the killed run left a torn last line, which the next record would extend
        if len(kept) != len(lines) or not text.endswith("\n"):
            from tunesmith.checkpoint import atomic_file

            with atomic_file(path) as partial:
                partial.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch}
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str)) and _finite(v)})
        self._write([*self._new_samples(state), record], args)

    def _new_samples(self, state) -> list[dict]:
        """Sample generations (SampleGenerationCallback's records in the log history) not written yet."""
        found = [r for r in state.log_history if "sample_output" in r]
        new, self._samples_written = found[getattr(self, "_samples_written", 0) :], len(found)
        return new

    def _write(self, records: list[dict], args) -> None:
        if not records:
            return
        folder = self._folder(args)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / METRICS_FILE, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._write(self._new_samples(state), args)
        if self.plots and state.is_world_process_zero and (self._folder(args) / METRICS_FILE).exists():
            plot_metrics(read_metrics(self._folder(args) / METRICS_FILE), self._folder(args))


def _finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file, in order (a torn last line, from a killed run, is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric across the records that have it.

    >>> series([{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 1.5}, {"step": 3, "loss": 1.0}], "loss")
    ([1, 3], [2.0, 1.0])
    """
    pairs = [(r["step"], float(r[key])) for r in records if key in r and isinstance(r[key], (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_metrics(records: Sequence[dict], output_dir: str | Path) -> list[Path]:
    """Write the PNG plots of `PLOTS` that have data; return the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no GUI toolkit imported
    import matplotlib.pyplot as plt

    written = []
    for filename, (title, ylabel, keys) in PLOTS.items():
        lines = [(label, *series(records, key)) for key, label in _expand(keys, records)]
        lines = [(label, steps, values) for label, steps, values in lines if steps]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for label, steps, values in lines:
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label)
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
        fig.tight_layout()
        path = Path(output_dir) / filename
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _expand(keys, records: Sequence[dict]) -> list[tuple[str, str]]:
    """(metric key, label) pairs, with a `*` key matched against the records' keys (its label's `*`
    becomes the matched part): ("eval_*_loss", "eval *") -> ("eval_math_loss", "eval math"), ..."""
    out = []
    for key, label in keys:
        if "*" not in key:
            out.append((key, label))
            continue
        head, tail = key.split("*")
        names = sorted({k for r in records for k in r if k.startswith(head) and k.endswith(tail)})
        for name in names:
            part = name[len(head) : len(name) - len(tail)]
            if part and len(name) >= len(head) + len(tail):  # "eval_loss" is not "eval_*_loss"
                out.append((name, label.replace("*", part)))
    return out


@dataclass
class Sample:
    prompt: str
    reference: str
    before: str
    after: str


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; `|` and newlines in cells are escaped so a cell stays one cell.

    >>> print(markdown_table(["a", "b"], [[1, "x|y"]]))
    | a | b |
    | --- | --- |
    | 1 | x\\|y |
    """

    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", "⏎")

    lines = [
        "| " + " | ".join(cell(h) for h in header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def samples_from_history(log_history: Sequence[dict]) -> list[tuple[int, str, str]]:
    """(step, prompt, output) of the `sample_prompts` generations in a trainer's log history.

    >>> samples_from_history([{"loss": 1.0, "step": 5}, {"step": 5, "sample_prompt": "Hi", "sample_output": "Hello"}])
    [(5, 'Hi', 'Hello')]
    """
    return [
        (r["step"], str(r["sample_prompt"]), r["sample_output"]) for r in log_history if "sample_output" in r
    ]


def write_report(
    output_dir: str | Path,
    *,
    title: str,
    metrics: dict[str, tuple[float, float]] | None = None,
    samples: Sequence[Sample] = (),
    notes: Sequence[str] = (),
    sections: Sequence[str] = (),
    generations: Sequence[tuple[int, str, str]] = (),
) -> Path:
    """Write `output_dir/report.md`: the before/after table, sample generations and the plots.

    `metrics`: name -> (before, after), as fractions (shown as percentages); None: no table.
    `generations`: (step, prompt, output) of the `sample_prompts` (see `samples_from_history`).
    """
    output_dir = Path(output_dir)
    parts = [f"# {title}", ""]
    if metrics:
        rows = [[name, f"{before:.1%}", f"{after:.1%}"] for name, (before, after) in metrics.items()]
        parts += [markdown_table(["metric (held-out)", "before", "after"], rows), ""]
    parts += [f"- {note}" for note in notes]
    if samples:
        parts += ["", "## Sample generations", ""]
        parts.append(
            markdown_table(
                ["prompt", "expected", "before", "after"],
                [[s.prompt, s.reference, s.before, s.after] for s in samples],
            )
        )
    if sections:  # markdown lines of other parts (tunesmith.evaluation.report_sections)
        parts += ["", *sections]
    if generations:
        parts += ["", "## Generations from sample_prompts", ""]
        parts.append(markdown_table(["step", "prompt", "output"], [list(g) for g in generations]))
    pictures = [name for name in PLOTS if (output_dir / name).exists()]
    if pictures:
        parts += ["", "## Training curves", ""] + [f"![{name}]({name})" for name in pictures]
    from tunesmith.checkpoint import atomic_file

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "report.md"
    with atomic_file(path) as partial:  # a crash leaves the old report or the new one
        partial.write_text("\n".join(parts) + "\n")
    return path
