"""linear_cross_entropy (chunked, gradients computed in the forward) against the reference
(full logits + F.cross_entropy), forward and backward, on odd shapes.

Tolerances: fp32 compares to 1e-5 relative to the largest entry (the two differ only in the
order of sums: chunking and where the scaling is applied). bf16 compares to 2e-2 relative to the
largest entry: both compute the logits with the same bf16 matmul, but the reference's gradient
w.r.t. the logits is rounded to bf16 before its (N, V) × (V, H) matmul exactly as ours is, while
the weight gradient is accumulated over chunks (ours, in fp32) or in one matmul (the
reference), so single entries can differ by a few bf16 ulps (2^-8 = 0.4% each).
"""

import math
import os

import pytest
import torch

# Without CUDA, the Triton kernel runs only under Triton's interpreter, which must be switched on
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tunesmith.ops._triton import interpreter_ready  # noqa: E402
from tunesmith.ops.linear_cross_entropy import default_chunk_size, linear_cross_entropy  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make(n=252, h=123, v=507, dtype=torch.float32, bias=True, ignore_every=3, seed=0, hit_every=4):
    """hidden (n, h), weight (v, h), bias (v,), targets (n,) with every `ignore_every`-th position
    ignored and the target of every `hit_every`-th supervised-or-not position set to its argmax."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h)).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    with torch.no_grad():
        logits = torch.nn.functional.linear(hidden, weight, b).float()
    targets[::hit_every] = logits.argmax(-1)[::hit_every]
    if ignore_every:
        targets[1::ignore_every] = -100
    return hidden, weight, b, targets


def run(impl, hidden, weight, bias, targets, grad_out=None, **kw):
    loss, correct = linear_cross_entropy(hidden, weight, targets, bias=bias, impl=impl, **kw)
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, inputs, grad_out) if inputs else []
    return loss, correct, grads


def assert_close(a, b, dtype, what):
    scale = b.abs().max().clamp(min=1e-6)
    err = ((a.float() - b.float()).abs().max() / scale).item()
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def expected_hits(hidden, weight, bias, targets):
    """Count of supervised positions whose argmax is the target, from full logits in fp32."""
    with torch.no_grad():
        logits = torch.nn.functional.linear(hidden, weight, bias).float()
    keep = targets != -100
    return int((logits.argmax(-1)[keep] == targets[keep]).sum())


CASES = [
    dict(),
    dict(softcap=2.5),
    dict(dft=True),
    dict(dft=True, softcap=2.5),
    dict(reduction="mean"),
    dict(reduction="none"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kw", CASES, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()) or "plain")
@pytest.mark.parametrize("chunk_size", [37, 10_000])
def test_matches_reference_forward_and_backward(dtype, kw, chunk_size):
    hidden, weight, bias, targets = make(dtype=dtype)
    g = torch.Generator().manual_seed(5)
    # a non-unit grad_output, so the backward's scaling is exercised too
    grad_out = torch.randn(targets.shape, generator=g) if kw.get("reduction") == "none" else torch.tensor(0.7)
    ref = run("reference", hidden, weight, bias, targets, grad_out, **kw)
    ours = run("chunked", hidden, weight, bias, targets, grad_out, chunk_size=chunk_size, **kw)
    assert ours[0].dtype == torch.float32 and ours[0].shape == ref[0].shape
    assert_close(ours[0], ref[0], dtype, "loss")
    for name, a, b in zip(["grad hidden", "grad weight", "grad bias"], ours[2], ref[2]):
        assert a.dtype == b.dtype == dtype
        assert_close(a, b, dtype, name)
    # 252 positions, every 3rd from index 1 ignored -> 168 supervised; every 4th has its argmax as
    # target. Exact in fp32; in bf16 a chunked matmul may round a near-tie differently.
    if dtype == torch.float32:
        assert ours[1].item() == ref[1].item() == expected_hits(hidden, weight, bias, targets)
    else:
        assert abs(ours[1].item() - expected_hits(hidden, weight, bias, targets)) <= 1


def test_ignored_positions_get_zero_gradient_and_zero_loss():
    hidden, weight, bias, targets = make(n=40, h=16, v=50)
    loss, _, (g_hidden, _, _) = run(
        "chunked", hidden, weight, bias, targets, torch.ones(40), reduction="none", chunk_size=7
    )
    ignored = targets == -100
    assert ignored.sum() == 13  # indices 1, 4, ..., 37
    assert (loss[ignored] == 0).all() and (loss[~ignored] > 0).all()
    assert (g_hidden[ignored] == 0).all() and (g_hidden[~ignored] != 0).any(dim=1).all()


def test_frozen_weight_computes_no_weight_gradient():
    hidden, weight, bias, targets = make(n=60, h=20, v=90, bias=False)
    weight.requires_grad_(False)
    ref = run("reference", hidden, weight, None, targets)
    ours = run("chunked", hidden, weight, None, targets, chunk_size=16)
    assert len(ours[2]) == 1  # only hidden
    assert_close(ours[2][0], ref[2][0], torch.float32, "grad hidden")
    loss, _ = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None


def test_batched_hidden_bth():
    hidden, weight, bias, targets = make(n=2 * 33, h=24, v=61)
    hidden3 = hidden.detach().view(2, 33, 24).requires_grad_()
    targets3 = targets.view(2, 33)
    ref = run("reference", hidden3, weight, bias, targets3)
    ours = run("chunked", hidden3, weight, bias, targets3, chunk_size=8)
    assert ours[2][0].shape == (2, 33, 24)
    for a, b in zip(ours[2], ref[2]):
        assert_close(a, b, torch.float32, "grad")
    assert_close(ours[0], ref[0], torch.float32, "loss")


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_zero_supervised_tokens_gives_zero_loss_and_zero_grads(reduction):
    hidden, weight, bias, targets = make(n=12, h=8, v=30)
    targets[:] = -100
    grad_out = torch.ones(12) if reduction == "none" else None
    loss, correct, grads = run("chunked", hidden, weight, bias, targets, grad_out, reduction=reduction)
    assert loss.abs().sum().item() == 0.0 and correct.item() == 0
    for g in grads:
        assert torch.isfinite(g).all() and (g == 0).all()


def test_worked_example_from_the_docstring():
    hidden = torch.tensor([[1.0], [2.0]])
    weight = torch.tensor([[0.0], [1.0], [-1.0]])
    loss, correct = linear_cross_entropy(hidden, weight, torch.tensor([1, -100]))
    assert loss.item() == pytest.approx(math.log(1 + math.e + math.exp(-1)) - 1)  # 0.4076
    assert correct.item() == 1


def test_dft_weights_each_token_by_its_detached_target_probability():
    # One token, logits [0, log 3] (softmax [0.25, 0.75]), target 1: CE = -log 0.75, DFT loss =
    # 0.75 * -log 0.75; gradient w.r.t. the logits = 0.75 * (softmax - onehot) = 0.75 * [0.25, -0.25].
    hidden = torch.tensor([[1.0]], requires_grad=True)
    weight = torch.tensor([[0.0], [math.log(3.0)]], requires_grad=True)
    loss, _ = linear_cross_entropy(hidden, weight, torch.tensor([1]), dft=True)
    assert loss.item() == pytest.approx(-0.75 * math.log(0.75))
    loss.backward()
    assert weight.grad.flatten().tolist() == pytest.approx([0.75 * 0.25, -0.75 * 0.25])


def test_softcap_bounds_the_logits():
    # A logit of 100 capped at 5 becomes 5 * tanh(20) ~ 5: loss vs a 0 logit = log(1 + e^5) - 0.
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[0.0], [100.0]])
    loss, _ = linear_cross_entropy(hidden, weight, torch.tensor([0]), softcap=5.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(5 * math.tanh(20.0))), rel=1e-6)


def test_mixed_dtypes_compute_in_the_hidden_dtype():
    # fp32 head under bf16 activations: the gradient comes back in each input's own dtype.
    hidden, weight, bias, targets = make(n=30, h=16, v=40, dtype=torch.bfloat16, bias=False)
    weight32 = weight.detach().float().requires_grad_()
    loss, _, (gh, gw) = run("chunked", hidden, weight32, None, targets, chunk_size=8)
    ref = run("reference", hidden, weight, None, targets)
    assert (gh.dtype, gw.dtype) == (torch.bfloat16, torch.float32)
    assert_close(loss, ref[0], torch.bfloat16, "loss")
    assert_close(gw, ref[2][1], torch.bfloat16, "grad weight")


def test_default_chunk_size_keeps_fp32_logits_near_64_mb():
    assert default_chunk_size(128_256) == 130  # 130 * 128,256 * 4 B = 63.6 MiB
    assert default_chunk_size(32_000) == 524
    assert default_chunk_size(100) == 4096  # capped


def test_bad_arguments_are_explained():
    hidden, weight, bias, targets = make(n=8, h=4, v=10)
    with pytest.raises(ValueError, match="reduction='avg' is not one of"):
        linear_cross_entropy(hidden, weight, targets, reduction="avg")
    with pytest.raises(ValueError, match="disagree"):
        linear_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="impl='fast' is not one of"):
        linear_cross_entropy(hidden, weight, targets, impl="fast")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kw", CASES, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()) or "plain")
def test_triton_kernel_matches_reference(dtype, kw):
    # The Triton kernel (softmax + gradient over the logits, in place) run on the CPU by Triton's
    # interpreter. V = 4,500 > the kernel's 4,096-column block, so its loops over vocab blocks
    # (online max / sum of exp, argmax across blocks, masked tail) all run.
    pytest.importorskip("triton")
    if not interpreter_ready():  # CPU tensors: only the interpreter runs them (tests/gpu covers CUDA)
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1")
    hidden, weight, bias, targets = make(n=40, h=23, v=4500, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    grad_out = torch.randn(targets.shape, generator=g) if kw.get("reduction") == "none" else torch.tensor(0.7)
    ref = run("reference", hidden, weight, bias, targets, grad_out, **kw)
    ours = run("triton", hidden, weight, bias, targets, grad_out, chunk_size=16, **kw)
    assert_close(ours[0], ref[0], dtype, "loss")
    for name, a, b in zip(["grad hidden", "grad weight", "grad bias"], ours[2], ref[2]):
        assert a.dtype == b.dtype == dtype
        assert_close(a, b, dtype, name)
    # 40 positions, 13 ignored (1, 4, ..., 37); every 4th target is its argmax
    assert abs(ours[1].item() - expected_hits(hidden, weight, bias, targets)) <= (
        0 if dtype == torch.float32 else 1
    )


def test_second_backward_through_the_same_loss_is_a_clear_error():
    hidden, weight, bias, targets = make(n=10, h=4, v=12)
    loss, _ = linear_cross_entropy(hidden, weight, targets, bias=bias)
    (loss * 2).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_chunks_cover_every_row_once_in_few_distinct_sizes():
    # Every supervised-token count 0..1,999 with chunks of 341: the chunks tile [0, n) in order, and
    # over all 2,000 counts the matmuls see only whole chunks, multiples of 32 below 341 and 1..31:
    # 1 + 10 + 31 = 42 row counts (one per count, 341, would be the cache-filling alternative).
    from tunesmith.ops.linear_cross_entropy import _chunks

    sizes = set()
    for n in range(2000):
        bounds = _chunks(n, 341)
        assert [a for a, _ in bounds] == [0, *(b for _, b in bounds[:-1])][: len(bounds)]
        assert (bounds[-1][1] if bounds else 0) == n
        sizes |= {b - a for a, b in bounds}
    assert sizes == {341} | set(range(32, 341, 32)) | set(range(1, 32))


def entropy_from_full_logits(hidden, weight, bias, targets, softcap=None):
    """(per-position entropy of the softmax, 0 where ignored), from the full logits in float64."""
    with torch.no_grad():
        logits = torch.nn.functional.linear(
            hidden.double(), weight.double(), None if bias is None else bias.double()
        )
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        p = torch.softmax(logits, dim=-1)
        entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
        return entropy * (targets != -100)


ENTROPY_IMPLS = ["chunked", "reference", "triton"]


@pytest.mark.parametrize("impl", ENTROPY_IMPLS)
@pytest.mark.parametrize("kw", [{}, {"softcap": 3.0}, {"dft": True}])
def test_entropy_matches_full_logits(impl, kw):
    # A detached metric: forward only. Chunks of 100 over 168 supervised rows (two chunks, one partial);
    # the logits are scaled so that some rows are peaked (entropy near 0) and some flat (near log V).
    if impl == "triton" and not interpreter_ready():  # CPU tensors (tests/gpu covers CUDA)
        pytest.skip("Triton's interpreter is not on (TRITON_INTERPRET=1 before triton is imported)")
    hidden, weight, bias, targets = make()
    with torch.no_grad():
        hidden[::5] *= 8.0  # peaked rows
        hidden[1::7] *= 0.01  # nearly uniform rows
    softcap = kw.get("softcap")
    expected = entropy_from_full_logits(hidden, weight, bias, targets, softcap)
    n = (targets != -100).sum()
    if softcap is None:  # both kinds of rows are present (soft-capping at 3 flattens every row)
        assert expected.max() > 0.9 * math.log(507) and expected[targets != -100].min() < 0.5
    args = dict(bias=bias, impl=impl, chunk_size=100, return_entropy=True, **kw)
    loss, correct, total = linear_cross_entropy(hidden, weight, targets, reduction="sum", **args)
    per_pos = linear_cross_entropy(hidden, weight, targets, reduction="none", **args)[2]
    mean = linear_cross_entropy(hidden, weight, targets, reduction="mean", **args)[2]
    assert not total.requires_grad and total.dtype == torch.float32
    assert per_pos.shape == targets.shape
    torch.testing.assert_close(per_pos.double(), expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(total.double(), expected.sum(), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(mean.double(), expected.sum() / n, atol=1e-5, rtol=1e-5)
    # asking for the entropy changes neither the loss nor the hits
    plain_loss, plain_correct = linear_cross_entropy(
        hidden, weight, targets, reduction="sum", bias=bias, impl=impl, chunk_size=100, **kw
    )
    assert loss.item() == pytest.approx(plain_loss.item(), rel=1e-6) and correct == plain_correct


def test_entropy_in_bf16_matches_full_logits_of_the_same_bf16_matmul():
    hidden, weight, bias, targets = make(dtype=torch.bfloat16)
    _, _, per_pos = linear_cross_entropy(
        hidden, weight, targets, bias=bias, reduction="none", chunk_size=64, return_entropy=True
    )
    # the reference rounds the logits to bf16 as the matmul does, then computes in fp32
    _, _, ref = linear_cross_entropy(
        hidden, weight, targets, bias=bias, reduction="none", impl="reference", return_entropy=True
    )
    torch.testing.assert_close(per_pos, ref, atol=1e-4, rtol=1e-4)


def test_entropy_backward_leaves_the_gradients_unchanged():
    hidden, weight, bias, targets = make()
    loss, _, _ = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=100, return_entropy=True)
    with_entropy = torch.autograd.grad(loss, [hidden, weight, bias])
    loss, _ = linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=100)
    without = torch.autograd.grad(loss, [hidden, weight, bias])
    for a, b in zip(with_entropy, without):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_torch_is_the_chunked_path():
    # "torch" names the PyTorch path in every op (ops._triton.IMPLS); for the loss that is "chunked"
    hidden, weight, bias, targets = make(n=40, h=16, v=50)
    chunked = run("chunked", hidden, weight, bias, targets, chunk_size=8)
    torch_ = run("torch", hidden, weight, bias, targets, chunk_size=8)
    assert torch.equal(torch_[0], chunked[0]) and torch.equal(torch_[1], chunked[1])
    assert all(torch.equal(a, b) for a, b in zip(torch_[2], chunked[2]))
