"""`tunesmith doctor`: what this machine can run, and whether the Triton kernels work on it.

    $ tunesmith doctor
    tunesmith 0.1.0 · Python 3.12.3 · Linux-6.8-x86_64
    device     cuda:0 NVIDIA H200 (sm_90, 139.8 GiB), CUDA 13.0, 1 GPU
    precision  bf16 yes · fp16 yes · TF32 supported (matmul off, cuDNN on)
    attention  sdpa yes · flex_attention yes · flash_attention_2 no (flash-attn not installed)
    4-bit      bitsandbytes 0.50.2 usable
    kernels    Triton 3.5.0, TUNESMITH_KERNELS unset: Triton kernels on CUDA after their check
               passed  rms_norm (2048, torch.bfloat16, torch.bfloat16, 'llama', False)  0.41 s
               ...
    packages   torch 2.11.0 · transformers 5.24.0 · ...

`collect()` returns the same as a dict (`tunesmith doctor --json` prints it). Nothing here needs
a GPU: on a CPU it says what runs instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

import torch

PACKAGES = (
    "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "triton", "bitsandbytes",
    "flash-attn", "liger-kernel", "trl", "deepspeed", "gguf",
)  # fmt: skip


# the model shapes the kernels are checked at (Llama-3.2-1B's; tests make them small)
SHAPES: dict = {}


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _devices() -> dict:
    if not torch.cuda.is_available():
        return {
            "type": "cpu",
            "cuda": torch.version.cuda,
            "count": 0,
            "gpus": [],
            "threads": torch.get_num_threads(),
        }
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "index": index,
                "name": props.name,
                "capability": f"sm_{props.major}{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count,
            }
        )
    return {"type": "cuda", "cuda": torch.version.cuda, "count": len(gpus), "gpus": gpus}


def _precision() -> dict:
    if not torch.cuda.is_available():
        # CPUs run bf16 autocast (the CLI's default recipe uses it); TF32 is a GPU format
        return {
            "bf16": True,
            "fp16": True,
            "tf32": {"supported": False},
            "note": "CPU: bf16 through autocast",
        }
    major, _ = torch.cuda.get_device_capability()
    return {
        "bf16": bool(torch.cuda.is_bf16_supported()),
        "fp16": True,
        "tf32": {
            "supported": major >= 8,
            "matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn": bool(torch.backends.cudnn.allow_tf32),
        },
    }


def _attention() -> dict:
    out = {
        "sdpa": True,
        "flex_attention": importlib.util.find_spec("torch.nn.attention.flex_attention") is not None,
    }
    if importlib.util.find_spec("flash_attn") is None:
        out["flash_attention_2"] = False
        out["flash_attention_2_why"] = "flash-attn is not installed: pip install flash-attn"
    elif not torch.cuda.is_available():
        out["flash_attention_2"] = False
        out["flash_attention_2_why"] = "flash-attn is installed but needs a CUDA GPU"
    else:
        try:
            from transformers.utils import is_flash_attn_2_available

            out["flash_attention_2"] = bool(is_flash_attn_2_available())
        except Exception as exc:  # a broken flash-attn build raises on import
            out["flash_attention_2"] = False
            out["flash_attention_2_why"] = f"{type(exc).__name__}: {exc}"
    return out


def _bitsandbytes() -> dict:
    installed = _version("bitsandbytes")
    if installed is None:
        return {"version": None, "usable": False, "why": "not installed (pip install 'tunesmith[gpu]')"}
    if not torch.cuda.is_available():
        return {
            "version": installed,
            "usable": False,
            "why": "4-bit QLoRA and 8-bit optimizers need a CUDA GPU here",
        }
    try:
        import bitsandbytes as bnb

        weight = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
        packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4")
        restored = bnb.functional.dequantize_4bit(packed, state)
        error = ((restored - weight).norm() / weight.norm()).item()
        if not error < 0.2:  # NF4 keeps about 3 bits of mantissa: ~0.1 relative error on Gaussian weights
            return {"version": installed, "usable": False, "why": f"NF4 round trip error {error:.2f}"}
        return {"version": installed, "usable": True, "nf4_round_trip_error": round(error, 4)}
    except Exception as exc:
        return {"version": installed, "usable": False, "why": f"{type(exc).__name__}: {exc}"}


def _kernels(check: bool) -> dict:
    from tunesmith.ops import selfcheck
    from tunesmith.ops._triton import (
        AUTO_ON_INTERPRETER,
        interpreter_ready,
        kernels_disabled,
        triton_installed,
    )

    env = os.environ.get("TUNESMITH_KERNELS")
    out: dict = {"triton": _version("triton"), "TUNESMITH_KERNELS": env, "checks": []}
    try:
        disabled = kernels_disabled()
    except ValueError as err:  # a value training would stop at
        out["mode"] = f"error: {err}"
        return out
    if disabled:
        out["mode"] = "off: TUNESMITH_KERNELS turns the Triton kernels off; the PyTorch versions run"
        return out
    if not triton_installed():
        out["mode"] = "off: triton is not installed (pip install 'tunesmith[gpu]'); the PyTorch versions run"
        return out
    device = "cuda" if torch.cuda.is_available() else None
    if device is None and AUTO_ON_INTERPRETER and interpreter_ready():
        device = "cpu"  # the tests' hook: the interpreter stands in for a device
    if device is None:
        out["mode"] = "cpu: Triton kernels run on CUDA only; on this machine the PyTorch versions run"
        return out
    out["mode"] = (
        f"on: Triton kernels on {device}, each after it passes its check against the PyTorch reference"
    )
    if check:
        results = []
        for dtype in (torch.bfloat16, torch.float16):
            results += selfcheck.check_shapes(device, dtype, **(SHAPES or selfcheck.LLAMA_1B))
        out["checks"] = [r.as_dict() for r in results]
        out["device"] = selfcheck.describe_device(torch.device(device))
    return out


def collect(check_kernels: bool = True) -> dict:
    """Everything `tunesmith doctor` prints, as a JSON-able dict."""
    import tunesmith

    return {
        "tunesmith": tunesmith.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": _devices(),
        "precision": _precision(),
        "attention": _attention(),
        "bitsandbytes": _bitsandbytes(),
        "kernels": _kernels(check_kernels),
        "packages": {name: _version(name) for name in PACKAGES},
    }


def _yes(value) -> str:
    return "yes" if value else "no"


def format_report(report: dict) -> str:
    dev = report["device"]
    lines = [f"tunesmith {report['tunesmith']} · Python {report['python']} · {report['platform']}"]
    if dev["type"] == "cuda":
        gpus = ", ".join(
            f"cuda:{g['index']} {g['name']} ({g['capability']}, {g['memory_gib']} GiB)" for g in dev["gpus"]
        )
        lines.append(f"device     {gpus}; CUDA {dev['cuda']}, {dev['count']} GPU(s)")
    else:
        lines.append(
            f"device     CPU ({dev['threads']} threads), no CUDA GPU; torch CUDA build: {dev['cuda'] or 'none'}"
        )
    p = report["precision"]
    tf32 = p["tf32"]
    tf32_text = (
        f"TF32 supported (matmul {'on' if tf32['matmul'] else 'off'}, cuDNN {'on' if tf32['cudnn'] else 'off'})"
        if tf32["supported"]
        else "TF32 no"
    )
    lines.append(f"precision  bf16 {_yes(p['bf16'])} · fp16 {_yes(p['fp16'])} · {tf32_text}")
    a = report["attention"]
    flash = _yes(a["flash_attention_2"]) + (
        f" ({a['flash_attention_2_why']})" if "flash_attention_2_why" in a else ""
    )
    lines.append(
        f"attention  sdpa yes · flex_attention {_yes(a['flex_attention'])} · flash_attention_2 {flash}"
    )
    b = report["bitsandbytes"]
    bnb = f"bitsandbytes {b['version']} " if b["version"] else "bitsandbytes "
    lines.append(f"4-bit      {bnb}{'usable' if b['usable'] else 'not usable: ' + b['why']}")
    k = report["kernels"]
    lines.append(f"kernels    Triton {k['triton'] or 'not installed'}; {k['mode']}")
    for check in k["checks"]:
        status = "passed" if check["passed"] else "FAILED"
        shape = check["shape"]
        line = f"           {status}  {check['op']} ({shape})  {check['seconds']:.2f} s"
        lines.append(line + (f"  {check['error']}" if check["error"] else ""))
    packages = " · ".join(f"{name} {v}" for name, v in report["packages"].items() if v)
    missing = ", ".join(name for name, v in report["packages"].items() if not v)
    lines.append(f"packages   {packages}")
    if missing:
        lines.append(f"           not installed: {missing}")
    return "\n".join(lines)


def main(as_json: bool = False, check_kernels: bool = True) -> int:
    """Print the report; exit status 1 when a kernel failed its check (the run would fall back)."""
    report = collect(check_kernels)
    print(json.dumps(report, indent=2) if as_json else format_report(report), file=sys.stdout)
    return 1 if any(not c["passed"] for c in report["kernels"]["checks"]) else 0
