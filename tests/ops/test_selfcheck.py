"""Kernels that check themselves (ops.selfcheck), exercised on the CPU through the real "auto" path.

`_triton.AUTO_ON_INTERPRETER` makes "auto" treat CPU tensors as a kernel device while Triton's
interpreter is on, so these tests run what a CUDA device runs: the one-time check against the
reference, the fallback and its one warning. The broken kernels are test doubles: the real
kernel's launch followed by a corrupted output ("wrong"), or a kernel builder that raises as a
failed compile does ("raises").
"""

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from tunesmith.ops import _triton, selfcheck  # noqa: E402
from tunesmith.ops import linear_cross_entropy_chunk as lce_module  # noqa: E402  (holds the loss kernel)
from tunesmith.ops import rms_norm as rms_module  # noqa: E402
from tunesmith.ops import rope as rope_module  # noqa: E402
from tunesmith.ops import swiglu as glu_module  # noqa: E402
from tunesmith.ops.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from tunesmith.ops.selfcheck import KernelMismatch, compare  # noqa: E402

LOGGER = "tunesmith.ops.selfcheck"


@pytest.fixture
def interpret():
    pytest.importorskip("triton")
    if not _triton.interpreter_ready():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1")


@pytest.fixture
def cpu_is_a_kernel_device(interpret, monkeypatch):
    """The test hook: "auto" runs the checked Triton path on CPU tensors (interpreter)."""
    monkeypatch.setattr(_triton, "AUTO_ON_INTERPRETER", True)
    monkeypatch.delenv("TUNESMITH_KERNELS", raising=False)
    selfcheck.reset()
    yield
    selfcheck.reset()


class _Corrupted:
    """A launcher that runs the real kernel, then scales its output tensor (argument `out`) by 1.5."""

    def __init__(self, kernel, out: int, calls: list):
        self.kernel, self.out, self.calls = kernel, out, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(grid)
            self.kernel[grid](*args, **kwargs)
            args[self.out].mul_(1.5)

        return launch


def _break(monkeypatch, module, how: str, calls: list, out: int) -> None:
    """Replace `module._kernels` by a test double: "wrong" (corrupted output) or "raises"."""
    real = module._kernels

    def broken():
        if how == "raises":
            calls.append("build")
            raise RuntimeError("simulated compile error: triton.compiler.errors.CompilationError")
        kernels = real()
        if isinstance(kernels, tuple):  # (forward, backward): corrupt the forward
            return (_Corrupted(kernels[0], out, calls), *kernels[1:])
        return _Corrupted(kernels, out, calls)

    monkeypatch.setattr(module, "_kernels", broken)


# where each op's kernel writes its output: rms_norm / glu forward Y, rope QO, loss LOSS
_OUTPUT_ARG = {rms_module: 2, glu_module: 2, rope_module: 2, lce_module: 3}


# ---------------------------------------------------------------- the comparison itself


