"""Weight-only int8 / int4 quantization of the frozen base (tunesmith.ops.quant) against its references."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tunesmith.ops.apply import optimize
from tunesmith.ops.lora import FastLoraLinear
from tunesmith.ops.quant import (
    INT4_GROUP,
    QuantizedLinear,
    dequantize,
    quantize,
    quantize_model,
    quantized_linear_reference,
)


def reference_int8(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric absmax quantization per row, written out plainly: s = max|w| / 127,
    w ≈ round(w / s) * s. What `dequantize(quantize(w, "int8"))` must give."""
    scale = weight.float().abs().amax(-1, keepdim=True) / 127
    return torch.round(weight.float() / scale).clamp(-127, 127) * scale


def reference_int4(weight: torch.Tensor) -> torch.Tensor:
    """Asymmetric min/max quantization per group of INT4_GROUP inputs: s = (max - min) / 15,
    w ≈ round((w - min) / s) * s + min. What `dequantize(quantize(w, "int4"))` must give."""
    w = weight.float().reshape(weight.shape[0], -1, INT4_GROUP)
    low = w.amin(-1, keepdim=True)
    scale = (w.amax(-1, keepdim=True) - low) / 15
    return (torch.round((w - low) / scale).clamp(0, 15) * scale + low).reshape(weight.shape)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_dequantize_of_quantize_is_the_plain_quantization(fmt):
    weight = torch.randn(10, 128, generator=torch.Generator().manual_seed(0))
    packed, scales = quantize(weight, fmt)
    got = dequantize(packed, scales, fmt, torch.float32)
    if fmt == "int8":  # a byte a weight, one scale per row
        assert (packed.dtype, packed.shape, scales.shape) == (torch.int8, (10, 128), (10, 1))
        want, step = reference_int8(weight), scales
    else:  # two weights a byte (rows i and i + 5 share one), a (scale, minimum) pair per 32 inputs
        assert (packed.dtype, packed.shape, scales.shape) == (torch.uint8, (5, 128), (10, 4, 2))
        want, step = reference_int4(weight), scales[..., 0].repeat_interleave(INT4_GROUP, dim=1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # and the rounding error is at most half a step everywhere
    assert bool(((got - weight).abs() <= step / 2 * (1 + 1e-4) + 1e-6).all())


def test_int4_keeps_the_extreme_codes_of_both_nibbles():
    # codes 0 and 15 in the low and the high nibble of one byte survive packing and unpacking
    weight = torch.zeros(2, INT4_GROUP)
    weight[0, :2] = torch.tensor([15.0, 0.0])
    weight[1, :2] = torch.tensor([0.0, 15.0])
    packed, scales = quantize(weight, "int4")
    assert scales.reshape(-1).tolist() == [1.0, 0.0, 1.0, 0.0]  # (scale, minimum) of each row
    assert packed[0, :2].tolist() == [0x0F, 0xF0]  # row 0 in the low nibble, row 1 in the high one
    assert torch.equal(dequantize(packed, scales, "int4", torch.float32), weight)


def test_quantize_refuses_what_it_cannot_store():
    with pytest.raises(ValueError, match="must be one of"):
        quantize(torch.zeros(4, 64), "nf4")
    with pytest.raises(ValueError, match="int4 needs in_features divisible by 32"):
        quantize(torch.zeros(4, 65), "int4")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_layers_match_the_reference_exactly_forward_and_backward(fmt, dtype):
    # Two layers of one shape share one dequantization buffer; backward through both must still use
    # each layer's own weight (a buffer kept from the forward would give the second layer's to both).
    g = torch.Generator().manual_seed(0)
    first, second = (nn.Linear(128, 128, bias=bias).to(dtype) for bias in (True, False))
    layers = [QuantizedLinear(first, fmt), QuantizedLinear(second, fmt)]
    x = torch.randn(3, 5, 128, generator=g).to(dtype)
    grad = torch.randn(3, 5, 128, generator=g).to(dtype)

    xi = x.clone().requires_grad_()
    out = layers[1](layers[0](xi))
    out.backward(grad)

    xr = x.clone().requires_grad_()
    ref = xr
    for layer in layers:
        ref = quantized_linear_reference(ref, layer.weight, layer.weight_scales, layer.bias, fmt)
    ref.backward(grad)
    assert out.dtype == dtype
    assert torch.equal(out, ref)
    assert torch.equal(xi.grad, xr.grad)
    assert not any(p.requires_grad for layer in layers for p in layer.parameters())


def tiny_llama(dtype):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype)


