"""Fused LM head + cross-entropy that never builds the full (tokens × vocab) logits.

The plain loss `F.cross_entropy(hidden @ weight.T, targets)` keeps (N, V) logits, an fp32 copy
for the softmax and an (N, V) gradient alive at once: for 8,192 tokens and Llama-3's 128,256-word
vocabulary that is gigabytes, for a loss that is one number. Here:

1. only supervised rows (`targets != ignore_index`) reach the matmul (`index_select`);
2. they are processed in chunks of `chunk_size` tokens, so at most (chunk, V) logits exist;
3. the gradients w.r.t. hidden, weight and bias are computed *in the forward*, chunk by chunk,
   so nothing but those gradients is kept for the backward, which only scales them by
   `grad_output` (the scalar `d loss_total / d loss`). reduction="none" is the exception: each
   token has its own grad_output, so it keeps the supervised rows and recomputes in the backward;
4. the softmax, log-sum-exp and loss are accumulated in fp32 whatever the input dtype.

`impl="reference"` is the textbook version the tests compare against; `impl="triton"` runs the
step after each chunk's matmul (softmax, loss, gradient) as one Triton kernel; both chunk steps live
in `ops.linear_cross_entropy_chunk`.

Worked example (vocab 3, no bias): hidden (2, 1) = [[1.], [2.]], weight (3, 1) = [[0.], [1.], [-1.]],
targets = [1, -100]. Only row 0 is supervised; its logits are [0, 1, -1], so
loss = logsumexp([0, 1, -1]) - 1 = 0.4076 and num_correct = 1 (argmax 1 == target 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.ops._triton import use_triton
from tunesmith.ops.linear_cross_entropy_chunk import _chunk_loss_and_grad, _chunk_loss_and_grad_triton

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "default_chunk_size"]

_REDUCTIONS = ("sum", "mean", "none")
# "torch" is "chunked" under the name the other ops give their PyTorch path (ops._triton.IMPLS)
_IMPLS = ("auto", "chunked", "reference", "torch", "triton")

# Budget for one chunk's fp32 logits. Several tensors of this size live at once inside a chunk
# (the input-dtype logits, the fp32 softmax/grad, its input-dtype copy for the two matmuls), so the
# working set is about 2× this: ~110 MB measured at V = 128k, H = 2048, against 11.2 GB for the
# plain loss at 8,192 tokens. Smaller chunks run the matmuls below peak: on the 2-core bench machine
# (1,024 tokens, bf16) 64-token chunks took 12-14 s per forward+backward where 130 took 10-11 s
# in the same sweep; 130 and 256 were indistinguishable under the machine's load (6-9 s each),
# 512 no faster and 0.3 GB bigger. So: the smallest chunk that keeps the matmuls fast.
_CHUNK_LOGITS_BYTES = 64 * 2**20
_MIN_CHUNK, _MAX_CHUNK = 16, 4096

# How the (V, H) weight gradient is summed over chunks when the weight is bf16/fp16. Each chunk's
# matmul accumulates in fp32 inside the kernel either way; the question is the running sum across
# chunks. Measured against an fp64 truth (N=2048, H=256, V=32,000; bench/RESULTS.md): the plain
# bf16 loss has a relative error of 3.5e-3 on grad_weight; summing 16-64 chunks in bf16 gives
# 4.5e-3-4.9e-3, in fp32 3.7e-3. An fp32 sum needs a (V, H) fp32 buffer plus a (V, H) temporary per
# chunk (1 GB + 0.5 GB at V=128k, H=2048: more than the whole rest of this loss) and a pass over
# them per chunk, so 16-bit weights accumulate in their own dtype: within 1.4× of the plain loss's
# own rounding error. fp32 weights (including fp32 master weights under bf16 activations)
# accumulate in fp32. A frozen LM head (LoRA) has no weight gradient at all.
_FP32_ACCUMULATION_FOR_16BIT_WEIGHT = False


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about 64 MB.

    >>> default_chunk_size(128_256), default_chunk_size(32_000), default_chunk_size(512)
    (130, 524, 4096)
    """
    tokens = _CHUNK_LOGITS_BYTES // (4 * max(vocab_size, 1))
    return int(min(max(tokens, _MIN_CHUNK), _MAX_CHUNK))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    dft: bool = False,
    reduction: str = "sum",
    impl: str = "auto",
    chunk_size: int | None = None,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `targets`, without the full logits.

    Args:
        hidden: (..., H) final hidden states (e.g. (B, T, H) or (N, H)).
        weight: (V, H) LM head weight. When it does not require grad (LoRA with a frozen head) its
            gradient is not computed at all.
        targets: (...) int64, **already shifted** (pass `batch["shift_labels"]`); `ignore_index`
            marks positions that are not trained.
        bias: optional (V,) LM head bias.
        softcap: Gemma-2 style logit soft-capping, `softcap * tanh(logits / softcap)`, applied before
            the softmax; the gradient goes through it.
        dft: Dynamic Fine-Tuning (TRL's `loss_type="dft"`): each token's loss is multiplied by the
            detached probability the model gives its target.
        reduction: "sum" (default: the trainer divides by the supervised tokens of the whole
            optimizer step), "mean" (over supervised tokens; 0 when there are none) or "none"
            (fp32 tensor shaped like `targets`, 0 at ignored positions).
        impl: "chunked" (PyTorch, CPU and CUDA; "torch" is the same), "triton" (the same chunks, with the softmax and
            its gradient in one Triton kernel that overwrites the logits in place: no fp32 (chunk, V)
            buffer; CUDA, or CPU under TRITON_INTERPRET=1), "reference" (full logits +
            F.cross_entropy, for tests), "auto" (triton on CUDA once the kernel has passed its
            one-time device check, `ops.selfcheck`; chunked otherwise or with TUNESMITH_KERNELS=off).
        chunk_size: tokens per chunk; default `default_chunk_size(V)` (~64 MB of fp32 logits).
        return_entropy: also return the entropy of the predicted next-token distribution (after
            soft-capping), `-sum_v p_v log p_v`, at the supervised positions, reduced as `reduction`
            says (sum, mean over supervised tokens, or per position with 0 where ignored). A detached
            fp32 metric (TRL logs it as `entropy`), computed chunk by chunk from the same logits.

    Returns:
        (loss, num_correct), or (loss, num_correct, entropy) with `return_entropy`: loss is fp32 (a
        scalar, or shaped like `targets` for "none"); num_correct is a detached int64 scalar, the
        number of supervised positions whose argmax logit is the target.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r} is not one of {_REDUCTIONS}")
    if impl not in _IMPLS:
        raise ValueError(f"linear_cross_entropy: impl={impl!r} is not one of {_IMPLS}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree: "
            "hidden must be targets.shape + (H,). Did you pass unshifted labels of another length?"
        )
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"linear_cross_entropy: weight {tuple(weight.shape)} must be (V, H) with H = {hidden.shape[-1]}"
        )
    if softcap is not None and softcap <= 0:
        raise ValueError(f"linear_cross_entropy: softcap must be positive or None, got {softcap}")
    if impl == "reference":
        return linear_cross_entropy_reference(
            hidden,
            weight,
            targets,
            bias=bias,
            ignore_index=ignore_index,
            softcap=softcap,
            dft=dft,
            reduction=reduction,
            return_entropy=return_entropy,
        )
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be ≥ 1, got {chunk_size}")

    chunk_fn = _chunk_loss_and_grad
    # "auto": the Triton kernel on CUDA once it has passed its device check (ops.selfcheck; its
    # speed against the chunked path is measured by bench/gpu, not yet run), else the chunked path
    if impl not in ("chunked", "torch"):
        check = _check(
            hidden.device,
            weight.shape[0],
            hidden.dtype,
            weight.dtype,
            bias,
            softcap,
            dft,
            return_entropy,
            reduction,
        )
        if use_triton(impl, "linear_cross_entropy", hidden, weight, check=check):
            chunk_fn = _chunk_loss_and_grad_triton
    h2d = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    flat_targets = targets.reshape(-1)  # (N,)
    if reduction == "none":
        loss, correct, entropy = _RecomputeInBackward.apply(
            h2d, weight, bias, flat_targets, ignore_index, softcap, dft, chunk_size, chunk_fn, return_entropy
        )
        loss, entropy = loss.view(targets.shape), entropy.view(targets.shape)
    else:
        loss, correct, entropy = _GradInForward.apply(
            h2d, weight, bias, flat_targets, ignore_index, softcap, dft, reduction == "mean", chunk_size,
            chunk_fn, return_entropy,
        )  # fmt: skip
    return (loss, correct, entropy) if return_entropy else (loss, correct)


