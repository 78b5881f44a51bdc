"""Model shapes the benchmarks build with random weights (no download), and model FLOPs per token.

from bench.model_shapes import SHAPES, flops_per_token
flops_per_token(SHAPES["llama-1b"], lengths=[1000])   # FLOPs of one trained token of a LoRA step
"""

from __future__ import annotations

_LLAMA_3 = dict(
    vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
# Llama-3.2-1B's and -3B's architectures
LLAMA_1B = dict(
    _LLAMA_3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64,
)  # fmt: skip
LLAMA_3B = dict(
    _LLAMA_3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
    num_key_value_heads=8, head_dim=128,
)  # fmt: skip
# Llama-3.1-8B's (untied embeddings): the size a 24 GB machine trains only with a quantized base
LLAMA_8B = dict(
    _LLAMA_3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
)  # fmt: skip
# SmolLM2-135M's (the benchmarks load its real weights; the shape is for the FLOPs)
SMOLLM2_135M = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, vocab_size=49152, tie_word_embeddings=True,
)  # fmt: skip
SHAPES = {"smollm2": SMOLLM2_135M, "llama-1b": LLAMA_1B, "llama-3b": LLAMA_3B, "llama-8b": LLAMA_8B}


def flops_per_token(shapes: dict, lengths: list[int], rank: int = 16) -> float:
    """Model FLOPs per trained token of a LoRA step (the MFU convention: what the model needs, not what
    recomputation adds). The frozen linear layers cost 2·N per token forward and 2·N backward (input
    gradients only; no weight gradients), N = the matmul parameters including the LM head; the LoRA
    adapters (rank `rank` on every linear layer) add 6·r·(in + out) per layer; causal attention over a
    document of n tokens costs 2·n²·d forward per layer (QKᵀ and PV, half of each), twice that
    backward: 6·n²·d per layer in all, d = heads · head_dim. Averaged over the documents' tokens:
    Σ n² / Σ n."""
    h, i, layers = shapes["hidden_size"], shapes["intermediate_size"], shapes["num_hidden_layers"]
    q, kv = (
        shapes["num_attention_heads"] * shapes["head_dim"],
        shapes["num_key_value_heads"] * shapes["head_dim"],
    )
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    n_matmul = layers * per_layer + shapes["vocab_size"] * h
    lora = layers * 6 * rank * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))
    mean_ctx = sum(n * n for n in lengths) / sum(lengths)
    attention = layers * 6 * mean_ctx * q
    return 4 * n_matmul + lora + attention


def cpu_matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """bf16 matmul throughput of this CPU with the current torch threads, measured now (n³, best of
    `repeats` after 2 warm-ups): the ceiling the benchmarks quote their model FLOPs against."""
    import time

    import torch

    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
