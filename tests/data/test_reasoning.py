"""Reasoning traces: the normaliser keeps `reasoning_content` / `thinking`, chat_template_kwargs reach the
template (config and per example), and `train_on_reasoning` (last|all|none) picks which reasoning blocks
train, read back token by token on three templates written for these tests:

    STRIP     Qwen3-style: `<think>` blocks only after the last user message (past reasoning dropped, as
              the model sees the conversation at inference); the final turn always gets one (empty when
              there is no reasoning); `enable_thinking=false` puts an empty block in the generation prompt
    KEEP      every assistant turn keeps its `<think>` block
    CHANNELS  gpt-oss-style channels, reading the `thinking` name of the field
"""

import json
import logging

import pytest

from tunesmith.common import reset_once
from tunesmith.data.formats import normalize_example
from tunesmith.data.sources import DataError
from tunesmith.data.templates import assistant_parts
from tunesmith.data.tokenize import tokenize_example

from . import word_tokenizer

STRIP = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['role'] == 'assistant' and loop.index0 > ns.last_user -%}"
    "{{ '<think>\\n' + (m.reasoning_content or '') + '\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{{ m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)
KEEP = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m.reasoning_content -%}{{ '<think>\\n' + m.reasoning_content + '\\n</think>\\n' }}{%- endif -%}"
    "{{ m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
CHANNELS = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- if m.thinking -%}{{ '<|start|> assistant <|channel|> analysis <|message|> ' + m.thinking + ' <|end|> ' }}"
    "{%- endif -%}"
    "{{ '<|start|> assistant <|channel|> final <|message|> ' + m['content'] + ' <|end|> ' }}"
    "{%- else -%}{{ '<|start|> ' + m['role'] + ' <|message|> ' + m['content'] + ' <|end|> ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start|> assistant ' }}{%- endif -%}"
)
CHANNEL_TOKENS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>"]

TWO_TURNS = [
    {"role": "user", "content": "what is two plus two"},
    {"role": "assistant", "content": "four", "reasoning_content": "two and two make four"},
    {"role": "user", "content": "and three plus three"},
    {"role": "assistant", "content": "six", "reasoning_content": "three and three make six"},
]
WORDS = "what is two plus two and three make four six <think> </think> analysis final".split()


def tokenizer(channels=False):
    tok = word_tokenizer(extra_words=WORDS)
    if channels:
        tok.add_special_tokens({"additional_special_tokens": CHANNEL_TOKENS})
    return tok


def trained_runs(tok, example, **kwargs):
    """The trained tokens of a normalised example, as runs of consecutive trained tokens."""
    out = tokenize_example(example, tok, **kwargs)
    runs, current = [], []
    for token, label in zip(tok.convert_ids_to_tokens(out["input_ids"]), out["labels"]):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def messages_example(messages, **extra):
    return normalize_example({"messages": messages, **extra}, "messages", index=0)


FOUR = ["four", "<|im_end|>"]
SIX = ["six", "<|im_end|>"]
THINK_FOUR = ["<think>", "two", "and", "two", "make", "four", "</think>", "four", "<|im_end|>"]
THINK_SIX = ["<think>", "three", "and", "three", "make", "six", "</think>", "six", "<|im_end|>"]


# --------------------------------------------------------------------------- the normaliser


def test_normaliser_keeps_reasoning_under_both_names():
    out = messages_example(TWO_TURNS)
    assert out["messages"][1] == {
        "role": "assistant",
        "content": "four",
        "reasoning_content": "two and two make four",
        "thinking": "two and two make four",
    }
    # `thinking` (gpt-oss's name) is the same field; ShareGPT rows keep it too
    sharegpt = normalize_example(
        {
            "conversations": [
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello", "thinking": "greet"},
            ]
        },
        "sharegpt",
    )
    assert sharegpt["messages"][1]["reasoning_content"] == "greet"


def test_normaliser_reasoning_errors_and_nulls():
    user_reasoning = [
        {"role": "user", "content": "hi", "reasoning_content": "x"},
        {"role": "assistant", "content": "a"},
    ]
    with pytest.raises(
        DataError, match=r"example 0, messages\[0\]: only assistant messages may have reasoning_content"
    ):
        messages_example(user_reasoning)
    with pytest.raises(DataError, match=r"messages\[1\], reasoning_content: expected a string"):
        messages_example(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "reasoning_content": 3}]
        )
    with pytest.raises(DataError, match="reasoning_content and thinking hold different texts"):
        messages_example(
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "a", "reasoning_content": "x", "thinking": "y"},
            ]
        )
    # Arrow's null for a key another message has, and a blank trace, are no reasoning
    out = messages_example(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "reasoning_content": None}]
    )
    assert out["messages"][1] == {"role": "assistant", "content": "a"}
    # a turn of reasoning only (e.g. before a tool call) may have empty content
    out = messages_example(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "thinking": "hmm"}]
    )
    assert out["messages"][1]["content"] == ""


