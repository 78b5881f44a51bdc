"""PEFT's LoRA linear vs tunesmith's FastLoraLinear: forward + backward time and saved memory.

    python bench/bench_lora.py [--tokens 1024] [--repeats 30]

One SmolLM2-135M decoder layer's worth of adapted linears (q, k, v, o, gate, up, down; hidden 576,
kv 192, intermediate 1536), bf16 frozen weights, LoRA r=16 in fp32 (as PEFT keeps it), applied to
the same bf16 input. Each step is a forward + backward through all seven; contenders alternate
within one process, median of `--repeats`. "Saved for backward" is the bytes autograd keeps
between forward and backward (counted with saved_tensors_hooks, shared storages once).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tunesmith.ops.apply import optimize, unoptimize

SHAPES = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576)}
SHAPES.update({"gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)})


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        for name, (d_in, d_out) in SHAPES.items():
            setattr(self, name, nn.Linear(d_in, d_out, bias=False))

    def forward(self, x):  # x (T, 576): every projection reads a (T, d_in) input
        h = x
        out = self.q(h) + self.o(h)
        out = out + self.k(h).repeat(1, 3) + self.v(h).repeat(1, 3)
        mid = self.gate(h) * self.up(h)
        return out + self.down(mid)


def saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = get_peft_model(
        Layer().to(torch.bfloat16), LoraConfig(r=16, lora_alpha=32, target_modules=list(SHAPES))
    )
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # PEFT's own choice for adapters on a bf16 base
    x = torch.randn(args.tokens, 576, dtype=torch.bfloat16, requires_grad=True)

    def step():
        model(x).float().sum().backward()

    times: dict[str, list[float]] = {"peft": [], "tunesmith": []}
    memory = {}
    for rep in range(args.repeats + 3):
        for name in times:
            if name == "tunesmith":
                optimize(model, swaps=("lora",), verbose=False)
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            if rep >= 3:  # warm-up rounds
                times[name].append(elapsed)
            if rep == 0:
                memory[name] = saved_bytes(lambda: model(x).float().sum())
            unoptimize(model)
    base = statistics.median(times["peft"])
    print(f"| contender | fwd+bwd ms | × PEFT | saved for backward (MB) | × PEFT |  ({args.tokens} tokens)")
    print("| --- | --- | --- | --- | --- |")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"| {name} | {med * 1e3:.1f} | {med / base:.2f} | {memory[name] / 2**20:.1f} | "
            f"{memory[name] / memory['peft']:.2f} |"
        )


if __name__ == "__main__":
    main()
