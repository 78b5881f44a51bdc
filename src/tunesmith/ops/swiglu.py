"""Gated MLP activations: SwiGLU (silu(gate) * up) and GeGLU (gelu_tanh(gate) * up, Gemma).

The Triton version computes in fp32, rounds once, and saves only `gate` and `up` for the
backward, where it recomputes the activation instead of storing it:

    silu(g)  = g * s,  s = sigmoid(g);           silu'(g) = s * (1 + g * (1 - s))
    gelu(g)  = 0.5 * g * (1 + t), t = tanh(k * (g + 0.044715 g^3)), k = sqrt(2 / pi)
    gelu'(g) = 0.5 * (1 + t) + 0.5 * g * (1 - t^2) * k * (1 + 3 * 0.044715 g^2)
    d gate   = dy * up * act'(gate);   d up = dy * act(gate)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.ops._triton import lazy_kernels, use_triton

ACTIVATIONS = ("silu", "gelu_tanh")


def glu_reference(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(gate) * up with the same operations as transformers' MLPs (ACT2FN["silu"] and
    ACT2FN["gelu_pytorch_tanh"])."""
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"glu: activation={activation!r} is not one of {', '.join(ACTIVATIONS)}")


@lazy_kernels
def _kernels():
    # `tl` and the helper must be module globals: the interpreter resolves names through the
    # kernels' __globals__, not their closure.
    global tl, _activation
    import triton
    import triton.language as tl

    @triton.jit
    def _activation(g, GELU: tl.constexpr):
        # returns (act(g), act'(g)) in fp32
        if GELU:
            k: tl.constexpr = 0.7978845608028654
            inner = k * (g + 0.044715 * g * g * g)
            t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh, from sigmoid (no tanh in tl core)
            act = 0.5 * g * (1.0 + t)
            grad = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * g * g)
        else:
            s = tl.sigmoid(g)
            act = g * s
            grad = s * (1.0 + g * (1.0 - s))
        return act, grad

    @triton.jit
    def forward(G, U, Y, stride_g, stride_u, stride_y, n_cols, GELU: tl.constexpr, BLOCK: tl.constexpr):
        # grid (rows, column blocks); each operand (rows, n_cols) with unit column stride
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        act, _ = _activation(g, GELU)
        tl.store(Y + row * stride_y + cols, (act * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def backward(
        DY, G, U, DG, DU,
        stride_dy, stride_g, stride_u, stride_dg, stride_du, n_cols,
        GELU: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        act, grad = _activation(g, GELU)
        tl.store(DG + row * stride_dg + cols, (dy * u * grad).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + row * stride_du + cols, (dy * act).to(DU.dtype.element_ty), mask=mask)

    return forward, backward


def _rows(t: torch.Tensor) -> torch.Tensor:
    # (..., n) -> (rows, n) without copying when possible: Phi-3's gate and up are the two halves
    # of one projection, so their rows are strided views
    if t.dim() >= 2 and t.stride(-1) == 1:
        try:
            return t.view(-1, t.shape[-1])
        except RuntimeError:
            pass
    return t.reshape(-1, t.shape[-1]).contiguous()


_BLOCK = 1024


class _GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, activation):
        forward_kernel, _ = _kernels()
        g, u = _rows(gate), _rows(up)
        n_rows, n_cols = g.shape
        y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        block = min(_BLOCK, 1 << (n_cols - 1).bit_length())
        grid = (n_rows, -(-n_cols // block))
        forward_kernel[grid](
            g,
            u,
            y,
            g.stride(0),
            u.stride(0),
            y.stride(0),
            n_cols,
            GELU=activation == "gelu_tanh",
            BLOCK=block,
        )
        ctx.save_for_backward(g, u)
        ctx.activation, ctx.gate_shape, ctx.up_shape = activation, gate.shape, up.shape
        ctx.dtypes = (gate.dtype, up.dtype)
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        _, backward_kernel = _kernels()
        g, u = ctx.saved_tensors
        d = _rows(dy)
        n_rows, n_cols = g.shape
        dg = torch.empty((n_rows, n_cols), dtype=ctx.dtypes[0], device=g.device)
        du = torch.empty((n_rows, n_cols), dtype=ctx.dtypes[1], device=g.device)
        block = min(_BLOCK, 1 << (n_cols - 1).bit_length())
        grid = (n_rows, -(-n_cols // block))
        backward_kernel[grid](
            d, g, u, dg, du,
            d.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0), n_cols,
            GELU=ctx.activation == "gelu_tanh", BLOCK=block,
        )  # fmt: skip
        return dg.view(ctx.gate_shape), du.view(ctx.up_shape), None


def _check(gate, up, activation):
    # the shape class of the one-time device check (ops.selfcheck); strided: Phi-3's halves
    from tunesmith.ops.selfcheck import check_glu

    n_cols = gate.shape[-1]
    strided = gate.stride(-2) != n_cols if gate.dim() >= 2 else False
    shape_class = (n_cols, gate.dtype, up.dtype, activation, strided)
    return shape_class, lambda: check_glu(gate.device, n_cols, gate.dtype, up.dtype, activation, strided)


def glu(
    gate: torch.Tensor, up: torch.Tensor, activation: str = "silu", *, impl: str = "auto"
) -> torch.Tensor:
    """act(gate) * up for `gate, up (..., I)`; activation "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
    impl: "reference" (= "torch"), "triton", or "auto" (Triton on CUDA once it has passed its device
    check, `ops.selfcheck`; the reference otherwise)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"glu: activation={activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if gate.shape != up.shape:
        raise ValueError(f"glu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if use_triton(impl, "glu", gate, up, check=_check(gate, up, activation)):
        return _GLUFunction.apply(gate, up, activation)
    return glu_reference(gate, up, activation)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    return glu(gate, up, "silu", impl=impl)


def geglu(gate: torch.Tensor, up: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    return glu(gate, up, "gelu_tanh", impl=impl)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with the fused activation, reusing the given projection modules
    (nn.Linear or PEFT LoRA layers) under the attribute names of the model it came from, so
    state_dict keys stay the same.

    Two layouts: separate `gate_proj` and `up_proj` (Llama, Mistral, Qwen2/3, Gemma), or one
    `gate_up_proj` whose output is [gate | up] along the last dim (Phi-3).
    """

    def __init__(
        self,
        *,
        down_proj: nn.Module,
        gate_proj: nn.Module | None = None,
        up_proj: nn.Module | None = None,
        gate_up_proj: nn.Module | None = None,
        activation: str = "silu",
        impl: str = "auto",
    ):
        super().__init__()
        if (gate_up_proj is None) == (gate_proj is None or up_proj is None):
            raise ValueError("GatedMLP needs either gate_proj and up_proj, or gate_up_proj")
        if gate_up_proj is None:
            self.gate_proj, self.up_proj = gate_proj, up_proj
        else:
            self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.fused_input = gate_up_proj is not None
        self.activation, self.impl = activation, impl
        self._stacked: dict = {}  # gate/up weights stacked by lora_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_input:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # each (..., I)
        else:
            from tunesmith.ops.lora import lora_projections

            # one matmul for both when they are fast LoRA layers
            projections = (self.gate_proj, self.up_proj)
            gate, up = lora_projections(x, projections, self._stacked) or (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(glu(gate, up, self.activation, impl=self.impl))

    def extra_repr(self) -> str:
        return f"activation={self.activation}, impl={self.impl}"
