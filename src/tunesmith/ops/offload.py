"""Activation memory: gradient checkpointing per decoder layer, optionally with the checkpointed
inputs offloaded to (pinned) CPU memory, and an `auto` policy that picks one from an estimate.

Three policies, from fastest to leanest:

- "none":       keep every activation on the device.
- "checkpoint": keep only each decoder layer's input (and, for rows of at least
                KEEP_ATTENTION_FROM_TOKENS, its fused attention kernel's output) and recompute the
                rest of the layer in backward (torch.utils.checkpoint, non-reentrant, selective:
                `_keep_attention`), set through transformers' own
                per-layer switch (`GradientCheckpointingLayer.gradient_checkpointing`).
- "offload":    as "checkpoint", and the kept layer inputs go to CPU memory while the forward
                runs on: copied on a side CUDA stream into pinned buffers (overlapping the next
                layer's compute) and copied back in backward. Uses
                torch.autograd.graph.saved_tensors_hooks (`OffloadActivations`), which also works
                on its own around any code.

The trainer's model build (`build.model.build_model`) calls `apply_memory_policy(model, policy, ...)`
and keeps the handle as `SFTTrainer.memory_policy` (for "auto" it calls `handle.plan(tokens)` before
each training forward); the trainer does not remove it: `handle.remove()` puts the layers' previous
settings back. "auto" goes through `choose_memory_policy`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

POLICIES = ("none", "checkpoint", "offload", "auto")

# Elements of hidden size that one decoder layer keeps per token for its backward, without
# checkpointing (Llama-shaped, intermediate ~2.7 x hidden): the norms' inputs (2), q, k, v and
# the attention output (~3), o_proj's input (1), the MLP's gate, up, act and product (~4 x 2.7),
# and the residual adds: about 18; we round up to 20 for LoRA's extra inputs and allocator slack.
ACTIVATION_FACTOR = 20
# ... and what a checkpointed layer keeps: its input and its attention kernel's output (see
# `_keep_attention`), each about a layer input's size. Rows shorter than KEEP_ATTENTION_FROM_TOKENS
# keep only the input; the estimate counts both for them too (on the safe side).
CHECKPOINT_FACTOR = 2
# Use at most this share of the free memory for activations: logits, optimizer state and
# fragmentation need the rest.
MEMORY_HEADROOM = 0.7
# memory_policy="auto" keeps a micro-batch's activations under a budget by checkpointing just
# enough decoder layers (see `MemoryPolicyHandle.plan`). Default budget: twice the size of the
# model's weights (activations in proportion to the model), at least this much.
MIN_ACTIVATION_BUDGET = 256 << 20


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Within this context, tensors autograd saves for backward go to CPU memory and come back
    when backward needs them.

    On CUDA: copies run on a side stream into pinned buffers, so they overlap compute; the
    copy back is ordered after the copy out on the same stream, and the compute stream waits
    for it. On the CPU the tensor is already in host memory, so nothing moves, but the hooks
    still run (and are counted), which is how the tests check the wiring.

    Parameters (and tensors under `min_bytes`) are not moved: they stay alive on the device
    anyway, and tiny copies cost more than they save.
    """

    def __init__(self, min_bytes: int = 1 << 16):
        self.min_bytes = min_bytes
        self.packed = 0  # tensors seen by the pack hook
        self.offloaded_bytes = 0  # bytes copied to the host
        self.unpacked = 0
        self._stream: torch.cuda.Stream | None = None
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> OffloadActivations:
        super().__enter__()
        return self

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _pack(self, tensor: torch.Tensor):
        self.packed += 1
        size = tensor.numel() * tensor.element_size()
        if not tensor.is_cuda or isinstance(tensor, nn.Parameter) or size < self.min_bytes:
            return ("kept", tensor)
        stream = self._side_stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is ready
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
        # keep the device memory from being reused until the copy has read it
        tensor.record_stream(stream)
        self.offloaded_bytes += size
        return ("host", tensor.device, host)

    def _unpack(self, packed):
        self.unpacked += 1
        if packed[0] == "kept":
            return packed[1]
        _, device, host = packed
        stream = self._side_stream(device)
        with torch.cuda.stream(stream):
            back = host.to(device, non_blocking=True)
        torch.cuda.current_stream(device).wait_stream(stream)
        back.record_stream(torch.cuda.current_stream(device))
        return back


