"""The real runtime: the default model after a short fine-tune on the quick start's task, exported
straight from its adapter folder, greedy-decoded by llama.cpp next to transformers on the merged model.

q8_0 must give identical tokens; q4_0 the same answers on the held-out dates. (On the untuned model
q8_0 is not a fair test: it rambles after the date and near-ties flip under any rounding; the f32
export gives transformers' text on it exactly, 10 of 10 prompts, which is what says the graph and
the tokenizer are right.) About two minutes on a 2-core CPU: marked slow, run by `make test`.
"""

import pytest
import torch

from tests.llama_cpp_check import llama_cpp_greedy, load, need_llama_cpp, transformers_greedy
from tunesmith.export import export_gguf, merge_adapter

PROMPTS = 12


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """(adapter folder, held-out prompts, references): 60 LoRA steps of the quick start's recipe."""
    need_llama_cpp()
    from tunesmith.config import load_config
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.quickstart import QUICKSTART_CONFIG, make_splits, prompts_and_references
    from tunesmith.trainer import SFTTrainer

    out = tmp_path_factory.mktemp("run")
    config = load_config(
        QUICKSTART_CONFIG,
        [
            f"output_dir={out}",
            "max_steps=60",
            "save_strategy='no'",
            "logging_steps=60",
            "use_cpu=true",
            # the quick start's generation evaluation needs its eval set; this fine-tune has none
            "eval_generation=null",
            "eval_on_start=false",
            "eval_strategy='no'",
        ],
    )
    splits = make_splits(600, PROMPTS, seed=0)
    tokenizer = load_tokenizer(config.model_name_or_path)
    model = load_model(config.model_name_or_path, dtype=config.model_dtype)
    trainer = SFTTrainer(model, args=config, train_dataset=splits.train, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    prompts, references = prompts_and_references(splits.heldout)
    return out, prompts, references


def _prompt_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_llama_cpp_greedy_text_equals_transformers_on_the_fine_tuned_default_model(fine_tuned, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, prompts, references = fine_tuned
    merge_adapter(adapter, tmp_path / "merged", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    stop = {tokenizer.eos_token_id}
    expected = [
        transformers_greedy(merged, _prompt_ids(tokenizer, m), max_new_tokens=16, stop_ids=stop)
        for m in prompts
    ]
    answers = [tokenizer.decode(ids).strip() for ids in expected]
    # the fine-tune learned the task (else "the same answers" would say little)
    assert sum(a == r for a, r in zip(answers, references)) >= PROMPTS * 3 // 4, answers

    for gguf_type in ("q8_0", "q4_0"):
        path = export_gguf(adapter, tmp_path / f"model-{gguf_type}.gguf", type=gguf_type)  # merge + export
        llm = load(path, n_ctx=256, logits_all=True)
        got = [
            llama_cpp_greedy(llm, _prompt_ids(tokenizer, m), max_new_tokens=16, stop_ids=stop)
            for m in prompts
        ]
        llm.close()
        if gguf_type == "q8_0":
            assert got == expected, [
                (tokenizer.decode(a), tokenizer.decode(b)) for a, b in zip(expected, got)
            ]
        else:
            assert [tokenizer.decode(ids).strip() for ids in got] == answers