def dequantized_copy(model):
    """The quantized model with every QuantizedLinear turned back into an nn.Linear holding its
    dequantized weight: the same function, computed the plain way."""
    plain = copy.deepcopy(model)
    for parent in list(plain.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                dtype = child.weight_scales.dtype
                linear.weight.data = dequantize(child.weight, child.weight_scales, child.quant_format, dtype)
                if child.bias is not None:
                    linear.bias.data = child.bias.data.clone()
                setattr(parent, name, linear.requires_grad_(False))
    return plain


def loss_and_grads(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    loss = nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def with_lora(model):
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, lora)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_on_a_quantized_base_equals_lora_on_its_dequantized_weights(fmt, dtype):
    quantized = tiny_llama(dtype)
    # 2 layers x (q, k, v, o, gate, up, down); embeddings and lm_head stay as they are
    assert quantize_model(quantized, fmt) == 14
    assert isinstance(quantized.lm_head, nn.Linear) and not isinstance(quantized.lm_head, QuantizedLinear)
    plain = dequantized_copy(quantized)
    ids = torch.randint(0, 128, (1, 19), generator=torch.Generator().manual_seed(2))

    runs = {}
    for name, base in (("plain", plain), ("quantized", quantized)):
        model = with_lora(base)
        runs[f"{name} peft"] = loss_and_grads(model, ids)
        report = optimize(model, swaps=("lora",))
        assert report.swapped == {"lora": 14}
        runs[f"{name} fast"] = loss_and_grads(model, ids)
    assert all(
        isinstance(m.base_layer, QuantizedLinear) for m in model.modules() if isinstance(m, FastLoraLinear)
    )

    # The same weights and the same order of operations on each side: equal up to float rounding.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for path in ("peft", "fast"):
        want_logits, want_grads = runs[f"plain {path}"]
        got_logits, got_grads = runs[f"quantized {path}"]
        torch.testing.assert_close(got_logits, want_logits, **tol)
        assert got_grads.keys() == want_grads.keys() and len(got_grads) == 28  # A and B of 14 layers
        for name, want in want_grads.items():
            scale = want.abs().max()
            torch.testing.assert_close(got_grads[name] / scale, want / scale, **tol)


@pytest.mark.parametrize("fmt, bytes_per_weight", [("int8", 1.0), ("int4", 0.5)])
def test_quantize_model_stores_the_linear_weights_in_their_format(fmt, bytes_per_weight):
    model = tiny_llama(torch.bfloat16)
    linears = {n: m for n, m in model.model.named_modules() if type(m) is nn.Linear}
    numel = sum(m.weight.numel() for m in linears.values())
    quantize_model(model, fmt)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == len(linears) == 14
    stored = sum(m.weight.untyped_storage().nbytes() for m in layers)
    assert stored == numel * bytes_per_weight
    # one bf16 scale per row (int8), or a bf16 (scale, minimum) pair per 32 inputs of a row (int4)
    scales = sum(m.weight_scales.numel() for m in layers)
    assert scales == (sum(m.out_features for m in layers) if fmt == "int8" else 2 * numel // INT4_GROUP)


def test_the_trainer_quantizes_the_base_and_trains_only_the_adapters(tmp_path):
    from tests.tiny import tiny_tokenizer
    from tunesmith import SFTConfig, SFTTrainer

    tiny_llama(torch.bfloat16).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    rows = [{"prompt": "a b c", "completion": " d e f"}] * 8
    common = dict(
        max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3, report_to=[], save_strategy="no",
        logging_steps=1, model_dtype="bf16",
    )  # fmt: skip
    args = SFTConfig(output_dir=str(tmp_path / "run"), use_peft=True, model_quantization="int8", **common)
    trainer = SFTTrainer(model=str(tmp_path / "model"), args=args, train_dataset=rows)
    layers = [m for m in trainer.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = {id(m): m.weight.clone() for m in layers}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0]  # lr 1e-3 on 8 repeated rows: it learns
    assert all(torch.equal(m.weight, before[id(m)]) for m in layers)  # the base did not move

    full = SFTConfig(output_dir=str(tmp_path / "full"), model_quantization="int4", **common)
    with pytest.raises(ValueError, match="model_quantization='int4' freezes the base weights.*use_peft"):
        SFTTrainer(model=str(tmp_path / "model"), args=full, train_dataset=rows)


def test_int4_stores_shapes_it_cannot_pack_as_int8_and_says_so(caplog):
    model = tiny_llama(torch.float32)
    model.model.layers[0].mlp.down_proj = nn.Linear(128, 64, bias=False)  # fits int4
    model.model.layers[1].mlp.down_proj = nn.Linear(128, 63, bias=False)  # odd rows: int4 cannot pair them
    with caplog.at_level("WARNING", logger="tunesmith.ops.quant"):
        quantize_model(model, "int4")
    formats = {n: m.quant_format for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert formats["model.layers.1.mlp.down_proj"] == "int8"
    assert formats["model.layers.0.mlp.down_proj"] == "int4"
    assert list(formats.values()).count("int8") == 1
    assert "1 of 14 linear layers" in caplog.text
