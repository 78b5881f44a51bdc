"""optimize(model): swap a model's modules for tunesmith's fused ones, explicitly and reversibly.

What is swapped, for the architectures we know (Llama, Mistral, Qwen2, Qwen3, Gemma 1-3, Phi-3):

- "rms_norm":  every *RMSNorm -> `ops.rms_norm.RMSNorm` holding the *same* weight Parameter
  (state_dict keys and optimizer state unchanged).
- "mlp":       every gated MLP -> `ops.swiglu.GatedMLP` holding the *same* projection modules (so
  LoRA-wrapped linears keep working, whether PEFT wraps them before or after).
- "lora":      every plain PEFT LoRA linear -> `ops.lora.FastLoraLinear`, a subclass of PEFT's
  layer sharing its weights, whose low-rank path runs in the activation dtype (no fp32 copy
  of each input). Applies to any architecture.
- "attention": every attention module -> a copy of it whose class is a subclass of the original
  and whose forward uses `ops.rope.apply_rope` and then the model's configured attention
  function (transformers' ALL_ATTENTION_FUNCTIONS), exactly as the original forward does. The
  copy shares the original's parameter, buffer and submodule dicts, so nothing is duplicated.
  "rope", its old name, is still accepted and means the same (`SWAP_ALIASES`).

With "lora" on the CPU, the swapped attention and MLP modules also run their q/k/v and gate/up
LoRA projections as one (`ops.lora.lora_projections`, which stacks those frozen weights in place,
without a second copy). Nothing is patched: no class, function or `forward` of transformers is changed;
`unoptimize` puts the original module objects back. All swaps are on by default on both device
types (`DEFAULT_SWAPS`, the same on each; measured in bench/RESULTS.md, "Kernels"): on CUDA for the
Triton kernels; on the CPU "lora" is faster, "rms_norm" keeps ~18% fewer activations at ~1% of the time, and the
MLP and attention modules run the same PyTorch ops as transformers' but stack the projections
(a SmolLM2 LoRA step 4% faster).
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from tunesmith.ops._triton import IMPLS, kernels_disabled, triton_installed
from tunesmith.ops.rms_norm import RMSNorm
from tunesmith.ops.rope import apply_rope
from tunesmith.ops.swiglu import GatedMLP

logger = logging.getLogger(__name__)

# module kinds with a fused kernel, and "lora": PEFT LoRA linears -> ops.lora.FastLoraLinear (no
# fp32 input casts; architecture-independent, so it applies to any model)
KERNEL_KINDS = ("rms_norm", "mlp", "attention")
KINDS = (*KERNEL_KINDS, "lora")
# old swap names -> their kind: "rope" was the attention swap's name, though it replaces the whole forward
SWAP_ALIASES = {"rope": "attention"}

# model_type values (config.model_type) whose modules we know; anything else runs unchanged
KNOWN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3")

# class name -> (casting, offset): how each model rounds and whether it scales by (1 + weight)
_NORMS = {
    **{name: ("llama", 0.0) for name in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")},
    "Phi3RMSNorm": ("llama", 0.0),
    **{name: ("gemma", 1.0) for name in ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")},
}

# class name -> attribute holding the activation; Phi-3 has one fused gate_up_proj
_MLPS = {
    **{name: "act_fn" for name in ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")},
    **{name: "act_fn" for name in ("GemmaMLP", "Gemma2MLP", "Gemma3MLP")},
    "Phi3MLP": "activation_fn",
}

# activation module class name -> our activation name
_ACTIVATIONS = {
    "SiLUActivation": "silu",
    "SiLU": "silu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
}


def _no_extra(module: nn.Module) -> dict:
    return {}


def _config_window(module: nn.Module) -> dict:
    return {"sliding_window": getattr(module.config, "sliding_window", None)}


def _own_window(module: nn.Module) -> dict:
    return {"sliding_window": module.sliding_window}


def _window_and_softcap(module: nn.Module) -> dict:
    return {"sliding_window": module.sliding_window, "softcap": module.attn_logit_softcapping}


@dataclass(frozen=True)
class _AttentionSpec:
    fused_qkv: bool  # Phi-3: one qkv_proj, split as [q | k | v]
    qk_norm: bool  # Qwen3, Gemma3: RMSNorm per head on q and k before rope
    extra: Callable[[nn.Module], dict]  # the keyword arguments the original passes to the attention function


# What each original forward does, read from transformers 5.x; the equality tests in
# tests/ops/test_apply.py pin it for every entry.
_ATTENTIONS = {
    "LlamaAttention": _AttentionSpec(False, False, _no_extra),
    "GemmaAttention": _AttentionSpec(False, False, _no_extra),
    "MistralAttention": _AttentionSpec(False, False, _config_window),
    "Qwen2Attention": _AttentionSpec(False, False, _own_window),
    "Qwen3Attention": _AttentionSpec(False, True, _own_window),
    "Gemma2Attention": _AttentionSpec(False, False, _window_and_softcap),
    "Gemma3Attention": _AttentionSpec(False, True, _own_window),
    "Phi3Attention": _AttentionSpec(True, False, _config_window),
}

# The swaps optimize() makes when it is not told which: all of them, on CUDA and on the CPU alike
# (each pays off on both, bench/RESULTS.md, "Kernels"); on CUDA none without Triton installed.
DEFAULT_SWAPS = KINDS


class _RopeAttention:
    """Mixed in front of a transformers attention class: the same forward with the fused rope."""

    _tunesmith_base: type
    _tunesmith_spec: _AttentionSpec
    _tunesmith_impl: str
    _tunesmith_stacked: dict

    def forward(
        self,
        hidden_states,
        position_embeddings=None,
        attention_mask=None,
        past_key_values=None,
        cache=None,
        **kwargs,
    ):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        from tunesmith.ops.lora import lora_projections

        spec = self._tunesmith_spec
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)  # (B, T, H, D)
        if spec.fused_qkv:
            qkv = self.qkv_proj(hidden_states)
            q_size = self.config.num_attention_heads * self.head_dim
            kv_size = self.config.num_key_value_heads * self.head_dim
            query, key, value = (
                qkv[..., :q_size],
                qkv[..., q_size : q_size + kv_size],
                qkv[..., q_size + kv_size :],
            )
        else:
            # one matmul for the three when they are all fast LoRA layers
            projections = (self.q_proj, self.k_proj, self.v_proj)
            query, key, value = lora_projections(hidden_states, projections, self._tunesmith_stacked) or (
                projection(hidden_states) for projection in projections
            )
        query, key, value = query.view(hidden_shape), key.view(hidden_shape), value.view(hidden_shape)
        if spec.qk_norm:
            # a norm over D per head: the same before or after the transpose
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, H, T, D)

        cos, sin = position_embeddings  # (B or 1, T, R)
        query, key = apply_rope(query, key, cos, sin, impl=self._tunesmith_impl)

        # transformers 5.24 renamed the layer's `past_key_values` argument to `cache`
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        # the original module's own eager function (Gemma2's applies the softcap)
        eager = sys.modules[self._tunesmith_base.__module__].eager_attention_forward
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **spec.extra(self),
            **kwargs,
        )
        output = output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(output), weights


_ROPE_CLASSES: dict[type, type] = {}


def _rope_class(original: type) -> type:
    # MRO: (ours, _RopeAttention, original, ...): isinstance(new, original) stays true
    if original not in _ROPE_CLASSES:
        name = f"FusedRope{original.__name__}"
        _ROPE_CLASSES[original] = type(name, (_RopeAttention, original), {"_tunesmith_base": original})
    return _ROPE_CLASSES[original]


@dataclass
class OptimizeReport:
    """What `optimize` did: swaps per kind, and why anything was left alone."""

    model_type: str
    device: str
    impl: str
    swapped: Counter = field(default_factory=Counter)
    skipped: dict[str, str] = field(default_factory=dict)  # kind or module class -> reason

    @property
    def total(self) -> int:
        return sum(self.swapped.values())

    def __str__(self) -> str:
        if self.swapped:
            done = ", ".join(f"{count} {kind}" for kind, count in sorted(self.swapped.items()))
        else:
            done = "nothing"
        lines = [f"optimize({self.model_type} on {self.device}, impl={self.impl}): swapped {done}"]
        lines += [f"  left unchanged: {what}: {why}" for what, why in self.skipped.items()]
        return "\n".join(lines)


def _device_type(model: nn.Module) -> str:
    for p in model.parameters():
        return p.device.type
    return "cpu"


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if getattr(config, "vision_config", None) is not None and hasattr(config, "get_text_config"):
        # a vision-language model: the modules we know are its language model's (LLaVA's is a Llama)
        config = config.get_text_config()
    return getattr(config, "model_type", None) or type(model).__name__


def _activation_name(mlp: nn.Module) -> str | None:
    act = getattr(mlp, _MLPS[type(mlp).__name__], None)
    return _ACTIVATIONS.get(type(act).__name__)


def _swap(parent: nn.Module, name: str, original: nn.Module, new: nn.Module) -> None:
    # remember the original without registering it as a submodule (it must not appear in
    # modules() or state_dict): plain object attribute
    object.__setattr__(new, "_tunesmith_original", original)
    setattr(parent, name, new)


def _apply(plan: list, report: OptimizeReport) -> None:
    for parent, name, original, new, kind in plan:
        _swap(parent, name, original, new)
        report.swapped[kind] += 1


def _new_norm(norm: nn.Module, impl: str) -> RMSNorm:
    casting, offset = _NORMS[type(norm).__name__]
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return RMSNorm(weight=norm.weight, eps=eps, offset=offset, casting=casting, impl=impl)


def _new_mlp(mlp: nn.Module, activation: str, impl: str) -> GatedMLP:
    if type(mlp).__name__ == "Phi3MLP":
        return GatedMLP(
            gate_up_proj=mlp.gate_up_proj, down_proj=mlp.down_proj, activation=activation, impl=impl
        )
    return GatedMLP(
        gate_proj=mlp.gate_proj,
        up_proj=mlp.up_proj,
        down_proj=mlp.down_proj,
        activation=activation,
        impl=impl,
    )


def _new_attention(attention: nn.Module, impl: str) -> nn.Module:
    cls = _rope_class(type(attention))
    new = cls.__new__(cls)
    # a shallow copy of the instance dict: _parameters, _buffers, _modules and the hook dicts are
    # the same objects, so LoRA layers added to either one are seen by both
    new.__dict__.update(attention.__dict__)
    object.__setattr__(new, "_tunesmith_spec", _ATTENTIONS[type(attention).__name__])
    object.__setattr__(new, "_tunesmith_impl", impl)
    object.__setattr__(new, "_tunesmith_stacked", {})  # q/k/v weights stacked by lora_projections
    return new


def optimize(
    model: nn.Module,
    *,
    verbose: bool = True,
    impl: str = "auto",
    swaps: tuple[str, ...] | None = None,
) -> OptimizeReport:
    """Swap `model`'s norms, MLPs and attention modules for fused ones; returns what was done.

    swaps: the kinds to swap, from `KINDS` (or `SWAP_ALIASES`); None: `DEFAULT_SWAPS` (all of them; on CUDA none when
    Triton is not installed). Whether to optimize at all is the caller's choice (`use_kernels`). impl is passed
    to every new module ("auto": Triton on CUDA tensors once each kernel has passed its device check,
    `ops.selfcheck`, the PyTorch versions elsewhere; "torch": never Triton). Works on a
    PeftModel or a bare model; call `unoptimize(model)` to put the original modules back.
    Calling it twice does nothing more the second time.
    """
    if impl not in IMPLS:
        raise ValueError(f"optimize: impl={impl!r} is not one of {', '.join(IMPLS)}")
    kernels_disabled()  # a TUNESMITH_KERNELS value we do not understand stops here, before training
    device = _device_type(model)
    report = OptimizeReport(model_type=_model_type(model), device=device, impl=impl)
    log = logger.info if verbose else logger.debug

    if swaps is None:
        swaps = DEFAULT_SWAPS
        if device == "cuda" and impl == "auto" and not triton_installed():
            swaps = ()
            report.skipped["all"] = "triton is not installed (pip install 'tunesmith[gpu]')"
    swaps = tuple(SWAP_ALIASES.get(kind, kind) for kind in swaps)
    if device == "cuda" and impl == "auto" and set(swaps) & set(KERNEL_KINDS):
        if kernels_disabled():
            report.skipped["triton"] = "TUNESMITH_KERNELS=off: the swapped modules run their PyTorch versions"
        else:  # ops.selfcheck: once per op, shape class, dtype and device
            log("optimize: each Triton kernel is checked against its PyTorch reference on its first use")
    unknown = set(swaps) - set(KINDS)
    if unknown:
        raise ValueError(f"optimize: unknown swaps {sorted(unknown)}; choose from {', '.join(KINDS)}")
    if report.model_type not in KNOWN_MODEL_TYPES and set(swaps) & set(KERNEL_KINDS):
        report.skipped["all"] = (
            f"model_type {report.model_type!r} is not one we know ({', '.join(KNOWN_MODEL_TYPES)})"
        )
        swaps = tuple(kind for kind in swaps if kind not in KERNEL_KINDS)
        if not swaps:
            log("optimize: %s is not a known architecture; the model runs unchanged", report.model_type)
            return report
    lora_blocker = None
    if "lora" in swaps:
        from tunesmith.ops.lora import FastLoraLinear, PeftLoraLinear, _fast_path_blocker

        lora_blocker = _fast_path_blocker

    plan: list[tuple[nn.Module, str, nn.Module, nn.Module, str]] = []
    if lora_blocker is not None:
        # first, so that the MLPs and attentions swapped below are built over the fast layers
        for parent in model.modules():
            for name, child in parent.named_children():
                if type(child) is PeftLoraLinear:
                    reason = lora_blocker(child)
                    if reason is None:
                        plan.append((parent, name, child, FastLoraLinear.from_peft(child), "lora"))
                    else:
                        report.skipped["lora"] = reason
        _apply(plan, report)
    plan = []
    for parent in model.modules():
        for name, child in parent.named_children():
            cls = type(child).__name__
            if cls in _NORMS and "rms_norm" in swaps:
                plan.append((parent, name, child, _new_norm(child, impl), "rms_norm"))
            elif cls in _MLPS and "mlp" in swaps:
                activation = _activation_name(child)
                if activation is None:
                    act = getattr(child, _MLPS[cls], None)
                    report.skipped[cls] = f"activation {type(act).__name__} has no fused kernel"
                    continue
                plan.append((parent, name, child, _new_mlp(child, activation, impl), "mlp"))
            elif cls in _ATTENTIONS and "attention" in swaps and not hasattr(child, "_tunesmith_original"):
                plan.append((parent, name, child, _new_attention(child, impl), "attention"))
    _apply(plan, report)
    for line in str(report).splitlines():
        log(line)
    return report


def unoptimize(model: nn.Module) -> int:
    """Put back every module `optimize` replaced; returns how many. Submodules added to a swapped
    module since (e.g. PEFT wrapping its linears in LoRA layers) are carried over."""
    found = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if "_tunesmith_original" in child.__dict__
    ]
    # innermost first: a LoRA layer inside a swapped MLP is put back in the MLP before the MLP's
    # children are handed to the original MLP
    for parent, name, new in reversed(found):
        original = new.__dict__["_tunesmith_original"]
        for child_name, child in new.named_children():
            if getattr(original, child_name, None) is not child:
                setattr(original, child_name, child)
        if isinstance(new, RMSNorm) and original.weight is not new.weight:
            original.weight = new.weight
        original.train(new.training)
        setattr(parent, name, original)
    return len(found)


def optimized_kinds(model: nn.Module) -> Counter:
    """Counts of swapped modules currently in `model`, per kind (for logs and tests)."""
    counts: Counter = Counter()
    for module in model.modules():
        if "_tunesmith_original" not in module.__dict__:
            continue
        if isinstance(module, RMSNorm):
            counts["rms_norm"] += 1
        elif isinstance(module, GatedMLP):
            counts["mlp"] += 1
        elif isinstance(module, _RopeAttention):
            counts["attention"] += 1
        elif type(module).__name__ == "FastLoraLinear":
            counts["lora"] += 1
    return counts


__all__ = [
    "DEFAULT_SWAPS",
    "KERNEL_KINDS",
    "KINDS",
    "OptimizeReport",
    "SWAP_ALIASES",
    "optimize",
    "optimized_kinds",
    "unoptimize",
]
