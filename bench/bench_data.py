"""Data preparation benchmark: tunesmith's prepare_dataset vs TRL's SFTTrainer dataset preparation.

    python bench/bench_data.py all --repeats 2            # the comparison, writes bench/RESULTS.md
    python bench/bench_data.py one --contender tunesmith --flavour messages --out r.json

Same data for both (bench/instruction_data.py, 10,000 examples, median 94 / p90 220 / max 2,000 SmolLM2
tokens), same tokenizer (SmolLM2-135M-Instruct's, saved once as a plain tokenizer folder),
max_length 1024, packing with best-fit decreasing, each library's default loss masking.
Each run is a fresh process (TRL's in the Python that has trl: --trl-python), timed from the
in-memory `datasets.Dataset` to the packed dataset, no cache on either side (TRL's `map` on an
in-memory dataset writes no cache files; tunesmith gets cache_dir=False). Tokenizer loading
and imports are outside the timing. Repeats alternate contenders; medians and ratios come
from the same invocation.

What each library does with the data differs in one way worth knowing: for conversations TRL
trains every token by default (its assistant-only loss needs `{% generation %}` markers, which
SmolLM2's template lacks), while tunesmith finds the assistant turns and trains only those.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# import bench modules as `bench.x` from the repo root, never shadowing installed packages
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

N_EXAMPLES, MAX_LENGTH, SEED = 10_000, 1024, 42
TOKENIZER_DIR = Path("/tmp/tunesmith-bench/smollm2-tokenizer")
CONTENDERS = ("tunesmith", "trl")
FLAVOURS = ("prompt_completion", "messages")


def ensure_tokenizer() -> Path:
    """SmolLM2's tokenizer as a plain folder (the GGUF file takes ~4 s to read; the folder ~0.3 s)."""
    if (TOKENIZER_DIR / "tokenizer.json").exists():
        return TOKENIZER_DIR
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import SMOLLM2_GGUF, smollm2_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    tok.save_pretrained(TOKENIZER_DIR)
    return TOKENIZER_DIR


def run_one(contender: str, flavour: str, n: int, num_proc: int | None = None) -> dict:
    """Prepare the dataset once in this process; returns timings and what came out."""
    from bench.instruction_data import make_dataset

    rows = make_dataset(n, flavour=flavour, seed=SEED)
    # alone in its block: ruff's isort takes `datasets` for bench/instruction_data.py
    from datasets import Dataset

    dataset = Dataset.from_list(rows)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    if contender == "tunesmith":
        from tunesmith.data.pipeline import prepare_dataset

        prepare_dataset(
            dataset.select(range(10)), tokenizer, max_length=MAX_LENGTH, packing=True, cache_dir=False
        )
        start, cpu_start = time.perf_counter(), time.process_time()
        prepared = prepare_dataset(
            dataset,
            tokenizer,
            max_length=MAX_LENGTH,
            packing=True,
            cache_dir=False,
            dataset_num_proc=num_proc,
        )
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        out = prepared.dataset
    else:
        out, seconds, cpu_seconds = _trl_prepare(dataset, tokenizer)
    lengths = [len(ids) for ids in out["input_ids"]]
    labels = out["labels"] if "labels" in out.column_names else None
    trained = None
    if labels is not None:
        trained = sum(sum(1 for x in row if x != -100) for row in labels)
    elif "completion_mask" in out.column_names or "assistant_masks" in out.column_names:
        column = "completion_mask" if "completion_mask" in out.column_names else "assistant_masks"
        trained = sum(sum(row) for row in out[column])
    return {
        "contender": contender,
        "flavour": flavour,
        "examples": n,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "examples_per_s": n / seconds,
        "rows": len(lengths),
        "tokens": sum(lengths),
        "trained_tokens": trained,
        "efficiency": sum(lengths) / (len(lengths) * MAX_LENGTH),
        "columns": out.column_names,
        "num_proc": num_proc,
    }


