"""models.adapters: LoRA targets, dtypes under LoRA, parameter groups, the trainable summary."""

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer

from tests.tiny import tiny_model
from tunesmith.models.adapters import apply_lora, parameter_groups, trainable_summary


def lora_module_names(model) -> list[str]:
    return sorted(
        n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)
    )


LLAMA_LIKE_TARGETS = [
    f"model.layers.{i}.{name}"
    for i in (0, 1)
    for name in (
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    )
]
# Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj.
PHI3_TARGETS = [
    f"model.layers.{i}.{name}"
    for i in (0, 1)
    for name in ("mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj")
]


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("llama", LLAMA_LIKE_TARGETS),
        ("qwen2", LLAMA_LIKE_TARGETS),
        ("gemma", LLAMA_LIKE_TARGETS),
        ("phi3", PHI3_TARGETS),
    ],
)
def test_default_targets_are_every_decoder_linear_and_never_the_lm_head(arch, expected):
    model = apply_lora(tiny_model(arch))
    assert isinstance(model, PeftModel)
    assert lora_module_names(model) == expected


def test_lora_alpha_defaults_to_r_and_a_dict_config_is_accepted():
    model = apply_lora(tiny_model("llama"), {"r": 4, "target_modules": ["q_proj"]})
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.task_type) == (4, 4, "CAUSAL_LM")
    assert lora_module_names(model) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_a_lora_config_is_used_as_given():
    # the seed tutorial's LoraConfig has no target_modules: PEFT's own default for Llama (q_proj, v_proj)
    # applies, exactly as in TRL, so a TRL user gets the same model
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    model = apply_lora(tiny_model("llama"), config)
    assert lora_module_names(model) == [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    ]


def test_frozen_base_stays_bf16_and_trained_weights_are_fp32():
    model = apply_lora(tiny_model("llama", dtype=torch.bfloat16), modules_to_save=["lm_head"])
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16}
    assert set(trained.values()) == {torch.float32}
    assert "base_model.model.lm_head.modules_to_save.default.weight" in trained
    # the fp32 LM head copy still takes the bf16 hidden states and gives fp32 logits
    out = model(torch.tensor([[1, 7, 9]])).logits
    assert out.dtype == torch.float32 and out.shape == (1, 3, 256)


def test_tied_embeddings_trained_in_full_stay_one_tensor():
    # Gemma ties lm_head to embed_tokens: training both must train one shared matrix, not two copies
    model = apply_lora(
        tiny_model("gemma", dtype=torch.bfloat16),
        target_modules=["q_proj"],
        modules_to_save=["embed_tokens", "lm_head"],
    )
    inner = model.base_model.model
    embed = inner.model.embed_tokens.modules_to_save["default"]
    head = inner.lm_head.modules_to_save["default"]
    assert embed.weight is head.weight and embed.weight.dtype == torch.float32
    # the embedding copy hands the bf16 model bf16 activations
    assert embed(torch.tensor([[1, 2]])).dtype == torch.bfloat16


def test_a_kbit_model_is_prepared_without_upcasting():
    model = tiny_model("llama", dtype=torch.bfloat16)
    model.is_loaded_in_4bit = True  # what bitsandbytes loading sets; the preparation only reads the flag
    peft_model = apply_lora(model, target_modules=["v_proj"])
    assert {p.dtype for p in peft_model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert sorted(n for n, p in peft_model.named_parameters() if p.requires_grad) == [
        f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_{ab}.default.weight"
        for i in (0, 1)
        for ab in "AB"
    ]


# --------------------------------------------------------------------------- parameter groups


def groups_by_name(groups):
    return {g["name"]: (g["lr"], g["weight_decay"], g["param_names"]) for g in groups}


LAYER_MATRICES = [
    f"model.layers.{i}.{name}.weight"
    for i in (0, 1)
    for name in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]
NORMS = [
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.post_attention_layernorm.weight",
    "model.norm.weight",
]


def test_full_finetuning_groups_with_an_embedding_learning_rate():
    groups = groups_by_name(
        parameter_groups(
            tiny_model("llama"), learning_rate=1e-4, weight_decay=0.1, embedding_learning_rate=1e-5
        )
    )
    assert list(groups) == ["decay", "no_decay", "embedding"]
    assert groups["decay"] == (1e-4, 0.1, LAYER_MATRICES)
    assert groups["no_decay"][:2] == (1e-4, 0.0) and sorted(groups["no_decay"][2]) == NORMS
    # embeddings keep weight decay (as transformers' Trainer and Unsloth do), at their own learning rate
    assert groups["embedding"] == (1e-5, 0.1, ["model.embed_tokens.weight", "lm_head.weight"])


def test_without_embedding_learning_rate_embeddings_are_ordinary_weights():
    groups = groups_by_name(parameter_groups(tiny_model("llama"), learning_rate=1e-4, weight_decay=0.1))
    assert list(groups) == ["decay", "no_decay"]
    assert groups["decay"][2] == ["model.embed_tokens.weight", *LAYER_MATRICES, "lm_head.weight"]


def test_lora_groups_with_biases_and_modules_to_save():
    # Qwen2 has q/k/v biases; bias="all" trains them, and they must get no weight decay
    model = apply_lora(
        tiny_model("qwen2"),
        target_modules=["q_proj"],
        bias="all",
        modules_to_save=["embed_tokens", "lm_head"],
    )
    groups = groups_by_name(
        parameter_groups(model, learning_rate=2e-4, weight_decay=0.01, embedding_learning_rate=5e-5)
    )
    prefix = "base_model.model."
    assert groups["decay"] == (
        2e-4,
        0.01,
        [
            f"{prefix}model.layers.{i}.self_attn.q_proj.lora_{ab}.default.weight"
            for i in (0, 1)
            for ab in "AB"
        ],
    )
    assert groups["no_decay"] == (
        2e-4,
        0.0,
        # q_proj is wrapped by LoRA, so its bias lives in base_layer; k and v are untouched
        [
            f"{prefix}model.layers.{i}.self_attn.{p}"
            for i in (0, 1)
            for p in ("q_proj.base_layer.bias", "k_proj.bias", "v_proj.bias")
        ],
    )
    assert groups["embedding"] == (
        5e-5,
        0.01,
        [
            f"{prefix}model.embed_tokens.modules_to_save.default.weight",
            f"{prefix}lm_head.modules_to_save.default.weight",
        ],
    )


def test_groups_build_an_optimizer_that_keeps_names():
    model = tiny_model("llama")
    optimizer = torch.optim.AdamW(
        parameter_groups(model, learning_rate=1e-3, weight_decay=0.1, embedding_learning_rate=1e-4)
    )
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay", "embedding"]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


# --------------------------------------------------------------------------- summary


def test_trainable_summary_counts_lora_weights():
    # r=16 per layer: q,o 16*(64+64); k,v 16*(64+32); gate,up,down 16*(64+128) -> 16,384; two layers 32,768.
    # the tiny Llama has 106,816 weights, so 32,768 / 139,584 = 23.5%
    assert trainable_summary(apply_lora(tiny_model("llama"))) == "trainable 32.8K / 139.6K (23.5%)"
    assert trainable_summary(tiny_model("llama")) == "trainable 106.8K / 106.8K (100.0%)"
