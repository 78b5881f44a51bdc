"""Rotary position embedding on queries and keys, in Hugging Face's `rotate_half` layout.

For a head vector x of size D, with R <= D rotary dims (R = D for Llama, Qwen, Gemma, Mistral and
Phi-3; R < D is partial rotary, e.g. Phi-2 / StableLM style) and h = R / 2:

    out[c] = x[c] * cos[c] - x[c + h] * sin[c]     for c <  h
    out[c] = x[c] * cos[c] + x[c - h] * sin[c]     for h <= c < R
    out[c] = x[c]                                  for R <= c < D   (passed through)

`cos`/`sin` come either per token, `(B or 1, T, R)` as transformers' rotary modules return
them, or as tables `(P, R)` gathered by `position_ids (B, T)` inside the kernel. Either way each
token has its own position, so packed rows (positions restarting at 0 per document) work.

The backward is the transposed map (a rotation by -theta when cos/sin are duplicated halves):
    dx[c] = dy[c] * cos[c] + dy[c + h] * sin[c + h]     for c <  h
    dx[c] = dy[c] * cos[c] - dy[c - h] * sin[c - h]     for h <= c < R
The Triton kernel does Q and K in one launch, one program per token, all heads at once, and
saves nothing but cos/sin (and position_ids) for the backward.
"""

from __future__ import annotations

import torch

from tunesmith.ops._triton import lazy_kernels, next_power_of_2, use_triton


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, T, D), k (B, Hk, T, D); cos/sin (B or 1, T, R), or (P, R) with position_ids (B, T).
    The same operations as transformers' apply_rotary_pos_emb (Llama's when R == D, Phi-3's
    partial form otherwise), so results are bit-identical to it."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]  # (B, T, R)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    rotary = cos.shape[-1]
    if rotary == q.shape[-1]:
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    q_rot, q_pass = q[..., :rotary], q[..., rotary:]
    k_rot, k_pass = k[..., :rotary], k[..., rotary:]
    q_out = torch.cat([q_rot * cos + _rotate_half(q_rot) * sin, q_pass], dim=-1)
    k_out = torch.cat([k_rot * cos + _rotate_half(k_rot) * sin, k_pass], dim=-1)
    return q_out, k_out


