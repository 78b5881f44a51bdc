"""Memory against context length: one training step on one conversation of N tokens, per process.

    python bench/bench_context.py --shape smollm2 --lengths 2048 4096 8192 16384
    python bench/bench_context.py --shape llama-1b --lengths 2048 4096 8192 --contender tunesmith

Each length runs in a process of its own (bench_e2e's `build_trainer`: the same model, LoRA and
`long_conversations` data as `bench_e2e.py --doc-tokens N`, batch 1, no accumulation, max_steps 1)
and reports the step's wall time, the peak RSS and the peak anonymous memory (`bench/memory.py`).
A step at 32k tokens on SmolLM2 costs about 130 TFLOP (over 15 minutes on 2 cores), so the table
of the longest context that trains in `--limit-gb` is the largest length measured under it plus the
straight line through the measured peaks (memory grows linearly in the length when attention runs
per document and layers are checkpointed), extended to the limit and labelled as such.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))


def run_length(contender: str, shape: str, length: int) -> dict:
    from bench.bench_e2e import CONTENDERS, build_trainer
    from bench.memory import AnonPeak, peak_rss_gb

    anon = AnonPeak().start()
    opts = argparse.Namespace(shape=shape, doc_tokens=length, batch=1, accum=1)
    trainer, counter = build_trainer(contender, max_steps=1, n_examples=4, opts=opts)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    policy = getattr(trainer, "memory_policy", None)
    return {
        "contender": contender,
        "overrides": CONTENDERS[contender][1],
        "shape": shape,
        "length": length,
        "tokens": counter.tokens,
        "step_seconds": seconds,
        "peak_rss_gb": peak_rss_gb(),
        "peak_anon_gb": anon.stop(),
        "memory_policy": getattr(policy, "policy", None),
        "checkpointed_layer_steps": getattr(policy, "planned", {}).get("checkpointed"),
    }


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of peak GB against length."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - slope * mx, slope


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", default="all", choices=["all", "one"])
    parser.add_argument("--shape", default="smollm2")
    parser.add_argument("--contender", default="tunesmith")
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    parser.add_argument("--limit-gb", type=float, default=24.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.mode == "one":
        (length,) = args.lengths
        args.out.write_text(json.dumps(run_length(args.contender, args.shape, length)))
        return

    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    subprocess.run([sys.executable, str(HERE / "bench_e2e.py"), "build", "--shape", args.shape], check=True)
    results = []
    for length in args.lengths:
        out = out_dir / f"context_{args.shape}_{args.contender}_{length}.json"
        cmd = [sys.executable, __file__, "one", "--shape", args.shape, "--contender", args.contender]
        cmd += ["--lengths", str(length), "--out", str(out)]
        done = subprocess.run(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if done.returncode != 0:
            print(f"length {length}: the run failed (exit {done.returncode}); stopping", flush=True)
            break
        results.append(json.loads(out.read_text()))
        print(json.dumps(results[-1]), flush=True)
    rows = ["| tokens | step (s) | peak RSS (GB) | peak anon (GB) | policy |", "|---|---|---|---|---|"]
    for r in results:
        rows.append(
            f"| {r['length']} | {r['step_seconds']:.0f} | {r['peak_rss_gb']:.2f} | {r['peak_anon_gb']:.2f} | "
            f"{r['memory_policy']} |"
        )
    print("\n".join(rows))
    if len(results) >= 2:
        for key in ("peak_rss_gb", "peak_anon_gb"):
            intercept, slope = fit_line([(r["length"], r[key]) for r in results])
            reach = (args.limit_gb - intercept) / slope if slope > 0 else float("inf")
            print(
                f"{key}: {intercept:.2f} GB + {slope * 1024:.3f} GB per 1k tokens; "
                f"{args.limit_gb:g} GB reached at about {reach:,.0f} tokens (extrapolated)"
            )
    summary = out_dir / f"context_{args.shape}_{args.contender}_summary.json"
    summary.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
