"""The fused LoRA linear against its fp32 reference and against PEFT's own layer."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tunesmith.ops.apply import optimize, unoptimize
from tunesmith.ops.lora import FastLoraLinear, lora_delta, lora_delta_reference

# bf16 keeps 8 bits of mantissa: results are compared relative to their own scale
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(252, 123, 507, 5), (2, 7, 64, 96, 16)])
def test_lora_delta_forward_and_backward_match_reference(dtype, shape):
    *lead, d_in, d_out, r = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, d_in, generator=g).to(dtype)
    a = torch.randn(r, d_in, generator=g) / d_in**0.5  # parameters stay fp32, as PEFT keeps them
    b = torch.randn(d_out, r, generator=g) / r**0.5
    grad = torch.randn(*lead, d_out, generator=g).to(dtype)
    results = []
    for fn in (lora_delta_reference, lora_delta):
        xi, ai, bi = (t.detach().clone().requires_grad_() for t in (x, a, b))
        out = fn(xi, ai, bi, 2.0)
        out.backward(grad)
        results.append((out, xi.grad, ai.grad, bi.grad))
    (ref, *ref_grads), (out, *grads) = results
    assert out.dtype == dtype
    for got, want in zip([out, *grads], [ref, *ref_grads]):
        assert got.dtype == want.dtype  # A and B grads come back in fp32, x's in x's dtype
        scale = want.float().abs().max()
        torch.testing.assert_close(got.float() / scale, want.float() / scale, **TOL[dtype])


def tiny_lora_model(dtype, dropout=0.0):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False
    )
    return get_peft_model(model, lora)


def loss_and_grads(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def relative_error(got, want):
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_swapped_model_matches_peft_exactly_in_fp32():
    model = tiny_lora_model(torch.float32)
    ids = torch.randint(0, 128, (1, 23), generator=torch.Generator().manual_seed(1))
    keys = list(model.state_dict())
    want_logits, want_grads = loss_and_grads(model, ids)

    report = optimize(model, swaps=("lora",))
    # all-linear on 2 Llama layers: q, k, v, o, gate, up, down = 7 per layer
    assert report.swapped == {"lora": 14} and report.skipped == {}
    assert list(model.state_dict()) == keys  # same parameter names: PEFT saving is unchanged
    got_logits, got_grads = loss_and_grads(model, ids)

    torch.testing.assert_close(got_logits, want_logits, **TOL[torch.float32])
    assert got_grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, **TOL[torch.float32])

    assert unoptimize(model) == 14
    assert not any(isinstance(m, FastLoraLinear) for m in model.modules())


def test_swapped_model_in_bf16_is_as_accurate_as_peft():
    # Neither bf16 run is exact; both are compared with an fp32 run of the same weights. Ours may not
    # be worse than PEFT's by more than a factor 2 (or 2% relative error, whichever is larger).
    reference = tiny_lora_model(torch.float32)
    ids = torch.randint(0, 128, (1, 23), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    model = tiny_lora_model(torch.float32)
    model.base_model.model.to(torch.bfloat16)  # base in bf16; LoRA weights back to fp32 as PEFT keeps them
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    peft_logits, peft_grads = loss_and_grads(model, ids)
    optimize(model, swaps=("lora",))
    ours_logits, ours_grads = loss_and_grads(model, ids)
    pairs = [(ours_logits, peft_logits, ref_logits)] + [
        (ours_grads[n], peft_grads[n], ref_grads[n]) for n in ref_grads
    ]
    for ours, peft, ref in pairs:
        assert ours.dtype == peft.dtype
        assert relative_error(ours, ref) <= max(2 * relative_error(peft, ref), 0.02)


def test_peft_controls_still_reach_swapped_layers():
    model = tiny_lora_model(torch.float32)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
        lora_logits = model(input_ids=ids).logits
        optimize(model, swaps=("lora",))
        with model.disable_adapter():
            # disabling must still turn the adapters off, i.e. PEFT sees the swapped layers
            torch.testing.assert_close(model(input_ids=ids).logits, base_logits)
        torch.testing.assert_close(model(input_ids=ids).logits, lora_logits, rtol=1e-5, atol=1e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, lora_logits, rtol=1e-4, atol=1e-4)


def test_layers_with_dropout_are_left_to_peft():
    model = tiny_lora_model(torch.float32, dropout=0.1)
    report = optimize(model, swaps=("lora",))
    assert report.swapped == {} and report.skipped == {"lora": "lora_dropout > 0"}


def test_optimize_swaps_lora_layers_on_cpu_by_default_and_unoptimize_restores():
    from tunesmith.ops.apply import DEFAULT_SWAPS, optimized_kinds

    model = tiny_lora_model(torch.float32)
    keys = list(model.state_dict())
    assert set(DEFAULT_SWAPS) == {"lora", "rms_norm", "mlp", "attention"}  # bench/RESULTS.md, "Kernels"
    report = optimize(model)  # the model is on the CPU
    # 14 LoRA linears; 5 norms (2 per layer and the final one); 2 MLPs and 2 attentions
    assert report.swapped == {"lora": 14, "rms_norm": 5, "mlp": 2, "attention": 2}
    assert optimized_kinds(model) == {"lora": 14, "rms_norm": 5, "mlp": 2, "attention": 2}
    assert list(model.state_dict()) == keys
    assert unoptimize(model) == 23
    assert not any(isinstance(m, FastLoraLinear) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lora_linear_forward_and_backward_match_reference(dtype, with_bias):
    # base projection + update in one function: output, grad x, grad A, grad B equal the reference's
    from tunesmith.ops.lora import lora_linear, lora_linear_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 41, 64, generator=g).to(dtype)
    weight = (torch.randn(96, 64, generator=g) / 8).to(dtype)
    bias = torch.randn(96, generator=g).to(dtype) if with_bias else None
    a = torch.randn(8, 64, generator=g) / 8
    b = torch.randn(96, 8, generator=g) / 3
    grad = torch.randn(3, 41, 96, generator=g).to(dtype)
    results = []
    for fn in (lora_linear_reference, lora_linear):
        xi, ai, bi = (t.detach().clone().requires_grad_() for t in (x, a, b))
        out = fn(xi, weight, bias, ai, bi, 2.0)
        out.backward(grad)
        results.append((out, xi.grad, ai.grad, bi.grad))
    (ref, *ref_grads), (out, *grads) = results
    for got, want in zip([out, *grads], [ref, *ref_grads]):
        assert got.dtype == want.dtype and got.shape == want.shape
        scale = want.float().abs().max()
        torch.testing.assert_close(got.float() / scale, want.float() / scale, **TOL[dtype])
    with pytest.raises(ValueError, match="must be frozen"):
        lora_linear(x, weight.clone().requires_grad_(), bias, a, b, 2.0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_stacked_projections_match_peft_and_replace_the_separate_calls(arch):
    # q/k/v (Qwen2: with biases) and gate/up run as one LoRA linear when all are fast LoRA layers;
    # ranks differ per module so the block-diagonal B is not square blocks. Phi-3 already has one
    # qkv_proj and one gate_up_proj: nothing to stack. Logits and all LoRA grads equal PEFT's.
    from peft import LoraConfig, get_peft_model

    from tests.tiny import tiny_model
    from tunesmith.ops.apply import KINDS

    def build():
        torch.manual_seed(3)
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
            rank_pattern={"k_proj": 2, "up_proj": 6},
        )  # fmt: skip
        return get_peft_model(tiny_model(arch), config)

    ids = torch.randint(0, 256, (1, 19), generator=torch.Generator().manual_seed(4))
    want_logits, want_grads = loss_and_grads(build(), ids)
    model = build()
    optimize(model, impl="reference", swaps=KINDS)
    calls = []
    for name, module in model.named_modules():
        if isinstance(module, FastLoraLinear):
            module.register_forward_hook(lambda m, i, o, name=name: calls.append(name.rsplit(".", 1)[-1]))
    got_logits, got_grads = loss_and_grads(model, ids)

    # the stacked projections' own forwards never run; the others' do, once per layer
    alone = ["o_proj", "down_proj"] + (["qkv_proj", "gate_up_proj"] if arch == "phi3" else [])
    assert sorted(calls) == sorted(alone * 2), calls
    torch.testing.assert_close(got_logits, want_logits, **TOL[torch.float32])
    assert got_grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, **TOL[torch.float32], msg=name)

    # all swaps undone, including the LoRA layers inside the swapped MLPs and attentions
    unoptimize(model)
    assert not any(type(m).__name__.startswith(("Fast", "GatedMLP")) for m in model.modules())
    torch.testing.assert_close(loss_and_grads(model, ids)[0], want_logits, **TOL[torch.float32])


def test_projections_fall_back_to_separate_calls_unless_all_are_fast():
    # a plain frozen nn.Linear among them (LoRA on q and v only, PEFT's Llama default): no stacking
    from peft import LoraConfig, get_peft_model

    from tests.tiny import tiny_model
    from tunesmith.ops.lora import lora_projections

    torch.manual_seed(3)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    optimize(model, swaps=("lora",))
    attention = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(1, 5, 64)
    assert lora_projections(x, (attention.q_proj, attention.k_proj, attention.v_proj), {}) is None
    assert len(lora_projections(x, (attention.q_proj, attention.v_proj), {})) == 2
    stacked: dict = {}
    assert len(lora_projections(x, (attention.q_proj, attention.v_proj), stacked)) == 2
    assert stacked["weight"].shape == (64 + 32, 64)
    with model.disable_adapter():
        assert lora_projections(x, (attention.q_proj, attention.v_proj), stacked) is None
    assert stacked == {}  # the copy is not kept while it is not used


def test_stacked_weights_follow_changes_to_the_base_weights():
    # the stacked copy is rebuilt when a base weight is changed in place or replaced
    from tests.tiny import tiny_model
    from tunesmith.ops.lora import lora_projections

    torch.manual_seed(3)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    optimize(model, swaps=("lora",))
    attention = model.base_model.model.model.layers[0].self_attn
    layers, stacked, x = (attention.q_proj, attention.v_proj), {}, torch.randn(1, 5, 64)
    q_weight = attention.q_proj.base_layer.weight
    with torch.no_grad():
        lora_projections(x, layers, stacked)
        q_weight.mul_(2)
        q, v = lora_projections(x, layers, stacked)
        torch.testing.assert_close(q, attention.q_proj(x))
        attention.v_proj.base_layer.weight = torch.nn.Parameter(torch.zeros(32, 64), requires_grad=False)
        q, v = lora_projections(x, layers, stacked)
        torch.testing.assert_close(v, attention.v_proj(x))
        assert torch.equal(stacked["weight"][:64], q_weight) and not stacked["weight"][64:].any()


def test_stacking_keeps_no_second_copy_of_the_frozen_weights():
    # after a forward, each q/k/v and gate/up base weight is the same Parameter, now a slice of the
    # module's stacked tensor: the distinct storages behind the model's parameters and the stacking
    # caches hold exactly the parameters' bytes, as before the forward (a copy would add the
    # stacked projections' bytes: 2 x (64 + 32 + 32) x 64 + 2 x 2 x 128 x 64 fp32 elements here)
    from tests.tiny import tiny_model
    from tunesmith.ops.apply import KINDS

    torch.manual_seed(3)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear"))
    optimize(model, impl="reference", swaps=KINDS)
    params = dict(model.named_parameters())

    def storage_bytes(extra=()):
        seen = {}
        for t in [*params.values(), *extra]:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    before = storage_bytes()
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    model(input_ids=ids).logits.sum().backward()
    layer = model.base_model.model.model.layers[0]
    caches = [m.__dict__.get("_tunesmith_stacked") or m.__dict__.get("_stacked") for m in model.modules()]
    stacked = [c["weight"] for c in caches if c]
    assert len(stacked) == 2 * 2  # q/k/v and gate/up in each of the 2 layers
    assert storage_bytes(stacked) == before
    q = layer.self_attn.q_proj.base_layer.weight
    assert q is params["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert (
        q.untyped_storage().data_ptr()
        == layer.self_attn.k_proj.base_layer.weight.untyped_storage().data_ptr()
    )
    # the state_dict still has every weight with its own values, and saves (disjoint views)
    from safetensors.torch import load, save

    state = {k: v for k, v in model.state_dict().items()}
    loaded = load(save({k: v.contiguous() for k, v in state.items()}))
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


def test_projections_wider_than_the_stacking_limit_run_separately(monkeypatch):
    # above STACK_MAX_IN_FEATURES inputs the projections are not stacked (it does not pay there):
    # None (the caller runs each layer) and nothing cached; the tiny model's 64 inputs are stacked
    # under the default limit
    from tests.tiny import tiny_model
    from tunesmith.ops import lora as lora_ops

    torch.manual_seed(3)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    optimize(model, swaps=("lora",))
    attention = model.base_model.model.model.layers[0].self_attn
    layers, stacked, x = (attention.q_proj, attention.v_proj), {}, torch.randn(1, 5, 64)
    assert lora_ops.STACK_MAX_IN_FEATURES >= 64
    assert lora_ops.lora_projections(x, layers, stacked) is not None and "weight" in stacked
    monkeypatch.setattr(lora_ops, "STACK_MAX_IN_FEATURES", 63)
    assert lora_ops.lora_projections(x, layers, stacked) is None
    assert stacked == {}
