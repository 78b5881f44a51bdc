"""LoRA linear layers without the input casts.

PEFT's `lora.Linear` computes `base(x) + B(A(dropout(x))) * scaling` with A and B in fp32 when the
base model is bf16, so every LoRA layer casts its input activation (T, in) to fp32, and autograd
keeps that fp32 copy for the backward: one extra (T, in) copy in time and twice its bf16 size in
memory, per adapted linear layer (seven per decoder layer with all-linear targets). On a CPU that
cast was 19% of a SmolLM2 LoRA step in our profile.

Here the low-rank path runs in the activation's dtype instead: the tiny A (r, in) and B (out, r)
are cast down (cheap), the big activation never is, and a custom autograd function saves only
`x` (the same tensor the frozen base linear already keeps, so no new memory) and `x @ A.T` (T, r).
The gradients of A and B come out of bf16 matmuls (which accumulate in fp32 internally) and are
returned in the parameters' own dtype (fp32), where the optimizer works. In fp32 everything is
exact against PEFT; in bf16 it differs from PEFT only by bf16 rounding of the (T, r) intermediate.

When the base layer is a plain frozen `nn.Linear` (the LoRA case), `lora_linear` does the base
projection and the update in one function: the update is accumulated into the base output by one
`addmm_` instead of a separate (T, out) add, and in the backward the two input gradients share one
(T, in) buffer instead of autograd adding them. `lora_delta_reference` and `lora_linear_reference`
are the pure-PyTorch references the tests compare against.

Projections that read the same input (an attention layer's q, k and v; an MLP's gate and up) run
as one: `lora_projections` stacks their frozen weights along the output dim, their A matrices
along the rank dim and their B matrices block-diagonally, so each of the forward and backward
does one big matmul and one LoRA update instead of one per projection, and the input gradient is
accumulated in one buffer. The frozen weights are stacked *in place*: they are copied once into
one tensor and each layer's weight becomes its slice of it (`Parameter.data`, the same Parameter
objects, so state_dict, merging and saving see the same values), so there is no second copy of
them. CPU-only, where per-call overheads dominate small matmuls, and only for projections of at
most `STACK_MAX_IN_FEATURES` inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from tunesmith.ops.quant import QuantizedLinear


def lora_delta_reference(x, lora_a, lora_b, scaling: float):
    """The LoRA update `scaling * (x @ A.T) @ B.T`, computed in fp32 and returned in x's dtype.

    x (..., in), lora_a (r, in), lora_b (out, r) -> (..., out)
    """
    out = (x.float() @ lora_a.float().t()) @ lora_b.float().t() * scaling
    return out.to(x.dtype)


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling: float):
    """`F.linear(x, weight, bias)` plus the LoRA update (as `lora_delta_reference`)."""
    return F.linear(x, weight, bias) + lora_delta_reference(x, lora_a, lora_b, scaling)


def _base_weight(weight, dtype):
    """The frozen weight as a tensor: a `QuantizedLinear` base is dequantized (into its scratch buffer)."""
    return weight.dequantized(dtype) if isinstance(weight, QuantizedLinear) else weight


class _LoraLinear(torch.autograd.Function):
    """x @ W.T (+ bias) + scaling * (x @ A.T) @ B.T in x.dtype, W and bias frozen; saves x and
    x @ A.T only. With weight None it is the update alone (`lora_delta`). `weight` may be a
    `QuantizedLinear` (a quantized base), dequantized for the forward and again for the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        a = lora_a.to(x.dtype)  # (r, in)
        b = (lora_b * scaling).to(x.dtype)  # (out, r); scaling folded in once, on the small matrix
        xa = x2 @ a.t()  # (N, r)
        if weight is None:
            out = xa @ b.t()  # (N, out)
        else:
            out = F.linear(x2, _base_weight(weight, x.dtype), bias)  # (N, out)
            out.addmm_(xa, b.t())  # the update, accumulated in place
        ctx.quantized = weight if isinstance(weight, QuantizedLinear) else None
        ctx.save_for_backward(x2, xa, a, b, None if ctx.quantized is not None else weight)
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.scaling = scaling
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, a, b, weight = ctx.saved_tensors
        if ctx.quantized is not None:
            weight = ctx.quantized  # dequantized below, only if the input gradient is needed
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)  # (N, out)
        gb = g @ b  # (N, r), scaling already inside b
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            if weight is None:
                grad_x = gb @ a  # (N, in)
            else:
                grad_x = g @ _base_weight(weight, g.dtype)  # (N, in)
                grad_x.addmm_(gb, a)
            grad_x = grad_x.view(*grad_out.shape[:-1], a.shape[1])
        if ctx.needs_input_grad[3]:
            grad_a = (gb.t() @ x2).to(ctx.param_dtypes[0])  # (r, in)
        if ctx.needs_input_grad[4]:
            grad_b = ((g.t() @ xa) * ctx.scaling).to(ctx.param_dtypes[1])  # (out, r)
        return grad_x, None, None, grad_a, grad_b, None


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float):
    """`F.linear(x, weight, bias) + scaling * (x @ A.T) @ B.T` in x's dtype, for a frozen weight and
    bias (no gradient is computed for them: pass tensors that do not require one). `weight` may also
    be a `QuantizedLinear`, whose dequantized weight is used."""
    frozen = weight.weight if isinstance(weight, QuantizedLinear) else weight
    if frozen.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear: the base weight and bias must be frozen (requires_grad=False)")
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, float(scaling))


