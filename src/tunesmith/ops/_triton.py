"""When the Triton kernels can run, and building them lazily.

Triton is optional (the `gpu` extra). Kernels run on CUDA tensors, or on CPU tensors under
Triton's interpreter (`TRITON_INTERPRET=1`, how the tests run them without a GPU). Triton reads
that variable when a function is decorated with `@triton.jit`, so the ops build their kernels on
first use (never at import) and keep one set per interpreter setting.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

IMPLS = ("auto", "reference", "triton")


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


def use_triton(impl: str, op: str, *tensors: torch.Tensor) -> bool:
    """Resolve `impl` for `op` on `tensors`: "reference" -> False; "triton" -> True (or a clear
    error when it cannot run here); "auto" -> True only for CUDA tensors with Triton installed."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not one of {', '.join(IMPLS)}")
    if impl == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        return on_cuda and triton_installed()
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
