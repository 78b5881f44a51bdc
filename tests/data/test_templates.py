"""Assistant-only masks on the built-in templates (chatml, llama-3, mistral-instruct, gemma,
phi-3, alpaca) and on the real SmolLM2 tokenizer: the trained tokens, read back, are exactly
each assistant turn's content followed by the template's end-of-turn token, and nothing of
the system, user or tool turns."""

import json

import pytest

from tunesmith.common import reset_once
from tunesmith.data.sources import DataError
from tunesmith.data.templates import (
    BUILTIN_TEMPLATES,
    assistant_turns,
    render_messages,
    resolve_chat_template,
)

from . import word_tokenizer

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
CALL = {"type": "function", "function": {"name": "lookup", "arguments": {"q": "France"}}}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "Paris."},
    {"role": "assistant", "content": "Paris."},
]

# template -> (end-of-turn token, how the template writes the tool call of CALL)
EXPECTED = {
    "chatml": ("<|im_end|>", '<tool_call>\n{"name": "lookup", "arguments": {"q": "France"}}\n</tool_call>'),
    "llama-3": ("<|eot_id|>", '{"name": "lookup", "parameters": {"q": "France"}}'),
    "mistral-instruct": ("</s>", '[TOOL_CALLS] [{"name": "lookup", "arguments": {"q": "France"}}]'),
    "gemma": ("<end_of_turn>", '{"name": "lookup", "arguments": {"q": "France"}}'),
    "phi-3": ("<|end|>", '{"name": "lookup", "arguments": {"q": "France"}}'),
    "alpaca": ("</s>", '{"name": "lookup", "arguments": {"q": "France"}}'),
}


def runs(ids, mask):
    """The contiguous runs of masked-in ids: one run per assistant turn."""
    out, current = [], []
    for t, m in zip(ids, mask):
        if m:
            current.append(t)
        elif current:
            out.append(current)
            current = []
    return out + ([current] if current else [])


@pytest.mark.parametrize("name", list(EXPECTED))
def test_builtin_template_masks_exactly_assistant_turns(name):
    # Every whitespace word of the rendering is put in the vocabulary, so no token is [UNK].
    text = word_tokenizer().apply_chat_template(
        CONVERSATION, tools=TOOLS, chat_template=BUILTIN_TEMPLATES[name], tokenize=False
    )
    tok = word_tokenizer(extra_words=text.split())
    ids, mask = render_messages(tok, CONVERSATION, tools=TOOLS, chat_template=name)
    end, call = EXPECTED[name]
    trained = [tok.convert_ids_to_tokens(run) for run in runs(ids, mask)]
    assert trained == [["hello", end], tok.tokenize(call) + [end], ["Paris.", end]]
    assert len(ids) == len(mask)


def test_assistant_turns_name_the_message_each_token_belongs_to():
    tok = word_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids, turns = assistant_turns(tok, messages, chat_template="chatml")
    # <|im_start|> user hi <|im_end|> <|im_start|> assistant hello <|im_end|>
    assert ids == [4, 25, 34, 5, 4, 26, 35, 5]
    assert turns == [-1, -1, -1, -1, -1, -1, 1, 1]


def test_smollm2_multi_turn_with_system_and_tool(smollm2_tokenizer):
    tok = smollm2_tokenizer
    call = '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>'
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": call},
        {"role": "tool", "content": '{"sky": "sunny", "temp_c": 21}'},
        {"role": "assistant", "content": "It is sunny and 21 °C."},
    ]
    ids, mask = render_messages(tok, messages)  # SmolLM2's own (chatml) template
    decoded = [tok.decode(run) for run in runs(ids, mask)]
    assert decoded == [
        "Hello! How can I help?<|im_end|>",
        call + "<|im_end|>",
        "It is sunny and 21 °C.<|im_end|>",
    ]
    # The ids are exactly those transformers (and so TRL) gives for the conversation.
    assert ids == list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def test_template_with_generation_markers_is_used_when_prefixes_are_unstable():
    # This template writes </s> after the *last* message only, so an earlier turn renders
    # differently once later turns follow: the prefix method cannot work, the markers can.
    marked = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if not add_generation_prompt %}{{ '</s>' }}{% endif %}"
    )
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "Welcome!"},
    ]
    tok = word_tokenizer()
    ids, turns = assistant_turns(tok, messages, chat_template=marked)
    assert [tok.convert_ids_to_tokens(r) for r in runs(ids, [t >= 0 for t in turns])] == [
        ["hello", "<|im_end|>"],
        ["Welcome!", "<|im_end|>"],
    ]
    assert sorted(set(turns)) == [-1, 1, 3]
    unmarked = marked.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(DataError, match="renders earlier turns differently"):
        render_messages(tok, messages, chat_template=unmarked)