def test_compare_accepts_rounding_and_rejects_wrong_values():
    want = torch.linspace(-3, 3, 1000)
    compare("x", want.bfloat16(), want, torch.bfloat16)  # one bf16 rounding: ~2e-3 relative
    with pytest.raises(KernelMismatch, match=r"relative error 5\.0+e-01"):
        compare("x", want * 1.5, want, torch.float32)  # off by half: ||0.5 w|| / ||w|| = 0.5
    with pytest.raises(KernelMismatch, match="non-finite"):
        compare("x", torch.full_like(want, float("nan")), want, torch.float32)
    with pytest.raises(KernelMismatch, match="shape"):
        compare("x", want[:10], want, torch.float32)
    with pytest.raises(KernelMismatch, match="missing"):
        compare("x", None, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_real_kernel_passes_its_check_under_the_interpreter(interpret, dtype):
    # the checks accept the kernels as they are (so a failure on a device means the device differs)
    cpu = torch.device("cpu")
    selfcheck.check_rms_norm(cpu, 40, dtype, dtype, 1e-6, 0.0, "llama")
    selfcheck.check_rms_norm(cpu, 40, dtype, torch.float32, 1e-6, 1.0, "gemma")
    selfcheck.check_glu(cpu, 72, dtype, dtype, "silu", False)
    selfcheck.check_glu(cpu, 72, dtype, dtype, "gelu_tanh", True)
    selfcheck.check_rope(cpu, 4, 2, 16, 16, dtype, dtype, False)
    selfcheck.check_rope(cpu, 3, 1, 24, 16, dtype, torch.float32, True)  # partial rotary, tables
    selfcheck.check_linear_cross_entropy(cpu, 300, dtype, dtype, False, None, False, True, False)
    selfcheck.check_linear_cross_entropy(cpu, 257, dtype, dtype, True, 30.0, True, False, True)


# ---------------------------------------------------------------- kernel_ok: cache, fallback, warning


def test_kernel_ok_runs_each_check_once_and_caches_failures_with_one_warning(caplog):
    selfcheck.reset()
    runs = []

    def failing():
        runs.append(1)
        raise KernelMismatch("output: relative error 5.0e-01 > 1.0e-04 (torch.float32)")

    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert selfcheck.kernel_ok("glu", (64, torch.float32), cpu, failing) is False
        assert selfcheck.kernel_ok("glu", (64, torch.float32), cpu, failing) is False  # cached
        assert selfcheck.kernel_ok("glu", (128, torch.float32), cpu, failing) is False  # new shape class
        assert selfcheck.kernel_ok("rope", (4, 2), cpu, lambda: None) is True
    assert len(runs) == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one per op and device; the second shape class is logged at info
    message = warnings[0].getMessage()
    for part in ("Triton glu kernel", "cpu (Triton interpreter)", f"torch {torch.__version__}", "triton ",
                 "relative error 5.0e-01", "TUNESMITH_KERNELS=off"):  # fmt: skip
        assert part in message, (part, message)
    assert [(r.op, r.passed) for r in selfcheck.results()] == [("glu", False), ("glu", False), ("rope", True)]
    assert selfcheck.results()[0].error.startswith("KernelMismatch: output: relative error")
    selfcheck.reset()


@pytest.mark.parametrize("how", ["wrong", "raises"])
def test_a_broken_rms_norm_kernel_is_replaced_by_the_pytorch_path(
    cpu_is_a_kernel_device, monkeypatch, caplog, how
):
    calls: list = []
    _break(monkeypatch, rms_module, how, calls, _OUTPUT_ARG[rms_module])
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 40, requires_grad=True), torch.randn(40, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        y = rms_norm(x, w, 1e-6)  # impl="auto"
    assert calls, "the check must have run the (broken) kernel"
    n_calls = len(calls)
    y.sum().backward()
    assert len(calls) == n_calls  # the forward and backward of the run itself used no kernel
    # exactly the PyTorch path: the reference forward, bit for bit
    assert torch.equal(y, rms_norm_reference(x, w, 1e-6))
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "rms_norm" in caplog.records[0].getMessage()
    assert ("simulated compile error" if how == "raises" else "relative error") in caplog.records[
        0
    ].getMessage()
    rms_norm(x, w, 1e-6)
    assert len(calls) == n_calls and len(caplog.records) == 1  # cached: no second check, no second warning


def test_a_good_kernel_passes_and_then_runs(cpu_is_a_kernel_device, monkeypatch):
    launches = []
    real = rms_module._kernels

    def counted():
        forward, backward = real()

        class Count:
            def __getitem__(self, grid):
                launches.append(grid)
                return forward[grid]

        return Count(), backward

    monkeypatch.setattr(rms_module, "_kernels", counted)
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 40), torch.randn(40)
    y = rms_norm(x, w, 1e-6)
    # one launch for the check's triton run, one for this call's
    assert len(launches) == 2
    assert [(r.op, r.passed) for r in selfcheck.results()] == [("rms_norm", True)]
    assert selfcheck.results()[0].shape_class == (40, torch.float32, torch.float32, "llama", False)
    torch.testing.assert_close(y, rms_norm(x, w, 1e-6, impl="triton"), atol=0, rtol=0)


def _in_checkpoint(fn, x, w):
    return torch.utils.checkpoint.checkpoint(fn, x, w, use_reentrant=False)


def _under(context):
    def run(fn, x, w):
        with context():
            return fn(x, w)

    return run


