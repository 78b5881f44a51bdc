"""The built-in chat templates (`chat_template: chatml`, `llama-3`, ...), for base models whose
tokenizer has none, and the special tokens each needs as single tokens.

    >>> sorted(BUILTIN_TEMPLATES)
    ['alpaca', 'chatml', 'gemma', 'llama-3', 'mistral-instruct', 'phi-3']
"""

from __future__ import annotations

# Built-in templates. Literal text is written inside {{ '...' }} so that transformers' jinja
# settings (trim_blocks strips the newline after a block tag) cannot eat a newline. Each keeps
# earlier turns unchanged when later ones are added, which the span finder relies on. A
# system message is rendered once at the start (merged into the first user turn where the
# format has no system role); tools are listed as JSON schemas with the system prompt.
_CHATML = (
    "{%- set ns = namespace(system='') -%}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}{%- endif -%}"
    "{%- if tools -%}"
    "{%- set ns.system = (ns.system + '\\n\\n' if ns.system else '') + '# Tools\\n\\nYou may call these functions"
    " (JSON schemas):\\n<tools>\\n' -%}"
    "{%- for tool in tools -%}{%- set ns.system = ns.system + (tool | tojson) + '\\n' -%}{%- endfor -%}"
    "{%- set ns.system = ns.system + '</tools>\\n\\nTo call one, answer with <tool_call>"
    '{"name": ..., "arguments": {...}}</tool_call>.\' -%}'
    "{%- endif -%}"
    "{%- if ns.system -%}{{ '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{{ ('\\n' if message['content'] or not loop.first else '') + '<tool_call>\\n' }}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{{ '\\n</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_LLAMA3 = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}{%- endif -%}"
    "{%- if tools -%}"
    "{%- set ns.system = (ns.system + '\\n\\n' if ns.system else '') + 'You can call these functions"
    ' (JSON schemas); to call one, answer with {"name": ..., "parameters": {...}}:\\n\' -%}'
    "{%- for tool in tools -%}{%- set ns.system = ns.system + (tool | tojson) + '\\n' -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if ns.system -%}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + ns.system + '<|eot_id|>' }}"
    "{%- endif -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{ '<|start_header_id|>' + ('ipython' if message['role'] == 'tool' else message['role'])"
    " + '<|end_header_id|>\\n\\n' + message['content'] }}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{{ {'name': call['function']['name'], 'parameters': call['function']['arguments']} | tojson }}"
    "{%- endfor -%}"
    "{{ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

_MISTRAL = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] + '\\n\\n' -%}{%- endif -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if ns.first and tools -%}{{ '[AVAILABLE_TOOLS] ' + (tools | tojson) + ' [/AVAILABLE_TOOLS]' }}{%- endif -%}"
    "{{ '[INST] ' + (ns.system if ns.first else '') + message['content'] + ' [/INST]' }}"
    "{%- set ns.first = false -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{ '[TOOL_RESULTS] ' + message['content'] + ' [/TOOL_RESULTS]' }}"
    "{%- else -%}"
    "{{ message['content'] }}"
    "{%- if message['tool_calls'] -%}"
    "{{ '[TOOL_CALLS] ' }}{{ message['tool_calls'] | map(attribute='function') | list | tojson }}"
    "{%- endif -%}"
    "{{ eos_token or '' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_GEMMA = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] + '\\n\\n' -%}{%- endif -%}"
    "{%- if tools -%}"
    "{%- set ns.system = ns.system + 'You can call these functions (JSON schemas):\\n' -%}"
    "{%- for tool in tools -%}{%- set ns.system = ns.system + (tool | tojson) + '\\n' -%}{%- endfor -%}"
    "{%- set ns.system = ns.system + '\\n' -%}"
    "{%- endif -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if ns.first and message['role'] == 'user' -%}{{ ns.system }}{%- set ns.first = false -%}{%- endif -%}"
    "{{ message['content'] }}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{%- endfor -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

_PHI3 = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' and tools -%}"
    "{{ '<|system|>\\n' + message['content'] + '\\n\\nYou can call these functions (JSON schemas):\\n'"
    " + (tools | tojson) + '<|end|>\\n' }}"
    "{%- else -%}"
    "{%- if loop.first and tools and message['role'] != 'system' -%}"
    "{{ '<|system|>\\nYou can call these functions (JSON schemas):\\n' + (tools | tojson) + '<|end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{%- endfor -%}"
    "{{ '<|end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

_ALPACA = (
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\\n\\n' }}"
    "{%- else -%}{{ 'Below is an instruction that describes a task. Write a response that appropriately"
    " completes the request.\\n\\n' }}{%- endif -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- if message['role'] == 'user' -%}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'tool' -%}{{ '### Input:\\n' + message['content'] + '\\n\\n' }}"
    "{%- else -%}{{ '### Response:\\n' + message['content'] }}"
    "{%- for call in message['tool_calls'] or [] -%}{{ call['function'] | tojson }}{%- endfor -%}"
    "{{ (eos_token or '') + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "llama-3": _LLAMA3,
    "mistral-instruct": _MISTRAL,
    "gemma": _GEMMA,
    "phi-3": _PHI3,
    "alpaca": _ALPACA,
}

# The tokens each built-in template needs as single tokens (turn markers and end-of-turn).
BUILTIN_SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama-3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral-instruct": (),  # [INST] ... [/INST] is plain text in Mistral's own v0.1 vocabulary; </s> ends turns
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "phi-3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "alpaca": (),
}

NO_TEMPLATE_FIX = (
    "set `chat_template: chatml` (or another built-in: "
    + ", ".join(BUILTIN_TEMPLATES)
    + ") or `chat_template_path: path/to/template.jinja`"
)


def missing_template_tokens(tokenizer, chat_template: str) -> list[str]:
    """The markers of a built-in template that are not single special tokens of `tokenizer`.

    A base model given `chat_template: chatml` usually has no `<|im_start|>` / `<|im_end|>`
    tokens: the text is then split into pieces like `<`, `|`, `im`, ... and the model never
    sees one token that ends a turn. Neither the trainer nor the pipeline calls this or adds
    tokens: it is for the caller, who adds the markers it names
    (`tokenizer.add_special_tokens({"additional_special_tokens": missing})`) and resizes the
    model's embeddings (`model.resize_token_embeddings(len(tokenizer))`) before training.

        >>> missing_template_tokens(word_tokenizer(), "chatml")
        []
        >>> missing_template_tokens(word_tokenizer(chat_specials=False), "chatml")
        ['<|im_start|>', '<|im_end|>']
    """
    markers = BUILTIN_SPECIAL_TOKENS.get(chat_template, ())
    known = set(getattr(tokenizer, "all_special_tokens", [])) | set(
        getattr(tokenizer, "get_added_vocab", dict)()
    )
    return [m for m in markers if m not in known]