def _check(device, vocab, h_dtype, w_dtype, bias, softcap, dft, entropy, reduction):
    # the shape class of the one-time device check (ops.selfcheck); "none" scales rows by a tensor
    from tunesmith.ops.selfcheck import check_linear_cross_entropy

    has_bias, per_token = bias is not None, reduction == "none"
    shape_class = (vocab, h_dtype, w_dtype, has_bias, softcap, dft, entropy, per_token)
    return shape_class, lambda: check_linear_cross_entropy(
        device, vocab, h_dtype, w_dtype, has_bias, softcap, dft, entropy, per_token
    )


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    dft: bool = False,
    reduction: str = "sum",
    return_entropy: bool = False,
):
    """The plain computation: full (N, V) logits in the input dtype, then fp32 cross-entropy (and,
    with `return_entropy`, the entropy of the softmax at the supervised positions, from the full logits)."""
    weight, bias = _in_dtype(weight, bias, hidden.dtype)  # as the chunked path does
    logits = F.linear(hidden, weight, bias).float()  # (..., V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    mask = targets != ignore_index
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).view(targets.shape)
    if dft:
        per_token = per_token * torch.exp(-per_token).detach()
    num_correct = ((logits.argmax(-1) == targets) & mask).sum().detach()
    with torch.no_grad():
        log_p = torch.log_softmax(logits, dim=-1)  # (..., V)
        entropy = -(log_p.exp() * log_p).sum(-1) * mask  # (...), 0 where ignored
    if reduction == "none":
        return (per_token, num_correct, entropy) if return_entropy else (per_token, num_correct)
    total, entropy = per_token.sum(), entropy.sum()
    if reduction == "mean":
        total, entropy = total / mask.sum().clamp(min=1), entropy / mask.sum().clamp(min=1)
    return (total, num_correct, entropy) if return_entropy else (total, num_correct)


