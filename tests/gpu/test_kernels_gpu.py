"""Every Triton kernel against its PyTorch reference on a real GPU: compiled, fp32 / fp16 / bf16,
odd shapes, forward and backward; the one-time device check; optimize() on a CUDA model.

They skip without CUDA. `TUNESMITH_GPU_TESTS_ON_CPU=1` runs them on the CPU through Triton's
interpreter instead (slow; how `bench/gpu/run.py --dry-run` checks this file's code on a machine
without a GPU).

The accuracy rule: against a float64 truth (the reference op run on the same inputs upcast), the
kernel's error must be at most twice that of the PyTorch reference run in the same dtype, plus a
small floor per dtype: a kernel is allowed to round differently, not to be less accurate. Both
the relative L2 error (catches diffuse error) and the max-abs error relative to the largest value
(catches a few wrong elements, e.g. a masked tail) are held to that rule.
"""

import os

import pytest
import torch

ON_CPU = os.environ.get("TUNESMITH_GPU_TESTS_ON_CPU") == "1" and not torch.cuda.is_available()
if ON_CPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tunesmith.ops import _triton, selfcheck  # noqa: E402
from tunesmith.ops.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from tunesmith.ops.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from tunesmith.ops.rope import apply_rope, rope_reference  # noqa: E402
from tunesmith.ops.swiglu import glu, glu_reference  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="needs a CUDA GPU (none here)"),
]

DEVICE = "cpu" if ON_CPU else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]
# error floors (relative): below these, differences are rounding noise for any implementation
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


# How much larger than the reference's error the kernel's may be. On a GPU the kernel rounds to
# nearest as the PyTorch ops do: 2x leaves room for a different order of fp32 accumulation. Triton's
# CPU interpreter converts fp32 to bf16 by truncation (73% of an RMSNorm's bf16 outputs differ from
# torch's, with 2.5x its error), so under it bf16 is allowed 4x.
FACTOR = {torch.float32: 2.0, torch.float16: 2.0, torch.bfloat16: 4.0 if ON_CPU else 2.0}


def size(gpu: int, cpu: int) -> int:
    """The GPU size, or a smaller one of the same oddness under the (slow) CPU interpreter."""
    return cpu if ON_CPU else gpu


@pytest.fixture(autouse=True)
def _kernels_can_run():
    pytest.importorskip("triton")
    if ON_CPU and not _triton.interpreter_ready():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")


