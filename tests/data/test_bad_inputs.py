"""Bad inputs, one row each: what the user gave -> the message they see. Each message must say
what was wrong, where (file:line, example index, field) and, where there is one, the fix.
("An example longer than max_length" belongs to the packing step and is tested there.)"""

import pytest

from tunesmith.data.formats import detect_format, normalize_example
from tunesmith.data.sources import DataError, load_source
from tunesmith.data.templates import resolve_chat_template
from tunesmith.data.tokenize import tokenize_example

from . import word_tokenizer

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


def file(name: str, content: bytes):
    """A source that is a file with these bytes."""

    def load(tmp_path):
        path = tmp_path / name
        path.write_bytes(content)
        return load_source(path)

    return load


def file_rows(name: str, content: bytes):
    """A file read, detected and normalised row by row, as the pipeline does."""

    def load(tmp_path):
        rows = file(name, content)(tmp_path).to_list()
        fmt = detect_format(list(rows[0]), first_example=rows[0])
        return [normalize_example(row, fmt, index=i) for i, row in enumerate(rows)]

    return load


def messages(*msgs, index=3):
    return lambda tmp_path: normalize_example({"messages": list(msgs)}, "messages", index=index)


def columns(*names, **kwargs):
    return lambda tmp_path: detect_format(list(names), **kwargs)


def empty_dataset():
    import datasets

    return datasets.Dataset.from_dict({"text": []})


def no_template(tmp_path):
    example = {"messages": [USER, ASSISTANT]}
    return tokenize_example(example, word_tokenizer(chat_template=None), index=4)


