"""Triton kernels that check themselves before their first use on a device.

With impl="auto", an op about to run its Triton kernel for the first time on a (op, shape class,
dtype, device) runs it once on a small input of the same shape class and dtype, forward and
backward, against the op's PyTorch reference:

    kernel_ok("rms_norm", (2048, bf16, bf16, "llama", False), cuda:0, run)   # run() raises on failure
      -> True: the kernel is used from now on for that shape class
      -> False: it failed to compile, raised, or differed beyond the tolerance; one warning names the
         op, the device, the versions and the error, and the PyTorch path runs for the rest of the
         process (the same path as TUNESMITH_KERNELS=off, so the results are the reference run's)

A shape class is what selects a different compiled kernel or code path: the sizes of the
dimensions the kernel loops over or blocks by (hidden size, intermediate size, heads and head
dimension, vocabulary size), the dtypes and the constexpr switches (casting, activation, softcap,
...); the number of rows is not part of it. The check's inputs come from a local random generator,
so the run's own random state is untouched. A kernel that corrupts the CUDA context (an illegal
memory access) cannot be recovered from in-process; the check then fails loudly rather than
silently.

`results()` lists every check of this process (`tunesmith doctor` prints them); `reset()` forgets
them (tests). Explicit impl="triton" is never checked: it is how the tests see the kernel itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from tunesmith.ops.kernel_checks import (
    TOLERANCE,
    KernelMismatch,
    check_glu,
    check_linear_cross_entropy,
    check_rms_norm,
    check_rope,
    compare,
)

logger = logging.getLogger(__name__)

# what each part of an op's shape class is (the tuples the ops build in their `_check`)
SHAPE_FIELDS = {
    "rms_norm": ("hidden", "x", "weight", "casting", "offset"),
    "glu": ("intermediate", "gate", "up", "activation", "strided"),
    "apply_rope": ("heads", "kv_heads", "head_dim", "rotary", "q", "k", "cos", "tables"),
    "linear_cross_entropy": ("vocab", "hidden", "weight", "bias", "softcap", "dft", "entropy", "per_token"),
}


def describe_shape_class(op: str, shape_class: tuple) -> str:
    """`(40, torch.bfloat16, ...)` -> "hidden=40 x=bf16 ..." (for warnings and `tunesmith doctor`)."""

    def text(value) -> str:
        if isinstance(value, torch.dtype):
            return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(
                value, str(value)
            )
        return str(value)

    names = SHAPE_FIELDS.get(op, ())
    if len(names) != len(shape_class):
        return ", ".join(text(v) for v in shape_class)
    return " ".join(f"{name}={text(v)}" for name, v in zip(names, shape_class))


@dataclass(frozen=True)
class CheckResult:
    op: str
    shape_class: tuple
    device: str
    passed: bool
    seconds: float
    error: str | None = None

    def as_dict(self) -> dict:
        out = asdict(self)
        out["shape_class"] = [str(part) for part in self.shape_class]
        out["shape"] = describe_shape_class(self.op, self.shape_class)
        return out


_RESULTS: dict[tuple, CheckResult] = {}
_WARNED: set[tuple[str, str]] = set()


def kernel_ok(op: str, shape_class: tuple, device: torch.device, run: Callable[[], None]) -> bool:
    """Whether `op`'s Triton kernel may run for `shape_class` on `device`: the cached result, or
    `run()` now, in its own thread (it raises when the kernel fails). Inside torch.compile tracing or
    CUDA graph capture nothing can be checked: the PyTorch path runs, and the check happens at the
    next eager call."""
    device = _with_index(device)
    key = (op, shape_class, str(device))
    result = _RESULTS.get(key)
    if result is not None:
        return result.passed
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return False
    start = time.perf_counter()
    error = None
    try:
        _in_own_thread(run, device)
    except Exception as exc:  # compile errors, launch errors, mismatches: all mean "do not use it"
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        error = f"{type(exc).__name__}: {first_line}"
    result = CheckResult(op, shape_class, str(device), error is None, time.perf_counter() - start, error)
    _RESULTS[key] = result
    if result.passed:
        logger.info(
            "tunesmith: Triton %s (%s) passed its check on %s (%.2f s)",
            op,
            describe_shape_class(op, shape_class),
            device,
            result.seconds,
        )
    else:
        _warn(result, device)
    return result.passed


def _with_index(device: torch.device) -> torch.device:
    # "cuda" and "cuda:0" are one device: one cache entry
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _in_own_thread(run: Callable[[], None], device: torch.device) -> None:
    """Run the check in a new thread and re-raise what it raised.

    The first call of an op often happens inside a region that changes how autograd works: activation
    checkpointing and CPU offload install saved-tensor hooks (a check run under them breaks the
    checkpoint: it saves a different number of tensors than the recomputation), the eval loop runs
    under no_grad, mixed precision under autocast. All of that is thread-local state, so a fresh
    thread starts without any of it; the check needs grad mode on, and the caller's CUDA device."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            with torch.enable_grad():
                run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=target, name="tunesmith-kernel-check", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _warn(result: CheckResult, device: torch.device) -> None:
    message = (
        f"tunesmith: the Triton {result.op} kernel failed its check on {describe_device(device)} "
        f"({versions_line()}) at {describe_shape_class(result.op, result.shape_class)}: {result.error}. "
        f"{result.op} runs its PyTorch version for the rest of this process (same results, less speed); "
        "please report this with `tunesmith doctor --json`. TUNESMITH_KERNELS=off turns every Triton kernel off."
    )
    if (result.op, result.device) in _WARNED:
        logger.info(message)  # one warning per op and device; further shape classes at info
        return
    _WARNED.add((result.op, result.device))
    logger.warning(message)


