"""merge_adapter and export_gguf on a tiny Llama whose tokenizer is built here (no downloads)."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.tiny import CHATML_TEMPLATE, tiny_bpe_tokenizer
from tunesmith.export import ExportError, export_gguf, merge_adapter, permute_for_gguf
from tunesmith.export.gguf_file import encode_tensor

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


def test_gguf_tensor_names_come_from_the_gguf_packages_map():
    from tests.tiny import tiny_model
    from tunesmith.export.gguf_arch import convert_tensors, family_of

    model = tiny_model("llama")
    names = [name for name, _ in convert_tensors(model.state_dict(), model.config, family_of("llama"))]
    assert names[:2] == ["token_embd.weight", "blk.0.attn_q.weight"]  # state-dict order
    assert "blk.1.ffn_down.weight" in names and "output_norm.weight" in names
    with pytest.raises(ExportError, match="no GGUF name"):
        list(
            convert_tensors(
                {"model.layers.0.self_attn.q_norm.weight": torch.ones(4)}, model.config, family_of("llama")
            )
        )


def test_permute_interleaves_the_two_rotary_halves_per_head():
    # two heads of 4 dims: rows [0 1 | 2 3] [4 5 | 6 7] -> [0 2 1 3] [4 6 5 7]
    rows = permute_for_gguf(np.arange(8).reshape(8, 1), 2)[:, 0]
    assert rows.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_tensor_types_follow_llama_cpps_layout():
    from gguf import GGMLQuantizationType as Q

    x = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
    assert encode_tensor("blk.0.attn_norm.weight", x[0], "q4_0")[1] == Q.F32  # 1-D stays float32
    packed, qtype = encode_tensor("blk.0.attn_q.weight", x, "q8_0")
    assert qtype == Q.Q8_0 and packed.shape == (3, 68)  # 2 blocks of (2-byte scale + 32 int8)
    assert encode_tensor("blk.0.attn_q.weight", x, "q4_0")[0].shape == (3, 36)  # 2 x (2 + 16 bytes)
    # rows that are not whole blocks fall back to f16, as llama.cpp's converter does
    assert encode_tensor("blk.0.attn_q.weight", x[:, :48], "q5_1")[1] == Q.F16
    # the output projection keeps 8 bits in the 4/5-bit files
    assert encode_tensor("output.weight", x, "q4_1")[1] == Q.Q8_0
    # q8_0 error per value is at most half a step: max|block| / 127 / 2 (+ fp16 rounding of the scale)
    from gguf import quants

    back = quants.dequantize(packed, Q.Q8_0)
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


def quantized_copy(model, gguf_type):
    """The model with every 2-D weight passed through the GGUF type's quantizer and back, as the file
    stores it (embedding and output at q8_0 in the 4/5-bit types): the logits a correct export of
    `gguf_type` must reproduce up to float32 summation order."""
    import copy

    from gguf import GGMLQuantizationType, quants

    from tunesmith.export.gguf_file import DIRECT_TYPES

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.ndim != 2:
                continue
            kind = gguf_type
            if kind in ("q4_0", "q4_1", "q5_0", "q5_1") and name in (
                "model.embed_tokens.weight",
                "lm_head.weight",
            ):
                kind = "q8_0"
            qtype = GGMLQuantizationType[DIRECT_TYPES[kind][0]]
            w = p.detach().numpy()
            p.copy_(torch.from_numpy(quants.dequantize(quants.quantize(w, qtype), qtype).reshape(w.shape)))
    return rounded


@pytest.mark.parametrize(
    ("gguf_type", "tie"),
    [
        ("f32", False),
        ("f16", False),
        ("bf16", True),
        ("q8_0", False),
        ("q4_0", True),
        ("q4_1", False),
        ("q5_0", False),
        ("q5_1", True),
    ],
)
def test_gguf_round_trip_through_transformers_loader(tmp_path, gguf_type, tie):
    """Every type written by tunesmith, read back by transformers' GGUF loader (which dequantizes with
    the gguf package): logits equal those of the model whose weights went through the same quantizer,
    to 1e-4 of the largest logit. A mis-permuted Q/K or a misplaced tensor gives errors of order 1."""
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

    expected, got = logits(quantized_copy(model, gguf_type), tok), logits(back, tok)
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel < 1e-4, f"{gguf_type}: relative logit error {rel:.2e}"
    if gguf_type not in ("f32", "f16", "bf16"):  # ...and quantizing changed something measurable
        assert (logits(model, tok) - expected).abs().max() / expected.abs().max() > 1e-4


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
    # an architecture llama.cpp runs but tunesmith does not write says so and lists those it writes
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(
        tmp_path / "gpt2"
    )
    build_tokenizer(tmp_path / "gpt2")
    with pytest.raises(
        ExportError, match=r"does not support the 'gpt2' architecture; supported: gemma, gemma2, "
    ):
        export_gguf(tmp_path / "gpt2", tmp_path / "gpt2.gguf")


def test_merge_into_safetensors_shards(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(tmp_path / "base")
    build_llama(tmp_path / "base", tok)
    peft_model = get_peft_model(
        base_without_adapter(tmp_path / "base"),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    merge_adapter(tmp_path / "adapter", tmp_path / "whole", dtype="float32")
    merge_adapter(tmp_path / "adapter", tmp_path / "sharded", dtype="float32", max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "whole", dtype=torch.float32).eval()
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32).eval()
    assert torch.equal(logits(whole, tok), logits(sharded, tok))
    # and the GGUF of a sharded folder holds the same tensors as that of the whole one, byte for byte
    from gguf import GGUFReader

    a = GGUFReader(str(export_gguf(tmp_path / "whole", tmp_path / "a.gguf", type="q8_0"))).tensors
    b = GGUFReader(str(export_gguf(tmp_path / "sharded", tmp_path / "b.gguf", type="q8_0"))).tensors
    assert [(t.name, t.tensor_type, t.data.tobytes()) for t in a] == [
        (t.name, t.tensor_type, t.data.tobytes()) for t in b
    ]
