"""Checkpointing and offload give the same gradients as a plain backward; the offload hooks run;
the auto policy picks from the memory estimate."""

import logging

import pytest
import torch

from tests.tiny import tiny_model
from tunesmith.ops.offload import (
    OffloadActivations,
    apply_memory_policy,
    choose_memory_policy,
    estimate_activation_bytes,
)

INPUT_IDS = torch.tensor([[7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25]])


def _grads(model):
    model.zero_grad()
    torch.manual_seed(11)  # the same dropout masks in every run
    loss = model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("policy", ["checkpoint", "offload"])
def test_full_finetuning_grads_identical(policy):
    model = tiny_model("llama").train()
    loss, grads = _grads(model)
    handle = apply_memory_policy(model, policy, min_offload_bytes=0)
    assert handle.layers == 2
    calls = []
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    loss2, grads2 = _grads(model)
    hook.remove()
    assert len(calls) == 2  # the layer ran in forward and again (recomputed) in backward
    # recomputation runs the same ops on the same inputs: bit-identical
    assert torch.equal(loss2, loss) and grads2.keys() == grads.keys()
    assert all(torch.equal(grads2[n], grads[n]) for n in grads)
    if policy == "offload":
        hooks = handle.checkpoint_function.hooks
        # one saved tensor per decoder layer (its input), packed in forward, unpacked in backward
        assert (hooks.packed, hooks.unpacked) == (2, 2)
    handle.remove()
    assert all(not layer.gradient_checkpointing for layer in model.model.layers)


def test_offload_with_lora_dropout_and_frozen_embeddings():
    # the layer input does not require grad (frozen embeddings): the LoRA weights inside the
    # checkpointed layers must still get gradients, and dropout must replay the same masks
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.5, init_lora_weights=False)
    model = get_peft_model(tiny_model("qwen2"), config).train()
    loss, grads = _grads(model)
    assert len(grads) == 2 * 7 * 2  # lora A and B of 7 linears in 2 layers
    handle = apply_memory_policy(model, "offload", min_offload_bytes=0)
    loss2, grads2 = _grads(model)
    assert torch.equal(loss2, loss)
    assert grads2.keys() == grads.keys() and all(torch.equal(grads2[n], grads[n]) for n in grads)
    handle.remove()


def test_offload_context_runs_hooks_around_any_code():
    x = torch.randn(64, 64, requires_grad=True)
    with OffloadActivations(min_bytes=0) as hooks:
        y = (x.sin() * x).sum()  # sin saves x; mul saves sin(x) and x
    y.backward()
    assert hooks.packed == 3 and hooks.unpacked == 3
    torch.testing.assert_close(x.grad, x.detach().cos() * x.detach() + x.detach().sin())
    assert hooks.offloaded_bytes == 0  # CPU tensors are already in host memory


def test_auto_policy_on_made_up_memory(caplog):
    model = tiny_model("llama")  # 2 layers, hidden 64, fp32
    need = estimate_activation_bytes(model, 1000)
    # one layer input: 1000 tokens * 64 * 4 bytes = 256,000; x20 per layer without checkpointing, x2
    # with (the input and the attention output)
    assert need == {
        "none": 2 * 20 * 256_000,
        "checkpoint": 2 * 2 * 256_000 + 20 * 256_000,
        "offload": 21 * 256_000,
    }
    # budget is 70% of free memory: 100 MB fits 10.24 MB; 10 MB (7 MB budget) fits only 5.63 MB
    assert choose_memory_policy(model, 1000, "cuda", free_bytes=100_000_000) == "none"
    assert choose_memory_policy(model, 1000, "cuda", free_bytes=10_000_000) == "checkpoint"
    with caplog.at_level(logging.INFO, logger="tunesmith.ops.offload"):
        assert choose_memory_policy(model, 1000, "cuda", free_bytes=5_000_000) == "offload"
    assert "memory policy: offload" in caplog.records[-1].message
    # on the CPU there is nowhere to offload to
    assert choose_memory_policy(model, 1000, "cpu", free_bytes=5_000_000) == "checkpoint"