_TAIL_ALIGN = 32


def _chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """(start, stop) of the chunks of n rows: whole chunks, then the rest cut into a multiple of
    `_TAIL_ALIGN` rows and what remains (< `_TAIL_ALIGN`).

    So the matmuls see at most chunk_size / 32 + 32 row counts over a whole run instead of one per
    supervised-token count: on the CPU, oneDNN builds (slowly) and caches (~250 KB each) one kernel
    per shape.

    >>> _chunks(700, 341)
    [(0, 341), (341, 682), (682, 700)]
    >>> _chunks(100, 341)
    [(0, 96), (96, 100)]
    """
    whole = n - n % chunk_size
    bounds = [(start, start + chunk_size) for start in range(0, whole, chunk_size)]
    aligned = n - (n - whole) % _TAIL_ALIGN
    bounds += [(a, b) for a, b in ((whole, aligned), (aligned, n)) if b > a]
    return bounds


def _supervised(
    h2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
):
    """Supervised rows only, everything in the hidden dtype: (idx (n,), h (n, H), t (n,), weight, bias)."""
    idx = (targets != ignore_index).nonzero().squeeze(1)  # (n,)
    h = h2d.index_select(0, idx)  # (n, H) copy: ignored rows never reach the matmul
    t = targets.index_select(0, idx)
    return (idx, h, t, *_in_dtype(weight, bias, h.dtype))


def _in_dtype(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    """Mixed dtypes (e.g. an fp32 head under bf16 activations) compute in the activation dtype."""
    w = weight if weight.dtype == dtype else weight.to(dtype)
    b = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
    return w, b


def _entropy_scratch(want_entropy, chunk_fn, n, chunk_size, vocab, device) -> torch.Tensor | None:
    """The (min(n, chunk), V) fp32 buffer the PyTorch chunks write the entropy's exp into, or None."""
    if not want_entropy or chunk_fn is not _chunk_loss_and_grad or n == 0:
        return None
    return torch.empty((min(n, chunk_size), vocab), dtype=torch.float32, device=device)


class _GradInForward(torch.autograd.Function):
    """reduction "sum"/"mean": gradients are finished in the forward; backward scales them."""

    @staticmethod
    def forward(
        ctx, h2d, weight, bias, targets, ignore_index, softcap, dft, mean, chunk_size, chunk_fn, want_entropy
    ):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        want_grad = need_h or need_w or need_b
        idx, h, t, w, b = _supervised(h2d, weight, bias, targets, ignore_index)
        n, dtype = t.shape[0], h.dtype
        scale = 1.0 / n if (mean and n > 0) else 1.0

        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        entropy = torch.zeros((), dtype=torch.float32, device=h.device)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None  # (n, H): each row written once
        # (V, H) accumulated over chunks, in the weight's dtype (see _FP32_ACCUMULATION_FOR_16BIT_WEIGHT).
        acc_dtype = weight.dtype
        if _FP32_ACCUMULATION_FOR_16BIT_WEIGHT and weight.dtype in (torch.bfloat16, torch.float16):
            acc_dtype = torch.float32
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_b else None

        scratch = _entropy_scratch(want_entropy, chunk_fn, n, chunk_size, weight.shape[0], h.device)
        for start, stop in _chunks(n, chunk_size):
            h_c, t_c = h[start:stop], t[start:stop]
            loss_c, correct_c, g, entropy_c = chunk_fn(
                h_c, w, b, t_c, softcap, dft, want_grad, scale, want_entropy, scratch
            )
            loss += loss_c.sum()
            correct += correct_c
            if entropy_c is not None:
                entropy += entropy_c.sum()
            if not want_grad:
                continue
            if grad_b is not None:
                grad_b += g.sum(0, dtype=torch.float32)
            g = g.to(dtype)  # (c, V) in the matmul dtype
            if grad_h is not None:
                torch.mm(g, w, out=grad_h[start:stop])  # (c, V) @ (V, H)
            if grad_w is not None:
                if acc_dtype == dtype:
                    grad_w.addmm_(g.t(), h_c)  # (V, c) @ (c, H), accumulated in place
                else:  # a (V, H) temporary per chunk: costs time and memory, hence not the default
                    grad_w += torch.mm(g.t(), h_c)
        if mean and n > 0:
            loss, entropy = loss / n, entropy / n

        ctx.n_rows = h2d.shape[0]
        ctx.mark_non_differentiable(correct, entropy)
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        # Plain attributes, not save_for_backward: these are new tensors, and backward takes them over.
        ctx.grads = (idx, grad_h, grad_w, grad_b)
        return loss, correct, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct, _grad_entropy):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy: backward ran twice through the same loss (retain_graph=True?). Its "
                "gradients are computed in the forward and handed over once; compute the loss again instead."
            )
        idx, grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None  # hand the buffers over: scaled in place, then owned by autograd (no copy)
        # grad_loss is a scalar (e.g. 1 / supervised tokens of the step); skip the pass when it is 1.
        scale = None if bool(grad_loss == 1.0) else grad_loss
        grad_hidden = None
        if grad_h is not None:
            if scale is not None:
                grad_h.mul_(scale.to(grad_h.dtype))
            grad_hidden = grad_h.new_zeros((ctx.n_rows, grad_h.shape[1]))  # ignored rows get 0
            grad_hidden.index_copy_(0, idx, grad_h)
        for g in (grad_w, grad_b):
            if g is not None and scale is not None:
                g.mul_(scale.to(g.dtype))
        return grad_hidden, grad_w, grad_b, None, None, None, None, None, None, None, None