def test_per_example_template_kwargs_column():
    out = messages_example(TWO_TURNS, chat_template_kwargs={"enable_thinking": False, "other": None})
    assert out["chat_template_kwargs"] == {"enable_thinking": False}  # Arrow's nulls dropped
    out = messages_example(TWO_TURNS, chat_template_kwargs='{"enable_thinking": true}')
    assert out["chat_template_kwargs"] == {"enable_thinking": True}
    with pytest.raises(DataError, match="example 0, field 'chat_template_kwargs': expected a mapping"):
        messages_example(TWO_TURNS, chat_template_kwargs=[1])
    with pytest.raises(DataError, match="example 0, field 'chat_template_kwargs': not valid JSON"):
        messages_example(TWO_TURNS, chat_template_kwargs="{enable_thinking")


# --------------------------------------------------------------------------- trained spans


def test_strip_template_last_trains_the_final_reasoning_only(caplog):
    tok = tokenizer()
    example = messages_example(TWO_TURNS)
    # the past reasoning is not rendered at all (as at inference); the final turn's block trains with its answer
    assert trained_runs(tok, example, chat_template=STRIP) == [FOUR, THINK_SIX]
    out = tokenize_example(example, tok, chat_template=STRIP)
    assert "two and two make four" not in " ".join(tok.convert_ids_to_tokens(out["input_ids"]))


def test_strip_template_none_trains_answers_and_end_of_turn_only():
    tok = tokenizer()
    assert trained_runs(tok, messages_example(TWO_TURNS), chat_template=STRIP, train_on_reasoning="none") == [
        FOUR,
        SIX,
    ]


def test_strip_template_all_trains_each_dropped_reasoning_in_an_example_of_its_own():
    tok = tokenizer()
    example = messages_example(TWO_TURNS)
    out = tokenize_example(example, tok, chat_template=STRIP, train_on_reasoning="all")
    # the conversation as the template renders it: the first turn's answer, the final turn whole
    assert trained_runs(tok, example, chat_template=STRIP, train_on_reasoning="all") == [FOUR, THINK_SIX]
    # and the first turn as the model sees it when it writes that turn (the last one then): reasoning included
    (extra,) = out["extra_examples"]
    tokens = tok.convert_ids_to_tokens(extra["input_ids"])
    assert tokens[-9:] == THINK_FOUR and "six" not in tokens
    assert [t for t, label in zip(tokens, extra["labels"]) if label != -100] == THINK_FOUR
    # last / none make no extra example; a keeping template needs none
    assert "extra_examples" not in tokenize_example(example, tok, chat_template=STRIP)
    assert "extra_examples" not in tokenize_example(
        example, tok, chat_template=KEEP, train_on_reasoning="all"
    )


