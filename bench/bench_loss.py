"""Benchmark: the loss alone (issue 5, benchmark 2) and packed attention, on the CPU.

Loss: hidden (N, H) @ lm_head (V, H)ᵀ + cross-entropy, forward + backward, gradients w.r.t. the
hidden states and the LM head weight.

    plain  logits = F.linear(hidden, weight); F.cross_entropy(logits.float(), targets)
           (what a Hugging Face model + its loss_function does)
    ours   tunesmith.ops.linear_cross_entropy(hidden, weight, targets) (chunked, grads in forward)

Liger's fused linear cross-entropy is a Triton kernel for CUDA; it does not run on a CPU, so it
is not a contender here.

Each contender runs in its own fresh process (so one's allocations cannot hide in the other's
peak), contenders alternate, and each process reports:
    time        median over `--repeats` forward+backward calls (the first call included: at this
                size a call is tens of seconds and allocation is a small part of it), as wall
                time and as the process's CPU time (all threads; steadier on a shared machine)
    extra peak  ru_maxrss (the process's resident high-water mark) after the calls, minus the
                resident size after building the inputs (hidden, weight, targets; created
                directly in the benchmark dtype so that setup leaves no higher transient peak).
                This counts everything the loss allocates, including the gradients it returns.
Gradients are compared to the plain version's (relative Frobenius error; grad hidden in full,
grad weight on its first 8,192 rows to keep the files small).

Attention (`--attention`): one layer's attention over one 4,096-token row of sixteen 256-token
documents, 9 heads × 64, bf16: sdpa with transformers' dense block-diagonal mask vs
tunesmith_varlen (causal sdpa per group of equal-length documents).

    .venv/bin/python bench/bench_loss.py                        # bf16, full size
    .venv/bin/python bench/bench_loss.py --dtype fp32 --tokens 2048
    .venv/bin/python bench/bench_loss.py --frozen-weight          # the LoRA case
    .venv/bin/python bench/bench_loss.py --attention
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GRAD_W_ROWS = 8192


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def loss_child(args) -> None:
    """One contender in this process; prints a JSON line."""
    from tunesmith.ops import linear_cross_entropy as lce
    from tunesmith.ops.linear_cross_entropy import linear_cross_entropy

    # "ours-fp32acc": the alternative measured for the weight-gradient sum (see the module)
    lce._FP32_ACCUMULATION_FOR_16BIT_WEIGHT = args.contender == "ours-fp32acc"
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=g, dtype=dtype)
    weight = torch.randn(args.vocab, args.hidden, generator=g, dtype=dtype).mul_(args.hidden**-0.5)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    targets[::10] = -100  # 10% unsupervised, as prompt tokens would be
    hidden.requires_grad_()
    weight.requires_grad_(not args.frozen_weight)  # frozen: an LM head under LoRA
    baseline = rss_bytes()

    times, cpu_times = [], []
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        if args.contender == "plain":
            logits = torch.nn.functional.linear(hidden, weight)
            loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
            del logits
        else:
            loss, _ = linear_cross_entropy(hidden, weight, targets, chunk_size=args.chunk_size)
        loss.backward()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        del loss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grad_w = torch.zeros(1) if weight.grad is None else weight.grad[:GRAD_W_ROWS].clone()
    torch.save({"grad_hidden": hidden.grad, "grad_weight": grad_w}, args.grads_out)
    print(
        json.dumps(
            {"times": times, "cpu_times": cpu_times, "extra_peak": peak - baseline, "baseline": baseline}
        )
    )


def run_loss(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_loss_"))
    contenders = args.contenders.split(",")
    results = {name: [] for name in contenders}
    for r in range(args.rounds):
        for contender in contenders if r % 2 == 0 else contenders[::-1]:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                contender,
                "--grads-out",
                str(tmp / f"{contender}.pt"),
            ]
            cmd += ["--dtype", args.dtype, "--tokens", str(args.tokens), "--hidden", str(args.hidden)]
            cmd += [
                "--vocab",
                str(args.vocab),
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
            ]
            if args.frozen_weight:
                cmd += ["--frozen-weight"]
            if args.chunk_size:
                cmd += ["--chunk-size", str(args.chunk_size)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[contender].append(json.loads(out.strip().splitlines()[-1]))
            print(contender, results[contender][-1], flush=True)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    gb = 2**30
    plain_grads = torch.load(tmp / "plain.pt")
    t_plain = statistics.median(t for res in results["plain"] for t in res["times"])
    c_plain = statistics.median(t for res in results["plain"] for t in res["cpu_times"])
    m_plain = statistics.median(res["extra_peak"] for res in results["plain"])
    frozen = ", LM head frozen" if args.frozen_weight else ""
    print(
        f"\n## loss alone: N={args.tokens} H={args.hidden} V={args.vocab} {args.dtype}{frozen}, {machine()}"
    )
    # The gradients themselves ((N, H) + (V, H) in the input dtype) are returned by every method;
    # "overhead" is what is left of the extra peak once they are subtracted.
    grad_rows = args.tokens + (0 if args.frozen_weight else args.vocab)
    grads_bytes = grad_rows * args.hidden * DTYPES[args.dtype].itemsize
    o_plain = m_plain - grads_bytes
    print(
        "| contender | wall s (median) | × plain | CPU s (median) | × plain | extra peak RSS (GiB) | × plain "
        "| overhead beyond the grads (GiB) | × plain | grad hidden / grad weight rel. err. vs plain |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in contenders:
        t = statistics.median(t for res in results[name] for t in res["times"])
        cpu = statistics.median(t for res in results[name] for t in res["cpu_times"])
        m = statistics.median(res["extra_peak"] for res in results[name])
        o = m - grads_bytes
        grads = torch.load(tmp / f"{name}.pt")
        err = f"{rel(grads['grad_hidden'], plain_grads['grad_hidden']):.1e} / "
        err += "—" if args.frozen_weight else f"{rel(grads['grad_weight'], plain_grads['grad_weight']):.1e}"
        print(
            f"| {name} | {t:.2f} | {t / t_plain:.2f} | {cpu:.2f} | {cpu / c_plain:.2f} | {m / gb:.2f} | {m / m_plain:.3f} "
            f"| {o / gb:.2f} | {o / o_plain:.3f} | {err} |"
        )


def run_attention(args) -> None:
    from transformers import LlamaConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import create_causal_mask

    from tunesmith.ops.attention import use_varlen_attention, varlen_attention_forward

    torch.set_num_threads(args.threads)
    n_docs, doc_len, heads, head_dim = 16, 256, 9, 64
    T = n_docs * doc_len
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, T, head_dim, generator=g, dtype=torch.bfloat16) for _ in range(3))
    position_ids = torch.arange(doc_len).repeat(n_docs)[None]
    cu = torch.arange(0, T + 1, doc_len, dtype=torch.int32)

    class Module(torch.nn.Module):  # what the attention functions read from the layer
        is_causal, num_key_value_groups = True, 1

    module = Module()
    config = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads)
    config._attn_implementation = "sdpa"
    embeds = torch.empty(1, T, 1, dtype=torch.bfloat16)

    def build_mask():
        # transformers builds the (T × T) block-diagonal mask once per forward and shares it
        # across layers, so it is timed on its own and the per-layer row excludes it
        return create_causal_mask(config, embeds, None, None, position_ids=position_ids)

    mask = build_mask()

    def sdpa_dense():
        return sdpa_attention_forward(module, q, k, v, mask, scaling=head_dim**-0.5)[0]

    def varlen():
        return varlen_attention_forward(module, q, k, v, None, scaling=head_dim**-0.5, cu_seq_lens_q=cu)[0]

    del use_varlen_attention  # registration is not needed to call the function directly
    dense_out, varlen_out = sdpa_dense(), varlen()
    err = (dense_out.float() - varlen_out.float()).abs().max().item()
    rows = []
    contenders = [
        ("sdpa, dense 4,096 × 4,096 block-diagonal mask", sdpa_dense),
        ("tunesmith_varlen (causal sdpa per group of equal-length documents)", varlen),
        ("(building the dense mask, once per forward)", build_mask),
    ]
    for name, fn in contenders:
        fwd, fwd_bwd = [], []
        for _ in range(args.repeats):
            with torch.no_grad():
                start = time.perf_counter()
                fn()
                fwd.append(time.perf_counter() - start)
            if fn is build_mask:
                continue
            for t in (q, k, v):
                t.requires_grad_().grad = None
            start = time.perf_counter()
            fn().float().sum().backward()
            fwd_bwd.append(time.perf_counter() - start)
            for t in (q, k, v):
                t.requires_grad_(False)
        rows.append((name, statistics.median(fwd), statistics.median(fwd_bwd) if fwd_bwd else None))
    print(f"\n## packed attention: 16 × 256 tokens, 9 heads × 64, bf16, one layer, {machine()}")
    print("| method | forward (s, median) | forward + backward (s, median) |\n| --- | --- | --- |")
    for name, t, tb in rows:
        print(f"| {name} | {t:.4f} | {'' if tb is None else f'{tb:.4f}'} |")
    print(
        f"speed-up forward {rows[0][1] / rows[1][1]:.1f}×, forward + backward {rows[0][2] / rows[1][2]:.1f}×; "
        f"max abs difference of outputs {err:.1e}"
    )


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--repeats", type=int, default=1, help="forward+backward calls per process")
    p.add_argument("--rounds", type=int, default=1, help="processes per contender, alternating")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--frozen-weight", action="store_true", help="LM head without gradient (LoRA)")
    p.add_argument("--attention", action="store_true", help="run the packed-attention benchmark instead")
    p.add_argument("--contenders", default="plain,ours", help="comma-separated: plain, ours, ours-fp32acc")
    p.add_argument("--child", choices=["plain", "ours", "ours-fp32acc"], help=argparse.SUPPRESS)
    p.add_argument("--grads-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.contender = args.child
        loss_child(args)
    elif args.attention:
        args.repeats = max(args.repeats, 5)
        run_attention(args)
    else:
        run_loss(args)


if __name__ == "__main__":
    main()