def results() -> list[CheckResult]:
    """Every check run in this process, in order."""
    return list(_RESULTS.values())


def reset() -> None:
    """Forget every check (tests; or to re-check after changing the environment)."""
    _RESULTS.clear()
    _WARNED.clear()


def describe_device(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{index} ({torch.cuda.get_device_name(index)}, sm_{major}{minor})"
    if device.type == "cpu":
        return "cpu (Triton interpreter)"
    return str(device)


def versions_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton_version = version("triton")
    except PackageNotFoundError:
        triton_version = "not installed"
    return f"torch {torch.__version__}, triton {triton_version}, CUDA {torch.version.cuda or 'none'}"


# Llama-3.2-1B's shapes: what `check_shapes` (and so `tunesmith doctor`) checks by default
LLAMA_1B = {"hidden": 2048, "intermediate": 8192, "heads": 32, "kv_heads": 8, "head_dim": 64, "vocab": 128256}


def check_shapes(
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    *,
    hidden: int = LLAMA_1B["hidden"],
    intermediate: int = LLAMA_1B["intermediate"],
    heads: int = LLAMA_1B["heads"],
    kv_heads: int = LLAMA_1B["kv_heads"],
    head_dim: int = LLAMA_1B["head_dim"],
    vocab: int = LLAMA_1B["vocab"],
) -> list[CheckResult]:
    """Run (or read from the cache) the checks a model of these shapes and dtype triggers in training:
    RMSNorm (Llama and Gemma casting), SwiGLU and GeGLU, RoPE, the fused loss (with its entropy).
    Returns their results; empty where "auto" runs no Triton kernel on `device` (CPU, no triton,
    TUNESMITH_KERNELS=off). The cache keys are the ops' own, so the run itself reuses them."""
    from tunesmith.ops import linear_cross_entropy, rms_norm, rope, swiglu
    from tunesmith.ops._triton import use_triton

    device = torch.device(device)

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device=device)

    x, w = empty(1, hidden), empty(hidden)
    gate = empty(1, intermediate)
    q, k, cos = empty(1, heads, 1, head_dim), empty(1, kv_heads, 1, head_dim), empty(1, 1, head_dim)
    lm_weight = empty(vocab, 1)
    wanted = [
        ("rms_norm", (x, w), rms_norm._check(x, w, 1e-5, 0.0, "llama")),
        ("rms_norm", (x, w), rms_norm._check(x, w, 1e-6, 1.0, "gemma")),
        ("glu", (gate, gate), swiglu._check(gate, gate, "silu")),
        ("glu", (gate, gate), swiglu._check(gate, gate, "gelu_tanh")),
        ("apply_rope", (q, k), rope._check(q, k, cos, None)),
        ("linear_cross_entropy", (x, lm_weight),
         linear_cross_entropy._check(device, vocab, dtype, dtype, None, None, False, True, "sum")),
    ]  # fmt: skip
    done = []
    for op, tensors, check in wanted:
        use_triton("auto", op, *tensors, check=check)  # runs the check where "auto" may use the kernel
        key = (op, check[0], str(_with_index(device)))
        if key in _RESULTS:
            done.append(_RESULTS[key])
    return done


__all__ = [
    "TOLERANCE",
    "CheckResult",
    "KernelMismatch",
    "check_glu",
    "check_linear_cross_entropy",
    "check_rms_norm",
    "check_rope",
    "check_shapes",
    "compare",
    "describe_device",
    "describe_shape_class",
    "kernel_ok",
    "reset",
    "results",
    "versions_line",
]
