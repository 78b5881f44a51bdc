"""Each Triton kernel against its PyTorch reference on a small input, forward and backward.

`ops.selfcheck.kernel_ok` runs one of these (in its own thread, once per op, shape class, dtype and
device) before impl="auto" first uses a kernel; each raises `KernelMismatch` when the kernel
differs from the reference beyond `TOLERANCE`. They are importable from `ops.selfcheck` too.
"""

from __future__ import annotations

import math

import torch

# Relative L2 error ||kernel - reference|| / ||reference|| allowed per compute dtype. Kernel and
# reference round differently (fp32 accumulation order; one rounding of the 16-bit result), which
# measures about 1e-7 in fp32, 5e-4 in fp16 and 4e-3 in bf16 on these inputs; a miscompiled or
# wrong kernel is off by O(1).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}

# rows / tokens of the check inputs: odd, so masked tails are exercised
_ROWS = 37
_CE_HIDDEN = 16  # the loss kernel works on (rows, V) logits; H only feeds the matmul before it


class KernelMismatch(AssertionError):
    """The kernel's output or gradient differs from the reference beyond the tolerance."""


# ---------------------------------------------------------------- comparisons and inputs


def compare(name: str, got: torch.Tensor | None, want: torch.Tensor | None, dtype: torch.dtype) -> None:
    """Raise KernelMismatch unless `got` matches `want` within TOLERANCE[dtype] (relative L2)."""
    if want is None and got is None:
        return
    if got is None or want is None:
        raise KernelMismatch(f"{name}: {'missing' if got is None else 'unexpected'} tensor")
    if got.shape != want.shape:
        raise KernelMismatch(f"{name}: shape {tuple(got.shape)}, reference {tuple(want.shape)}")
    got, want = got.detach().double(), want.detach().double()
    if not torch.isfinite(got).all() and torch.isfinite(want).all():
        raise KernelMismatch(f"{name}: non-finite values where the reference is finite")
    tolerance = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    error = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    if not error <= tolerance:  # also catches NaN
        raise KernelMismatch(f"{name}: relative error {error:.2e} > {tolerance:.1e} ({dtype})")


class _Inputs:
    """Random tensors from a private generator (the run's random state is not touched)."""

    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int, dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.generator) * scale + shift
        return t.to(device=self.device, dtype=dtype)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=self.generator).to(self.device)


def _grads(outputs: tuple[torch.Tensor, ...], upstream: tuple[torch.Tensor, ...], inputs: list[torch.Tensor]):
    return torch.autograd.grad(outputs, inputs, upstream, allow_unused=True)


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# ---------------------------------------------------------------- one check per op


def check_rms_norm(
    device: torch.device,
    n_cols: int,
    x_dtype: torch.dtype,
    w_dtype: torch.dtype,
    eps: float,
    offset: float,
    casting: str,
) -> None:
    from tunesmith.ops.rms_norm import rms_norm, rms_norm_reference

    data = _Inputs(device)
    x = data.randn(_ROWS, n_cols, dtype=x_dtype, scale=2.0)
    w = data.randn(n_cols, dtype=w_dtype, scale=0.5, shift=0.0 if offset else 1.0)
    out_dtype = torch.promote_types(x_dtype, w_dtype) if casting == "llama" else x_dtype
    dy = data.randn(_ROWS, n_cols, dtype=out_dtype)
    runs = []
    for fn in (
        lambda x, w: rms_norm(x, w, eps, offset=offset, casting=casting, impl="triton"),
        lambda x, w: rms_norm_reference(x, w, eps, offset=offset, casting=casting),
    ):
        leaves = _leaves(x, w)
        y = fn(*leaves)
        runs.append((y, *_grads((y,), (dy,), leaves)))
    for name, got, want in zip(("output", "grad_x", "grad_weight"), *runs):
        compare(f"rms_norm {name}", got, want, x_dtype)


def check_glu(
    device: torch.device,
    n_cols: int,
    g_dtype: torch.dtype,
    u_dtype: torch.dtype,
    activation: str,
    strided: bool,
) -> None:
    from tunesmith.ops.swiglu import glu, glu_reference

    data = _Inputs(device)
    if strided:  # Phi-3: gate and up are the two halves of one projection's output
        gate, up = data.randn(_ROWS, 2 * n_cols, dtype=g_dtype, scale=2.0).chunk(2, dim=-1)
        up = up.to(u_dtype)
    else:
        gate, up = (
            data.randn(_ROWS, n_cols, dtype=g_dtype, scale=2.0),
            data.randn(_ROWS, n_cols, dtype=u_dtype),
        )
    dy = data.randn(_ROWS, n_cols, dtype=torch.promote_types(g_dtype, u_dtype))
    runs = []
    for fn in (
        lambda g, u: glu(g, u, activation, impl="triton"),
        lambda g, u: glu_reference(g, u, activation),
    ):
        leaves = (
            [gate.detach().requires_grad_(True), up.detach().requires_grad_(True)]
            if strided
            else _leaves(gate, up)
        )
        y = fn(*leaves)
        runs.append((y, *_grads((y,), (dy,), leaves)))
    for name, got, want in zip(("output", "grad_gate", "grad_up"), *runs):
        compare(f"glu({activation}) {name}", got, want, g_dtype)


