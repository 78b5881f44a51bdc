"""Full fine-tuning at a fine-tuning learning rate: do the updates survive the weights' dtype?

    python bench/bench_full_ft.py                 # SmolLM2-135M, 20 AdamW steps at lr 1e-5, three runs
    python bench/bench_full_ft.py --model tiny    # a random 21M-parameter Llama instead (faster)

The model is fine-tuned in full by `SFTTrainer(model=<folder>)` three ways, each in a fresh process
(so that its peak RSS is its own), on the same rows in the same order. `--model smollm2` (default):
SmolLM2-135M-Instruct (the built-in default, its fp32 conversion) on the quick start's date task,
loss on the answers. `--model tiny`: a random Llama (hidden 512, 4 layers, vocabulary 8,192) saved in
fp32, on pre-tokenized rows drawn from a fixed random bigram table.

    fp32      model_dtype="float32": fp32 weights, fp32 compute (the reference; what TRL does with
              an fp32 checkpoint)
    bf16      model_dtype="bfloat16": bf16 weights updated in place by AdamW (tunesmith's default
              before fp32 master weights, on a CPU with native bf16)
    default   model_dtype="auto": on a bf16 machine, fp32 master weights + bf16 autocast

Reported: the weight change of each run against the fp32 run's (cosine and norm ratio, over all
parameters, each run measured from its own starting weights), the loss curve and its largest
distance from the fp32 run's, seconds per step and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = {"fp32": "float32", "bf16": "bfloat16", "default": "auto"}


def make_model(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import tiny_tokenizer

    config = LlamaConfig(
        hidden_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1376,
        vocab_size=8192,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)  # only its pad/eos ids are used: the rows are token ids


def make_rows(n: int, length: int = 128, vocab: int = 8192, seed: int = 0) -> list[dict]:
    """Pre-tokenized rows from a fixed random bigram table (each token has 4 likely successors)."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(3, vocab, (vocab, 4), generator=g)
    rows = []
    for _ in range(n):
        ids = [int(torch.randint(3, vocab, (1,), generator=g))]
        for _ in range(length - 1):
            ids.append(int(successors[ids[-1], torch.randint(0, 4, (1,), generator=g)]))
        rows.append({"input_ids": ids})
    return rows


def task_rows(n: int) -> list[dict]:
    from tunesmith.quickstart import make_splits

    return make_splits(n, 1).train


def run_variant(name: str, folder: Path, out: Path, steps: int, lr: float, model: str) -> None:
    from tunesmith import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(out / name),
        model_dtype=VARIANTS[name],
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataset_cache_dir=False,
        seed=0,
        data_seed=0,
    )
    rows = make_rows(4 * steps) if model == "tiny" else task_rows(4 * steps)
    trainer = SFTTrainer(model=folder, args=args, train_dataset=rows)
    start = {k: p.detach().float().clone() for k, p in trainer.model.named_parameters()}
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    delta = torch.cat(
        [(p.detach().float() - start[k]).flatten() for k, p in trainer.model.named_parameters()]
    )
    torch.save(delta, out / f"{name}.delta.pt")
    result = {
        "weights": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
        "autocast_bf16": bool(trainer.args.bf16),
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "seconds_per_step": seconds / steps,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
    }
    (out / f"{name}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args.variant, Path(args.folder), Path(args.out), args.steps, args.lr, args.model)
        return

    work = Path(tempfile.mkdtemp(prefix="bench_full_ft."))
    if args.model == "tiny":
        folder = work / "model"
        make_model(folder)
    else:
        from tunesmith.models.load import default_model_path

        folder = default_model_path()  # saved in fp32 by the conversion
    for name in VARIANTS:
        subprocess.run(
            [sys.executable, __file__, "--variant", name, "--folder", str(folder), "--out", str(work)]
            + ["--steps", str(args.steps), "--lr", str(args.lr), "--model", args.model],
            check=True,
        )
    results = {name: json.loads((work / f"{name}.json").read_text()) for name in VARIANTS}
    reference = torch.load(work / "fp32.delta.pt")
    print(f"\n{args.model}: {args.steps} AdamW steps at lr {args.lr:g}, full fine-tuning, batch 4")
    print(
        "| run | weights | bf16 autocast | cosine to fp32 | norm ratio | first loss | last loss "
        "| max abs loss gap to fp32 | s/step | peak RSS |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ref_losses = results["fp32"]["losses"]
    for name, r in results.items():
        delta = torch.load(work / f"{name}.delta.pt")
        cosine = torch.nn.functional.cosine_similarity(delta.double(), reference.double(), dim=0).item()
        ratio = (delta.double().norm() / reference.double().norm()).item()
        print(
            f"| {name} | {r['weights']} | {r['autocast_bf16']} | {cosine:.3f} | {ratio:.3f} | "
            f"{r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | "
            f"{max(abs(a - b) for a, b in zip(r['losses'], ref_losses)):.4f} | {r['seconds_per_step']:.3f} | "
            f"{r['peak_rss_gb']:.2f} GB |"
        )
    print("\nloss curves (every 5th step):")
    for name, r in results.items():
        print(f"  {name:8s}", " ".join(f"{x:.4f}" for x in r["losses"][::5]), f"... {r['losses'][-1]:.4f}")


if __name__ == "__main__":
    main()