def test_auto_needs_batch_tokens():
    with pytest.raises(ValueError, match="batch_tokens"):
        apply_memory_policy(tiny_model("llama"), "auto")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_moves_layer_inputs_to_host():
    model = tiny_model("llama").cuda().train()
    ids = INPUT_IDS.cuda()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    handle = apply_memory_policy(model, "offload", min_offload_bytes=0)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    hooks = handle.checkpoint_function.hooks
    assert hooks.offloaded_bytes == 2 * 12 * 64 * 4  # two layer inputs of 12 tokens x 64 fp32
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n])


def test_auto_plans_checkpointed_layers_per_micro_batch():
    model = tiny_model("llama")  # 2 layers, hidden 64, fp32: one layer input = tokens * 256 bytes
    # budget 1,000,000 bytes. Without checkpointing a batch needs 2 * 20 * 256 * tokens bytes:
    #   50 tokens -> 512,000: fits, no layer checkpointed;
    #   150 tokens -> 1,536,000: k = ceil((1,536,000 - 1,000,000) / ((20 - 2) * 38,400)) = 1;
    #   1,000 tokens -> 10,240,000: k = 13 capped at the 2 layers there are.
    handle = apply_memory_policy(model, "auto", batch_tokens=1000, device="cpu", activation_budget=1_000_000)
    assert (
        handle.policy == "auto" and handle.budget_bytes == 1_000_000 and handle.bytes_per_token_layer == 256
    )
    layers = [layer for layer, *_ in handle._previous]
    assert [layer.gradient_checkpointing for layer in layers] == [False, False]
    assert handle.plan(50) == 0 and [layer.gradient_checkpointing for layer in layers] == [False, False]
    assert handle.plan(150) == 1 and [layer.gradient_checkpointing for layer in layers] == [True, False]
    assert handle.plan(1000) == 2 and [layer.gradient_checkpointing for layer in layers] == [True, True]
    assert handle.planned == {"batches": 3, "checkpointed": 2, "layer_steps": 3}
    handle.remove()
    assert [layer.gradient_checkpointing for layer in layers] == [False, False]


def test_auto_plan_gives_the_same_gradients():
    # whatever plan() picks, gradients are those of the plain model (checkpointing recomputes exactly)
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    grads = []
    for budget in (None, 1):  # no policy at all, then a budget so small every layer is checkpointed
        model = tiny_model("llama").train()
        if budget is not None:
            handle = apply_memory_policy(
                model, "auto", batch_tokens=40, device="cpu", activation_budget=budget
            )
            assert handle.plan(40) == 2
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


@pytest.mark.parametrize(
    "keep, from_tokens, runs_per_layer",
    [(True, 6, 1), (True, 7, 2), (False, 6, 2)],  # the rows here have 6 tokens
)
def test_checkpointed_layers_keep_the_attention_kernel_output(monkeypatch, keep, from_tokens, runs_per_layer):
    # selective checkpointing (offload._keep_attention): backward recomputes a checkpointed layer
    # but replays its fused attention kernel's saved output, so the kernel runs once per layer;
    # twice when KEEP_ATTENTION is off or the rows are shorter than KEEP_ATTENTION_FROM_TOKENS.
    # Gradients are the same bit for bit either way
    from torch.utils._python_dispatch import TorchDispatchMode

    import tunesmith.ops.offload as offload

    class CountAttention(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func in offload._attention_ops()
            return func(*args, **(kwargs or {}))

    model = tiny_model("llama").train()
    model.set_attn_implementation("sdpa")  # no mask for one unpadded row: sdpa's fused CPU kernel
    loss, grads = _grads(model)
    monkeypatch.setattr(offload, "KEEP_ATTENTION", keep)
    monkeypatch.setattr(offload, "KEEP_ATTENTION_FROM_TOKENS", from_tokens)
    apply_memory_policy(model, "checkpoint")
    with CountAttention() as counter:
        loss2, grads2 = _grads(model)
    layers = 2
    assert counter.calls == runs_per_layer * layers
    assert torch.equal(loss2, loss) and all(torch.equal(grads2[n], grads[n]) for n in grads)