def check_rope(
    device: torch.device,
    n_q_heads: int,
    n_k_heads: int,
    head_dim: int,
    rotary: int,
    q_dtype: torch.dtype,
    cos_dtype: torch.dtype,
    tables: bool,
) -> None:
    from tunesmith.ops.rope import apply_rope, rope_reference

    data = _Inputs(device)
    # one program per token: no tail to exercise along T. 16 tokens keep the integer arguments (seq_len
    # and the strides) divisible by 16 like a real run's, so Triton reuses this compiled kernel there.
    batch, seq = 2, 16
    # (B, T, H, D) viewed as (B, H, T, D): the layout the projections produce
    q = data.randn(batch, seq, n_q_heads, head_dim, dtype=q_dtype).transpose(1, 2)
    k = data.randn(batch, seq, n_k_heads, head_dim, dtype=q_dtype).transpose(1, 2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary, 2, dtype=torch.float64) / rotary))  # (R/2,)
    n_positions = 3 * seq
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # (P, R), rotate_half layout
    cos_table, sin_table = (f(angles).to(device=device, dtype=cos_dtype) for f in (torch.cos, torch.sin))
    position_ids = data.randint(n_positions, batch, seq)
    if tables:
        cos, sin, pos = cos_table, sin_table, position_ids
    else:
        cos, sin, pos = cos_table[position_ids], sin_table[position_ids], None  # (B, T, R)
    dq = data.randn(batch, n_q_heads, seq, head_dim, dtype=q_dtype)
    dk = data.randn(batch, n_k_heads, seq, head_dim, dtype=q_dtype)
    runs = []
    for fn in (
        lambda q, k: apply_rope(q, k, cos, sin, pos, impl="triton"),
        lambda q, k: rope_reference(q, k, cos, sin, pos),
    ):
        leaves = [q.detach().requires_grad_(True), k.detach().requires_grad_(True)]
        q_out, k_out = fn(*leaves)
        runs.append((q_out, k_out, *_grads((q_out, k_out), (dq, dk), leaves)))
    for name, got, want in zip(("q", "k", "grad_q", "grad_k"), *runs):
        compare(f"rope {name}", got, want, q_dtype)


def check_linear_cross_entropy(
    device: torch.device,
    vocab: int,
    h_dtype: torch.dtype,
    w_dtype: torch.dtype,
    has_bias: bool,
    softcap: float | None,
    dft: bool,
    entropy: bool,
    per_token: bool,
) -> None:
    from tunesmith.ops.linear_cross_entropy import linear_cross_entropy

    data = _Inputs(device)
    # logits h @ w.T with standard deviation ~2, as a trained LM head gives
    h = data.randn(_ROWS, _CE_HIDDEN, dtype=h_dtype)
    w = data.randn(vocab, _CE_HIDDEN, dtype=w_dtype, scale=2.0 / math.sqrt(_CE_HIDDEN))
    b = data.randn(vocab, dtype=w_dtype, scale=0.1) if has_bias else None
    targets = data.randint(vocab, _ROWS)
    with torch.no_grad():  # half the rows are predicted right, so the hit count means something
        argmax = (h.float() @ w.float().T).argmax(-1)
    targets[: _ROWS // 2] = argmax[: _ROWS // 2]
    targets[-3:] = -100  # ignored rows
    reduction = "none" if per_token else "sum"
    upstream = data.randn(_ROWS, dtype=torch.float32) if per_token else torch.ones((), device=device)
    runs, hits = [], []
    for impl in ("triton", "chunked"):
        leaves = _leaves(h, w) + (_leaves(b) if has_bias else [])
        out = linear_cross_entropy(
            leaves[0], leaves[1], targets, bias=leaves[2] if has_bias else None, softcap=softcap, dft=dft,
            reduction=reduction, impl=impl, return_entropy=entropy,
        )  # fmt: skip
        loss = out[0]
        grads = _grads((loss,), (upstream,), leaves)
        runs.append((loss, out[2] if entropy else None, *grads))
        hits.append(int(out[1]))
    names = ("loss", "entropy", "grad_hidden", "grad_weight", "grad_bias")
    for name, got, want in zip(names, *runs):
        compare(f"linear_cross_entropy {name}", got, want, h_dtype)
    if abs(hits[0] - hits[1]) > 1:  # one tie broken differently is rounding; more is a wrong argmax
        raise KernelMismatch(f"linear_cross_entropy: {hits[0]} correct predictions, reference {hits[1]}")
