"""merge_adapter and export_gguf on a tiny Llama whose tokenizer is built here (no downloads)."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.tiny import CHATML_TEMPLATE, tiny_bpe_tokenizer
from tunesmith.export import (
    ExportError,
    export_gguf,
    gguf_tensor_name,
    merge_adapter,
    permute_for_gguf,
    quantize_q8_0,
)

TEXT = "the quick brown fox jumps over the lazy dog; 2021-03-05 <|im_end|>"


def build_tokenizer(folder):
    """A byte-level BPE (gpt2-style, like SmolLM2's) trained on a few sentences: 256 byte tokens,
    ~40 merges and two special tokens."""
    corpus = ["the quick brown fox jumps over the lazy dog"] * 20 + ["2021-03-05"] * 5
    tok = tiny_bpe_tokenizer(corpus, vocab_size=300, pad_token="<|im_end|>")
    tok.save_pretrained(folder)
    return tok


def build_llama(folder, tokenizer, *, tie=False):
    """2 layers, 4 query heads / 2 KV heads of 16 dims (GQA, so Q and K permute differently).
    initializer_range 0.2 makes logits O(1): a wrong permutation then shows as an O(1) error."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms, so a norm written to the wrong tensor is noticed
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def logits(model, tokenizer):
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits.float()


def test_gguf_tensor_names():
    assert gguf_tensor_name("model.layers.12.mlp.down_proj.weight") == "blk.12.ffn_down.weight"
    assert gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    with pytest.raises(ExportError, match="no GGUF name"):
        gguf_tensor_name("model.layers.0.self_attn.q_norm.weight")


def test_permute_interleaves_the_two_rotary_halves_per_head():
    # two heads of 4 dims: rows [0 1 | 2 3] [4 5 | 6 7] -> [0 2 1 3] [4 6 5 7]
    rows = permute_for_gguf(np.arange(8).reshape(8, 1), 2)[:, 0]
    assert rows.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_q8_0_matches_gguf_reference_dequantizer():
    from gguf import GGMLQuantizationType, quants

    x = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
    packed = quantize_q8_0(x)
    assert packed.shape == (3, 68) and packed.dtype == np.uint8  # 2 blocks of (2-byte scale + 32 int8)
    # our bytes must equal gguf's own reference quantizer's, byte for byte
    assert np.array_equal(packed, quants.quantize(x, GGMLQuantizationType.Q8_0))
    back = quants.dequantize(packed, GGMLQuantizationType.Q8_0)
    # error per value is at most half a step: max|block| / 127 / 2 (+ fp16 rounding of the scale)
    step = np.abs(x.reshape(-1, 32)).max(axis=1) / 127
    assert (np.abs(back - x).reshape(-1, 32).max(axis=1) <= step * 0.5 + 1e-3).all()


def rounded_copy(model, dtype, *, only_2d=True):
    """The model with every 2-D weight rounded to `dtype` and back (norms stay float32, as in the
    GGUF file): its logits are what a correct f16/bf16 export must reproduce."""
    import copy

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim == 2 or not only_2d:
                p.copy_(p.to(dtype).float())
    return rounded


@pytest.mark.parametrize(
    ("gguf_type", "tie", "tolerance"),
    # f16 / bf16: equal to the weight-rounded model up to float32 summation order (1e-4).
    # q8_0 (8-bit blocks) has no such reference here: 5e-2 of the largest logit, an error
    # measured at ~1e-2; a mis-permuted Q/K or misplaced tensor gives errors of order 1.
    [("f16", False, 1e-4), ("bf16", True, 1e-4), ("q8_0", False, 5e-2)],
)
def test_gguf_round_trip_through_transformers_loader(tmp_path, gguf_type, tie, tolerance):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = build_tokenizer(tmp_path / "model")
    model = build_llama(tmp_path / "model", tok, tie=tie)
    out = export_gguf(tmp_path / "model", tmp_path / f"model-{gguf_type}.gguf", type=gguf_type)

    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    back_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert back.config.tie_word_embeddings is tie
    assert back_tok(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert back_tok.eos_token == "<|im_end|>"
    assert back_tok.chat_template == CHATML_TEMPLATE

    reference = {"f16": rounded_copy(model, torch.float16), "bf16": rounded_copy(model, torch.bfloat16)}
    expected, got = logits(reference.get(gguf_type, model), tok), logits(back, tok)
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel < tolerance, f"{gguf_type}: relative logit error {rel:.2e}"


def test_merge_adapter_gives_plain_transformers_model(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = build_tokenizer(tmp_path / "base")
    build_llama(tmp_path / "base", tok)
    base = base_without_adapter(tmp_path / "base")  # loaded from disk, so the adapter records its path
    torch.manual_seed(1)
    # init_lora_weights=False: B is random, not zero, so the merge changes the logits
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(tmp_path / "base")

    merge_adapter(tmp_path / "adapter", tmp_path / "merged32", dtype="float32")
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")  # default: bf16
    with safe_open(tmp_path / "merged/model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert not any("lora" in k for k in f.keys())
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == CHATML_TEMPLATE
    merged32 = AutoModelForCausalLM.from_pretrained(tmp_path / "merged32", dtype=torch.float32).eval()
    merged16 = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()

    expected, plain = logits(peft_model.eval(), tok), logits(base_without_adapter(tmp_path / "base"), tok)
    scale = expected.abs().max()
    assert (expected - plain).abs().max() / scale > 0.05  # the adapter matters...
    # ...the float32 merge reproduces base + adapter up to summation order...
    assert (logits(merged32, tok) - expected).abs().max() / scale < 1e-5
    # ...and the bf16 file is exactly that merge rounded once to bf16
    rounded = logits(rounded_copy(merged32, torch.bfloat16, only_2d=False), tok)
    assert (logits(merged16, tok) - rounded).abs().max() / scale < 1e-5

    # export straight from the adapter folder: merged in float32 first, then rounded once to f16
    export_gguf(tmp_path / "adapter", tmp_path / "adapter.gguf", type="f16")
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="adapter.gguf", dtype=torch.float32)
    rounded = logits(rounded_copy(merged32, torch.float16), tok)
    assert (logits(from_gguf.eval(), tok) - rounded).abs().max() / scale < 1e-4


def base_without_adapter(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_merge_and_export_refuse_with_a_reason(tmp_path):
    with pytest.raises(ExportError, match="not a LoRA adapter folder"):
        merge_adapter(tmp_path, tmp_path / "out")
    with pytest.raises(ExportError, match="unknown GGUF type 'q4'"):
        export_gguf(tmp_path, tmp_path / "x.gguf", type="q4")