CASES = [
    # --- files
    ("malformed JSON line", file("bad.jsonl", b'{"text": "a"}\n{"text": "b",}\n'),
     ["bad.jsonl:2:", "not valid JSON", "Expecting property name"]),
    ("JSON line not an object", file("bad.jsonl", b'{"text": "a"}\n["b"]\n'),
     ["bad.jsonl:2:", "must be a JSON object"]),
    ("malformed JSON array", file("bad.json", b'[\n{"text": "a"},\n{"text" "b"}\n]'),
     ["bad.json:3:", "Expecting ':' delimiter"]),
    ("JSON objects per line in a .json file", file("lines.json", b'{"text": "a"}\n{"text": "b"}\n'),
     ["lines.json:2:", "Extra data", "name the file .jsonl"]),
    ("non-UTF-8 bytes in JSONL", file("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
     ["latin1.jsonl:2:", "0xe9", "not valid UTF-8", "re-save the file as UTF-8"]),
    ("non-UTF-8 bytes in CSV", file("latin1.csv", b"text\nok\ncaf\xe9\n"),
     ["latin1.csv:3:", "not valid UTF-8"]),
    ("empty file", file("empty.jsonl", b""), ["empty.jsonl: the file is empty"]),
    ("file of blank lines", file("blank.jsonl", b"\n\n"), ["blank.jsonl: the file is empty"]),
    ("empty JSON array", file("empty.json", b"[]"), ["empty.json: the file is empty"]),
    ("CSV with only a header", file("header.csv", b"text\n"), ["header.csv", "has no rows"]),
    ("unknown file kind", file("data.txt", b"hello"), ["data.txt", "unknown file kind '.txt'", ".jsonl"]),
    ("missing file", lambda tmp_path: load_source(tmp_path / "nope.jsonl"), ["nope.jsonl: no such file"]),
    ("number content in a file's second row", file_rows("chat.jsonl",
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "yo"}]}\n'),
     ["example 1, messages[0], content", "expected a string, got int (5)"]),
    # --- in-memory sources
    ("empty list", lambda tmp_path: load_source([]), ["the list of examples is empty"]),
    ("empty Dataset", lambda tmp_path: load_source(empty_dataset()),
     ["has no rows", "nothing to train on"]),
    ("list with a non-dict", lambda tmp_path: load_source([{"text": "a"}, "b"]),
     ["example 1", "expected a dict", "str"]),
    ("column of mixed types", lambda tmp_path: load_source([{"text": "a"}, {"text": 5}]),
     ["could not build a table", "one column holds different types"]),
    # --- columns
    ("no known columns", columns("foo", "bar"),
     ["columns found: foo, bar", "Formats accepted", "messages (messages)", "alpaca (instruction + output)",
      "set dataset_text_field"]),
    ("misspelled column", columns("promt", "completion"),
     ["columns found: promt, completion", "'promt' looks like a misspelling of 'prompt'"]),
    ("misspelled messages column", columns("mesages"), ["'mesages' looks like a misspelling of 'messages'"]),
    ("dataset_text_field not a column", columns("content", "id", dataset_text_field="contnet"),
     ["dataset_text_field='contnet' is not a column", "columns found: content, id", "Did you mean 'content'?"]),
    ("mixed formats", columns("messages", "prompt", "completion"),
     ["more than one format", "messages, prompt_completion", "columns found: messages, prompt, completion",
      "`dataset_format: messages`"]),
    ("unknown format override", columns("text", override="chat"), ["dataset_format='chat' is not a known dataset format", "messages"]),
    ("override without its columns", columns("text", override="alpaca"),
     ["'alpaca' needs column(s) 'instruction', 'output'", "columns found: text"]),
    # --- wrong types and empty strings
    ("content is a number", messages(USER | {"content": 5}, ASSISTANT),
     ["example 3, messages[0], content", "expected a string, got int (5)"]),
    ("messages not a list", lambda tmp_path: normalize_example({"messages": "hi"}, "messages", index=2),
     ["example 2, field 'messages'", "expected a list of messages", "got str"]),
    ("message without role", messages({"text": "hi"}, ASSISTANT),
     ["example 3, messages[0]", "needs 'role' and 'content'", "keys found: text"]),
    ("unknown role", messages({"role": "asistant", "content": "x"}),
     ["example 3, messages[0]", "unknown role 'asistant'", "did you mean 'assistant'?"]),
    ("unknown ShareGPT speaker", lambda tmp_path: normalize_example(
        {"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", index=1),
     ["example 1, conversations[0]", "unknown ShareGPT speaker 'bot'", "human"]),
    ("empty prompt", lambda tmp_path: normalize_example({"prompt": "", "completion": "4"}, "prompt_completion", index=5),
     ["example 5, field 'prompt'", "empty string"]),
    ("whitespace-only text", lambda tmp_path: normalize_example({"text": "  \n"}, "text", index=6),
     ["example 6, field 'text'", "empty string"]),
    ("empty message content", messages(USER | {"content": ""}, ASSISTANT),
     ["example 3, messages[0], content", "empty string"]),
    ("prompt is a number", lambda tmp_path: normalize_example({"prompt": 7, "completion": "x"}, "prompt_completion"),
     ["field 'prompt'", "expected a string, got int"]),
    ("null in a mixed dataset", lambda tmp_path: normalize_example({"messages": None, "text": "x"}, "messages", index=9),
     ["example 9, field 'messages'", "missing (null)", "may mix formats"]),
    ("tools not JSON", lambda tmp_path: normalize_example({"messages": [USER, ASSISTANT], "tools": "[{name: f}]"},
                                                          "messages", index=8),
     ["example 8, field 'tools'", "not valid JSON"]),
    ("tool call arguments not JSON", messages(USER, ASSISTANT | {"content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "{city: Paris}"}}]}, {"role": "tool", "content": "x"}, ASSISTANT),
     ["example 3, messages[1], tool_calls[0].arguments", "not valid JSON"]),
    ("labels and input_ids differ in length", lambda tmp_path: normalize_example(
        {"input_ids": [1, 2, 3], "labels": [1, 2]}, "tokenized", index=0),
     ["example 0", "'labels' has 2 entries but 'input_ids' has 3"]),
    # --- roles out of order
    ("two user turns", messages(USER, USER, ASSISTANT),
     ["example 3, messages[1]", "a 'user' message cannot follow a 'user' message", "expected assistant"]),
    ("assistant right after system", messages({"role": "system", "content": "s"}, ASSISTANT),
     ["example 3, messages[1]", "an 'assistant' message cannot follow a 'system' message", "expected user"]),
    ("assistant first", messages(ASSISTANT, USER, ASSISTANT),
     ["example 3, messages[0]", "an 'assistant' message cannot follow the start"]),
    ("ends on user", messages(USER, ASSISTANT, USER),
     ["example 3, messages", "ends on a 'user' message", "must end with an assistant turn"]),
    ("two assistant turns", messages(USER, ASSISTANT, ASSISTANT),
     ["example 3, messages[2]", "an 'assistant' message cannot follow an 'assistant' message"]),
    ("tool result right after user", messages(USER, {"role": "tool", "content": "x"}, ASSISTANT),
     ["example 3, messages[1]", "'tool' message cannot follow a 'user'"]),
    ("completion not starting with assistant", lambda tmp_path: normalize_example(
        {"prompt": [USER], "completion": [USER, ASSISTANT]}, "conversational_prompt_completion", index=2),
     ["example 2, field 'completion'", "must start with an assistant message"]),
    # --- chat templates
    ("no chat template", no_template,
     ["example 4", "needs a chat template", "chat_template: chatml", "chat_template_path"]),
    ("unknown built-in template", lambda tmp_path: resolve_chat_template(None, chat_template="chatm1"),
     ["chat_template='chatm1'", "Did you mean 'chatml'?"]),
    ("template file missing", lambda tmp_path: resolve_chat_template(None, chat_template_path=tmp_path / "t.jinja"),
     ["chat_template_path=", "t.jinja: no such file"]),
]  # fmt: skip


@pytest.mark.parametrize("what, make, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_message(tmp_path, what, make, expected):
    with pytest.raises(DataError) as info:
        make(tmp_path)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{what}: {part!r} not in the message:\n{message}"