def _errors(x: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    x, truth = x.detach().double(), truth.detach().double()
    scale = truth.abs().max().clamp_min(1e-30)
    return ((x - truth).norm() / truth.norm().clamp_min(1e-30)).item(), (
        (x - truth).abs().max() / scale
    ).item()


def assert_as_accurate(name, kernel, same_dtype_reference, truth, dtype):
    assert kernel.shape == truth.shape, (name, kernel.shape, truth.shape)
    assert torch.isfinite(kernel).all(), f"{name}: non-finite values"
    got, ref = _errors(kernel, truth), _errors(same_dtype_reference, truth)
    for metric, g, r in zip(("relative L2", "max-abs / max"), got, ref):
        assert g <= FACTOR[dtype] * r + FLOOR[dtype], (
            f"{name} ({dtype}): {metric} error {g:.3e}, reference's {r:.3e}"
        )


def _grads(fn, inputs, upstream):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(outs, leaves, upstream, allow_unused=True)
    return [o.detach() for o in outs], list(grads)


def _three_ways(kernel_fn, reference_fn, inputs, upstream, dtype):
    """(kernel, reference in the same dtype, float64 truth), each as outputs + input gradients."""
    kernel = _grads(kernel_fn, inputs, upstream)
    reference = _grads(reference_fn, inputs, upstream)
    truth = _grads(reference_fn, [t.double() for t in inputs], [u.double() for u in upstream])
    for k_list, r_list, t_list in zip(kernel, reference, truth):
        for i, (k, r, t) in enumerate(zip(k_list, r_list, t_list)):
            if t is None:
                assert k is None and r is None
                continue
            assert k.dtype == r.dtype, f"#{i}: kernel dtype {k.dtype}, reference {r.dtype}"
            assert_as_accurate(f"#{i}", k, r, t, dtype)


def _randn(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("casting,offset", [("llama", 0.0), ("gemma", 1.0)])
@pytest.mark.parametrize("shape", [(3, size(333, 33), 2048), (7, 1000), (5, 3, 4096 + 17)], ids=str)
def test_rms_norm(dtype, casting, offset, shape):
    x = _randn(*shape, dtype=dtype, scale=3.0, seed=1)
    w = _randn(shape[-1], dtype=dtype, scale=0.5, seed=2) + (0 if offset else 1)
    dy = _randn(*shape, dtype=dtype, seed=3)
    _three_ways(
        lambda x, w: rms_norm(x, w, 1e-6, offset=offset, casting=casting, impl="triton"),
        lambda x, w: rms_norm_reference(x, w, 1e-6, offset=offset, casting=casting),
        [x, w],
        [dy],
        dtype,
    )


# ---------------------------------------------------------------- SwiGLU / GeGLU


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(2, size(333, 33), size(8192, 2048)), (size(1001, 31), 1000 + 3)], ids=str)
def test_glu(dtype, activation, shape):
    gate = _randn(*shape, dtype=dtype, scale=3.0, seed=1)
    up = _randn(*shape, dtype=dtype, seed=2)
    dy = _randn(*shape, dtype=dtype, seed=3)
    _three_ways(
        lambda g, u: glu(g, u, activation, impl="triton"),
        lambda g, u: glu_reference(g, u, activation),
        [gate, up],
        [dy],
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_glu_on_the_two_halves_of_one_projection(dtype):
    # Phi-3: gate and up are strided views of one (rows, 2 I) tensor
    rows = size(333, 33)
    fused = _randn(rows, 2 * 3001, dtype=dtype, scale=2.0, seed=4)
    dy = _randn(rows, 3001, dtype=dtype, seed=5)

    def halves(fn):
        def run(f):
            gate, up = f.chunk(2, dim=-1)
            return fn(gate, up)

        return run

    _three_ways(
        halves(lambda g, u: glu(g, u, "silu", impl="triton")), halves(glu_reference), [fused], [dy], dtype
    )


# ---------------------------------------------------------------- RoPE


def _rope_tables(positions: int, rotary: int, dtype):
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, rotary, 2, dtype=torch.float64) / rotary))
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,rotary,tables",
    [(32, 8, 64, 64, False), (24, 8, 128, 128, True), (5, 1, 96, 64, False), (3, 3, 80, 80, True)],
    ids=["llama-1b", "llama-8b-tables", "partial", "odd-heads"],
)
def test_rope(dtype, heads, kv_heads, head_dim, rotary, tables):
    batch, seq = 2, size(333, 133)
    # (B, T, H, D) viewed as (B, H, T, D), as the projections produce them
    q = _randn(batch, seq, heads, head_dim, dtype=dtype, seed=1).transpose(1, 2)
    k = _randn(batch, seq, kv_heads, head_dim, dtype=dtype, seed=2).transpose(1, 2)
    cos_t, sin_t = _rope_tables(4096, rotary, dtype)
    g = torch.Generator().manual_seed(3)
    # packed rows: positions restart per document
    position_ids = torch.cat([torch.arange(100), torch.arange(seq - 100)]).repeat(batch, 1)
    position_ids[1] = torch.randint(0, 4096, (seq,), generator=g)
    position_ids = position_ids.to(DEVICE)
    if tables:
        cos, sin, pos = cos_t, sin_t, position_ids
    else:
        cos, sin, pos = cos_t[position_ids], sin_t[position_ids], None
    dq = _randn(batch, heads, seq, head_dim, dtype=dtype, seed=4)
    dk = _randn(batch, kv_heads, seq, head_dim, dtype=dtype, seed=5)

    def truth_or(fn):
        # cos/sin follow the inputs' dtype for the float64 truth
        def run(q, k):
            c, s = (cos.double(), sin.double()) if q.dtype == torch.float64 else (cos, sin)
            return fn(q, k, c, s, pos)

        return run

    _three_ways(
        truth_or(lambda q, k, c, s, p: apply_rope(q, k, c, s, p, impl="triton")),
        truth_or(rope_reference),
        [q, k],
        [dq, dk],
        dtype,
    )


# ---------------------------------------------------------------- fused linear cross-entropy