class _OffloadedCheckpoint(torch.autograd.Function):
    """Checkpoint one layer call `run(hidden, *rest)`: forward without keeping activations, save
    only `hidden` (through whatever saved-tensor hooks are active: `OffloadActivations` moves it
    to the host), recompute in backward.

    `anchor` is a tensor that requires grad, so the backward runs even when `hidden` does not
    require grad (LoRA with frozen embeddings): the layer's own parameters still need theirs.
    """

    @staticmethod
    def forward(ctx, run, anchor, hidden, *rest):
        ctx.run, ctx.rest = run, rest
        ctx.hidden_requires_grad = hidden.requires_grad
        ctx.device_type = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.device_type), torch.get_autocast_dtype(ctx.device_type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        with torch.no_grad():
            out = run(hidden, *rest)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"offload checkpointing expects a layer that returns a tensor, got {type(out).__name__}"
            )
        ctx.save_for_backward(hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (hidden,) = ctx.saved_tensors
        hidden = hidden.detach().requires_grad_(ctx.hidden_requires_grad)
        devices = [hidden.device] if hidden.is_cuda else []
        # replay dropout (e.g. LoRA's) with the forward's random state
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, hidden.device)
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
                out = ctx.run(hidden, *ctx.rest)
        if out.requires_grad:
            torch.autograd.backward(out, grad_out)
        grad_hidden = hidden.grad if ctx.hidden_requires_grad else None
        return (None, None, grad_hidden) + (None,) * len(ctx.rest)


class OffloadedCheckpoint:
    """A checkpoint function for transformers' layers (`layer._gradient_checkpointing_func`):
    called as `fn(partial(layer.forward, **kwargs), hidden_states)`."""

    def __init__(self, min_bytes: int = 1 << 16):
        self.hooks = OffloadActivations(min_bytes=min_bytes)
        self._anchor = torch.ones((), requires_grad=True)
        self._warned = False

    def __call__(self, run, *args):
        if not args or not isinstance(args[0], torch.Tensor):
            # transformers passes hidden_states positionally; a layer called otherwise is
            # still checkpointed, without the offload
            if not self._warned:
                logger.warning(
                    "offload: a decoder layer got no positional hidden_states; checkpointing it without offload"
                )
                self._warned = True
            return _plain_checkpoint(run, *args)
        with self.hooks:
            return _OffloadedCheckpoint.apply(run, self._anchor, *args)


def _plain_checkpoint(run, *args):
    from torch.utils.checkpoint import checkpoint, noop_context_fn

    hidden = args[0] if args and isinstance(args[0], torch.Tensor) else None
    long_rows = hidden is not None and hidden.dim() >= 2 and hidden.shape[-2] >= KEEP_ATTENTION_FROM_TOKENS
    context_fn = _keep_attention if KEEP_ATTENTION and long_rows else noop_context_fn
    return checkpoint(run, *args, use_reentrant=False, context_fn=context_fn)


# Checkpointed layers keep their attention kernels' outputs (`_keep_attention`) for rows of at least
# this many tokens: on 4,096-token documents a SmolLM2 step ran 9% faster with it (bench/ab_step.py,
# 132.5 vs 121.6 tokens/s), on short instruction data 10% slower (190 vs 210: the dispatch mode's
# cost on every op of the layer, and short documents do not use the fused kernels on the CPU).
KEEP_ATTENTION = True
KEEP_ATTENTION_FROM_TOKENS = 2048


@functools.cache
def _attention_ops() -> frozenset:
    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


