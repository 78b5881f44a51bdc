"""End-to-end CPU benchmark: one LoRA fine-tuning run per contender, each in its own process.

    python bench/bench_e2e.py one --contender trl_default --seconds 150 --out out.json   # one run
    python bench/bench_e2e.py all --seconds 150 --repeats 2                              # the comparison

Every contender gets the same model object type (SmolLM2-135M-Instruct, bf16 weights), the
same LoRA (r=16, alpha=32, all linear layers), the same data (bench/instruction_data.py, prompt/completion
flavour, completion-only loss), batch 4 x accumulation 2, max length 1024, seed 42.

What is measured, identically for every contender:
- non-padding tokens per second: tokens are counted in the data collator (a wrapper around the
  contender's own collator: attention_mask.sum() for padded batches, the row length less its
  `padding_tokens` for padding-free ones), time is wall time between optimizer steps; the first `--warmup` optimizer
  steps are excluded (allocator warm-up, lazy init);
- peak RSS of the process (ru_maxrss), which includes loading the model and preparing the data,
  and the peak of its anonymous memory (`bench/memory.py`: RssAnon sampled every 5 ms, which leaves
  out the memory-mapped weight file's pages);
- the loss at every optimizer step, against the number of supervised tokens seen.

A run stops after `--seconds` of measured training (checked at every optimizer step) or
`--max-steps`, whichever comes first.

Bigger models and longer documents (issue 17), same contenders and measurements:
- `--shape llama-1b` / `llama-3b`: a Llama-3.2-1B- / 3B-shaped model with random bf16 weights
  (`bench/model_shapes.py`), built once and saved as safetensors under /tmp/tunesmith-bench/models,
  loaded by every contender with `from_pretrained` (SmolLM2's tokenizer: its ids are < 49,152);
- `--doc-tokens N`: instead of the instruction data, multi-turn conversations of exactly N tokens
  (`instruction_data.long_conversations`), max length N, batch 1 x accumulation 2 unless told
  (`--batch`, `--accum`); loss on every token (both trainers' default for conversations).
Every run also measures this CPU's bf16 matmul peak (2048³, before training, same threads) and
reports model FLOPs (`model_shapes.flops_per_token`, causal attention over the documents the
collator saw) per second over it: `mfu`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# run as a script, bench/ would be sys.path[0]; import bench modules as `bench.x` from the repo
# root instead, so that nothing in bench/ can shadow an installed package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

BATCH, ACCUM, MAX_LENGTH, LR, SEED = 4, 2, 1024, 2e-4, 42
MODELS_DIR = Path("/tmp/tunesmith-bench/models")

# contender -> (library, config overrides). "Tuned" TRL is what its docs recommend for speed:
# BFD packing (which turns padding-free on) and no gradient checkpointing.
CONTENDERS = {
    "trl_default": ("trl", {}),
    "trl_tuned": ("trl", {"packing": True, "packing_strategy": "bfd", "gradient_checkpointing": False}),
    "tunesmith": ("tunesmith", {}),
    "tunesmith_packed": ("tunesmith", {"packing": True}),
    # the memory end of the trade-off: every decoder layer checkpointed
    "tunesmith_checkpoint": ("tunesmith", {"memory_policy": "checkpoint"}),
    # the frozen base quantized (tunesmith.ops.quant), LoRA in bf16 beside it: the CPU's QLoRA
    "tunesmith_int8": ("tunesmith", {"model_quantization": "int8"}),
    "tunesmith_int4": ("tunesmith", {"model_quantization": "int4"}),
}


class TokenCounter:
    """Wraps a data collator and counts the non-padding tokens of every batch it builds."""

    def __init__(self, collator):
        self.collator = collator
        self.tokens = 0
        self.slots = 0
        self.squares = 0  # Σ n² over the documents, n their real tokens (for the attention FLOPs)

    def __call__(self, features):
        batch = self.collator(features)
        if "attention_mask" in batch:
            lengths = batch["attention_mask"].sum(-1).tolist()
        else:  # padding-free: one row, whose last `padding_tokens` (tunesmith on CPU) are padding
            real = int(batch["input_ids"].numel()) - int(batch.get("padding_tokens", 0))
            starts = (batch["position_ids"][0, :real] == 0).nonzero().flatten().tolist() + [real]
            lengths = [b - a for a, b in zip(starts, starts[1:])]
        self.tokens += sum(lengths)
        self.squares += sum(n * n for n in lengths)
        self.slots += int(batch["input_ids"].numel())
        return batch


def bench_records(n: int, doc_tokens: int = 0):
    from bench.instruction_data import long_conversations, make_dataset

    if doc_tokens:
        return long_conversations(n, doc_tokens, seed=SEED)
    return make_dataset(n, flavour="prompt_completion", seed=SEED)


def model_dir(shape: str) -> Path:
    """SmolLM2-135M-Instruct's directory, or a random-weight model of `shape` saved once (bf16
    safetensors, SmolLM2's tokenizer beside it)."""
    from tunesmith.models.load import default_model_path

    if shape == "smollm2":
        return Path(default_model_path())
    path = MODELS_DIR / shape
    if not (path / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

        from bench.model_shapes import SHAPES

        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=torch.bfloat16)
        tmp = path.with_name(path.name + ".tmp")
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(tmp)
        del model
        tmp.rename(path)
    return path