def _ce_inputs(n, h, v, dtype, bias):
    hidden = _randn(n, h, dtype=dtype, seed=1)
    weight = _randn(v, h, dtype=dtype, scale=2.0 / h**0.5, seed=2)
    b = _randn(v, dtype=dtype, scale=0.1, seed=3) if bias else None
    g = torch.Generator().manual_seed(4)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::7] = -100
    return hidden, weight, b, targets.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(
    "kw",
    [{}, {"softcap": 30.0}, {"dft": True}, {"reduction": "none"}, {"reduction": "mean", "bias": True}],
    ids=["plain", "softcap", "dft", "none", "mean-bias"],
)
def test_linear_cross_entropy(dtype, kw):
    kw = dict(kw)
    bias = kw.pop("bias", False)
    reduction = kw.pop("reduction", "sum")
    # odd sizes; V = 128,256 (Llama 3) spans 32 of the kernel's 4,096-column blocks with a tail (4,500
    # on the CPU: two blocks)
    n = size(333, 37)
    hidden, weight, b, targets = _ce_inputs(n, size(2048, 64), size(128256, 4500), dtype, bias)
    upstream = (
        _randn(n, dtype=torch.float32, seed=5) if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    )

    inputs = [hidden, weight] + ([b] if bias else [])

    def run(impl, tensors):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        loss, _, entropy = linear_cross_entropy(
            leaves[0], leaves[1], targets, bias=leaves[2] if bias else None, reduction=reduction, impl=impl,
            return_entropy=True, **kw,
        )  # fmt: skip
        grads = torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))
        return [loss.detach(), entropy, *grads]

    kernel, chunked = run("triton", inputs), run("chunked", inputs)
    truth = run("reference", [t.double() for t in inputs])
    names = ["loss", "entropy", "grad hidden", "grad weight", "grad bias"]
    for name, k, c, t in zip(names, kernel, chunked, truth):
        assert k.dtype == c.dtype, name
        assert_as_accurate(name, k, c, t, dtype)


# ---------------------------------------------------------------- the device check and optimize


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_kernel_passes_its_device_check(dtype, monkeypatch):
    monkeypatch.delenv("TUNESMITH_KERNELS", raising=False)
    monkeypatch.setattr(_triton, "AUTO_ON_INTERPRETER", ON_CPU)
    selfcheck.reset()
    shapes = selfcheck.LLAMA_1B if not ON_CPU else {**selfcheck.LLAMA_1B, "vocab": 4500}
    results = selfcheck.check_shapes(DEVICE, dtype, **shapes)
    assert [r.op for r in results] == [
        "rms_norm",
        "rms_norm",
        "glu",
        "glu",
        "apply_rope",
        "linear_cross_entropy",
    ]
    failed = [(r.op, r.shape_class, r.error) for r in results if not r.passed]
    assert not failed, failed
    selfcheck.reset()


def test_optimize_on_the_device_uses_the_checked_kernels_and_matches_the_model(monkeypatch):
    from tests.tiny import tiny_model
    from tunesmith.ops.apply import optimize

    monkeypatch.delenv("TUNESMITH_KERNELS", raising=False)
    monkeypatch.setattr(_triton, "AUTO_ON_INTERPRETER", ON_CPU)
    selfcheck.reset()
    torch.manual_seed(0)
    model = tiny_model("llama", hidden_size=128, intermediate_size=344, num_attention_heads=4).to(DEVICE)
    ids = torch.randint(7, 256, (2, 61), device=DEVICE)

    def logits_and_grads():
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    before = logits_and_grads()
    report = optimize(model, swaps=("rms_norm", "mlp", "attention"))  # impl="auto"
    assert report.swapped == {"rms_norm": 5, "mlp": 2, "attention": 2}
    after = logits_and_grads()
    checked = {r.op: r.passed for r in selfcheck.results()}
    assert checked == {"rms_norm": True, "glu": True, "apply_rope": True}, selfcheck.results()
    torch.testing.assert_close(after[0], before[0], atol=1e-4, rtol=1e-4)
    for name, grad in before[1].items():
        torch.testing.assert_close(after[1][name], grad, atol=1e-4, rtol=1e-3, msg=name)
    selfcheck.reset()
