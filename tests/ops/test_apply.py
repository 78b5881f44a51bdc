"""optimize(): swaps are counted, exact (logits and gradients unchanged), reversible, and work on
PEFT LoRA models; unknown architectures run unchanged with one log line."""

import logging
import os

import pytest
import torch

# Without CUDA, Triton runs only under its interpreter, switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.tiny import ARCHS, tiny_model  # noqa: E402
from tunesmith.ops._triton import interpreter_ready  # noqa: E402
from tunesmith.ops.apply import KERNEL_KINDS, optimize, optimized_kinds, unoptimize  # noqa: E402
from tunesmith.ops.rms_norm import RMSNorm  # noqa: E402
from tunesmith.ops.swiglu import GatedMLP  # noqa: E402

INPUT_IDS = torch.tensor([[7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23, 24, 0, 0]])
ATTENTION_MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])


def _logits_and_grads(model):
    model.zero_grad()
    out = model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, labels=INPUT_IDS)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _expected_counts(model):
    # counted from transformers' own class names, independently of optimize()'s tables
    names = [type(m).__name__ for m in model.modules()]
    return {
        "rms_norm": sum(n.endswith("RMSNorm") for n in names),
        "mlp": sum(n.endswith("MLP") for n in names),
        "attention": sum(n.endswith("Attention") for n in names),
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_swaps_leave_logits_and_grads_bit_identical_and_are_reversible(arch):
    model = tiny_model(arch)
    before = _logits_and_grads(model)
    expected = _expected_counts(model)
    classes = [type(m) for m in model.modules()]
    keys = list(model.state_dict())
    params = dict(model.named_parameters())

    report = optimize(model, impl="reference", swaps=KERNEL_KINDS)

    # 2 layers: 2 MLPs, 2 attentions; 5 norms (2 per layer + final), more for Gemma2 and q/k norms
    assert dict(report.swapped) == expected == dict(optimized_kinds(model))
    assert expected["mlp"] == 2 and expected["attention"] == 2 and expected["rms_norm"] >= 5
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    after = _logits_and_grads(model)
    # the reference path runs the very same torch ops in the same order: bit-identical
    assert torch.equal(after[0], before[0])
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][n], before[1][n]) for n in before[1])

    assert optimize(model, impl="reference", swaps=KERNEL_KINDS).total == 0  # already swapped
    assert unoptimize(model) == sum(expected.values())
    assert [type(m) for m in model.modules()] == classes
    assert torch.equal(_logits_and_grads(model)[0], before[0])


@pytest.mark.parametrize("arch", ["llama", "gemma", "qwen3", "phi3"])
def test_triton_swaps_match_under_the_interpreter(arch):
    pytest.importorskip("triton")
    if not interpreter_ready():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run with TRITON_INTERPRET=1")
    model = tiny_model(arch)
    before = _logits_and_grads(model)
    optimize(model, impl="triton", swaps=KERNEL_KINDS)
    after = _logits_and_grads(model)
    # fp32 kernels round differently from the torch ops (one rounding per fused op): ~1e-6
    torch.testing.assert_close(after[0], before[0], atol=1e-4, rtol=1e-4)
    for name, grad in before[1].items():
        torch.testing.assert_close(after[1][name], grad, atol=1e-4, rtol=1e-3, msg=name)


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)


@pytest.mark.parametrize("order", ["lora_then_optimize", "optimize_then_lora"])
def test_peft_lora_model(order):
    reference = _lora(tiny_model("llama"))
    before = _logits_and_grads(reference)
    if order == "lora_then_optimize":
        model = _lora(tiny_model("llama"))
        report = optimize(model, impl="reference", swaps=KERNEL_KINDS)
        assert dict(report.swapped) == {"rms_norm": 5, "mlp": 2, "attention": 2}
    else:
        base = tiny_model("llama")
        optimize(base, impl="reference", swaps=KERNEL_KINDS)
        model = _lora(base)
    mlp = model.base_model.model.model.layers[0].mlp
    assert isinstance(mlp, GatedMLP) and type(mlp.gate_proj).__name__ == "Linear"  # peft's lora.Linear
    assert hasattr(mlp.gate_proj, "lora_A")
    after = _logits_and_grads(model)
    assert torch.equal(after[0], before[0])
    lora_grads = [n for n in before[1] if "lora_" in n]
    assert len(lora_grads) == 2 * 7 * 2  # A and B for 7 linears in each of 2 layers
    assert all(torch.equal(after[1][n], before[1][n]) for n in lora_grads)
    # unoptimize keeps the LoRA layers that now sit in the original modules
    assert unoptimize(model) == 9
    mlp = model.base_model.model.model.layers[0].mlp
    assert type(mlp).__name__ == "LlamaMLP" and hasattr(mlp.gate_proj, "lora_A")
    assert torch.equal(_logits_and_grads(model)[0], before[0])


def test_generation_with_cache_is_unchanged():
    # the swapped attention goes through the KV cache like the original
    model = tiny_model("qwen3")
    prompt = INPUT_IDS[:1]
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    optimize(model, impl="reference", swaps=KERNEL_KINDS)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), expected)


def test_default_on_cpu_swaps_every_kind_and_logs_it(caplog):
    model = tiny_model("llama")  # no LoRA layers: norms, MLPs and attentions
    with caplog.at_level(logging.INFO, logger="tunesmith.ops.apply"):
        report = optimize(model)
    expected = {"rms_norm": 5, "mlp": 2, "attention": 2}
    assert report.swapped == expected and optimized_kinds(model) == expected
    assert report.skipped == {}
    assert any("swapped 2 attention, 2 mlp, 5 rms_norm" in r.getMessage() for r in caplog.records), (
        caplog.text
    )


def test_unknown_architecture_runs_unchanged_with_one_log_line(caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(
            n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
        )
    )
    with caplog.at_level(logging.INFO, logger="tunesmith.ops.apply"):
        report = optimize(model, swaps=KERNEL_KINDS)
    assert report.total == 0 and "gpt2" in str(report)
    ours = [r.message for r in caplog.records if r.name == "tunesmith.ops.apply"]
    assert ours == ["optimize: gpt2 is not a known architecture; the model runs unchanged"]


def test_swapped_norm_holds_the_same_parameter():
    model = tiny_model("gemma")
    weight = model.model.norm.weight
    optimize(model, impl="reference", swaps=("rms_norm",))
    norm = model.model.norm
    assert (
        isinstance(norm, RMSNorm) and norm.weight is weight and norm.offset == 1.0 and norm.casting == "gemma"
    )


def test_mlp_with_an_activation_we_have_no_kernel_for_is_left_alone():
    model = tiny_model("llama", hidden_act="relu")
    report = optimize(model, impl="reference", swaps=KERNEL_KINDS)
    assert report.swapped["mlp"] == 0 and report.swapped["rms_norm"] == 5
    assert report.skipped == {"LlamaMLP": "activation ReLU has no fused kernel"}
    assert str(report).splitlines() == [
        "optimize(llama on cpu, impl=reference): swapped 2 attention, 5 rms_norm",
        "  left unchanged: LlamaMLP: activation ReLU has no fused kernel",
    ]


def test_rope_is_still_accepted_as_the_attention_swap():
    # "rope" was the attention swap's name before it was named for what it replaces
    model = tiny_model("llama")
    report = optimize(model, impl="reference", swaps=("rope",))
    assert report.swapped == {"attention": 2} and optimized_kinds(model) == {"attention": 2}
    assert optimize(model, impl="reference", swaps=("rope", "attention")).total == 0  # already swapped
