"""Format detection from the columns, and normalisation of each source format into the
kinds of docs/ARCHITECTURE.md."""

import pytest

from tunesmith.data.formats import FORMATS, detect_format, normalize_example
from tunesmith.data.sources import DataError


@pytest.mark.parametrize(
    "columns, first, expected",
    [
        (["text"], None, "text"),
        (["text", "meta"], None, "text"),
        (["prompt", "completion"], {"prompt": "a", "completion": "b"}, "prompt_completion"),
        (
            ["prompt", "completion"],
            {"prompt": [{"role": "user", "content": "a"}]},
            "conversational_prompt_completion",
        ),
        (["prompt", "response"], None, "prompt_response"),
        (["instruction", "input", "output"], None, "alpaca"),
        (["instruction", "output"], None, "alpaca"),
        (["messages"], None, "messages"),
        (["messages", "tools"], None, "messages"),
        (["conversations"], None, "sharegpt"),
        (["input_ids", "attention_mask"], None, "tokenized"),
        (["input_ids", "labels", "text"], None, "tokenized"),  # already tokenized wins, as in TRL
        # A rendered "text" beside structured columns: the structure is what is trained.
        (["text", "messages"], None, "messages"),
    ],
)
def test_detect_format(columns, first, expected):
    assert detect_format(columns, first_example=first) == expected


def test_detect_format_explicit_text_field_and_override_and_formatting_func():
    assert detect_format(["body", "messages"], dataset_text_field="body") == "text"
    assert detect_format(["prompt", "completion"], override="text", dataset_text_field="prompt") == "text"
    assert detect_format(["q", "a"], formatting_func=lambda ex: ex["q"]) == "formatting_func"
    assert "formatting_func" in FORMATS and "sharegpt" in FORMATS


def test_prompt_response_with_text_field_prompt_is_prompt_response(caplog):
    with caplog.at_level("INFO", logger="tunesmith.data.formats"):
        assert detect_format(["prompt", "response"], dataset_text_field="prompt") == "prompt_response"
    assert "training on prompt + response" in caplog.text
    # the same trap with a completion column: the completions are not dropped either
    assert detect_format(["prompt", "completion"], dataset_text_field="prompt") == "prompt_completion"


def test_normalize_text_prompt_completion_prompt_response():
    assert normalize_example({"text": "hi"}, "text") == {"text": "hi"}
    assert normalize_example({"body": "hi"}, "text", dataset_text_field="body") == {"text": "hi"}
    assert normalize_example({"prompt": "Q:", "completion": " A"}, "prompt_completion") == {
        "prompt": "Q:",
        "completion": " A",
    }
    # prompt/response: a newline keeps the two from running together, unless whitespace is there.
    assert normalize_example({"prompt": "Q?", "response": "A"}, "prompt_response") == {
        "prompt": "Q?",
        "completion": "\nA",
    }
    assert normalize_example({"prompt": "Q? ", "response": "A"}, "prompt_response")["completion"] == "A"


def test_normalize_alpaca_exact_prompts():
    no_input = normalize_example({"instruction": "Add 2 and 2.", "input": None, "output": "4"}, "alpaca")
    assert no_input == {
        "prompt": "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd 2 and 2.\n\n### Response:\n",
        "completion": "4",
    }
    with_input = normalize_example({"instruction": "Add.", "input": "2 and 2", "output": "4"}, "alpaca")
    assert with_input["prompt"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n2 and 2\n\n### Response:\n"
    )


def test_normalize_sharegpt_roles():
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "Sunny."},
        ]
    }
    assert normalize_example(row, "sharegpt") == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
                ],
            },
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ]
    }


def test_normalize_messages_with_tools_as_json_string_and_string_arguments():
    row = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "content": "sunny", "name": "weather"},
            {"role": "assistant", "content": "Sunny."},
        ],
        "tools": '[{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]',
    }  # fmt: skip
    out = normalize_example(row, "messages")
    assert out["messages"][1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}],
    }
    assert out["messages"][2] == {"role": "tool", "content": "sunny", "name": "weather"}
    assert out["tools"] == [
        {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    ]


def test_arrow_nulls_in_messages_and_tools_are_dropped():
    import datasets

    # Through Arrow, keys of one row's dicts appear as null in every other row's dicts.
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
         "tools": [{"name": "f", "parameters": {"x": {"type": "string"}}}]},
        {"messages": [{"role": "user", "content": "c"},
                      {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "g", "arguments": {"y": 1}}}]},
                      {"role": "tool", "content": "1"}, {"role": "assistant", "content": "d"}],
         "tools": [{"name": "g", "parameters": {"y": {"type": "integer"}}}]},
    ]  # fmt: skip
    first, second = datasets.Dataset.from_list(rows).to_list()
    assert first["messages"][0].get("tool_calls", "absent") is None  # what Arrow did
    assert normalize_example(first, "messages") == {
        "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        "tools": [{"name": "f", "parameters": {"x": {"type": "string"}}}],
    }
    out = normalize_example(second, "messages")
    assert out["tools"] == [{"name": "g", "parameters": {"y": {"type": "integer"}}}]
    assert out["messages"][1]["tool_calls"] == [
        {"type": "function", "function": {"name": "g", "arguments": {"y": 1}}}
    ]


def test_conversational_prompt_completion():
    row = {
        "prompt": [{"role": "user", "content": "hi"}],
        "completion": [{"role": "assistant", "content": "hello"}],
    }
    assert normalize_example(row, "conversational_prompt_completion") == row


def test_tokenized_and_formatting_func():
    assert normalize_example({"input_ids": [3, 4], "labels": None}, "tokenized") == {"input_ids": [3, 4]}
    assert normalize_example({"input_ids": [3, 4], "labels": [-100, 4]}, "tokenized") == {
        "input_ids": [3, 4],
        "labels": [-100, 4],
    }
    out = normalize_example({"q": "hi"}, "formatting_func", formatting_func=lambda ex: "Q: " + ex["q"])
    assert out == {"text": "Q: hi"}


def test_formatting_func_returning_several_strings_per_example_is_an_error():
    with pytest.raises(
        DataError, match="example 7: formatting_func must return one string per example, got list of 2"
    ):
        normalize_example({"q": "hi"}, "formatting_func", formatting_func=lambda ex: ["a", "b"], index=7)


def test_docstring_examples_of_the_data_modules_hold():
    # The worked examples in the docstrings are run, so they cannot drift from the code.
    import doctest
    import importlib

    from . import word_tokenizer

    names = ("file_checks", "formats", "sources", "stats", "template_library", "template_reasoning", "templates",
             "tokenize")  # fmt: skip
    for module in [importlib.import_module(f"tunesmith.data.{name}") for name in names]:
        result = doctest.testmod(module, extraglobs={"word_tokenizer": word_tokenizer}, verbose=False)
        assert result.failed == 0, f"{module.__name__}: {result.failed} docstring example(s) failed"
        assert result.attempted > 0