class _RecomputeInBackward(torch.autograd.Function):
    """reduction "none": each token has its own grad_output, so the weight gradient cannot be
    finished in the forward. Keep only the supervised rows (n, H) and recompute each chunk's
    logits in the backward (one extra matmul per chunk)."""

    @staticmethod
    def forward(
        ctx, h2d, weight, bias, targets, ignore_index, softcap, dft, chunk_size, chunk_fn, want_entropy
    ):
        idx, h, t, w, b = _supervised(h2d, weight, bias, targets, ignore_index)
        per_token = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)  # (N,)
        entropy = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)  # (N,)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        scratch = _entropy_scratch(want_entropy, chunk_fn, t.shape[0], chunk_size, weight.shape[0], h.device)
        for start, stop in _chunks(t.shape[0], chunk_size):
            h_c, t_c = h[start:stop], t[start:stop]
            loss_c, correct_c, _, entropy_c = chunk_fn(
                h_c, w, b, t_c, softcap, dft, False, None, want_entropy, scratch
            )
            per_token[idx[start:stop]] = loss_c
            if entropy_c is not None:
                entropy[idx[start:stop]] = entropy_c
            correct += correct_c
        ctx.mark_non_differentiable(correct, entropy)
        ctx.args = (
            softcap,
            dft,
            chunk_size,
            h2d.shape[0],
            weight.dtype,
            None if bias is None else bias.dtype,
            chunk_fn,
        )
        ctx.save_for_backward(idx, h, t, weight, bias)
        return per_token, correct, entropy

    @staticmethod
    def backward(ctx, grad_per_token, _grad_correct, _grad_entropy):
        softcap, dft, chunk_size, n_rows, w_dtype, b_dtype, chunk_fn = ctx.args
        idx, h, t, weight, bias = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        w, b = _in_dtype(weight, bias, h.dtype)
        dtype = h.dtype
        g_rows = grad_per_token.index_select(0, idx).float()  # (n,)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_b else None
        for start, stop in _chunks(t.shape[0], chunk_size):
            h_c = h[start:stop]
            _, _, g, _ = chunk_fn(h_c, w, b, t[start:stop], softcap, dft, True, g_rows[start:stop])
            if grad_b is not None:
                grad_b += g.sum(0, dtype=torch.float32)
            g = g.to(dtype)
            if grad_h is not None:
                torch.mm(g, w, out=grad_h[start:stop])
            if grad_w is not None:
                grad_w += torch.mm(g.t(), h_c)
        grad_hidden = None
        if grad_h is not None:
            grad_hidden = grad_h.new_zeros((n_rows, h.shape[1]))
            grad_hidden.index_copy_(0, idx, grad_h)
        grad_w = None if grad_w is None else grad_w.to(w_dtype)
        grad_b = None if grad_b is None else grad_b.to(b_dtype)
        return grad_hidden, grad_w, grad_b, None, None, None, None, None, None, None
