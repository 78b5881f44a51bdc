"""RMSNorm: the reference matches transformers' modules bit for bit; the Triton kernel (run on the
CPU by Triton's interpreter) matches the reference forward and backward."""

import os

import pytest
import torch

# Without CUDA, Triton runs only under its interpreter, which must be switched on before triton is
# first imported (building a transformers model imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tunesmith.ops._triton import interpreter_ready  # noqa: E402
from tunesmith.ops.rms_norm import RMSNorm, rms_norm, rms_norm_reference  # noqa: E402

# Tolerances: fp32 kernels and reference differ only in summation order (~1e-6 relative);
# bf16/fp16 outputs may differ by one rounding of the result (bf16 ulp 2**-8, fp16 2**-11).
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


@pytest.fixture
def interpret():
    pytest.importorskip("triton")
    if not interpreter_ready():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1")


def test_reference_is_bitwise_transformers_llama_and_gemma_norms():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 40, dtype=dtype)
        llama = LlamaRMSNorm(40, eps=1e-5).to(dtype)
        gemma = GemmaRMSNorm(40, eps=1e-6).to(dtype)
        with torch.no_grad():
            llama.weight.normal_()
            gemma.weight.normal_()
        ours = rms_norm_reference(x, llama.weight, 1e-5, casting="llama")
        assert torch.equal(ours, llama(x)), dtype
        ours = rms_norm_reference(x, gemma.weight, 1e-6, offset=1.0, casting="gemma")
        assert torch.equal(ours, gemma(x)), dtype


def _forward_backward(x, w, impl, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = rms_norm(x, w, 1e-6, impl=impl, **kwargs)
    # a fixed, non-uniform upstream gradient so every output element matters
    dy = torch.linspace(-1, 1, y.numel(), dtype=torch.float32).view_as(y).to(y.dtype)
    y.backward(dy)
    return y, x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("casting,offset", [("llama", 0.0), ("gemma", 1.0)])
def test_triton_matches_reference_forward_and_backward(interpret, dtype, casting, offset):
    torch.manual_seed(1)
    # odd sizes: 3*7 = 21 rows (not a multiple of the 4 backward programs), 40 columns (block of 64)
    x = (torch.randn(3, 7, 40) * 3).to(dtype)
    w = torch.randn(40).to(dtype)
    ref = _forward_backward(x, w, "reference", casting=casting, offset=offset)
    got = _forward_backward(x, w, "triton", casting=casting, offset=offset)
    atol, rtol = TOL[dtype]
    for name, r, g in zip(("y", "dx", "dw"), ref, got):
        assert g.dtype == r.dtype, name
        # the weight gradient sums 21 rows, so allow the row count times the per-element error
        scale = 21 if name == "dw" else 1
        torch.testing.assert_close(g.float(), r.float(), atol=atol * scale, rtol=rtol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("casting,offset", [("llama", 0.0), ("gemma", 1.0)])
def test_cpu_autograd_function_matches_reference(dtype, casting, offset):
    # "auto" off CUDA: the reference forward op for op (bit-identical output) with a hand-written
    # backward from x and rstd; gradients differ from autograd's only by fp32 summation order
    # (plus one rounding of dx to the input dtype)
    torch.manual_seed(2)
    x = (torch.randn(3, 7, 40) * 3).to(dtype)
    w = torch.randn(40).to(dtype)
    ref = _forward_backward(x, w, "reference", casting=casting, offset=offset)
    got = _forward_backward(x, w, "auto", casting=casting, offset=offset)
    assert torch.equal(got[0], ref[0])
    atol, rtol = TOL[dtype]
    for name, r, g in zip(("dx", "dw"), ref[1:], got[1:]):
        assert g.dtype == r.dtype, name
        scale = 21 if name == "dw" else 1  # dw sums 21 rows
        torch.testing.assert_close(g.float(), r.float(), atol=atol * scale, rtol=rtol, msg=name)


def test_cpu_autograd_function_keeps_only_the_input_and_rstd():
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(64, dtype=torch.bfloat16, requires_grad=True)
    for impl, expected in (("reference", None), ("auto", 4 * 64 * 2 + 64 * 2 + 4 * 4)):
        saved = {}

        def pack(t, saved=saved):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            rms_norm(x, w, 1e-6, impl=impl)
        if expected is None:  # autograd of the reference: an fp32 copy of x among other things
            reference_bytes = sum(saved.values())
        else:  # x (bf16), the weight (bf16) and rstd (4 rows, fp32): nothing else
            assert sum(saved.values()) == expected
    assert reference_bytes > 2 * expected


def test_triton_mixed_dtypes_and_non_contiguous_input(interpret):
    # bf16 activations with an fp32 weight (autocast training): output is fp32 as in transformers
    torch.manual_seed(2)
    x = torch.randn(6, 2, 24).to(torch.bfloat16).transpose(0, 1)  # (2, 6, 24), rows not contiguous
    w = torch.randn(24)
    ref = _forward_backward(x, w, "reference")
    got = _forward_backward(x, w, "triton")
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.float(), r.float(), atol=2e-2, rtol=2e-2)


def test_module_adopts_the_given_parameter():
    weight = torch.nn.Parameter(torch.full((8,), 2.0))
    norm = RMSNorm(weight=weight, eps=0.0, impl="reference")
    assert norm.weight is weight and list(norm.state_dict()) == ["weight"]
    # rows of all ones have rms 1, so the output is the weight: 2.0 everywhere
    assert torch.equal(norm(torch.ones(3, 8)), torch.full((3, 8), 2.0))


def test_triton_on_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rms_norm(torch.ones(2, 4), torch.ones(4), impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_reference(dtype):
    torch.manual_seed(3)
    x = torch.randn(4, 333, 2048, device="cuda").to(dtype)
    w = torch.randn(2048, device="cuda").to(dtype)
    ref = _forward_backward(x, w, "reference")
    got = _forward_backward(x, w, "triton")
    atol, rtol = TOL[dtype]
    for name, r, g in zip(("y", "dx", "dw"), ref, got):
        scale = 100 if name == "dw" else 1
        torch.testing.assert_close(g.float(), r.float(), atol=atol * scale, rtol=rtol, msg=name)