def _keep_attention():
    """Selective checkpointing: a checkpointed layer keeps the outputs of its fused attention
    kernels (the output and the softmax statistics: about the layer input's size per kernel call)
    and recomputes everything else, so backward does not run the attention forward a second time.
    On long documents that forward is the largest share of what recomputation costs, and the
    saved output is small next to what the layer would keep unchecked."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    keep = _attention_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks transformers can checkpoint (GradientCheckpointingLayer instances). On a
    vision-language model whose vision tower is frozen (LoRA's default) only the language model's: a frozen
    tower keeps no activations for backward, so checkpointing it would save nothing."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from tunesmith.models.vision import language_model_if_tower_frozen

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    language = language_model_if_tower_frozen(model)
    if language is not None:
        inside = {id(m) for m in language.modules()}
        layers = [m for m in layers if id(m) in inside]
    return layers


@dataclass
class MemoryPolicyHandle:
    """What `apply_memory_policy` changed; `.remove()` restores each layer's previous settings.

    Under policy "auto" the layers carry the checkpoint function but start switched off, and
    `plan(tokens)` switches on, for each micro-batch, just enough of them that the estimated
    activations fit `budget_bytes`: short micro-batches run with no recompute at all, and only
    long ones (the tail of the length distribution, which sets the peak) pay for checkpointing.
    """

    policy: str
    layers: int = 0
    checkpoint_function: object = None
    budget_bytes: int | None = None
    bytes_per_token_layer: int = 0  # one layer's input per token (hidden × element size)
    planned: dict = field(default_factory=lambda: {"batches": 0, "checkpointed": 0, "layer_steps": 0})
    _previous: list = field(default_factory=list)

    def plan(self, tokens: int) -> int:
        """Checkpoint the fewest decoder layers that keep this micro-batch's activations within the
        budget; returns how many. A no-op (0) unless the policy is "auto".

        Each checkpointed layer keeps C = CHECKPOINT_FACTOR units (its input and its attention
        output) instead of ACTIVATION_FACTOR units:
            need(k) = (L - k)·F·u + k·C·u <= budget  ->  k = ceil((L·F·u - budget) / ((F - C)·u))
        Example: L=30, F=20, C=2, u = 1,000 tokens × 576 × 2 bytes = 1.15 MB, budget 540 MB -> 691 MB
        without checkpointing, k = ceil(151 / 20.7) = 8 layers.
        """
        if self.policy != "auto" or not self._previous:
            return 0
        unit = tokens * self.bytes_per_token_layer
        total = self.layers * ACTIVATION_FACTOR * unit
        k = 0
        if total > self.budget_bytes and unit > 0:
            saved = (ACTIVATION_FACTOR - CHECKPOINT_FACTOR) * unit
            k = min(self.layers, -(-(total - self.budget_bytes) // saved))
        for i, (layer, *_rest) in enumerate(self._previous):
            layer.gradient_checkpointing = i < k
        self.planned["batches"] += 1
        self.planned["checkpointed"] += k > 0
        self.planned["layer_steps"] += k
        return k

    def summary(self) -> str:
        batches, ckpt, layer_steps = (self.planned[key] for key in ("batches", "checkpointed", "layer_steps"))
        if not batches:
            return f"memory policy {self.policy}"
        return (
            f"memory policy auto: {ckpt} of {batches} micro-batches checkpointed "
            f"{layer_steps / max(ckpt, 1):.1f} of {self.layers} layers on average "
            f"(activation budget {self.budget_bytes / 2**30:.2f} GiB)"
        )

    def remove(self) -> None:
        for layer, had, enabled, function in self._previous:
            layer.gradient_checkpointing = enabled
            if had:
                layer._gradient_checkpointing_func = function
            elif "_gradient_checkpointing_func" in layer.__dict__:
                del layer.__dict__["_gradient_checkpointing_func"]
        self._previous.clear()


def default_activation_budget(model: nn.Module) -> int:
    """Twice the bytes of the model's weights, at least MIN_ACTIVATION_BUDGET."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(2 * weights, MIN_ACTIVATION_BUDGET)


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def estimate_activation_bytes(
    model: nn.Module, batch_tokens: int, *, bytes_per_element: int | None = None
) -> dict:
    """Activation memory of one micro-batch of `batch_tokens` tokens, per policy (bytes).

        none       = layers * tokens * hidden * bytes * ACTIVATION_FACTOR
        checkpoint = layers * tokens * hidden * bytes * CHECKPOINT_FACTOR + one layer's full activations
        offload    = one layer's input + one layer's full activations

    Example: 30 layers, hidden 576, 8,192 tokens, bf16 -> none = 30*8192*576*2*20 = 5.7 GB,
    checkpoint = 0.57 GB + 0.19 GB = 0.75 GB.
    """
    config = _text_config(model)
    layers = getattr(config, "num_hidden_layers", None) or len(decoder_layers(model))
    hidden = getattr(config, "hidden_size", None)
    if not layers or not hidden:
        raise ValueError(
            f"cannot estimate activations: {type(model).__name__} has no num_hidden_layers/hidden_size"
        )
    if bytes_per_element is None:
        floating = [p for p in model.parameters() if p.is_floating_point()]
        bytes_per_element = floating[0].element_size() if floating else 4
    per_layer_input = batch_tokens * hidden * bytes_per_element
    per_layer_full = per_layer_input * ACTIVATION_FACTOR
    return {
        "none": layers * per_layer_full,
        "checkpoint": layers * per_layer_input * CHECKPOINT_FACTOR + per_layer_full,
        "offload": per_layer_input + per_layer_full,
    }


