"""models.fast.FastLanguageModel: the seeds' Unsloth loader lines run unchanged (model name aside) on a CPU."""

import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny import tiny_model, tiny_tokenizer
from tunesmith import FastLanguageModel
from tunesmith.common import reset_once
from tunesmith.models.fast import max_seq_length_of

IDS = torch.tensor([[1, 10, 20, 30, 2]])


@pytest.fixture(scope="module")
def model_name(tmp_path_factory):
    """A tiny Llama folder standing in for "unsloth/Llama-3.2-1B-Instruct" (no Hub here)."""
    folder = tmp_path_factory.mktemp("tiny-llama-instruct")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reset_once("fast")


def lora_targets(model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return sorted(
        n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)
    )


def test_seed_001_basic_lines_run_on_a_cpu(model_name, no_cuda):
    # from the Unsloth seed page: load_in_4bit=True must not stop a CPU-only machine
    with pytest.warns(UserWarning, match="needs a CUDA GPU.*loading the model in 16-bit"):
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=model_name,
            max_seq_length=2048,
            load_in_4bit=True,
        )
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype in (torch.bfloat16, torch.float32)  # whatever dtype "auto" picks on this CPU
    assert (model.max_seq_length, max_seq_length_of(model), tokenizer.model_max_length) == (2048, 2048, 2048)
    assert tokenizer.chat_template is not None and tokenizer.pad_token == "<pad>"

    model = FastLanguageModel.get_peft_model(model, r=16)
    assert isinstance(model, PeftModel)
    # target_modules=None: every decoder linear (Unsloth's seven projections on Llama), two layers
    assert len(lora_targets(model)) == 14 and "lm_head" not in " ".join(lora_targets(model))
    assert model.peft_config["default"].r == 16 and model.peft_config["default"].lora_alpha == 16
    # the trainer reads max_seq_length through the PeftModel
    assert (model.max_seq_length, max_seq_length_of(model)) == (2048, 2048)
    # use_gradient_checkpointing defaults to "unsloth", as in Unsloth: plain checkpointing here
    assert model.base_model.model.is_gradient_checkpointing


def test_the_cpu_fallback_warns_once(model_name, no_cuda):
    with pytest.warns(UserWarning):
        FastLanguageModel.from_pretrained(model_name, load_in_4bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FastLanguageModel.from_pretrained(model_name, load_in_4bit=True)


def test_seed_001_embedding_lines_train_embed_tokens_and_lm_head(model_name, no_cuda):
    with pytest.warns(UserWarning):
        model, _ = FastLanguageModel.from_pretrained(
            model_name=model_name, max_seq_length=2048, load_in_4bit=True
        )
    model = FastLanguageModel.get_peft_model(model, r=16, modules_to_save=["embed_tokens", "lm_head"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.model.embed_tokens.modules_to_save.default.weight" in trained
    assert "base_model.model.lm_head.modules_to_save.default.weight" in trained


def test_embeddings_in_target_modules_are_trained_in_full(model_name):
    model, _ = FastLanguageModel.from_pretrained(model_name, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(
        model,
        r=8,
        target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"],
        use_gradient_checkpointing=False,
    )
    assert lora_targets(model) == [
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    ]
    assert sorted(model.peft_config["default"].modules_to_save) == ["embed_tokens", "lm_head"]
    assert not model.base_model.model.is_gradient_checkpointing


def test_random_state_fixes_the_adapter_initialisation(model_name):
    def lora_a(seed):
        model, _ = FastLanguageModel.from_pretrained(model_name, dtype="fp32")
        peft_model = FastLanguageModel.get_peft_model(
            model, r=4, target_modules=["q_proj"], random_state=seed
        )
        return (
            peft_model.base_model.model.model.layers[0]
            .self_attn.q_proj.lora_A["default"]
            .weight.detach()
            .clone()
        )

    first, again, other = lora_a(3407), lora_a(3407), lora_a(1)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)


def test_full_finetuning_loads_16_bit_and_trains_every_weight(model_name, no_cuda):
    model, _ = FastLanguageModel.from_pretrained(
        model_name, load_in_4bit=True, full_finetuning=True, dtype="fp32"
    )
    assert all(p.requires_grad for p in model.parameters())


def test_for_inference_and_for_training(model_name):
    model, tokenizer = FastLanguageModel.from_pretrained(model_name, dtype="fp32")
    model = FastLanguageModel.for_training(model)
    assert model.training and model.config.use_cache is False
    model = FastLanguageModel.for_inference(model)
    assert not model.training and model.config.use_cache is True
    out = model.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, 8)


def test_seed_000_loader_lines_load_the_same_folder(model_name):
    # the TRL tutorial's lines are plain transformers; our loader must give the same model from the same folder
    tokenizer = AutoTokenizer.from_pretrained(model_name, use_fast=True)
    model = AutoModelForCausalLM.from_pretrained(model_name, torch_dtype="auto")
    ours, our_tokenizer = FastLanguageModel.from_pretrained(model_name, dtype=model.dtype)
    assert tokenizer("hello world .").input_ids == our_tokenizer("hello world .").input_ids == [120, 206, 20]
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_unsloth_helpers(monkeypatch):
    from tunesmith.models.fast import FastModel, is_bfloat16_supported

    assert FastModel is FastLanguageModel
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert is_bfloat16_supported() is False  # a pre-Ampere GPU: fp16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert is_bfloat16_supported() is True