def build_trainer(contender: str, max_steps: int, n_examples: int, opts: argparse.Namespace):
    """The contender's trainer on the benchmark's model, LoRA, data and settings, and the
    TokenCounter around its data collator."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    library, overrides = CONTENDERS[contender]
    torch.manual_seed(SEED)
    path = model_dir(opts.shape)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    dataset = Dataset.from_list(bench_records(n_examples, opts.doc_tokens))
    long = opts.doc_tokens > 0
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    common = dict(
        output_dir=f"/tmp/tunesmith-bench/{contender}",
        per_device_train_batch_size=opts.batch or (1 if long else BATCH),
        gradient_accumulation_steps=opts.accum or (2 if long else ACCUM),
        max_length=opts.doc_tokens if long else MAX_LENGTH,
        learning_rate=LR,
        bf16=True,
        use_cpu=True,  # TrainingArguments refuses bf16 on a machine without a GPU unless told
        logging_steps=1,
        max_steps=max_steps,
        save_strategy="no",
        report_to="none",
        seed=SEED,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if long and library == "tunesmith":
        common["assistant_only_loss"] = False  # TRL's default: the same loss on every token, the same work
    common.update(overrides)
    if library == "trl":
        from trl import SFTConfig, SFTTrainer
    else:
        from tunesmith import SFTConfig, SFTTrainer
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**common),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
    )
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    return trainer, counter


def run_one(contender: str, seconds: float, max_steps: int, warmup: int, n_examples: int, opts) -> dict:
    import torch
    from transformers import TrainerCallback

    from bench.memory import AnonPeak, peak_rss_gb
    from bench.model_shapes import SHAPES, cpu_matmul_peak_gflops, flops_per_token

    peak_gflops = cpu_matmul_peak_gflops()
    anon = AnonPeak().start()
    trainer, counter = build_trainer(contender, max_steps, n_examples, opts)
    library, overrides = CONTENDERS[contender]
    record = {"steps": [], "losses": []}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            record["steps"].append((state.global_step, now, counter.tokens, counter.slots, counter.squares))
            if state.global_step > warmup and now - record["steps"][warmup][1] >= seconds:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record["losses"].append((state.global_step, float(logs["loss"])))

    trainer.add_callback(Clock())
    # get_train_dataloader is built lazily inside train(), after our collator swap
    trainer.train()
    steps = record["steps"]
    if len(steps) < warmup + 2:
        # timing runs from the end of optimizer step warmup + 1 to the end of the last one
        raise SystemExit(f"only {len(steps)} optimizer steps ran: --max-steps must be at least --warmup + 2")
    (s0, t0, tok0, slot0, sq0), (s1, t1, tok1, slot1, sq1) = steps[warmup], steps[-1]
    tokens_per_s = (tok1 - tok0) / (t1 - t0)
    # the attention term needs Σ n² / Σ n only: one "document" of that mean context stands for them
    mean_context = round((sq1 - sq0) / max(tok1 - tok0, 1))
    model_gflops = flops_per_token(SHAPES[opts.shape], [mean_context]) * tokens_per_s / 1e9
    return {
        "contender": contender,
        "library": library,
        "overrides": overrides,
        "shape": opts.shape,
        "doc_tokens": opts.doc_tokens,
        "measured_steps": s1 - s0,
        "seconds": t1 - t0,
        "tokens_per_s": tokens_per_s,
        "matmul_peak_gflops": peak_gflops,
        "model_gflops_per_s": model_gflops,
        "mfu": model_gflops / peak_gflops,
        "padding_fraction": 1 - (tok1 - tok0) / max(slot1 - slot0, 1),
        "peak_rss_gb": peak_rss_gb(),
        "peak_anon_gb": anon.stop(),
        "losses": record["losses"],
        "torch_threads": torch.get_num_threads(),
    }


def run_all(args) -> None:
    results: dict[str, list[dict]] = {c: [] for c in args.contenders}
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    tag = args.shape + (f"_{args.doc_tokens}" if args.doc_tokens else "")
    # built once, before any contender runs, in a process of its own (its memory is then given back)
    subprocess.run([sys.executable, __file__, "build", "--shape", args.shape], check=True)
    for repeat in range(args.repeats):
        # alternate the order between repeats so that drift (thermal, other load) hits everyone
        order = args.contenders if repeat % 2 == 0 else list(reversed(args.contenders))
        for contender in order:
            out = out_dir / f"e2e_{tag}_{contender}_{repeat}.json"
            cmd = [
                sys.executable, __file__, "one", "--contender", contender, "--seconds", str(args.seconds),
                "--max-steps", str(args.max_steps), "--warmup", str(args.warmup), "--examples", str(args.examples),
                "--out", str(out), "--shape", args.shape, "--doc-tokens", str(args.doc_tokens),
                "--batch", str(args.batch), "--accum", str(args.accum),
            ]  # fmt: skip
            print("running", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            results[contender].append(json.loads(out.read_text()))
    summary = {
        c: {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in runs),
            "peak_anon_gb": statistics.median(r["peak_anon_gb"] for r in runs),
            "padding_fraction": statistics.median(r["padding_fraction"] for r in runs),
            "mfu": statistics.median(r["mfu"] for r in runs),
            "runs": len(runs),
        }
        for c, runs in results.items()
    }
    (out_dir / f"e2e_{tag}_summary.json").write_text(
        json.dumps({"summary": summary, "runs": results}, indent=1)
    )
    print(format_table(summary))
    if tag == "smollm2":
        plot(results, out_dir.parent / "e2e_cpu.png")


def format_table(summary: dict) -> str:
    base = summary.get("trl_default")

    def ratio(s, key):
        return f"{s[key] / base[key]:.2f}" if base and base.get(key) else "-"

    rows = [
        "| contender | non-pad tokens/s | × TRL default | peak RSS (GB) | × TRL default | peak anon (GB) | × TRL default | padding | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c, s in summary.items():
        rows.append(
            f"| {c} | {s['tokens_per_s']:.1f} | {ratio(s, 'tokens_per_s')} | {s['peak_rss_gb']:.2f} | "
            f"{ratio(s, 'peak_rss_gb')} | {s.get('peak_anon_gb', 0):.2f} | {ratio(s, 'peak_anon_gb')} | "
            f"{s['padding_fraction']:.0%} | {s['mfu']:.0%} |"
        )
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(results)
    ax_speed.bar(names, [statistics.median(r["tokens_per_s"] for r in results[n]) for n in names])
    ax_speed.set_ylabel("non-padding tokens / s")
    ax_speed.set_title("LoRA on SmolLM2-135M, 2-core CPU")
    ax_speed.tick_params(axis="x", rotation=20)
    for n in names:
        steps, losses = zip(*results[n][0]["losses"]) if results[n][0]["losses"] else ((), ())
        ax_loss.plot(steps, losses, label=n)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The options that say what is trained (model shape, documents, batch), for this script and ab_step."""
    from bench.model_shapes import SHAPES

    parser.add_argument("--shape", choices=list(SHAPES), default="smollm2")
    parser.add_argument("--doc-tokens", type=int, default=0, help="conversations of this many tokens")
    parser.add_argument(
        "--batch", type=int, default=0, help="per-device batch (0: 4, or 1 with --doc-tokens)"
    )
    parser.add_argument("--accum", type=int, default=0, help="accumulation (0: 2)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["one", "all", "build"])
    parser.add_argument("--contender", choices=list(CONTENDERS))
    parser.add_argument(
        "--contenders",
        nargs="+",
        default=[
            c for c in CONTENDERS if c not in ("tunesmith_checkpoint", "tunesmith_int8", "tunesmith_int4")
        ],
    )
    parser.add_argument("--seconds", type=float, default=150.0, help="measured training time per run")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps excluded from timing")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--out", type=Path)
    add_workload_args(parser)
    args = parser.parse_args()
    if args.mode == "build":
        print(model_dir(args.shape))
    elif args.mode == "one":
        result = run_one(args.contender, args.seconds, args.max_steps, args.warmup, args.examples, args)
        args.out.write_text(json.dumps(result))
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
