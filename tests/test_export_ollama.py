"""The Ollama Modelfile: its TEMPLATE (Go) renders every conversation as the model's Jinja chat template
does, on the built-in templates and on the default model's; stop tokens and PARAMETERs."""

import copy
import re

import pytest

from tests import go_template
from tunesmith.data.templates import BUILTIN_SPECIAL_TOKENS, BUILTIN_TEMPLATES
from tunesmith.export import ExportError
from tunesmith.export.ollama import modelfile, write_modelfile

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
    [
        {"role": "user", "content": "Write this date in ISO format (YYYY-MM-DD): 5 May 1999"},
        {"role": "assistant", "content": "1999-05-05"},
        {"role": "user", "content": "And {{ 3 March 2001 }}?"},  # Go delimiters in content are data
    ],
    [
        {"role": "system", "content": "Be brief.\nVery brief."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"},
    ],
]


def test_go_interpreter_follows_text_template_rules():
    # trim markers eat the whitespace (newlines included) on their side; variables assigned in a
    # range reach the enclosing scope; literal text is verbatim
    data = {"Messages": [{"Role": "user", "Content": "x"}, {"Role": "assistant", "Content": "y"}]}
    template = "{{ $n := 0 }}a \n {{- range $i, $m := .Messages }}[{{ $i }}:{{ .Content }}]{{ $n = $i }}{{ end }} \n{{- $n }}"
    assert go_template.render(template, data) == "a[0:x][1:y]1"
    cond = "{{ range $i, $_ := .Messages }}{{ if eq (len (slice $.Messages $i)) 1 }}last={{ .Role }}{{ end }}{{ end }}"
    assert go_template.render(cond, data) == "last=assistant"


def parse(text: str) -> dict:
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M) or re.search(
        r'^SYSTEM "(.*)"$', text, re.M
    )
    params = re.findall(r"^PARAMETER (\w+) (.*)$", text, re.M)
    return {
        "template": template,
        "system": system.group(1) if system else None,
        "params": params,
        "from": re.search(r"^FROM (.*)$", text, re.M).group(1),
    }


def ollama_render(parsed: dict, messages: list[dict]) -> str:
    """What Ollama renders: the Modelfile's SYSTEM is the system message when the request has none."""
    if parsed["system"] and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": parsed["system"]}, *messages]
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return go_template.render(parsed["template"], data)


def check_against_jinja(tokenizer, parsed, *, drop_bos: bool):
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if drop_bos:  # the runtime adds bos itself (add_bos_token in the GGUF)
            assert expected.startswith(tokenizer.bos_token)
            expected = expected[len(tokenizer.bos_token) :]
        assert ollama_render(parsed, messages) == expected, messages


@pytest.fixture(scope="module")
def default_tokenizer():
    from transformers import AutoTokenizer

    from tunesmith.models.load import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def test_default_model_modelfile(default_tokenizer):
    text = modelfile("./smollm2-q8_0.gguf", default_tokenizer, context_length=8192)
    parsed = parse(text)
    assert parsed["from"] == "./smollm2-q8_0.gguf"
    # SmolLM2's template adds its own system prompt when there is none: that is the Modelfile's SYSTEM
    assert parsed["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert ("stop", '"<|im_end|>"') in parsed["params"]
    assert ("num_ctx", "8192") in parsed["params"] and ("temperature", "0") in parsed["params"]
    check_against_jinja(default_tokenizer, parsed, drop_bos=False)


@pytest.mark.parametrize("name", ["chatml", "llama-3", "mistral-instruct", "gemma", "phi-3", "alpaca"])
def test_builtin_templates_translate(default_tokenizer, name):
    tokenizer = copy.deepcopy(default_tokenizer)
    tokenizer.chat_template = BUILTIN_TEMPLATES[name]
    # a bos of its own, added by the tokenizer (as Llama 3, Mistral and Gemma do): the Go template
    # must then leave it out, or the runtime would see two
    # the template's turn markers as special tokens, as in the models that use the template
    tokenizer.add_special_tokens(
        {"bos_token": "<|bos|>", "additional_special_tokens": list(BUILTIN_SPECIAL_TOKENS[name])},
        replace_extra_special_tokens=False,
    )
    tokenizer.add_bos_token = True
    tokenizer.update_post_processor()
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    parsed = parse(modelfile("./m.gguf", tokenizer, context_length=4096))
    uses_bos = "bos_token" in BUILTIN_TEMPLATES[name]
    check_against_jinja(tokenizer, parsed, drop_bos=uses_bos)
    assert not parsed["template"].startswith("<|bos|>")
    stops = [value.strip('"') for key, value in parsed["params"] if key == "stop"]
    end_of_turn = {
        "chatml": "<|im_end|>",
        "llama-3": "<|eot_id|>",
        "gemma": "<end_of_turn>",
        "phi-3": "<|end|>",
        "mistral-instruct": "<|im_end|>",  # the eos (</s> in Mistral's vocabulary) ends a turn
        "alpaca": "<|im_end|>",
    }[name]
    assert end_of_turn in stops and default_tokenizer.eos_token in stops


def test_a_template_of_another_shape_is_refused(default_tokenizer):
    tokenizer = copy.deepcopy(default_tokenizer)
    # numbers the turns: no fixed per-role prefix
    tokenizer.chat_template = (
        "{% for m in messages %}{{ loop.index }}. {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}{{ (messages | length) + 1 }}. assistant: {% endif %}"
    )
    with pytest.raises(ExportError, match="write the TEMPLATE by hand"):
        modelfile("./m.gguf", tokenizer, context_length=4096)


def test_write_modelfile_beside_the_gguf(tmp_path, default_tokenizer):
    from tests.tiny import tiny_model

    folder = tmp_path / "model"
    tiny_model("llama", vocab_size=len(default_tokenizer)).save_pretrained(folder)
    default_tokenizer.save_pretrained(folder)
    (tmp_path / "out").mkdir()
    path = write_modelfile(folder, tmp_path / "out", tmp_path / "out" / "model.gguf")
    assert path == tmp_path / "out" / "Modelfile"
    assert parse(path.read_text())["from"] == "./model.gguf"
    # a GGUF elsewhere is named by its absolute path
    elsewhere = write_modelfile(folder, tmp_path / "other", tmp_path / "out" / "model.gguf")
    assert parse(elsewhere.read_text())["from"] == str((tmp_path / "out" / "model.gguf").resolve())


GEMMA2_STYLE = (  # the shape of Gemma 1/2's own template: no system role at all
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def test_a_template_without_system_role_leaves_system_messages_out(default_tokenizer):
    tokenizer = copy.deepcopy(default_tokenizer)
    tokenizer.chat_template = GEMMA2_STYLE
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
        replace_extra_special_tokens=False,
    )
    parsed = parse(modelfile("./m.gguf", tokenizer, context_length=4096))
    for messages in CONVERSATIONS:
        if messages[0]["role"] == "system":  # Jinja refuses these; Ollama's request goes without it
            assert ollama_render(parsed, messages) == ollama_render(parsed, messages[1:])
            continue
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ollama_render(parsed, messages) == expected
    assert ("stop", '"<end_of_turn>"') in parsed["params"]
