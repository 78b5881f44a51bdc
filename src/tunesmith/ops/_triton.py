"""When the Triton kernels can run, and building them lazily.

Triton is optional (the `gpu` extra). Kernels run on CUDA tensors, or on CPU tensors under
Triton's interpreter (`TRITON_INTERPRET=1`, how the tests run them without a GPU). Triton reads
that variable when a function is decorated with `@triton.jit`, so the ops build their kernels on
first use (never at import) and keep one set per interpreter setting.

With impl="auto", a kernel runs only after it has passed its one-time check against the op's
PyTorch reference on the live device (`ops.selfcheck`); `TUNESMITH_KERNELS=off` turns every
"auto" Triton kernel off (the PyTorch versions run), and impl="torch" does the same for one call
or module (what `SFTConfig(triton_kernels=False)` passes).

What impl="auto" runs, per op and device ("checked": the kernel passed its self-check for this
shape class and device; "failed" also covers TUNESMITH_KERNELS=off and Triton not installed):

    op (module)                         CPU                     CUDA, checked    CUDA, failed
    rms_norm (RMSNorm, "rms_norm")      "torch": the reference  Triton           "torch"
                                        forward, hand-written
                                        backward (reference
                                        when no grad is needed)
    glu (GatedMLP, "mlp")               the reference           Triton           the reference
    apply_rope ("attention" swap)       the reference           Triton           the reference
    linear_cross_entropy (the loss)     "chunked"               chunked, Triton  "chunked"
                                                                chunk step
    attention function, lora, offload   no impl: one path per device (flash varlen where it is
                                        installed, else sdpa, on CUDA; the short-document math path on the CPU;
                                        LoRA stacks q/k/v and gate/up on the CPU only)

So "auto" means one thing everywhere: the op's Triton kernel where it may run and has passed its
check, else the op's PyTorch path ("torch"; for the loss "chunked", which "torch" also names);
"reference" is always the plain autograd reference (for the loss: full logits). `optimize(model,
impl="auto")` swaps the same modules on both devices (`ops.apply.DEFAULT_SWAPS`) and hands them
the impl; on CUDA without Triton installed it swaps nothing (swaps=None). The config switches are
booleans, not "auto": use_kernels=False: no swaps, the loss runs "reference";
triton_kernels=False: optimize(impl="torch") and the loss "chunked"; both True (the default):
"auto" for both (`build.model`, `loss.loss_impl`). The other "auto"s of the config mean something
else: attention="auto" picks tunesmith_varlen for padding-free batches, memory_policy="auto"
picks checkpointing per micro-batch from a memory estimate (`ops.offload`), model_dtype="auto"
picks bf16 where the hardware runs it fast (`models.load.resolve_dtype`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

# "torch": what "auto" runs where no Triton kernel may run (the PyTorch path, e.g. RMSNorm's
# hand-written backward); "reference": the plain PyTorch reference with autograd
IMPLS = ("auto", "reference", "torch", "triton")

# Test hook: when True, "auto" treats CPU tensors as a kernel device while the interpreter is
# ready (TRITON_INTERPRET=1), so the CPU tests run the real auto path: self-check, fallback,
# warning. Never set outside tests.
AUTO_ON_INTERPRETER = False

_OFF_VALUES = ("off", "0", "false", "no", "none")
_ON_VALUES = ("", "on", "auto", "1", "true", "yes")


def kernels_disabled() -> bool:
    """True when the environment turns the Triton kernels off: `TUNESMITH_KERNELS=off` (unset or
    `on`: they run where they can). Any other value is an error, not a silent "on"."""
    value = os.environ.get("TUNESMITH_KERNELS", "").strip().lower()
    if value in _OFF_VALUES:
        return True
    if value not in _ON_VALUES:
        raise ValueError(
            f"TUNESMITH_KERNELS={os.environ['TUNESMITH_KERNELS']!r} is not understood: set it to off (no Triton "
            "kernels) or on (the default: each kernel used after it passes its check), or unset it"
        )
    return False


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels will run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def interpreter_ready() -> bool:
    """True when kernels can run on CPU tensors now: triton is installed, TRITON_INTERPRET=1, and
    triton was first imported with it set (its own library functions, like `tl.sum`, are built at
    import time, compiled or interpreted for good)."""
    if not (triton_installed() and interpreting()):
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


def auto_device(*tensors: torch.Tensor) -> bool:
    """True when "auto" may run a Triton kernel on these tensors: all on CUDA with Triton installed
    and not turned off by TUNESMITH_KERNELS (or, for tests, all on the CPU under the interpreter
    with `AUTO_ON_INTERPRETER`)."""
    if kernels_disabled() or not triton_installed():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return AUTO_ON_INTERPRETER and all(t.device.type == "cpu" for t in tensors) and interpreter_ready()


def use_triton(
    impl: str,
    op: str,
    *tensors: torch.Tensor,
    check: tuple[tuple, Callable[[], None]] | None = None,
) -> bool:
    """Resolve `impl` for `op` on `tensors`: "reference" / "torch" -> False; "triton" -> True (or a
    clear error when it cannot run here; never checked, so tests see the kernel itself); "auto" ->
    True only where `auto_device` allows it and, given `check=(shape_class, run)`, the kernel has
    passed `run` (a comparison against the reference that raises on failure; once per op, shape
    class, dtype and device: `ops.selfcheck.kernel_ok`)."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not one of {', '.join(IMPLS)}")
    if impl in ("reference", "torch"):
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        if not auto_device(*tensors):
            return False
        if check is None:
            return True
        from tunesmith.ops.selfcheck import kernel_ok

        shape_class, run = check
        return kernel_ok(op, shape_class, tensors[0].device, run)
    if not triton_installed():
        raise RuntimeError(f"{op}: impl='triton' needs the triton package: pip install 'tunesmith[gpu]'")
    if not on_cuda and not interpreting():
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"{op}: impl='triton' got tensors on {', '.join(devices)}; Triton kernels run on CUDA, or on "
            "the CPU only under the interpreter (set TRITON_INTERPRET=1 before the first call). "
            "Use impl='reference' or 'auto' on the CPU."
        )
    return True


def lazy_kernels(build: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap a function that imports triton and defines `@triton.jit` kernels: the result is
    built on the first call, once for compiled and once for interpreted mode."""

    @functools.cache
    def cached(interpret: bool) -> Any:
        return build()

    @functools.wraps(build)
    def get() -> Any:
        return cached(interpreting())

    return get


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
