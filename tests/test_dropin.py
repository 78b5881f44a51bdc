"""Issue 11: what TRL and Unsloth users notice when a script moves over unchanged.

Errors TRL raises at construction, settings that must pass through (`model_init_kwargs`, `Path`
models, `eos_token` that is also the unknown token), `evaluate(eval_dataset=raw)`, the kernel
switches of TRL (`use_liger_kernel`, `use_kernels="liger"`), NEFTune with the fused loss and
pre-tokenized rows with `train_on_inputs`.
"""

import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset

# the suite's pairs, run config and per-test notice reset (an autouse fixture, active here once imported)
from tests.test_trainer import PAIRS, _fresh_notices, config  # noqa: F401
from tests.tiny import tiny_model, tiny_tokenizer
from tunesmith import SFTTrainer
from tunesmith.data.pipeline import prepare_dataset
from tunesmith.data.tokenize import tokenize_example

PROMPT_COMPLETION = [{"prompt": p, "completion": c} for p, c in PAIRS]
MESSAGES = [
    {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in PAIRS
]


# ---------------------------------------------------------------------- errors at construction


def test_no_train_dataset_is_an_error_that_names_it(tmp_path):
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        SFTTrainer(tiny_model("llama"), args=config(tmp_path), processing_class=tiny_tokenizer())


@pytest.mark.parametrize(
    "rows, detected",
    [
        ([{"text": f"{p} {c}"} for p, c in PAIRS], "'text'"),
        (PROMPT_COMPLETION, "'prompt_completion'"),
    ],
)
def test_assistant_only_loss_on_data_that_is_not_conversational_is_an_error(tmp_path, rows, detected):
    # before: trained every token without a word
    with pytest.raises(ValueError, match=rf"assistant_only_loss=True needs conversational.*{detected}"):
        SFTTrainer(
            tiny_model("llama"),
            args=config(tmp_path, assistant_only_loss=True),
            train_dataset=Dataset.from_list(rows),
            processing_class=tiny_tokenizer(),
        )


def test_assistant_only_loss_on_conversations_still_works(tmp_path):
    trainer = SFTTrainer(
        tiny_model("llama"),
        args=config(tmp_path, assistant_only_loss=True),
        train_dataset=Dataset.from_list(MESSAGES),
        processing_class=tiny_tokenizer(),
    )
    row = trainer.train_dataset[0]
    # the user turn is not trained, the assistant's is: some labels masked, some not
    assert -100 in row["labels"] and any(t != -100 for t in row["labels"])


def test_completion_only_loss_with_formatting_func_is_an_error_before_the_model_loads(tmp_path):
    with pytest.raises(ValueError, match="completion_only_loss=True cannot be used with a formatting_func"):
        SFTTrainer(
            model="/no/such/model",  # never reached: the check comes first
            args=config(tmp_path, completion_only_loss=True),
            train_dataset=Dataset.from_list(PROMPT_COMPLETION),
            formatting_func=lambda row: row["prompt"] + row["completion"],
        )
    # prepare_dataset (the CLI's path) refuses the same pair
    with pytest.raises(ValueError, match="completion_only_loss=True cannot be used with a formatting_func"):
        prepare_dataset(
            PROMPT_COMPLETION,
            tiny_tokenizer(),
            formatting_func=lambda row: row["prompt"],
            completion_only_loss=True,
            cache_dir=False,
        )


# ---------------------------------------------------------------------- eos that is also unk


def test_eos_token_may_be_the_unknown_token():
    # SmolLM2's <|endoftext|> is its eos, bos and unk at once; here <unk> (id 3) plays that part
    tok = tiny_tokenizer()
    out = tokenize_example({"text": "Paris."}, tok, eos_token="<unk>")
    assert out["input_ids"][-1] == 3 == tok.unk_token_id
    # a string that is not a token stays an error, and says which
    with pytest.raises(ValueError, match="'<not-a-token>' is not a token"):
        tokenize_example({"text": "Paris."}, tok, eos_token="<not-a-token>")


def test_eos_token_that_is_smollm2s_unknown_token_trains_through_the_trainer(tmp_path):
    # the real case: SmolLM2's <|endoftext|> (id 0) is its unk token too; it was refused before
    from tunesmith.models.load import default_model_path

    trainer = SFTTrainer(
        model=default_model_path(),
        args=config(tmp_path, eos_token="<|endoftext|>", use_peft=True, max_steps=1),
        train_dataset=[{"text": "Paris is in France."}],
    )
    assert trainer.processing_class.unk_token == "<|endoftext|>"
    assert trainer.train_dataset[0]["input_ids"][-1] == 0 == trainer.train_dataset[0]["labels"][-1]


# ---------------------------------------------------------------------- pre-tokenized + train_on_inputs


def test_pretokenized_labels_with_train_on_inputs_train_every_token():
    rows = [{"input_ids": [7, 8, 9, 2], "labels": [-100, -100, 9, 2]}]
    given = prepare_dataset(rows, None, cache_dir=False).dataset[0]
    assert given["labels"] == [-100, -100, 9, 2]  # the labels as given
    every = prepare_dataset(rows, None, train_on_inputs=True, cache_dir=False).dataset[0]
    assert every["labels"] == [7, 8, 9, 2]  # as tokenize_example does: train_on_inputs trains every token


# ---------------------------------------------------------------------- evaluate(eval_dataset=raw)


def test_evaluate_prepares_a_raw_eval_dataset_as_the_constructor_does(tmp_path):
    def build(**eval_kwargs):
        return SFTTrainer(
            tiny_model("llama"),
            args=config(tmp_path, per_device_eval_batch_size=3),
            train_dataset=Dataset.from_list(MESSAGES),
            processing_class=tiny_tokenizer(),
            **eval_kwargs,
        )

    expected = build(eval_dataset=Dataset.from_list(MESSAGES)).evaluate()
    trainer = build()
    raw = trainer.evaluate(eval_dataset=Dataset.from_list(MESSAGES))  # failed: "No columns ... match"
    assert raw["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    assert raw["eval_num_supervised_tokens"] == expected["eval_num_supervised_tokens"]
    both = trainer.evaluate(eval_dataset={"a": Dataset.from_list(MESSAGES), "b": MESSAGES[:2]})
    assert both["eval_a_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    assert 0 < both["eval_b_num_supervised_tokens"] < expected["eval_num_supervised_tokens"]


# ---------------------------------------------------------------------- models by path, model_init_kwargs


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)  # fp32 on disk
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_a_path_object_works_where_a_string_path_does(tmp_path, saved_model):
    trainer = SFTTrainer(model=saved_model, args=config(tmp_path), train_dataset=PROMPT_COMPLETION)
    assert type(trainer.model).__name__ == "LlamaForCausalLM"
    assert trainer.args.output_dir.endswith("out")


@pytest.mark.parametrize(
    "init_kwargs, dtype",
    [
        ({"dtype": "bfloat16"}, torch.bfloat16),  # raised TypeError: multiple values for 'dtype'
        ({"torch_dtype": torch.bfloat16}, torch.bfloat16),  # TRL < 1.0 spelling
        ({"dtype": "auto"}, torch.float32),  # as TRL / from_pretrained: the checkpoint's dtype
    ],
)
def test_model_init_kwargs_dtype_wins(tmp_path, saved_model, init_kwargs, dtype):
    args = config(tmp_path, model_dtype="float16", model_init_kwargs=init_kwargs)
    trainer = SFTTrainer(model=str(saved_model), args=args, train_dataset=PROMPT_COMPLETION)
    assert trainer.model.dtype == dtype


def test_model_init_kwargs_attention_and_device_map_pass_through(tmp_path, saved_model, monkeypatch):
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    init = {
        "attn_implementation": "eager",
        "device_map": "cpu",
        "revision": "main",
        "low_cpu_mem_usage": True,
    }
    trainer = SFTTrainer(
        model=str(saved_model), args=config(tmp_path, model_init_kwargs=init), train_dataset=PROMPT_COMPLETION
    )
    assert {k: seen[k] for k in init} == init  # every one reached from_pretrained as given
    # eager wins over tunesmith's per-document attention for padding-free batches
    assert trainer.model.config._attn_implementation == "eager"
    trainer.train()  # and it trains that way


# ---------------------------------------------------------------------- TRL's kernel switches


def test_use_liger_kernel_means_tunesmith_kernels_with_one_notice(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tunesmith.config"):
        first = config(tmp_path, use_liger_kernel=True, use_kernels=False)
        config(tmp_path, use_liger_kernel=True)
    assert first.use_kernels is True and first.use_liger_kernel is False  # Trainer never imports liger
    notices = [r for r in caplog.records if "use_liger_kernel=True" in r.getMessage()]
    assert len(notices) == 1
    trainer = SFTTrainer(
        tiny_model("llama"), args=first, train_dataset=PROMPT_COMPLETION, processing_class=tiny_tokenizer()
    )
    trainer.train()  # liger-kernel is not installed here: before, Trainer.train raised ImportError


@pytest.mark.parametrize("value, on", [("liger", True), (True, True), (False, False), ("none", False)])
def test_use_kernels_accepts_trl_values(tmp_path, value, on):
    assert config(tmp_path, use_kernels=value).use_kernels is on


# ---------------------------------------------------------------------- NEFTune with the fused loss


def test_neftune_noise_reaches_the_fused_loss_in_training_only(tmp_path):
    torch.manual_seed(0)
    trainer = SFTTrainer(
        tiny_model("llama"),
        args=config(tmp_path, neftune_noise_alpha=5.0, per_device_eval_batch_size=4),
        train_dataset=PROMPT_COMPLETION,
        eval_dataset=PROMPT_COMPLETION,
        processing_class=tiny_tokenizer(),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    batch = trainer._prepare_inputs(batch)
    from transformers.integrations.neftune import activate_neftune, deactivate_neftune

    model = trainer.model
    model.train()
    with torch.no_grad():
        clean = trainer.compute_loss(model, dict(batch)).item()
        handle = activate_neftune(model, 5.0)  # what Trainer.train does when neftune_noise_alpha is set
        noisy = [trainer.compute_loss(model, dict(batch)).item() for _ in range(2)]
        model.eval()
        eval_with_hook = trainer.compute_loss(model, dict(batch)).item()
        deactivate_neftune(model, handle)
    # noise in training: each forward differs from the clean one and from the other
    assert abs(noisy[0] - clean) > 1e-4 and abs(noisy[0] - noisy[1]) > 1e-4
    # none in evaluation, even with the hook in place
    assert eval_with_hook == pytest.approx(clean, abs=1e-6)
    # and through Trainer.train: the hook is on during every step and gone afterwards
    from transformers import TrainerCallback

    embeddings = trainer.model.get_input_embeddings()
    hooked = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            hooked.append(len(embeddings._forward_hooks))

    trainer.add_callback(Watch())
    trainer.train()
    assert hooked == [1, 1] and not embeddings._forward_hooks


# ---------------------------------------------------------------------- full fine-tuning keeps its updates


@pytest.fixture
def bf16_machine(monkeypatch):
    """resolve_dtype("auto") answers bf16, as on a CPU with AVX512-BF16 / AMX or an Ampere GPU."""
    from tunesmith.models import load

    real = load.resolve_dtype
    monkeypatch.setattr(
        load,
        "resolve_dtype",
        lambda dtype="auto", device=None: torch.bfloat16 if dtype in ("auto", None) else real(dtype),
    )


def full_ft(tmp_path, saved_model, name, **overrides):
    args = config(
        tmp_path / name,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        max_steps=3,
        per_device_train_batch_size=4,
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    trainer = SFTTrainer(model=saved_model, args=args, train_dataset=PROMPT_COMPLETION * 3)
    start = torch.cat([p.detach().float().flatten() for p in trainer.model.parameters()])
    trainer.train()
    delta = torch.cat([p.detach().float().flatten() for p in trainer.model.parameters()]) - start
    return trainer, delta


def test_full_finetune_keeps_fp32_master_weights_and_computes_in_bf16(tmp_path, saved_model, bf16_machine):
    trainer, delta = full_ft(tmp_path, saved_model, "default")
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert trainer.args.bf16 and trainer.args.mixed_precision == "bf16"  # autocast: matmuls in bf16
    _, reference = full_ft(tmp_path, saved_model, "fp32", model_dtype="float32")
    _, pure_bf16 = full_ft(tmp_path, saved_model, "bf16", model_dtype="bfloat16")
    cosine = torch.nn.functional.cosine_similarity
    # lr 1e-5 on weights of ~0.02: each update is ~5e-4 of a weight, under bf16's 1/256 step. fp32 master
    # weights keep them (same direction and size as the fp32 run, up to bf16 compute); bf16 weights lose most.
    assert cosine(delta, reference, dim=0) > 0.98
    assert 0.95 < delta.norm() / reference.norm() < 1.05
    assert cosine(pure_bf16, reference, dim=0) < 0.9
    assert pure_bf16.norm() / reference.norm() < 0.9


def test_lora_and_an_explicit_choice_keep_bf16_weights(tmp_path, saved_model, bf16_machine):
    lora = SFTTrainer(
        model=saved_model, args=config(tmp_path / "lora", use_peft=True), train_dataset=PROMPT_COMPLETION
    )
    base = lora.model.get_base_model().model.layers[0].mlp.down_proj
    assert getattr(base, "base_layer", base).weight.dtype == torch.bfloat16  # frozen base: bf16 is fine
    off = SFTTrainer(
        model=saved_model,
        args=config(tmp_path / "off", fp32_master_weights=False),
        train_dataset=PROMPT_COMPLETION,
    )
    assert off.model.dtype == torch.bfloat16 and not off.args.bf16
