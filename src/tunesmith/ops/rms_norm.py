"""RMSNorm: a pure-PyTorch reference and a Triton kernel (forward and backward).

    y = x / sqrt(mean(x**2) + eps) * (offset + weight)

computed in fp32 whatever the input dtype. Two roundings are in use, and we keep each model's:

- casting="llama" (Llama, Mistral, Qwen2/3, Phi-3): the normalised x is cast back to the input
  dtype *before* the weight multiply; the output dtype is the promotion of input and weight.
- casting="gemma" (Gemma 1-3, which also use offset=1, i.e. (1 + weight)): the weight multiply
  happens in fp32 and the result is cast to the input dtype.

The Triton backward saves only x, the weight and rstd (one fp32 per row), never the
normalised activations, and reduces the weight gradient in fp32 per program.

Off CUDA, "auto" runs `_RMSNormTorch`: the reference's forward, op for op (so bit-identical
outputs), with a hand-written backward that also keeps only x and rstd. Autograd of the
reference keeps an fp32 copy of x (2× its bf16 size) plus the normalised bf16 activations for
every norm; on SmolLM2 that was 4.5 of ~25 KB of saved activations per token and layer, and the
hand-written backward is also faster on the CPU (bench/RESULTS.md, "Kernels").
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.ops._triton import lazy_kernels, next_power_of_2, use_triton

CASTINGS = ("llama", "gemma")


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0, casting: str = "llama"
) -> torch.Tensor:
    """The same operations, in the same order, as transformers' LlamaRMSNorm (casting="llama")
    and GemmaRMSNorm (casting="gemma"), so a model using it gives bit-identical outputs."""
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "llama":
        scale = weight + offset if offset else weight
        return scale * normed.to(x.dtype)
    if casting == "gemma":
        return (normed * (offset + weight.float())).type_as(x)
    raise ValueError(f"rms_norm: casting={casting!r} is not one of {', '.join(CASTINGS)}")


@lazy_kernels
def _kernels():
    # `tl` must be a module global: the interpreter finds triton.language through the
    # kernel's __globals__ to run it on CPU tensors.
    global tl
    import triton
    import triton.language as tl

    @triton.jit
    def forward(
        X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, offset, LLAMA: tl.constexpr, BLOCK: tl.constexpr
    ):
        # one program per row; x (n_rows, n_cols) with unit column stride
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        normed = x * rstd
        if LLAMA:
            normed = normed.to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
        tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def backward(
        DY, X, W, RSTD, DX, DW_PARTIAL,
        stride_dy, stride_x, stride_dx, n_rows, n_cols, offset, rows_per_program,
        LLAMA: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # each program walks `rows_per_program` consecutive rows and keeps its own fp32 partial
        # weight gradient (n_programs, n_cols); the host sums the partials.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        col_mask = cols < n_cols
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, rows_per_program):
            row = (pid * rows_per_program + i).to(tl.int64)
            # the row test as a block, not a scalar: the interpreter rejects a scalar & block mask
            mask = col_mask & ((cols * 0 + row) < n_rows)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            # past the last row (the last program's tail) read a valid rstd; its stores are masked
            rstd = tl.load(RSTD + tl.minimum(row, n_rows - 1))
            normed = x * rstd
            if LLAMA:
                dw += dy * normed.to(X.dtype.element_ty).to(tl.float32)
            else:
                dw += dy * normed
            # d/dx of x*rstd: rstd * (g - normed * mean(g * normed)), g = dy * w
            g = dy * w
            dx = rstd * (g - normed * (tl.sum(g * normed, axis=0) / n_cols))
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_mask)

    return forward, backward


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, casting):
        forward_kernel, _ = _kernels()
        x2 = _as_rows(x)
        n_rows, n_cols = x2.shape
        out_dtype = torch.promote_types(x.dtype, weight.dtype) if casting == "llama" else x.dtype
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = next_power_of_2(n_cols)
        forward_kernel[(n_rows,)](
            x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps, offset,
            LLAMA=casting == "llama", BLOCK=block,
        )  # fmt: skip
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.casting, ctx.shape = offset, casting, x.shape
        return y.view(*x.shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy):
        _, backward_kernel = _kernels()
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = _as_rows(dy)
        dx = torch.empty_like(x2)
        n_programs = _backward_programs(x2.device, n_rows)
        rows_per_program = -(-n_rows // n_programs)
        dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x2.device)
        backward_kernel[(n_programs,)](
            dy2, x2, weight, rstd, dx, dw_partial,
            dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols, ctx.offset, rows_per_program,
            LLAMA=ctx.casting == "llama", BLOCK=next_power_of_2(n_cols),
        )  # fmt: skip
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None, None, None


class _RMSNormTorch(torch.autograd.Function):
    """The reference forward; the backward from x and rstd only (pure PyTorch, any device).

    With n = x·rstd and the output y = s·n (s = offset + weight, in the model's casting order):
      dn = dy·s,   dx = rstd·(dn − n·mean(dn·n)),   dweight = Σ_rows dy·n
    all in fp32.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, offset, casting):
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        normed = x32 * rstd
        if casting == "llama":
            y = (weight + offset if offset else weight) * normed.to(x.dtype)
        else:
            y = (normed * (offset + weight.float())).type_as(x)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd  # recomputed: one elementwise pass
        dy32 = dy.to(torch.float32)
        dn = dy32 * (weight.float() + ctx.offset)
        dx = rstd * (dn - normed * (dn * normed).mean(-1, keepdim=True))
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy32 * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        return dx.to(x.dtype), dw, None, None, None


