"""One chunk of `linear_cross_entropy`: its logits, fp32 loss, argmax hits, entropy and the gradient
w.r.t. the logits, in PyTorch (`_chunk_loss_and_grad`) and with the part after the matmul in one
Triton kernel (`_chunk_loss_and_grad_triton`). `ops.linear_cross_entropy` cuts the supervised rows
into chunks, picks one of these per call and wraps them in autograd; the reference it is tested
against is `linear_cross_entropy_reference` there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.ops._triton import lazy_kernels


def _chunk_loss_and_grad(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    t: torch.Tensor,
    softcap: float | None,
    dft: bool,
    want_grad: bool,
    row_scale: torch.Tensor | float | None,
    want_entropy: bool = False,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One chunk: per-token fp32 loss (c,), argmax hits (scalar), d(sum of scaled loss)/d logits,
    and the per-token entropy of the softmax (c,) when `want_entropy` (else None). `scratch`: an
    fp32 buffer of at least (c, V) that the entropy's exp may write into (reused across chunks).

    h (c, H) and weight (V, H) in the compute dtype; t (c,). The logits matmul runs in the input
    dtype (bf16 matmuls are ~3× faster than fp32 on CPU and are what the plain loss does too) and
    is upcast once; everything after it is fp32. The returned gradient (c, V) is fp32, already
    multiplied by `row_scale` (a float, or a (c,) tensor).
    """
    logits = F.linear(h, weight, bias)  # (c, V), input dtype
    z = logits.float()  # (c, V) fp32; the same tensor when the input is fp32
    del logits
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(z.div_(softcap))  # (c, V); d(softcap·tanh(x/softcap))/dx = 1 - tanh²
        z = tanh * softcap
    rows = torch.arange(t.shape[0], device=t.device)
    z_target = z[rows, t]  # (c,), read before z is overwritten
    # One exp pass serves both the log-sum-exp and the softmax (torch.logsumexp would be a second
    # one; the profile showed exp and sub over (c, V) at ~20% of the loss's CPU time).
    z_max, argmax = z.max(dim=-1, keepdim=True)  # (c, 1) each, one pass; first index on ties
    correct = (argmax.squeeze(1) == t).sum()  # on the capped logits, as the reference
    z_shift = z.sub_(z_max)  # (c, V), in place: z - max
    entropy = None
    if want_entropy:
        # H = log Σe - Σ e·(z - max) / Σe with e = exp(z - max). The dot product needs z - max after e
        # exists, so e gets its own (c, V) buffer (the chunk budget allows for it; one buffer reused by
        # every chunk: a fresh 64 MB one per chunk cost as much again in page faults), and z - max,
        # not needed after that, takes the products in place.
        e = torch.exp(z_shift) if scratch is None else torch.exp(z_shift, out=scratch[: z_shift.shape[0]])
        dot = z_shift.mul_(e).sum(dim=-1)  # (c,)
        del z_shift, z
    else:
        e = z_shift.exp_()  # (c, V), in place: exp(z - max)
    sum_e = e.sum(dim=-1)  # (c,)
    log_sum_e = sum_e.log()
    loss = z_max.squeeze(1) + log_sum_e - z_target  # (c,) = log-sum-exp - z_target = -log p(target)
    if want_entropy:
        entropy = log_sum_e - dot / sum_e
    if dft:
        prob = torch.exp(-loss)  # p(target), detached by construction (no autograd in here)
        loss = loss * prob
    if not want_grad:
        return loss, correct, None, entropy
    # scale · (softmax - one_hot), in place: (c, V)
    scale = torch.ones_like(sum_e)
    if dft:
        scale = scale * prob
    if row_scale is not None:
        scale = scale * row_scale
    grad = e.mul_((scale / sum_e)[:, None])
    grad[rows, t] -= scale
    if tanh is not None:
        grad.mul_(1.0 - tanh * tanh)
    return loss, correct, grad, entropy