@lazy_kernels
def _kernels():
    # `tl` and the helper must be module globals: the interpreter resolves names through the
    # kernels' __globals__, not their closure.
    global tl, _rotate_heads
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(
        X, Y, sx_b, sx_h, sx_t, sy_b, sy_h, sy_t, b, t, n_heads, head_dim, half, cos, sin, sin_partner,
        BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        heads = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
        cols = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
        partner = tl.where(cols < half, cols + half, cols - half)
        rotary = cols < 2 * half
        mask = (heads < n_heads) & (cols < head_dim)
        base = X + b * sx_b + t * sx_t + heads * sx_h
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        x_partner = tl.load(base + partner, mask=mask & rotary, other=0.0).to(tl.float32)
        # rotate_half's sign: -x[c + h] in the first half, +x[c - h] in the second
        sign = tl.where(cols < half, -1.0, 1.0)
        if BACKWARD:
            y = x * cos + (-sign) * x_partner * sin_partner
        else:
            y = x * cos + sign * x_partner * sin
        tl.store(Y + b * sy_b + t * sy_t + heads * sy_h + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def rope(
        Q, K, QO, KO, COS, SIN, POS,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t,
        sc_b, sc_t, sp_b, sp_t,
        seq_len, n_q_heads, n_k_heads, head_dim, half,
        HAS_POS: tl.constexpr, BACKWARD: tl.constexpr,
        BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # one program per token (b, t)
        token = tl.program_id(0).to(tl.int64)
        b = token // seq_len
        t = token % seq_len
        if HAS_POS:
            # tables (P, R): row = position of this token
            cos_row = tl.load(POS + b * sp_b + t * sp_t).to(tl.int64) * sc_t
        else:
            # per token (B or 1, T, R); sc_b is 0 when cos is shared by the batch
            cos_row = b * sc_b + t * sc_t
        cols = tl.arange(0, BLOCK_D)[None, :]
        rotary = cols < 2 * half
        partner = tl.where(cols < half, cols + half, cols - half)
        # outside the rotary dims: cos 1, sin 0, so those dims pass through
        cos = tl.load(COS + cos_row + cols, mask=rotary, other=1.0).to(tl.float32)
        sin = tl.load(SIN + cos_row + cols, mask=rotary, other=0.0).to(tl.float32)
        sin_partner = tl.load(SIN + cos_row + partner, mask=rotary, other=0.0).to(tl.float32)
        _rotate_heads(
            Q, QO, sq_b, sq_h, sq_t, sqo_b, sqo_h, sqo_t, b, t, n_q_heads, head_dim, half, cos, sin, sin_partner,
            BACKWARD, BLOCK_HQ, BLOCK_D,
        )  # fmt: skip
        _rotate_heads(
            K, KO, sk_b, sk_h, sk_t, sko_b, sko_h, sko_t, b, t, n_k_heads, head_dim, half, cos, sin, sin_partner,
            BACKWARD, BLOCK_HK, BLOCK_D,
        )  # fmt: skip

    return rope


def _empty_like_bthd(x: torch.Tensor) -> torch.Tensor:
    # output laid out (B, T, H, D) in memory and viewed as (B, H, T, D): the layout the
    # projections produce, so the later reshape to (B, T, H*D) is free
    b, h, t, d = x.shape
    return torch.empty((b, t, h, d), dtype=x.dtype, device=x.device).transpose(1, 2)


def _launch(q, k, cos, sin, position_ids, backward: bool):
    kernel = _kernels()
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    batch, n_q_heads, seq_len, head_dim = q.shape
    n_k_heads = k.shape[1]
    rotary = cos.shape[-1]
    q_out, k_out = _empty_like_bthd(q), _empty_like_bthd(k)
    if position_ids is not None:
        pos = position_ids.expand(batch, seq_len)
        cos_strides = (0, cos.stride(0))
        pos_strides = (pos.stride(0), pos.stride(1))
    else:
        pos = cos  # unused
        cos_strides = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1))
        pos_strides = (0, 0)
    kernel[(batch * seq_len,)](
        q, k, q_out, k_out, cos, sin, pos,
        *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3],
        *cos_strides, *pos_strides,
        seq_len, n_q_heads, n_k_heads, head_dim, rotary // 2,
        HAS_POS=position_ids is not None, BACKWARD=backward,
        BLOCK_HQ=next_power_of_2(n_q_heads), BLOCK_HK=next_power_of_2(n_k_heads),
        BLOCK_D=next_power_of_2(head_dim),
    )  # fmt: skip
    return q_out, k_out


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):
        ctx.save_for_backward(cos, sin, position_ids)
        return _launch(q, k, cos, sin, position_ids, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, position_ids = ctx.saved_tensors
        dq_in, dk_in = _launch(dq, dk, cos, sin, position_ids, backward=True)
        return dq_in, dk_in, None, None, None


def _check(q, k, cos, position_ids):
    # the shape class of the one-time device check (ops.selfcheck)
    from tunesmith.ops.selfcheck import check_rope

    n_q, n_k, head_dim, rotary = q.shape[1], k.shape[1], q.shape[-1], cos.shape[-1]
    tables = position_ids is not None
    shape_class = (n_q, n_k, head_dim, rotary, q.dtype, k.dtype, cos.dtype, tables)
    return shape_class, lambda: check_rope(q.device, n_q, n_k, head_dim, rotary, q.dtype, cos.dtype, tables)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate `q (B, Hq, T, D)` and `k (B, Hk, T, D)` (any strides, e.g. transposed projections).

    cos/sin: `(B or 1, T, R)` per token (what transformers' rotary embedding returns), or
    tables `(P, R)` together with `position_ids (B, T)`. R <= D must be even (partial rotary
    rotates the first R dims). impl: "reference" (= "torch"), "triton", or "auto" (Triton on CUDA
    once it has passed its device check, `ops.selfcheck`).
    The Triton path does not propagate gradients into cos/sin (they are not trained).
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, H, T, D) alike")
    rotary = cos.shape[-1]
    if cos.shape != sin.shape or rotary % 2 or rotary > q.shape[-1]:
        raise ValueError(
            f"apply_rope: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must match, with an even last "
            f"dim <= head_dim {q.shape[-1]}"
        )
    if position_ids is None and (cos.dim() != 3 or cos.shape[1] != q.shape[2]):
        raise ValueError(
            f"apply_rope: cos {tuple(cos.shape)} must be (B or 1, T={q.shape[2]}, R) without position_ids"
        )
    if position_ids is not None and cos.dim() != 2:
        raise ValueError(f"apply_rope: with position_ids, cos/sin are tables (P, R), got {tuple(cos.shape)}")
    if use_triton(impl, "apply_rope", q, k, check=_check(q, k, cos, position_ids)):
        cos, sin = cos.contiguous(), sin.contiguous()
        return _RopeFunction.apply(q, k, cos, sin, position_ids)
    return rope_reference(q, k, cos, sin, position_ids)