def _trl_prepare(dataset, tokenizer):
    """TRL 1.x: build an SFTTrainer on 10 rows with a tiny model, then time _prepare_dataset on all rows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    args = SFTConfig(
        output_dir="/tmp/tunesmith-bench/trl-data",
        max_length=MAX_LENGTH,
        packing=True,
        packing_strategy="bfd",
        report_to="none",
        save_strategy="no",
        bf16=False,  # only the data step runs; TRL's bf16 default refuses a CPU without bf16 support
        use_cpu=True,
    )
    trainer = SFTTrainer(
        model=LlamaForCausalLM(config),
        args=args,
        train_dataset=dataset.select(range(10)),
        processing_class=tokenizer,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    out = trainer._prepare_dataset(dataset, tokenizer, args, True, None, "train")
    return out, time.perf_counter() - start, time.process_time() - cpu_start


def run_all(repeats: int, n: int, trl_python: str, results: Path) -> None:
    ensure_tokenizer()
    runs = []
    for flavour in FLAVOURS:
        for repeat in range(repeats):
            order = CONTENDERS if repeat % 2 == 0 else CONTENDERS[::-1]
            for contender in order:
                python = trl_python if contender == "trl" else sys.executable
                out = Path(f"/tmp/tunesmith-bench/data-{contender}-{flavour}-{repeat}.json")
                cmd = [python, str(HERE / "bench_data.py"), "one", "--contender", contender]
                cmd += ["--flavour", flavour, "--n", str(n), "--out", str(out)]
                env = {
                    **os.environ,
                    "PYTHONPATH": str(HERE.parent),
                    "TQDM_DISABLE": "1",
                    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                }
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
                run = json.loads(out.read_text())
                print(f"{flavour:18s} {contender:10s} {run['seconds']:7.2f} s  cpu {run['cpu_seconds']:7.2f} s  "
                      f"{run['examples_per_s']:8.0f} ex/s  "
                      f"rows {run['rows']}  efficiency {100 * run['efficiency']:.1f}%", flush=True)  # fmt: skip
                runs.append(run)
    write_results(runs, repeats, n, results)


def write_results(runs: list[dict], repeats: int, n: int, results: Path) -> None:
    def median(contender, flavour, key):
        return statistics.median(
            r[key] for r in runs if r["contender"] == contender and r["flavour"] == flavour
        )

    lines = [
        "## Data preparation",
        "",
        f"{n:,} examples from `bench/instruction_data.py` (seed {SEED}; median 94, p90 220, max 2,000 SmolLM2 tokens), "
        f"SmolLM2-135M-Instruct tokenizer, max_length {MAX_LENGTH}, packing with best-fit decreasing, no cache. "
        "Time from an in-memory `datasets.Dataset` to the packed dataset (tokenize, truncate, pack), each run in a "
        f"fresh process, median of {repeats} runs per cell, contenders alternating. CPU s is the process's CPU "
        "time (all threads): steadier than wall time on a machine shared with other jobs.",
        "",
        "| data | contender | wall s | CPU s | examples/s (wall) | rows | packing efficiency | trained tokens |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for flavour in FLAVOURS:
        for contender in CONTENDERS:
            one = next(r for r in runs if r["contender"] == contender and r["flavour"] == flavour)
            trained = "n/a" if one["trained_tokens"] is None else f"{one['trained_tokens']:,}"
            lines.append(
                f"| {flavour} | {contender} | {median(contender, flavour, 'seconds'):.2f} | "
                f"{median(contender, flavour, 'cpu_seconds'):.2f} | {median(contender, flavour, 'examples_per_s'):,.0f} | "
                f"{one['rows']:,} | {100 * one['efficiency']:.2f}% | {trained} |"
            )
    lines.append("")
    for flavour in FLAVOURS:
        wall = median("trl", flavour, "seconds") / median("tunesmith", flavour, "seconds")
        cpu = median("trl", flavour, "cpu_seconds") / median("tunesmith", flavour, "cpu_seconds")
        lines.append(
            f"- {flavour}: TRL time / tunesmith time = {wall:.2f} (wall), {cpu:.2f} (CPU time of the process)."
        )
    same = {r["trained_tokens"] for r in runs if r["flavour"] == "prompt_completion"}
    if len(same) == 1:
        lines.append(
            f"- prompt_completion: both train exactly {same.pop():,} tokens, a check that they label the data alike."
        )
    lines += [
        "- Trained tokens differ on conversations by design: TRL trains every token of a conversation by "
        "default (its assistant-only loss needs `{% generation %}` markers, which SmolLM2's template lacks); "
        "tunesmith trains the assistant turns only.",
        "",
        f"Machine: {_cpu_model()}, {os.cpu_count()} cores (shared with other work while measuring), "
        f"Python {platform.python_version()}.",
        "",
        "Command: `.venv/bin/python bench/bench_data.py all --repeats "
        f"{repeats} --trl-python /tmp/probe/bin/python` (TRL 1.16 in its own virtual environment).",
        "",
    ]
    _replace_section(results, "## Data preparation", "\n".join(lines))
    print("\n".join(lines))


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _replace_section(path: Path, heading: str, text: str) -> None:
    """Write our section into RESULTS.md, leaving everyone else's sections as they are."""
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = current.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        new = current.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + text + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("one", help="one contender, one flavour, in this process")
    one.add_argument("--contender", choices=CONTENDERS, required=True)
    one.add_argument("--flavour", choices=FLAVOURS, required=True)
    one.add_argument("--n", type=int, default=N_EXAMPLES)
    one.add_argument("--out", type=Path, required=True)
    one.add_argument("--num-proc", type=int, help="tunesmith: dataset_num_proc (tokenize in processes)")
    every = sub.add_parser("all", help="every contender and flavour, each run in a fresh process")
    every.add_argument("--repeats", type=int, default=2)
    every.add_argument("--n", type=int, default=N_EXAMPLES)
    every.add_argument("--trl-python", default=sys.executable, help="a Python with trl installed")
    every.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    if args.command == "one":
        result = run_one(args.contender, args.flavour, args.n, args.num_proc)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result))
    else:
        run_all(args.repeats, args.n, args.trl_python, args.results)


if __name__ == "__main__":
    main()