def _chunk_loss_and_grad_triton(
    h, weight, bias, t, softcap, dft, want_grad, row_scale, want_entropy=False, scratch=None
):
    """`_chunk_loss_and_grad` with the part after the matmul in one Triton kernel: it reads the
    (c, V) logits twice (log-sum-exp, then gradient) and writes the gradient over them in the input
    dtype, so the chunk needs no fp32 (c, V) buffer. One program per token."""
    kernel = _kernels()
    logits = F.linear(h, weight, bias).contiguous()  # (c, V), input dtype; becomes the gradient
    c, v = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=h.device)
    entropy = torch.empty(c, dtype=torch.float32, device=h.device) if want_entropy else loss
    hits = torch.empty(c, dtype=torch.int32, device=h.device)
    scale_rows = isinstance(row_scale, torch.Tensor)
    scalar = 1.0 if row_scale is None or scale_rows else float(row_scale)
    rows = row_scale.float().contiguous() if scale_rows else loss  # unused pointer when not scale_rows
    kernel[(c,)](
        logits, logits.stride(0), t.contiguous(), loss, hits, rows, entropy, v,
        scalar, softcap if softcap is not None else 1.0,
        SOFTCAP=softcap is not None, DFT=dft, WANT_GRAD=want_grad, SCALE_ROWS=scale_rows,
        WANT_ENTROPY=want_entropy, BLOCK=min(4096, 1 << max(4, (v - 1).bit_length())),
    )  # fmt: skip
    return loss, hits.sum(), logits if want_grad else None, entropy if want_entropy else None


@lazy_kernels
def _kernels():
    # `tl` must be a module global: the interpreter finds triton.language through the kernel's
    # __globals__ when it runs on CPU tensors.
    global tl
    import triton
    import triton.language as tl

    @triton.jit
    def ce_chunk(
        LOGITS, stride, TARGETS, LOSS, HITS, ROW_SCALE, ENTROPY, n_cols, scale, cap,
        SOFTCAP: tl.constexpr, DFT: tl.constexpr, WANT_GRAD: tl.constexpr, SCALE_ROWS: tl.constexpr,
        WANT_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride
        target = tl.load(TARGETS + row)
        cols = tl.arange(0, BLOCK)
        # pass 1: running max and sum of exp (online softmax), and the first argmax of the logits;
        # for the entropy also d = Σ exp(z - m)·(z - m), rescaled like s when m grows:
        # d' = exp(m - m')·(d - (m' - m)·s), so that H = log s - d / s at the end
        m = -float("inf")
        s = 0.0
        d = 0.0
        best = -float("inf")
        best_idx = 0
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x = tl.load(base + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
            block_best = tl.max(x, axis=0)
            block_idx = tl.argmax(x, axis=0) + start
            if block_best > best:
                best = block_best
                best_idx = block_idx
            z = x
            if SOFTCAP:  # cap * tanh(x / cap), tanh written with exp (no libdevice in the interpreter)
                z = (1.0 - 2.0 / (tl.exp(2.0 * x / cap) + 1.0)) * cap
            z = tl.where(mask, z, -float("inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            alpha = tl.exp(m - m_new)
            if WANT_ENTROPY:
                zs = tl.where(mask, z - m_new, 0.0)
                d_block = tl.sum(tl.where(mask, tl.exp(zs) * zs, 0.0), axis=0)
                if s > 0.0:
                    d = alpha * (d - (m_new - m) * s) + d_block
                else:  # the first block (m = -inf): nothing to rescale
                    d = d_block
            s = s * alpha + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        z_t = tl.load(base + target).to(tl.float32)
        if SOFTCAP:
            z_t = (1.0 - 2.0 / (tl.exp(2.0 * z_t / cap) + 1.0)) * cap
        loss = lse - z_t
        g_scale = scale
        if SCALE_ROWS:
            g_scale = tl.load(ROW_SCALE + row)
        if DFT:
            p_t = tl.exp(-loss)  # the target's probability, a constant for the gradient
            loss = loss * p_t
            g_scale = g_scale * p_t
        tl.store(LOSS + row, loss)
        tl.store(HITS + row, (best_idx == target).to(tl.int32))
        if WANT_ENTROPY:
            tl.store(ENTROPY + row, tl.log(s) - d / s)
        if WANT_GRAD:
            # pass 2: d loss / d logits = (softmax - onehot) * scale (* (1 - tanh²)), over the logits
            for start in range(0, n_cols, BLOCK):
                mask = start + cols < n_cols
                x = tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32)
                if SOFTCAP:
                    th = 1.0 - 2.0 / (tl.exp(2.0 * x / cap) + 1.0)
                    g = tl.exp(th * cap - lse) * (1.0 - th * th)  # d(cap·tanh(x/cap))/dx = 1 - tanh²
                    g = g - tl.where(start + cols == target, 1.0 - th * th, 0.0)
                else:
                    g = tl.exp(x - lse) - tl.where(start + cols == target, 1.0, 0.0)
                g = g * g_scale
                tl.store(base + start + cols, g.to(LOGITS.dtype.element_ty), mask=mask)

    return ce_chunk
