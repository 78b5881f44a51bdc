"""SwiGLU / GeGLU: the reference matches transformers' MLP activations bit for bit; the Triton kernel
(on the CPU through Triton's interpreter) matches the reference forward and backward."""

import os

import pytest
import torch

# Without CUDA, Triton runs only under its interpreter, switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tunesmith.ops._triton import interpreter_ready  # noqa: E402
from tunesmith.ops.swiglu import GatedMLP, glu, glu_reference  # noqa: E402

# fp32: kernel and reference differ by a few ulps (the tanh is built from a sigmoid: ~1e-7 absolute);
# bf16/fp16: the reference rounds twice (activation, then product), the kernel once.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 2e-3)}


@pytest.fixture
def interpret():
    pytest.importorskip("triton")
    if not interpreter_ready():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1")


def test_reference_is_bitwise_transformers_activations():
    from transformers.activations import ACT2FN

    torch.manual_seed(0)
    gate, up = torch.randn(2, 3, 40).bfloat16(), torch.randn(2, 3, 40).bfloat16()
    assert torch.equal(glu_reference(gate, up, "silu"), ACT2FN["silu"](gate) * up)
    assert torch.equal(glu_reference(gate, up, "gelu_tanh"), ACT2FN["gelu_pytorch_tanh"](gate) * up)


def _forward_backward(gate, up, activation, impl):
    gate = gate.detach().clone().requires_grad_(True)
    up = up.detach().clone().requires_grad_(True)
    y = glu(gate, up, activation, impl=impl)
    dy = torch.linspace(-2, 2, y.numel()).view_as(y).to(y.dtype)
    y.backward(dy)
    return y, gate.grad, up.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_triton_matches_reference_forward_and_backward(interpret, dtype, activation):
    torch.manual_seed(1)
    # 15 rows of 37: not powers of two; values up to about +-9 reach both tails of the activations
    gate = (torch.randn(3, 5, 37) * 3).to(dtype)
    up = torch.randn(3, 5, 37).to(dtype)
    ref = _forward_backward(gate, up, activation, "reference")
    got = _forward_backward(gate, up, activation, "triton")
    atol, rtol = TOL[dtype]
    for name, r, g in zip(("y", "dgate", "dup"), ref, got):
        assert g.dtype == r.dtype, name
        torch.testing.assert_close(g.float(), r.float(), atol=atol, rtol=rtol, msg=name)


def test_triton_on_strided_halves_of_one_projection(interpret):
    # Phi-3 chunks one (…, 2I) projection into gate and up: views with row stride 2I
    torch.manual_seed(2)
    both = torch.randn(4, 2 * 24, requires_grad=True)
    gate, up = both.chunk(2, dim=-1)
    y = glu(gate, up, "silu", impl="triton")
    y.sum().backward()
    grad_triton = both.grad.clone()
    both.grad = None
    gate, up = both.chunk(2, dim=-1)
    y_ref = glu_reference(gate, up, "silu")
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_triton, both.grad, atol=1e-5, rtol=1e-5)


def test_gated_mlp_equals_transformers_mlps():
    from transformers import LlamaConfig, Phi3Config
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    torch.manual_seed(3)
    x = torch.randn(2, 5, 16)
    llama = LlamaMLP(
        LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=2)
    )
    ours = GatedMLP(
        gate_proj=llama.gate_proj, up_proj=llama.up_proj, down_proj=llama.down_proj, impl="reference"
    )
    assert torch.equal(ours(x), llama(x))
    assert list(ours.state_dict()) == list(llama.state_dict())
    phi3 = Phi3MLP(
        Phi3Config(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=2)
    )
    ours = GatedMLP(gate_up_proj=phi3.gate_up_proj, down_proj=phi3.down_proj, impl="reference")
    assert torch.equal(ours(x), phi3(x))
    assert sorted(ours.state_dict()) == sorted(phi3.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_cuda_kernel_matches_reference(activation):
    torch.manual_seed(4)
    gate = torch.randn(3, 257, 5632, device="cuda").bfloat16()
    up = torch.randn(3, 257, 5632, device="cuda").bfloat16()
    ref = _forward_backward(gate, up, activation, "reference")
    got = _forward_backward(gate, up, activation, "triton")
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.float(), r.float(), atol=3e-2, rtol=2e-2)