def _backward_programs(device: torch.device, n_rows: int) -> int:
    # enough programs to fill the GPU; few on the interpreter, where each program is slow Python
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 4))


def _check(x, weight, eps, offset, casting):
    # the shape class of the one-time device check (ops.selfcheck): what selects another kernel
    from tunesmith.ops.selfcheck import check_rms_norm

    n_cols = x.shape[-1]
    shape_class = (n_cols, x.dtype, weight.dtype, casting, bool(offset))
    return shape_class, lambda: check_rms_norm(x.device, n_cols, x.dtype, weight.dtype, eps, offset, casting)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    casting: str = "llama",
    impl: str = "auto",
) -> torch.Tensor:
    """RMSNorm over the last dimension of `x (..., H)` with `weight (H,)`; see the module
    docstring for `offset` and `casting`. impl: "reference" (pure PyTorch, autograd), "triton", "torch"
    (the reference forward with a hand-written backward), or "auto" (Triton on CUDA once it has passed
    its device check, `ops.selfcheck`; "torch" otherwise)."""
    if casting not in CASTINGS:
        raise ValueError(f"rms_norm: casting={casting!r} is not one of {', '.join(CASTINGS)}")
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rms_norm: x has {x.shape[-1]} features but weight has {weight.shape[-1]}")
    if use_triton(impl, "rms_norm", x, weight, check=_check(x, weight, eps, offset, casting)):
        return _RMSNormFunction.apply(x, weight, float(eps), float(offset), casting)
    if impl in ("auto", "torch") and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNormTorch.apply(x, weight, float(eps), float(offset), casting)
    return rms_norm_reference(x, weight, eps, offset=offset, casting=casting)


class RMSNorm(nn.Module):
    """RMSNorm as a module. Pass `weight=` to adopt an existing parameter (the same object, so
    state_dict keys and optimizer state are unchanged) instead of creating one."""

    def __init__(
        self,
        hidden_size: int | None = None,
        eps: float = 1e-6,
        *,
        offset: float = 0.0,
        casting: str = "llama",
        weight: nn.Parameter | None = None,
        impl: str = "auto",
    ):
        super().__init__()
        if weight is None:
            if hidden_size is None:
                raise ValueError("RMSNorm needs hidden_size or weight")
            # offset=1 stores weight - 1 (Gemma), so zeros is the identity there
            weight = nn.Parameter(torch.zeros(hidden_size) if offset else torch.ones(hidden_size))
        self.weight = weight
        self.eps, self.offset, self.casting, self.impl = eps, offset, casting, impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, offset=self.offset, casting=self.casting, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}, casting={self.casting}, impl={self.impl}"
