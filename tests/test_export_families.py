"""Every supported family, exported as f32 GGUF and run by llama.cpp: the logits of a 40-token text equal
transformers' to 1e-4 of the largest logit (6e-4 for Gemma, see below) (float32 throughout, KV cache included, so the only
difference is summation order). Tiny random models with random norms and features that change the
result when written wrong: GQA (Q and K permuted differently), sliding windows shorter than the text,
logit soft-capping that bites, rope scaling, Qwen's q/k/v biases, Qwen3's and Gemma 3's q/k norms."""

import numpy as np
import pytest
import torch

from tests.llama_cpp_check import llama_cpp_logits, load, need_llama_cpp, real_texts
from tests.tiny import tiny_bpe_tokenizer, tiny_model
from tunesmith.export import export_gguf

GEMMA_TOLERANCE = 6e-4  # see test_llama_cpp_logits_equal_transformers
TEXT = "def add(a, b):\n    return a + b  # 2021-03-05, (x = 3)"

VARIANTS = {
    "llama": {},
    "llama-rope-llama3": dict(
        arch="llama",
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama-rope-linear": dict(
        arch="llama", rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    ),
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": dict(
        sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=3.0, final_logit_softcapping=2.0
    ),
    "gemma3": dict(
        sliding_window=8,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
        },
    ),
    "phi3": {},
    # long-context rope: Phi-3's per-frequency factors (the text is longer than the original context,
    # so the long factors apply) and Qwen2.5's YaRN
    "phi3-longrope": dict(
        arch="phi3",
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "original_max_position_embeddings": 32,
            "long_factor": [1.0 + 0.5 * i for i in range(8)],
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
        },
    ),
    "qwen2-yarn": dict(
        arch="qwen2",
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
}


def build(folder, variant, **extra):
    """(model, tokenizer as the folder loads it) of `variant`, `extra` config fields on top."""
    overrides = {"initializer_range": 0.2, **VARIANTS[variant], **extra}
    arch = overrides.pop("arch", variant)
    tokenizer = tiny_bpe_tokenizer(real_texts(40), vocab_size=400)
    model = tiny_model(
        arch,
        # more embedding rows than tokens, as in Qwen (151,936 rows, 151,665 tokens): the GGUF fills
        # the rows with placeholders. (Saved under a qwen2 config the tokenizer also gains a token.)
        vocab_size=len(tokenizer) + 8,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        **overrides,
    )
    torch.manual_seed(1)
    with torch.no_grad():  # random norms and biases, so one written to the wrong tensor is noticed
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if arch.startswith("gemma") else 1.0) + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    from transformers import AutoTokenizer

    # as the folder loads (a qwen2 config makes it a Qwen2Tokenizer, with Qwen's split expression)
    return model, AutoTokenizer.from_pretrained(folder)


class Fp16TableGelu(torch.nn.Module):
    """GELU as ggml's CPU backend computes it in float32 graphs: ggml-cpu/vec.h defines
    GGML_GELU_FP16, so the input is rounded to f16 and the answer read from an f16 table (identity
    from 10 up, 0 from -10 down). Gemma's reference uses it, or the comparison would measure ggml's
    table (about 1e-3 of the logits) instead of the export."""

    def forward(self, x):
        table = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


def reference_logits(model, ids):
    import copy

    model = copy.deepcopy(model)
    if model.config.model_type.startswith("gemma"):
        for layer in model.model.layers:
            layer.mlp.act_fn = Fp16TableGelu()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_cpp_logits_equal_transformers(tmp_path, variant):
    need_llama_cpp()
    model, tokenizer = build(tmp_path / "model", variant)
    out = export_gguf(tmp_path / "model", tmp_path / "model.gguf", type="f32")
    ids = tokenizer(TEXT)["input_ids"]
    assert 30 <= len(ids) <= 64, len(ids)
    expected = reference_logits(model, ids)
    llm = load(out, n_ctx=64, logits_all=True)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ids
    got = llama_cpp_logits(llm, ids)
    llm.close()
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    # Gemma: an activation on an f16 rounding boundary of ggml's GELU table may land one f16 step
    # away from the reference's (measured up to 1.02e-4); a misplaced tensor gives O(1)
    # Gemma: ggml's GELU reads an f16 table; measured 1.0e-4 to 3.1e-4 across runs of the suite (thread
    # counts change the order of llama.cpp's sums), so 6e-4; a wrong tensor or rope is ~1e-1
    tolerance = GEMMA_TOLERANCE if variant.startswith("gemma") else 1e-4
    assert rel < tolerance, f"{variant}: relative logit error {rel:.2e}"


@pytest.mark.parametrize("variant", ["qwen3", "gemma3", "phi3"])
def test_export_straight_from_an_adapter_folder(tmp_path, variant):
    """LoRA on every linear layer (random B, so the adapter matters), saved as an adapter folder and
    exported in one call: llama.cpp's logits equal those of base + adapter in transformers."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    need_llama_cpp()
    base, tokenizer = build(tmp_path / "base", variant)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    torch.manual_seed(2)
    peft_model = get_peft_model(loaded, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    out = export_gguf(tmp_path / "adapter", tmp_path / "model.gguf", type="f32")
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32), tmp_path / "adapter"
    ).merge_and_unload()
    ids = tokenizer(TEXT)["input_ids"]
    expected = reference_logits(merged.eval(), ids)
    assert np.abs(expected - reference_logits(base, ids)).max() / np.abs(expected).max() > 0.05
    llm = load(out, n_ctx=64, logits_all=True)
    got = llama_cpp_logits(llm, ids)
    llm.close()
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel < (GEMMA_TOLERANCE if variant.startswith("gemma") else 1e-4), f"{variant}: {rel:.2e}"
