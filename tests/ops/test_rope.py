"""Rotary embedding: the reference matches transformers' apply_rotary_pos_emb bit for bit; the Triton
kernel (on the CPU through Triton's interpreter) matches the reference forward and backward, for
per-token cos/sin, position-id tables (packed rows), partial rotary and several dtypes."""

import os

import pytest
import torch

# Without CUDA, Triton runs only under its interpreter, switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tunesmith.ops._triton import interpreter_ready  # noqa: E402
from tunesmith.ops.rope import apply_rope, rope_reference  # noqa: E402

# fp32: same products, one rounding fewer in the kernel -> ~1e-7; bf16/fp16: the reference rounds
# after each product and the sum, the kernel once.
TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 2e-3)}


@pytest.fixture
def interpret():
    pytest.importorskip("triton")
    if not interpreter_ready():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1")


def _tables(rotary: int, n_positions: int, dtype=torch.float32):
    # the default rope of transformers: freqs duplicated into both halves
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary))
    freqs = torch.arange(n_positions).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _qk(batch, q_heads, k_heads, seq, dim, dtype):
    # (B, T, H, D) projections viewed as (B, H, T, D), exactly as the attention modules do
    q = torch.randn(batch, seq, q_heads, dim).to(dtype).transpose(1, 2)
    k = torch.randn(batch, seq, k_heads, dim).to(dtype).transpose(1, 2)
    return q, k


def test_reference_is_bitwise_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_rope

    torch.manual_seed(0)
    q, k = _qk(2, 4, 2, 7, 16, torch.bfloat16)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3]])
    cos, sin = _tables(16, 32, torch.bfloat16)
    ours = rope_reference(q, k, cos[positions], sin[positions])
    theirs = llama_rope(q, k, cos[positions], sin[positions])
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    # the table form gathers the same rows
    assert all(torch.equal(a, b) for a, b in zip(rope_reference(q, k, cos, sin, positions), theirs))
    cos, sin = _tables(10, 32, torch.bfloat16)  # partial rotary: first 10 of 16 dims
    ours = rope_reference(q, k, cos[positions], sin[positions])
    theirs = phi3_rope(q, k, cos[positions], sin[positions])
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def _forward_backward(q, k, cos, sin, position_ids, impl):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    q_out, k_out = apply_rope(q, k, cos, sin, position_ids, impl=impl)
    dq = torch.linspace(-1, 1, q_out.numel()).view_as(q_out).to(q_out.dtype)
    dk = torch.linspace(1, -1, k_out.numel()).view_as(k_out).to(k_out.dtype)
    torch.autograd.backward((q_out, k_out), (dq, dk))
    return q_out, k_out, q.grad, k.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rotary", [12, 8])  # full (head_dim 12) and partial rotary
@pytest.mark.parametrize("form", ["per_token", "table"])
def test_triton_matches_reference_forward_and_backward(interpret, dtype, rotary, form):
    torch.manual_seed(1)
    # 3 query heads, 1 kv head, 5 tokens, head_dim 12 (a block of 16): nothing a power of two
    q, k = _qk(2, 3, 1, 5, 12, dtype)
    # the second row is packed: two documents, positions restart at 0
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]])
    cos, sin = _tables(rotary, 16, dtype)
    if form == "per_token":
        args = (cos[positions], sin[positions], None)
    else:
        args = (cos, sin, positions)
    ref = _forward_backward(q, k, *args, "reference")
    got = _forward_backward(q, k, *args, "triton")
    atol, rtol = TOL[dtype]
    for name, r, g in zip(("q", "k", "dq", "dk"), ref, got):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        torch.testing.assert_close(g.float(), r.float(), atol=atol, rtol=rtol, msg=name)


def test_triton_shared_cos_for_the_batch(interpret):
    # cos/sin of shape (1, T, R) broadcast over the batch (no position_ids passed to the model)
    torch.manual_seed(2)
    q, k = _qk(3, 2, 2, 4, 8, torch.float32)
    cos, sin = _tables(8, 4)
    ref = _forward_backward(q, k, cos[None], sin[None], None, "reference")
    got = _forward_backward(q, k, cos[None], sin[None], None, "triton")
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def test_backward_is_rotation_by_minus_theta():
    # rotating by theta then by -theta (sin negated) is the identity: the backward of an orthogonal map
    torch.manual_seed(3)
    q, k = _qk(1, 2, 2, 6, 8, torch.float64)
    cos, sin = _tables(8, 6, torch.float64)
    q1, k1 = rope_reference(q, k, cos[None], sin[None])
    q2, k2 = rope_reference(q1, k1, cos[None], -sin[None])
    torch.testing.assert_close(q2, q)
    torch.testing.assert_close(k2, k)


def test_bad_shapes_are_explained():
    q, k = _qk(1, 2, 2, 6, 8, torch.float32)
    cos, sin = _tables(10, 6)
    with pytest.raises(ValueError, match="head_dim 8"):
        apply_rope(q, k, cos[None], sin[None], impl="reference")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_matches_reference():
    torch.manual_seed(4)
    q = torch.randn(2, 333, 32, 128, device="cuda").bfloat16().transpose(1, 2)
    k = torch.randn(2, 333, 8, 128, device="cuda").bfloat16().transpose(1, 2)
    cos, sin = _tables(128, 4096, torch.bfloat16)
    positions = torch.randint(0, 4096, (2, 333), device="cuda")
    cos, sin = cos.cuda(), sin.cuda()
    ref = _forward_backward(q, k, cos, sin, positions, "reference")
    got = _forward_backward(q, k, cos, sin, positions, "triton")
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.float(), r.float(), atol=3e-2, rtol=2e-2)