def test_slow_tokenizer_path_gives_the_same_ids_and_mask():
    class NoOffsets:
        """A tokenizer without offset mapping, as slow (Python) tokenizers are."""

        is_fast = False

        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def __call__(self, text, **kwargs):
            assert "return_offsets_mapping" not in kwargs
            return self._tok(text, **kwargs)

    tok = word_tokenizer()
    text = tok.apply_chat_template(CONVERSATION, chat_template=BUILTIN_TEMPLATES["chatml"], tokenize=False)
    tok = word_tokenizer(extra_words=text.split())
    fast = render_messages(tok, CONVERSATION, chat_template="chatml")
    assert render_messages(NoOffsets(tok), CONVERSATION, chat_template="chatml") == fast


def test_warns_when_a_turn_ends_without_a_special_token(caplog):
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"

    reset_once("templates")  # the warning is given once per process
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with caplog.at_level("WARNING", logger="tunesmith.data.templates"):
        render_messages(word_tokenizer(), messages, chat_template=plain)
    assert "may not learn to stop" in caplog.text


def test_resolve_chat_template(tmp_path):
    tok = word_tokenizer(chat_template="{{ 'own' }}")
    assert resolve_chat_template(tok) == "{{ 'own' }}"
    assert resolve_chat_template(tok, chat_template="gemma") == BUILTIN_TEMPLATES["gemma"]
    assert resolve_chat_template(tok, chat_template="{{ 'inline' }}") == "{{ 'inline' }}"
    (tmp_path / "t.jinja").write_text("{{ 'file' }}")
    assert resolve_chat_template(tok, chat_template_path=tmp_path / "t.jinja") == "{{ 'file' }}"
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'config' }}"}))
    assert resolve_chat_template(tok, chat_template_path=folder) == "{{ 'config' }}"
    assert resolve_chat_template(word_tokenizer()) is None
    with pytest.raises(DataError, match="Did you mean 'llama-3'"):
        resolve_chat_template(tok, chat_template="llama3")
    with pytest.raises(DataError, match="not both"):
        resolve_chat_template(tok, chat_template="chatml", chat_template_path=tmp_path / "t.jinja")


def test_turn_that_changes_when_later_turns_follow_is_found_by_its_text():
    # Qwen3-style: an empty <think></think> block is written only in assistant turns after the
    # last user message, so "hello" renders with it while last and without it once "Thanks!"
    # follows. That turn is found by its text; the last turn keeps its think block, which the
    # model does generate after the generation prompt.
    qwen3_like = (
        "{%- set ns = namespace(last_user=-1) -%}"
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
        "{%- endif -%}{%- endfor -%}"
        "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{%- if m['role'] == 'assistant' and loop.index0 > ns.last_user -%}{{ '<think>\\n\\n</think>\\n\\n' }}"
        "{%- endif -%}{{ m['content'] + '<|im_end|>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )
    messages = [
        {"role": "user", "content": "hello"},  # the user says what the assistant will say: not matched
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "Welcome!"},
    ]
    tok = word_tokenizer(extra_words=["<think>", "</think>"])
    ids, mask = render_messages(tok, messages, chat_template=qwen3_like)
    assert [tok.convert_ids_to_tokens(r) for r in runs(ids, mask)] == [
        ["hello", "<|im_end|>"],
        ["<think>", "</think>", "Welcome!", "<|im_end|>"],
    ]
    # and the first "hello" (the user's) is not trained: tokens 0-3 are <|im_start|> user hello <|im_end|>
    assert mask[:4] == [0, 0, 0, 0]


def test_base_tokenizer_with_chatml_warns_once_and_reports_missing_tokens(caplog):
    # Without <|im_end|> as a token the turn ends in plain word pieces: the model would not
    # learn a stop token. One warning for the whole dataset, and the trainer's fix is named.
    from tunesmith.data import templates

    tok = word_tokenizer(chat_specials=False)
    assert templates.missing_template_tokens(tok, "chatml") == ["<|im_start|>", "<|im_end|>"]
    assert templates.missing_template_tokens(word_tokenizer(), "chatml") == []
    reset_once("templates")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with caplog.at_level("WARNING", logger="tunesmith.data.templates"):
        for _ in range(3):
            render_messages(tok, messages, chat_template="chatml")
    assert caplog.text.count("may not learn to stop") == 1


def test_template_that_drops_tool_calls_is_named(smollm2_tokenizer, caplog):
    # SmolLM2's own template writes only `content`: a turn that is all tool_calls would train
    # to an empty answer. The built-in chatml renders the call and gives no warning.

    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    reset_once("templates")
    with caplog.at_level("WARNING", logger="tunesmith.data.templates"):
        render_messages(smollm2_tokenizer, messages, chat_template="chatml")
    assert "tool_calls" not in caplog.text
    with caplog.at_level("WARNING", logger="tunesmith.data.templates"):
        ids, mask = render_messages(smollm2_tokenizer, messages)
    assert "does not render assistant tool_calls ('get_weather'" in caplog.text
    assert [smollm2_tokenizer.decode(r) for r in runs(ids, mask)] == ["<|im_end|>", "Sunny.<|im_end|>"]
