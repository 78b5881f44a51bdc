"""`tunesmith doctor`: the report on this CPU machine, and the kernel checks it runs where a kernel
device exists (the CPU tests stand the Triton interpreter in for one, as tests/ops/test_selfcheck.py)."""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tunesmith import doctor  # noqa: E402
from tunesmith.cli import main  # noqa: E402
from tunesmith.ops import _triton, selfcheck  # noqa: E402
from tunesmith.ops import swiglu as glu_module  # noqa: E402

SMALL = {"hidden": 40, "intermediate": 72, "heads": 4, "kv_heads": 2, "head_dim": 16, "vocab": 300}


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes a machine without CUDA")
def test_on_a_cpu_machine_it_says_what_runs_instead(capsys, monkeypatch):
    monkeypatch.delenv("TUNESMITH_KERNELS", raising=False)
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"]["type"] == "cpu" and report["device"]["count"] == 0
    assert report["packages"]["torch"] == torch.__version__  # read from the package metadata
    assert report["precision"]["tf32"] == {"supported": False}
    assert report["kernels"]["checks"] == []
    if _triton.triton_installed():
        assert report["kernels"]["mode"].startswith("cpu: Triton kernels run on CUDA only")
    assert set(report["attention"]) >= {"sdpa", "flex_attention", "flash_attention_2"}
    assert report["bitsandbytes"]["usable"] is False and report["bitsandbytes"]["why"]

    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert (
        text.splitlines()[0].startswith("tunesmith ") and "device     CPU" in text and "kernels    " in text
    )


def test_tunesmith_kernels_off_is_reported(capsys, monkeypatch):
    monkeypatch.setenv("TUNESMITH_KERNELS", "off")
    report = doctor.collect()
    assert report["kernels"]["TUNESMITH_KERNELS"] == "off"
    assert (
        report["kernels"]["mode"].startswith("off: TUNESMITH_KERNELS") and report["kernels"]["checks"] == []
    )
    monkeypatch.setenv("TUNESMITH_KERNELS", "of")  # what training would stop at, reported
    assert doctor.collect()["kernels"]["mode"].startswith("error: TUNESMITH_KERNELS='of' is not understood")


@pytest.fixture
def interpreter_device(monkeypatch):
    pytest.importorskip("triton")
    if not _triton.interpreter_ready():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1")
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine doctor checks the GPU (tests/gpu)")
    monkeypatch.setattr(_triton, "AUTO_ON_INTERPRETER", True)
    monkeypatch.setattr(doctor, "SHAPES", SMALL)
    monkeypatch.delenv("TUNESMITH_KERNELS", raising=False)
    selfcheck.reset()
    yield
    selfcheck.reset()


def test_where_kernels_run_it_checks_each_one(interpreter_device, capsys):
    assert main(["doctor", "--json"]) == 0
    checks = json.loads(capsys.readouterr().out)["kernels"]["checks"]
    # per dtype (bf16, fp16): RMSNorm Llama + Gemma, SwiGLU, GeGLU, RoPE, the loss
    ops = ["rms_norm", "rms_norm", "glu", "glu", "apply_rope", "linear_cross_entropy"]
    assert [c["op"] for c in checks] == ops * 2
    assert all(c["passed"] and c["error"] is None for c in checks), checks
    assert checks[0]["shape_class"] == ["40", "torch.bfloat16", "torch.bfloat16", "llama", "False"]
    assert checks[-1]["shape_class"][:3] == ["300", "torch.float16", "torch.float16"]


def test_a_failing_kernel_shows_as_failed_and_the_exit_status_says_so(
    interpreter_device, capsys, monkeypatch
):
    def broken():
        raise RuntimeError("simulated compile error")

    monkeypatch.setattr(glu_module, "_kernels", broken)
    assert main(["doctor"]) == 1
    text = capsys.readouterr().out
    failed = [line for line in text.splitlines() if "FAILED" in line]
    assert len(failed) == 4 and all("glu" in line and "simulated compile error" in line for line in failed)
    assert text.count("passed  ") == 8  # the other kernels, in both dtypes