@pytest.mark.parametrize(
    "where",
    [_in_checkpoint, _under(torch.autograd.graph.save_on_cpu), _under(torch.no_grad)],
    ids=["activation checkpointing", "saved tensors offloaded", "no_grad (eval)"],
)
def test_the_first_call_may_come_from_inside_checkpointing_offload_or_no_grad(cpu_is_a_kernel_device, where):
    # The check must pass wherever the model first calls the op, and leave the caller's region as it
    # found it: run under checkpointing's saved-tensor hooks, it once saved extra tensors and the
    # backward failed ("A different number of tensors was saved during the original forward and
    # recomputation"). It runs in its own thread, without the caller's thread-local autograd state.
    torch.manual_seed(0)
    x, w = torch.randn(6, 40, requires_grad=True), torch.randn(40, requires_grad=True)
    y = where(lambda x, w: rms_norm(x, w, 1e-6), x, w)
    assert [(r.op, r.passed, r.error) for r in selfcheck.results()] == [("rms_norm", True, None)]
    torch.testing.assert_close(y, rms_norm_reference(x, w, 1e-6), atol=1e-5, rtol=1e-5)
    if y.requires_grad:
        y.sum().backward()  # the checkpoint recomputes: the same tensors are saved again
        expected = torch.autograd.grad(rms_norm_reference(x, w, 1e-6).sum(), (x, w))
        torch.testing.assert_close(x.grad, expected[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w.grad, expected[1], atol=1e-5, rtol=1e-4)


def test_tunesmith_kernels_off_runs_no_kernel_and_no_check(cpu_is_a_kernel_device, monkeypatch):
    calls: list = []
    _break(monkeypatch, rms_module, "raises", calls, 2)
    monkeypatch.setenv("TUNESMITH_KERNELS", "off")
    x, w = torch.randn(4, 40), torch.randn(40)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    assert calls == [] and selfcheck.results() == []


def test_impl_torch_never_runs_a_kernel(cpu_is_a_kernel_device, monkeypatch):
    calls: list = []
    for module in _OUTPUT_ARG:
        _break(monkeypatch, module, "raises", calls, _OUTPUT_ARG[module])
    from tunesmith.ops.rope import apply_rope
    from tunesmith.ops.swiglu import glu

    x = torch.randn(2, 3, 40)
    rms_norm(x, torch.ones(40), impl="torch")
    glu(x, x, impl="torch")
    q = torch.randn(1, 2, 3, 8)
    apply_rope(q, q, torch.ones(1, 3, 8), torch.zeros(1, 3, 8), impl="torch")
    assert calls == [] and selfcheck.results() == []


# ---------------------------------------------------------------- a training run with broken kernels


def _train(tmp_path, name, **overrides):
    from tunesmith import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    args = SFTConfig(
        output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=3, logging_steps=1,
        report_to="none", save_strategy="no", dataset_cache_dir=False, memory_policy="none", bf16=False,
        learning_rate=1e-2, seed=0, **overrides,
    )  # fmt: skip
    data = [{"prompt": f"what is {a} plus {b} ?", "completion": f"{a} and {b} ."} for a, b in
            [("one", "two"), ("two", "three"), ("three", "four"), ("four", "five")]]  # fmt: skip
    trainer = SFTTrainer(
        tiny_model("llama"), args=args, train_dataset=data, processing_class=tiny_tokenizer()
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return losses, weights


@pytest.mark.parametrize(
    "how,memory",
    [("wrong", {}), ("raises", {}), ("wrong", {"gradient_checkpointing": True})],
    ids=["wrong", "raises", "wrong-checkpointed"],
)
def test_training_with_every_kernel_broken_equals_the_pytorch_run(
    cpu_is_a_kernel_device, monkeypatch, caplog, tmp_path, how, memory
):
    # the reference run: triton_kernels=False, the PyTorch versions of every op
    reference_losses, reference_weights = _train(tmp_path, "reference", triton_kernels=False, **memory)
    assert selfcheck.results() == []  # nothing checked: no kernel may run
    calls: list = []
    for module, out in _OUTPUT_ARG.items():
        _break(monkeypatch, module, how, calls, out)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        losses, weights = _train(tmp_path, "broken", **memory)
    # every op was checked (the kernels ran in the checks only), every one failed and fell back
    assert {r.op for r in selfcheck.results()} == {"rms_norm", "glu", "apply_rope", "linear_cross_entropy"}
    assert not any(r.passed for r in selfcheck.results())
    warned = sorted(r.getMessage().split(" kernel failed")[0] for r in caplog.records if r.name == LOGGER)
    assert warned == [
        f"tunesmith: the Triton {op}" for op in ("apply_rope", "glu", "linear_cross_entropy", "rms_norm")
    ]
    # and the run is the reference run, exactly
    assert losses == reference_losses and len(losses) == 3
    assert weights.keys() == reference_weights.keys()
    assert all(torch.equal(weights[n], reference_weights[n]) for n in weights), "weights differ"


def test_training_with_one_wrong_kernel_keeps_the_others(cpu_is_a_kernel_device, monkeypatch, tmp_path):
    reference_losses, _ = _train(tmp_path, "reference", triton_kernels=False)
    calls: list = []
    _break(monkeypatch, glu_module, "wrong", calls, _OUTPUT_ARG[glu_module])
    losses, _ = _train(tmp_path, "one_wrong")
    passed = {r.op: r.passed for r in selfcheck.results()}
    assert passed == {"rms_norm": True, "glu": False, "apply_rope": True, "linear_cross_entropy": True}
    assert len(calls) == 1  # the glu kernel launched once, in its check (forward; backward not corrupted)
    # the other kernels ran in training: fp32 kernels round differently from PyTorch (~1e-6 relative)
    assert losses == pytest.approx(reference_losses, rel=1e-4)


def test_triton_kernels_is_a_config_key_in_the_kernels_section(tmp_path):
    from tunesmith.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("output_dir: out\nkernels: {triton_kernels: off}\n")  # YAML reads `off` as false
    assert load_config(path).triton_kernels is False
    assert load_config(None, ["triton_kernels=false"]).triton_kernels is False
    cfg = load_config(None)
    assert cfg.triton_kernels is True and cfg.to_yaml_dict()["kernels"]["triton_kernels"] is True


def test_a_tunesmith_kernels_value_we_do_not_know_is_an_error(monkeypatch):
    from tunesmith.ops.apply import optimize

    for value in ("off", "OFF", "0", "false", "none"):
        monkeypatch.setenv("TUNESMITH_KERNELS", value)
        assert _triton.kernels_disabled() is True, value
    for value in ("", "on", "auto", "1"):
        monkeypatch.setenv("TUNESMITH_KERNELS", value)
        assert _triton.kernels_disabled() is False, value
    monkeypatch.setenv("TUNESMITH_KERNELS", "of")  # a typo must not mean "on"
    with pytest.raises(ValueError, match="TUNESMITH_KERNELS='of' is not understood: set it to off"):
        optimize(tiny_model("llama"))