def lora_delta(x, lora_a, lora_b, scaling: float):
    """`scaling * (x @ A.T) @ B.T` in x's dtype, with gradients for x, A and B (see module doc)."""
    return _LoraLinear.apply(x, None, None, lora_a, lora_b, float(scaling))


# Stack only projections of at most this many input features (None: all): the fewer, larger
# matmuls pay where per-call overheads are a large share of small ones (SmolLM2's 576), not at
# Llama-3.2-1B's 2,048 (bench/RESULTS.md), and the stacked weights cost memory where the model was
# memory-mapped from its file (the file's pages stay mapped beside the stacked tensor).
STACK_MAX_IN_FEATURES: int | None = 1024


def _stack_in_place(weights) -> torch.Tensor:
    """One (Σ out, in) tensor holding `weights` end to end, each of which becomes its slice of it
    (`.data` reassigned: the same Parameter objects, no second copy kept). When they already are
    consecutive slices of one tensor, that tensor (a view), with nothing copied."""
    first = weights[0]
    rows = sum(w.shape[0] for w in weights)
    row_bytes = first.shape[1] * first.element_size()
    storage = first.untyped_storage()
    if all(
        w.untyped_storage().data_ptr() == storage.data_ptr()
        and w.data_ptr() == first.data_ptr() + sum(v.shape[0] for v in weights[:i]) * row_bytes
        and w.is_contiguous()
        and w.dtype == first.dtype
        and w.shape[1] == first.shape[1]
        for i, w in enumerate(weights)
    ):
        return first.detach().as_strided((rows, first.shape[1]), (first.shape[1], 1))
    with torch.no_grad():
        stacked = torch.cat([w.detach() for w in weights])
    offset = 0
    for w in weights:
        w.data = stacked[offset : offset + w.shape[0]]
        offset += w.shape[0]
    return stacked


