"""Weight-only int8 / int4 quantization of a frozen base model, for LoRA on machines without bitsandbytes.

QLoRA keeps the frozen base weights in 4 bits and trains 16-bit adapters beside them. bitsandbytes
does that on CUDA; on a CPU it is missing or slow, and torchao's CPU paths measured slower than
their bf16 matmul here (bench/RESULTS.md). This is the plain version that is fast on a CPU:

- `int8`: one scale per output row, symmetric (w ≈ q * s, q in [-127, 127]); 1 byte a weight.
- `int4`: per group of `INT4_GROUP` (32) inputs in a row, asymmetric (w ≈ q * s + min, q in
  [0, 15]: llama.cpp's Q4_1 layout of the numbers); half a byte a weight plus a 16-bit scale and
  minimum per group (4.5 bits a weight in all). Two rows share a byte: row i in the low nibble and
  row i + out/2 in the high one, so unpacking writes two contiguous halves. On SmolLM2-135M this
  measured better than symmetric groups of 32 or 64 (bench/RESULTS.md).

The matmuls run in the activation's dtype on a weight dequantized into a scratch buffer (one per
shape and dtype, reused by every layer, never kept for backward): forward `x @ W.T`, backward
`grad @ W`, each dequantizing again. So the only extra memory is one weight-sized buffer per shape,
and the results are exactly those of `F.linear` on `dequantize(...)`, the pure-PyTorch reference
(`quantized_linear_reference`). The cost is a cast (and for int4 an unpack) per matmul.

`QuantizedLinear` is an `nn.Linear` subclass (so PEFT wraps it as a base layer for LoRA) whose
`weight` is the packed integer tensor (frozen). Merging an adapter into it is not supported (PEFT's
merge adds into `weight` and fails on its integer dtype); `tunesmith export` merges into the 16-bit
base it reloads, so exports are unaffected.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

FORMATS = ("int8", "int4")
INT4_GROUP = 32


def int4_fits(out_features: int, in_features: int) -> bool:
    """Whether int4 can store a (out, in) weight: whole groups of inputs, rows in pairs."""
    return in_features % INT4_GROUP == 0 and out_features % 2 == 0


# --------------------------------------------------------------------------- quantize / dequantize


@torch.no_grad()
def quantize(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed integers, scales) of a (out, in) float weight; see the module doc for the formats.
    int8: int8 codes and (out, 1) scales; int4: uint8 bytes and (out, in / INT4_GROUP, 2) pairs of
    (scale, minimum). Rows are done a block at a time in fp32, so the transient memory stays small."""
    if fmt not in FORMATS:
        raise ValueError(f"quantization format must be one of {FORMATS}, not {fmt!r}")
    out_features, in_features = weight.shape
    if fmt == "int4" and not int4_fits(out_features, in_features):
        raise ValueError(
            f"int4 needs in_features divisible by {INT4_GROUP} and an even out_features, got {tuple(weight.shape)}"
        )
    int8 = fmt == "int8"
    q = torch.empty(
        out_features, in_features, dtype=torch.int8 if int8 else torch.uint8, device=weight.device
    )
    groups = 1 if int8 else in_features // INT4_GROUP
    scales = torch.empty(
        out_features, groups, *(() if int8 else (2,)), dtype=torch.float32, device=weight.device
    )
    for start in range(0, out_features, 1024):
        w = weight[start : start + 1024].float().reshape(-1, groups, in_features // groups)
        if int8:  # symmetric: w ≈ q * s
            step = w.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
            codes = torch.round(w / step).clamp(-127, 127)
            scales[start : start + 1024] = step.squeeze(-1)
        else:  # asymmetric: w ≈ q * s + min, q in [0, 15]
            low = w.amin(-1, keepdim=True)
            step = (w.amax(-1, keepdim=True) - low).clamp(min=1e-12) / 15
            codes = torch.round((w - low) / step).clamp(0, 15)
            scales[start : start + 1024] = torch.cat([step, low], -1)
        q[start : start + 1024] = codes.reshape(-1, in_features).to(q.dtype)
    if not int8:
        half = out_features // 2
        q = q[:half] | (q[half:] << 4)  # row i in the low nibble, row i + half in the high one
    # scales in the weight's dtype: the dequantized weight is formed in the compute dtype anyway
    return q, scales.to(weight.dtype if weight.dtype.is_floating_point else torch.float32)


def dequantize(
    packed: torch.Tensor, scales: torch.Tensor, fmt: str, dtype: torch.dtype, out=None
) -> torch.Tensor:
    """The (out, in) weight in `dtype` (into `out` when given, which is returned)."""
    if fmt == "int8":
        rows, cols = packed.shape
    else:
        rows, cols = packed.shape[0] * 2, packed.shape[1]
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype, device=packed.device)
    if fmt == "int8":
        out.copy_(packed)
        out.mul_(scales.to(dtype))
        return out
    half = rows // 2
    out[:half].copy_(packed & 0x0F)
    out[half:].copy_(packed >> 4)  # uint8: a logical shift
    groups = scales.shape[1]
    view = out.view(rows, groups, cols // groups)
    pairs = scales.to(dtype)
    view.mul_(pairs[..., :1]).add_(pairs[..., 1:])
    return out


_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(shape, dtype, device) -> torch.Tensor:
    """A reused buffer of this shape: every quantized layer of one shape dequantizes into the same one
    (layers run one at a time, and nothing keeps the buffer past the matmul that reads it)."""
    key = (tuple(shape), dtype, str(device))
    buffer = _SCRATCH.get(key)
    if buffer is None:
        buffer = _SCRATCH[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffer


# --------------------------------------------------------------------------- the layer


def quantized_linear_reference(x, packed, scales, bias, fmt: str) -> torch.Tensor:
    """`F.linear` on the dequantized weight, in x's dtype: the reference the fast path must equal."""
    return F.linear(x, dequantize(packed, scales, fmt, x.dtype), bias)


class _QuantizedLinearFn(torch.autograd.Function):
    """x @ dequantize(W).T + bias for a frozen quantized W; saves nothing but the layer (the weight is
    dequantized again for backward)."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        return F.linear(x, layer.dequantized(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight = ctx.layer.dequantized(grad_out.dtype)
        return grad_out @ weight, None, None


class QuantizedLinear(nn.Linear):
    """A frozen `nn.Linear` whose weight is stored as int8 or packed int4 (see the module doc).

    `weight` is the packed integer tensor (a Parameter without gradient, so it is saved, moved and
    counted like any weight), `weight_scales` its scales, `quant_format` "int8" or "int4"."""

    def __init__(self, linear: nn.Linear, fmt: str):
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.quant_format = fmt
        # PEFT reads `compute_dtype` (bitsandbytes' name) to give adapters the base layer's dtype, as it
        # would for the float nn.Linear this replaces (its `weight` is now an integer tensor)
        self.compute_dtype = linear.weight.dtype
        packed, scales = quantize(linear.weight.detach(), fmt)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.register_buffer("weight_scales", scales)
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype`, in the shared scratch buffer of its shape (valid until the next call)."""
        out = _scratch((self.out_features, self.in_features), dtype, self.weight.device)
        return dequantize(self.weight, self.weight_scales, self.quant_format, dtype, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            raise RuntimeError("QuantizedLinear is frozen: its base weight cannot be trained")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not torch.is_grad_enabled() or not x.requires_grad:
            return F.linear(x, self.dequantized(x.dtype), bias)
        return _QuantizedLinearFn.apply(x, self, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_format}"


def quantize_model(model: nn.Module, fmt: str) -> int:
    """Replace every nn.Linear of the model's decoder stack (not the embeddings, not lm_head, not a
    vision tower) with a `QuantizedLinear`, one at a time (the float weight of each is released as it
    goes). Returns how many were replaced; logs the weight bytes before and after."""
    from tunesmith.models.introspect import decoder

    stack = decoder(model)
    if stack is None:
        raise ValueError(
            f"{type(model).__name__} has no decoder stack (get_decoder()) to quantize: "
            "load it without model_quantization"
        )
    targets = [
        (parent, name, child)
        for parent in stack.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    before = after = as_int8 = 0
    for parent, name, child in targets:
        before += child.weight.numel() * child.weight.element_size()
        layer_fmt = fmt
        if fmt == "int4" and not int4_fits(child.out_features, child.in_features):
            layer_fmt, as_int8 = "int8", as_int8 + 1  # int4 cannot store this shape
        new = QuantizedLinear(child, layer_fmt)
        after += new.weight.numel() + new.weight_scales.numel() * new.weight_scales.element_size()
        setattr(parent, name, new)
        del child
    # A model loaded from safetensors is memory-mapped from its file: the pages of the float weights
    # just replaced stay resident (counted in the process's memory) for as long as any tensor holds
    # the mapping. Copying the few remaining tensors (embeddings, norms) out of it lets it go.
    # (parameters() and buffers() give a tied weight once, and it stays one Parameter, so it stays tied.)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    quantized = {id(t) for m in layers for t in [*m.parameters(), *m.buffers()]}
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if id(tensor) not in quantized:
                tensor.data = tensor.data.clone()
    if as_int8:
        logger.warning(
            "int4: %d of %d linear layers have in_features not divisible by %d or an odd out_features; "
            "they are stored as int8",
            as_int8,
            len(targets),
            INT4_GROUP,
        )
    logger.info(
        "quantized %d linear layers to %s: their weights %.1f MB -> %.1f MB",
        len(targets),
        fmt,
        before / 1e6,
        after / 1e6,
    )
    return len(targets)