def available_bytes(device: torch.device | str) -> int:
    """Free memory where activations live: the CUDA device's free memory, or the host's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read the available memory: install psutil (pip install psutil)")


def choose_memory_policy(
    model: nn.Module,
    batch_tokens: int,
    device: torch.device | str,
    *,
    free_bytes: int | None = None,
    bytes_per_element: int | None = None,
) -> str:
    """ "none" if all activations fit in MEMORY_HEADROOM of the free memory, else "checkpoint" if
    the checkpointed ones fit, else "offload" (CUDA only; on the CPU offloading moves nothing,
    so it stays "checkpoint"). `free_bytes` overrides the measured free memory (tests, planning).
    Logs the estimate and the choice."""
    device = torch.device(device)
    need = estimate_activation_bytes(model, batch_tokens, bytes_per_element=bytes_per_element)
    free = available_bytes(device) if free_bytes is None else free_bytes
    budget = free * MEMORY_HEADROOM
    if need["none"] <= budget:
        choice = "none"
    elif need["checkpoint"] <= budget or device.type != "cuda":
        choice = "checkpoint"
    else:
        choice = "offload"
    gib = 1 << 30
    logger.info(
        "memory policy: %s (activations for %d tokens: %.2f GiB without checkpointing, %.2f GiB with; "
        "%.2f GiB free on %s, budget %.0f%%)",
        choice, batch_tokens, need["none"] / gib, need["checkpoint"] / gib, free / gib, device.type,
        MEMORY_HEADROOM * 100,
    )  # fmt: skip
    return choice


def apply_memory_policy(
    model: nn.Module,
    policy: str,
    *,
    batch_tokens: int | None = None,
    device: torch.device | str | None = None,
    min_offload_bytes: int = 1 << 16,
    activation_budget: int | None = None,
) -> MemoryPolicyHandle:
    """Set every decoder layer of `model` (a PreTrainedModel or PeftModel) to `policy`.

    "auto" needs `batch_tokens` (the most tokens a micro-batch can hold): "offload" when
    `choose_memory_policy` says even checkpointing cannot fit that, else per-micro-batch
    checkpointing under `activation_budget` bytes (default: `default_activation_budget`, capped at
    MEMORY_HEADROOM of the free memory) — call `handle.plan(tokens)` before each forward.
    Checkpointing only acts in training mode (transformers skips it in eval). Returns a handle;
    `handle.remove()` puts the layers' previous settings back.
    """
    if policy not in POLICIES:
        raise ValueError(f"memory policy {policy!r} is not one of {', '.join(POLICIES)}")
    budget = None
    if policy == "auto":
        if batch_tokens is None:
            raise ValueError(
                "memory policy 'auto' needs batch_tokens (tokens per micro-batch) to estimate memory"
            )
        if device is None:
            device = next(model.parameters()).device
        if choose_memory_policy(model, batch_tokens, device) == "offload":
            policy = "offload"  # even fully checkpointed the longest micro-batch would not fit
        else:
            free = available_bytes(device) * MEMORY_HEADROOM
            budget = int(min(activation_budget or default_activation_budget(model), free))
    handle = MemoryPolicyHandle(policy=policy, budget_bytes=budget)
    if policy == "none":
        return handle
    layers = decoder_layers(model)
    if not layers:
        logger.info(
            "memory policy %s: %s has no checkpointable decoder layers; unchanged",
            policy,
            type(model).__name__,
        )
        handle.policy = "none"
        return handle
    function = OffloadedCheckpoint(min_offload_bytes) if policy == "offload" else _plain_checkpoint
    for layer in layers:
        had = "_gradient_checkpointing_func" in layer.__dict__
        handle._previous.append(
            (layer, had, layer.gradient_checkpointing, layer.__dict__.get("_gradient_checkpointing_func"))
        )
        # transformers' own switch: its layer __call__ routes through this function when training
        layer._gradient_checkpointing_func = function
        layer.gradient_checkpointing = policy != "auto"  # "auto": `plan` switches layers per batch
    handle.layers, handle.checkpoint_function = len(layers), function
    if policy == "auto":
        config = _text_config(model)
        floating = [p for p in model.parameters() if p.is_floating_point()]
        element = floating[0].element_size() if floating else 4
        handle.bytes_per_token_layer = int(getattr(config, "hidden_size", 0) or 0) * element
        logger.info(
            "memory policy auto: activations per micro-batch kept under %.2f GiB by checkpointing as few "
            "of the %d decoder layers as needed",
            budget / 2**30,
            len(layers),
        )
    else:
        logger.info("memory policy %s on %d decoder layers", policy, len(layers))
    return handle