def test_pipeline_counts_the_extra_examples(tmp_path, caplog):
    from tunesmith.data.pipeline import prepare_dataset

    rows = [{"messages": TWO_TURNS}] * 3
    with caplog.at_level(logging.INFO, logger="tunesmith.data"):
        prepared = prepare_dataset(
            rows, tokenizer(), chat_template=STRIP, train_on_reasoning="all", cache_dir=False
        )
    assert (prepared.stats.examples_in, prepared.stats.examples_out) == (3, 6)
    assert prepared.stats.supervised_tokens == 3 * (2 + 9 + 9)  # FOUR + THINK_SIX, and THINK_FOUR alone
    assert (
        "6 examples from 3 rows: train_on_reasoning=all and the chat template drops the reasoning"
        in caplog.text
    )


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("last", [FOUR, THINK_SIX]), ("all", [THINK_FOUR, THINK_SIX]), ("none", [FOUR, SIX])],
)
def test_keep_template_trains_the_reasoning_the_rule_says(rule, expected):
    tok = tokenizer()
    example = messages_example(TWO_TURNS)
    assert trained_runs(tok, example, chat_template=KEEP, train_on_reasoning=rule) == expected
    # the earlier reasoning is in the input either way (the template keeps it): masked, not dropped
    ids = tokenize_example(example, tok, chat_template=KEEP, train_on_reasoning=rule)["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[10:19] == ["<think>", "two", "and", "two", "make", "four", "</think>", "four", "<|im_end|>"]


def test_channels_template_reads_thinking_and_trains_the_channel_markers_with_the_reasoning():
    tok = tokenizer(channels=True)
    messages = [
        {"role": "user", "content": "what is two plus two"},
        {"role": "assistant", "content": "four", "thinking": "two and two make four"},
    ]
    example = messages_example(messages)
    analysis = ["<|channel|>", "analysis", "<|message|>", "two", "and", "two", "make", "four", "<|end|>"]
    final = ["<|start|>", "assistant", "<|channel|>", "final", "<|message|>"]
    assert trained_runs(tok, example, chat_template=CHANNELS) == [analysis + final + ["four", "<|end|>"]]
    # none: the reasoning block is everything from the turn's start to its answer
    assert trained_runs(tok, example, chat_template=CHANNELS, train_on_reasoning="none") == [
        ["four", "<|end|>"]
    ]


def test_enable_thinking_from_config_and_per_example():
    tok = tokenizer()
    plain = [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"}]
    # thinking on (the template's default): the empty block is what the model writes first, so it trains
    assert trained_runs(tok, messages_example(plain), chat_template=STRIP) == [
        ["<think>", "</think>", "four", "<|im_end|>"]
    ]
    # enable_thinking=false: the empty block is part of the generation prompt, as at inference: masked
    off = {"enable_thinking": False}
    assert trained_runs(tok, messages_example(plain), chat_template=STRIP, chat_template_kwargs=off) == [FOUR]
    # the example's own column wins over the config's
    example = messages_example(plain, chat_template_kwargs={"enable_thinking": True})
    assert trained_runs(tok, example, chat_template=STRIP, chat_template_kwargs=off) == [
        ["<think>", "</think>", "four", "<|im_end|>"]
    ]
    example = messages_example(plain, chat_template_kwargs={"enable_thinking": False})
    assert trained_runs(tok, example, chat_template=STRIP) == [FOUR]


def test_reasoning_only_turn_still_trains_its_end_of_turn_token():
    tok = tokenizer()
    messages = [
        {"role": "user", "content": "what is two plus two"},
        {"role": "assistant", "content": "", "reasoning_content": "two and two make four"},
    ]
    example = messages_example(messages)
    assert trained_runs(tok, example, chat_template=KEEP, train_on_reasoning="none") == [["<|im_end|>"]]
    assert trained_runs(tok, example, chat_template=KEEP) == [THINK_FOUR[:-2] + ["<|im_end|>"]]


def test_inline_think_block_in_content_is_reasoning():
    # DeepSeek-R1-style data: the trace inside the content, rendered by a template that knows nothing of it
    tok = tokenizer()
    messages = [
        {"role": "user", "content": "what is two plus two"},
        {"role": "assistant", "content": "<think> two and two make four </think> four"},
    ]
    example = messages_example(messages)
    assert trained_runs(tok, example, chat_template="chatml") == [THINK_FOUR]
    assert trained_runs(tok, example, chat_template="chatml", train_on_reasoning="none") == [FOUR]


def test_template_that_ignores_reasoning_is_logged(caplog):
    reset_once("tokenize")
    tok = tokenizer()
    with caplog.at_level(logging.WARNING, logger="tunesmith.data.tokenize"):
        runs = trained_runs(tok, messages_example(TWO_TURNS), chat_template="chatml")
    assert runs == [FOUR, SIX]
    assert (
        "does not render the reasoning (reasoning_content / thinking) of the final assistant turn (message 3)"
        in (caplog.text)
    )


def test_conversational_prompt_completion_trains_the_completion_reasoning():
    tok = tokenizer()
    example = normalize_example(
        {"prompt": TWO_TURNS[:3], "completion": TWO_TURNS[3:]}, "conversational_prompt_completion"
    )
    # completion only: the prompt's assistant turn (and its kept reasoning) is context, not trained
    assert trained_runs(tok, example, chat_template=KEEP, train_on_reasoning="all") == [THINK_SIX]
    assert trained_runs(
        tok, example, chat_template=KEEP, completion_only_loss=False, train_on_reasoning="all"
    ) == [
        THINK_FOUR,
        THINK_SIX,
    ]


def test_assistant_parts_marks_reasoning_tokens():
    tok = tokenizer()
    rendered = assistant_parts(tok, messages_example(TWO_TURNS)["messages"], chat_template=STRIP)
    tokens = tok.convert_ids_to_tokens(rendered.input_ids)
    reasoning = [t for t, flag in zip(tokens, rendered.reasoning) if flag]
    assert reasoning == ["<think>", "three", "and", "three", "make", "six", "</think>"]
    assert rendered.unrendered_reasoning == [1]


def test_template_kwargs_that_apply_chat_template_keeps_are_refused():
    with pytest.raises(DataError, match="'tools' cannot be a template variable"):
        tokenize_example(
            messages_example(TWO_TURNS), tokenizer(), chat_template=KEEP, chat_template_kwargs={"tools": []}
        )


def test_pipeline_passes_settings_and_caches_by_them(tmp_path):
    from tunesmith.data.pipeline import prepare_dataset

    path = tmp_path / "reasoning.jsonl"
    path.write_text("".join(json.dumps({"messages": TWO_TURNS}) + "\n" for _ in range(2)))
    tok = tokenizer()
    common = {"chat_template": KEEP, "cache_dir": tmp_path / "cache"}
    last = prepare_dataset(str(path), tok, **common)
    none = prepare_dataset(str(path), tok, train_on_reasoning="none", **common)
    assert not none.stats.cache_hit  # a different setting is a different cache entry
    # per example: THINK_FOUR/FOUR... last trains 2 + 9 tokens, none 2 + 2
    assert (last.stats.supervised_tokens, none.stats.supervised_tokens) == (2 * 11, 2 * 4)
    again = prepare_dataset(str(path), tok, train_on_reasoning="none", **common)
    assert again.stats.cache_hit and again.stats.supervised_tokens == 8
    with pytest.raises(ValueError, match="train_on_reasoning='some' is not one of last, all, none"):
        prepare_dataset(str(path), tok, train_on_reasoning="some", cache_dir=False)


def test_config_fields_from_yaml():
    from tunesmith.config import ConfigError, load_config

    config = load_config(
        {"data": {"train_on_reasoning": "none", "chat_template_kwargs": {"enable_thinking": False}}}
    )
    assert (config.train_on_reasoning, config.chat_template_kwargs) == ("none", {"enable_thinking": False})
    with pytest.raises(
        ConfigError, match="`train_on_reasoning` must be one of 'last', 'all', 'none', got 'every'"
    ):
        load_config({"train_on_reasoning": "every"})


# --------------------------------------------------------------------------- where the template renders


def test_inspect_shows_the_trained_reasoning(tmp_path, capsys):
    from tests.test_export import build_tokenizer
    from tunesmith.cli import main

    build_tokenizer(tmp_path / "model")
    (tmp_path / "strip.jinja").write_text(STRIP)
    (tmp_path / "data.jsonl").write_text(json.dumps({"messages": TWO_TURNS}) + "\n")
    common = ["inspect", str(tmp_path / "data.jsonl"), "--model", str(tmp_path / "model"), "--no-color"]
    common += [f"chat_template_path={tmp_path / 'strip.jinja'}", "dataset_cache_dir=false"]
    assert main(common) == 0
    out = capsys.readouterr().out
    # the earlier turn: its answer only (its reasoning is not in the text); the final turn: reasoning and answer
    assert "<|im_start|>assistant\n[[four<|im_end|>]]\n" in out
    assert "<|im_start|>assistant\n[[<think>\nthree and three make six\n</think>\n\nsix<|im_end|>]]\n" in out
    assert main([*common, "train_on_reasoning=none"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>assistant\n<think>\nthree and three make six\n</think>\n\n[[six<|im_end|>]]\n" in out


def test_generation_renders_the_prompt_with_the_template_kwargs():
    from tunesmith.generation import chat_prompt_ids

    tok = tokenizer()
    tok.chat_template = STRIP
    messages = [{"role": "user", "content": "what is two plus two"}]
    on = tok.convert_ids_to_tokens(chat_prompt_ids(tok, messages)[0])
    off = tok.convert_ids_to_tokens(chat_prompt_ids(tok, messages, {"enable_thinking": False})[0])
    assert on[-2:] == ["<|im_start|>", "assistant"]
    assert off[-4:] == ["<|im_start|>", "assistant", "<think>", "</think>"]


def test_cli_generation_reads_the_runs_template_kwargs(tmp_path):
    import argparse

    from tunesmith.cli import UsageError, _template_kwargs

    (tmp_path / "tunesmith_config.yaml").write_text(
        "data:\n  chat_template_kwargs: {enable_thinking: false}\n"
    )
    args = argparse.Namespace(model=str(tmp_path), chat_template_kwargs=None)
    assert _template_kwargs(args) == {"enable_thinking": False}
    args.chat_template_kwargs = '{"enable_thinking": true}'
    assert _template_kwargs(args) == {"enable_thinking": True}
    args.chat_template_kwargs = "{nope"
    with pytest.raises(UsageError, match="--chat-template-kwargs: not valid JSON"):
        _template_kwargs(args)


def test_reasoning_and_answer_reads_content_parts():
    # vision data keeps content as a list of parts; the answer is the text of its text parts (images
    # have none), and an inline think block is found there too
    from tunesmith.data.templates import reasoning_and_answer

    parts = [{"type": "image"}, {"type": "text", "text": "a red "}, {"type": "text", "text": "square"}]
    assert reasoning_and_answer({"role": "assistant", "content": parts}) == (None, "a red square")
    with_reasoning = {"role": "assistant", "content": parts, "reasoning_content": "it has four sides"}
    assert reasoning_and_answer(with_reasoning) == ("it has four sides", "a red square")
    inline = [{"type": "text", "text": "<think>corners</think>square"}]
    assert reasoning_and_answer({"role": "assistant", "content": inline}) == ("corners", "square")
