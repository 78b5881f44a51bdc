"""A/B timing of tunesmith's training step: the same micro-batches, several variants, one process.

    python bench/ab_step.py --variants '[{}, {"swaps": "lora,rms_norm"}]'
    python bench/ab_step.py --variants '[{"tunesmith.ops.attention._MATH_ATTENTION_MAX_LENGTH": 128}, {}]'

For deciding whether a change to the ops pays off: a 5% question that process-to-process noise
(±3% on a shared 2-core machine) hides in end-to-end runs. Builds the end-to-end benchmark's
tunesmith trainer (bench_e2e.build_trainer: SmolLM2-135M or `--shape`, LoRA r=16 on all linears,
bf16, batch 4, the benchmark's data in its order, or `--doc-tokens` conversations), takes its first `--batches` micro-batches, and times
`trainer.training_step` (forward + backward, no optimizer step) on each of them under every
variant in turn, `--repeats` times, keeping each batch's best time. Prints non-padding tokens per
second per variant after every repeat.

A variant is a JSON object: "swaps" re-runs optimize() with those kinds (comma-separated); any
other key is a module attribute ("package.module.NAME") set to the value for that variant. An
empty object is the code as it is (default swaps, attributes as imported).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_e2e import add_workload_args, build_trainer  # noqa: E402


def apply_variant(model, variant: dict, originals: dict) -> None:
    """Put back every attribute an earlier variant set, then set this variant's; re-run optimize
    with its "swaps" (or the defaults)."""
    from tunesmith.ops.apply import optimize, unoptimize

    for (module, name), value in originals.items():
        setattr(module, name, value)
    for key, value in variant.items():
        if key != "swaps":
            module_name, name = key.rsplit(".", 1)
            module = importlib.import_module(module_name)
            originals.setdefault((module, name), getattr(module, name))
            setattr(module, name, value)
    unoptimize(model)
    swaps = variant.get("swaps")
    optimize(model, swaps=None if swaps is None else tuple(swaps.split(",")), verbose=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", required=True, help="JSON list of variant objects")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--examples", type=int, default=2000)
    add_workload_args(parser)
    args = parser.parse_args()
    variants = json.loads(args.variants)

    import torch

    trainer, _ = build_trainer("tunesmith", max_steps=10, n_examples=args.examples, opts=args)
    batches = []
    for batch in trainer.get_train_dataloader():
        batches.append(batch)
        if len(batches) == args.batches:
            break
    tokens = sum(int(b["input_ids"].numel()) - int(b.get("padding_tokens", 0)) for b in batches)
    model = trainer.model
    model.train()
    best = [[float("inf")] * len(batches) for _ in variants]
    originals: dict = {}
    for repeat in range(args.repeats):
        for v, variant in enumerate(variants):
            apply_variant(model, variant, originals)
            for i, batch in enumerate(batches):
                start = time.perf_counter()
                trainer.training_step(model, batch, num_items_in_batch=torch.tensor(1000))
                best[v][i] = min(best[v][i], time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        line = "  ".join(
            f"{json.dumps(var)}: {tokens / sum(times):.1f}" for var, times in zip(variants, best)
        )
        print(f"repeat {repeat} (tokens/s, best per batch so far): {line}", flush=True)


if __name__ == "__main__":
    main()