def lora_projections(x, layers, stacked: dict) -> tuple[torch.Tensor, ...] | None:
    """`tuple(layer(x) for layer in layers)` computed as one LoRA linear (see module doc), for
    projections of the same input such as q, k and v. `stacked` is the caller's cache of the
    stacked frozen weight (a dict it keeps; the weights become slices of it, so changes made to
    them in place are its changes; rebuilt when a weight is replaced). None, with nothing
    computed, off the CPU or unless every layer is a `FastLoraLinear` on its plain path
    (`FastLoraLinear.plain_parts`)."""
    on_cpu = x.device.type == "cpu"
    parts = [
        layer.plain_parts(x) if on_cpu and isinstance(layer, FastLoraLinear) else None for layer in layers
    ]
    if any(part is None or isinstance(part[0], QuantizedLinear) for part in parts):
        stacked.clear()  # e.g. after merge_and_unload; a quantized base is not stacked
        return None
    weights, biases, lora_as, lora_bs, scalings = zip(*parts)
    if STACK_MAX_IN_FEATURES is not None and weights[0].shape[1] > STACK_MAX_IN_FEATURES:
        stacked.clear()
        return None
    key = [(w.data_ptr(), w.shape, w.dtype) for w in weights]
    if stacked.get("key") != key:
        stacked.clear()
        weight = _stack_in_place(weights)
        stacked.update(key=[(w.data_ptr(), w.shape, w.dtype) for w in weights], weight=weight)
    bias = None
    if any(b is not None for b in biases):  # small: concatenated per call
        bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases)])
    lora_a = torch.cat(lora_as)  # (Σ r, in)
    lora_b = torch.block_diag(*(b * s for b, s in zip(lora_bs, scalings)))  # (Σ out, Σ r)
    out = _LoraLinear.apply(x, stacked["weight"], bias, lora_a, lora_b, 1.0)
    return out.split([w.shape[0] for w in weights], dim=-1)


class FastLoraLinear(PeftLoraLinear):
    """A PEFT `lora.Linear` whose plain-LoRA forward runs `lora_delta` (no input casts).

    It is a subclass, built from an existing layer's state (same child modules, same parameter
    objects), so PEFT still recognises it everywhere: state_dict keys, adapter saving,
    `disable_adapter()`, `merge_and_unload()`. Only layers with one adapter, no dropout, no
    variant (DoRA) and no LoRA bias are converted (see `_fast_path_blocker`); whenever the layer
    is in another state at call time (adapters disabled, merged, several active), the forward
    is PEFT's own.
    """

    @classmethod
    def from_peft(cls, layer: PeftLoraLinear) -> FastLoraLinear:
        fast = cls.__new__(cls)
        # a shallow copy: the module/parameter dicts are shared with `layer`, nothing is copied
        fast.__dict__.update(layer.__dict__)
        return fast

    def _plain_adapter(self) -> str | None:
        # the one active adapter, when PEFT would run exactly base(x) + its update
        active = self.active_adapters
        if self.disable_adapters or self.merged or len(active) != 1:
            return None
        return active[0]

    def plain_parts(self, x) -> tuple | None:
        """(weight, bias, lora_A, lora_B, scaling) when this layer's output for `x` is
        `lora_linear(x, *parts)`: one plain adapter on a frozen nn.Linear of x's dtype, or on a
        `QuantizedLinear` (then `weight` is that layer, and its bias is in x's dtype); else None."""
        name = self._plain_adapter()
        base = self.base_layer
        quantized = type(base) is QuantizedLinear
        if (
            name is None
            or (type(base) is not nn.Linear and not quantized)
            or base.weight.requires_grad
            or (base.bias is not None and (base.bias.requires_grad or base.bias.dtype != x.dtype))
            or (not quantized and x.dtype != base.weight.dtype)
        ):
            return None
        weight = base if quantized else base.weight
        return weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]

    def forward(self, x, *args, **kwargs):
        parts = None if args or kwargs else self.plain_parts(x)
        if parts is not None:
            return lora_linear(x, *parts)
        name = self._plain_adapter()
        if args or kwargs or name is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        result = base(x)
        delta = lora_delta(x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])
        return result + delta.to(result.dtype)


def _fast_path_blocker(layer: nn.Module) -> str | None:
    """Why this PEFT layer cannot take the fast path, or None if it can."""
    if type(layer) is not PeftLoraLinear:
        return f"{type(layer).__name__} (only plain peft lora.Linear is swapped)"
    if not isinstance(layer.base_layer, nn.Linear):
        return "base layer is not nn.Linear"
    if len(layer.lora_A) != 1:
        return "several adapters"
    adapter = next(iter(layer.lora_A))
    if layer.lora_variant.get(adapter) is not None:
        return "a LoRA variant (e.g. DoRA)"
    if not isinstance(layer.lora_dropout[adapter], nn.Identity):
        return "lora_dropout > 0"
    if layer.lora_A[adapter].bias is not None or layer.lora_B[adapter].bias is not None:
        return "LoRA bias"
    return None
