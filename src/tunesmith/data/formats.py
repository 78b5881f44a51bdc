"""Recognise what kind of training data a dataset holds and rewrite each example into one of
the normalised kinds of `docs/ARCHITECTURE.md`:

    text                              {"text": str}
    prompt_completion                 {"prompt": str, "completion": str}
    conversational_prompt_completion  {"prompt": [msg], "completion": [msg], "tools"?: [...]}
    messages                          {"messages": [msg], "tools"?: [...]}
    tokenized                         {"input_ids": [int], "labels"?: [int]}

Worked example (ShareGPT -> messages):

    >>> detect_format(["conversations"])
    'sharegpt'
    >>> normalize_example({"conversations": [{"from": "human", "value": "Hi"},
    ...                                      {"from": "gpt", "value": "Hello!"}]}, "sharegpt")
    {'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]}

Every error names the example index and the field, and says how to fix it.
"""

from __future__ import annotations

import difflib
import json
import logging

from tunesmith.data.sources import DataError

logger = logging.getLogger(__name__)

# source format -> the columns that identify it (all required); "text" uses dataset_text_field.
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_response": ("prompt", "response"),
    "prompt_completion": ("prompt", "completion"),
    "conversational_prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "tokenized": ("input_ids",),
    "formatting_func": (),
}
FORMATS: tuple[str, ...] = tuple(FORMAT_COLUMNS)

# Column names we know, for "did you mean" suggestions on misspelled columns.
KNOWN_COLUMNS = ("text", "prompt", "response", "completion", "instruction", "input", "output",
                 "messages", "conversations", "tools", "input_ids", "labels", "chat_template_kwargs")  # fmt: skip

# ShareGPT speaker names -> roles. "function_call" is an assistant turn that calls a tool;
# "observation" / "function_response" are the tool's answer.
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "chatgpt": "assistant", "system": "system", "tool": "tool", "observation": "tool",
    "function_response": "tool", "ipython": "tool", "function_call": "assistant",
}  # fmt: skip
ROLES = ("system", "user", "assistant", "tool")
# Per-example extra variables for the chat template (over the config's chat_template_kwargs)
TEMPLATE_KWARGS_COLUMN = "chat_template_kwargs"
# An assistant message's reasoning trace (kept as both names; see _reasoning)
REASONING_KEYS = ("reasoning_content", "thinking")

# The Stanford Alpaca prompts (the format's definition, so they must be exactly these).
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def _where(index) -> str:
    return f"example {index}" if index is not None else "example"


def _accepted() -> str:
    parts = []
    for fmt, cols in FORMAT_COLUMNS.items():
        if fmt == "conversational_prompt_completion":
            continue  # same columns as prompt_completion, told apart by value type
        if fmt == "formatting_func":
            parts.append("any columns with a formatting_func")
        else:
            parts.append(f"{fmt} ({' + '.join(cols)})")
    return "; ".join(parts)


def _suggestions(column_names) -> str:
    hints = []
    for col in column_names:
        if col in KNOWN_COLUMNS:
            continue
        close = difflib.get_close_matches(col, KNOWN_COLUMNS, n=1, cutoff=0.6)
        if close:
            hints.append(f"column {col!r} looks like a misspelling of {close[0]!r}")
    return (" " + "; ".join(hints) + ".") if hints else ""


def detect_format(
    column_names, *, dataset_text_field=None, formatting_func=None, override=None, first_example=None
):
    """Pick the source format from the column names (and, for prompt/completion, whether the
    first example holds strings or message lists).

        >>> detect_format(["prompt", "completion"], first_example={"prompt": "2+2=", "completion": "4"})
        'prompt_completion'
        >>> detect_format(["prompt", "response"], dataset_text_field="prompt")  # the TRL tutorials' case
        'prompt_response'

    `override` (the config's choice) wins, but its columns must exist. A `formatting_func`
    wins over the columns. A column named by a non-default `dataset_text_field` wins over the
    structured formats, except `prompt` next to `response` or `completion` (trained as prompt +
    answer, as the tutorials that set `dataset_text_field="prompt"` expect, with a notice). Raises `DataError` listing
    the columns found and the formats accepted when nothing (or more than one thing) fits.
    """
    columns = list(column_names)
    have = set(columns)
    text_field = dataset_text_field or "text"

    if override is not None:
        if override not in FORMAT_COLUMNS:
            close = difflib.get_close_matches(str(override), FORMATS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise DataError(
                f"dataset_format={override!r} is not a known dataset format; formats: {', '.join(FORMATS)}.{hint}"
            )
        if override == "formatting_func" and formatting_func is None:
            raise DataError("dataset format 'formatting_func' needs a formatting_func")
        needed = (text_field,) if override == "text" else FORMAT_COLUMNS[override]
        missing = [c for c in needed if c not in have]
        if missing:
            raise DataError(
                f"dataset format {override!r} needs column(s) {', '.join(map(repr, missing))}; "
                f"columns found: {', '.join(columns)}.{_suggestions(columns)}"
            )
        return override

    if formatting_func is not None:
        return "formatting_func"
    if "input_ids" in have:
        return "tokenized"

    if text_field == "prompt" and ({"prompt", "response"} <= have or {"prompt", "completion"} <= have):
        # Reading only the prompt column would silently drop the answers the user meant to train.
        other = "response" if "response" in have else "completion"
        fmt = "prompt_response" if other == "response" else "prompt_completion"
        if fmt == "prompt_completion" and isinstance((first_example or {}).get("prompt"), list):
            fmt = "conversational_prompt_completion"
        logger.info(
            "dataset_text_field='prompt' on a prompt/%s dataset: training on prompt + %s "
            "(loss on the %s only unless completion_only_loss=False)",
            other, other, other,
        )  # fmt: skip
        return fmt
    if dataset_text_field not in (None, "text"):
        if dataset_text_field in have:
            return "text"
        close = difflib.get_close_matches(dataset_text_field, columns, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DataError(
            f"dataset_text_field={dataset_text_field!r} is not a column; columns found: "
            f"{', '.join(columns)}.{hint}"
        )

    matches = []
    if "messages" in have:
        matches.append("messages")
    if "conversations" in have:
        matches.append("sharegpt")
    if {"prompt", "completion"} <= have:
        prompt = (first_example or {}).get("prompt")
        matches.append(
            "conversational_prompt_completion" if isinstance(prompt, list) else "prompt_completion"
        )
    elif {"prompt", "response"} <= have:
        matches.append("prompt_response")
    if {"instruction", "output"} <= have:
        matches.append("alpaca")
    if len(matches) > 1:
        raise DataError(
            f"the columns fit more than one format ({', '.join(matches)}); columns found: {', '.join(columns)}. "
            f"Remove the extra columns or choose one with `dataset_format: {matches[0]}` in the config."
        )
    if matches:
        return matches[0]
    if text_field in have:
        return "text"
    raise DataError(
        f"cannot tell the dataset format from its columns; columns found: {', '.join(columns) or '(none)'}."
        f"{_suggestions(columns)} Formats accepted: {_accepted()}. For plain text in another column, "
        "set dataset_text_field to its name."
    )


def normalize_example(
    example: dict, fmt: str, *, dataset_text_field=None, formatting_func=None, index=None
) -> dict:
    """Rewrite one example of source format `fmt` into its normalised kind.

        >>> normalize_example({"instruction": "Add.", "input": "", "output": "4"}, "alpaca")["completion"]
        '4'
        >>> normalize_example({"prompt": "Hi", "response": "Hello"}, "prompt_response")
        {'prompt': 'Hi', 'completion': '\\nHello'}

    prompt/response: when neither side has whitespace at the join, a newline is put in front
    of the response so the two do not run together ("Hi" + "Hello" -> "Hi\\nHello").

    formatting_func: called on the example and must return a string. The older batched style
    (a function that takes a batch of columns and returns a list with one string per example,
    as in TRL 0.x and Unsloth notebooks) is recognised: when the function returns a list, or
    fails on a single example, it is called again on a batch of one and its one string used.
    Returning several strings for one example is an error (one example in, one example out).
    """
    where = _where(index)
    if fmt == "text":
        field = dataset_text_field or "text"
        return {"text": _string(example, field, where)}
    if fmt == "prompt_completion":
        return {
            "prompt": _string(example, "prompt", where),
            "completion": _string(example, "completion", where),
        }
    if fmt == "prompt_response":
        prompt, response = _string(example, "prompt", where), _string(example, "response", where)
        if not (prompt[-1].isspace() or response[0].isspace()):
            response = "\n" + response
        return {"prompt": prompt, "completion": response}
    if fmt == "alpaca":
        instruction = _string(example, "instruction", where)
        output = _string(example, "output", where)
        extra = example.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError(
                f"{where}, field 'input': expected a string, got {type(extra).__name__} ({extra!r:.60})"
            )
        if extra and extra.strip():
            prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
        else:
            prompt = ALPACA_PROMPT.format(instruction=instruction)
        return {"prompt": prompt, "completion": output}
    if fmt in ("messages", "sharegpt"):
        field = "messages" if fmt == "messages" else "conversations"
        messages = _messages(example.get(field), field, where)
        check_roles(messages, where=where, field=field)
        return _with_template_kwargs(_with_tools({"messages": messages}, example, where), example, where)
    if fmt == "conversational_prompt_completion":
        prompt = _messages(example.get("prompt"), "prompt", where)
        completion = _messages(example.get("completion"), "completion", where)
        if completion[0]["role"] != "assistant":
            raise DataError(
                f"{where}, field 'completion': must start with an assistant message, "
                f"starts with {completion[0]['role']!r}"
            )
        check_roles(prompt + completion, where=where, field="prompt + completion")
        out = _with_tools({"prompt": prompt, "completion": completion}, example, where)
        return _with_template_kwargs(out, example, where)
    if fmt == "tokenized":
        return _tokenized(example, where)
    if fmt == "formatting_func":
        if formatting_func is None:
            raise DataError("dataset format 'formatting_func' needs a formatting_func")
        return {"text": _apply_formatting_func(formatting_func, example, where)}
    raise DataError(f"dataset format {fmt!r} is not known; formats: {', '.join(FORMATS)}")


# --------------------------------------------------------------------------- fields


def _string(example: dict, field: str, where: str) -> str:
    if field not in example:
        close = difflib.get_close_matches(field, list(example), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"{where}: has no field {field!r}{hint}; fields: {', '.join(example)}")
    value = example[field]
    if value is None:
        raise DataError(f"{where}, field {field!r}: is missing (null); the dataset may mix formats")
    if not isinstance(value, str):
        raise DataError(
            f"{where}, field {field!r}: expected a string, got {type(value).__name__} ({value!r:.60})"
        )
    if not value.strip():
        raise DataError(f"{where}, field {field!r}: is an empty string; remove the example or fill it in")
    return value


def _tokenized(example: dict, where: str) -> dict:
    ids = example.get("input_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
        raise DataError(f"{where}, field 'input_ids': expected a non-empty list of token ids (ints >= 0)")
    out = {"input_ids": list(ids)}
    labels = example.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(t, int) for t in labels):
            raise DataError(f"{where}, field 'labels': expected a list of ints (-100 = not trained)")
        if len(labels) != len(ids):
            raise DataError(
                f"{where}: 'labels' has {len(labels)} entries but 'input_ids' has {len(ids)}; they must match"
            )
        out["labels"] = list(labels)
    return out


def _apply_formatting_func(func, example: dict, where: str) -> str:
    try:
        result, first_error = func(example), None
    except Exception as err:  # the batched style may fail on a single example; try it below
        result, first_error = None, err
    if isinstance(result, str):
        if not result.strip():
            raise DataError(f"{where}: formatting_func returned an empty string")
        return result
    try:
        batched = func({key: [value] for key, value in example.items()})
    except Exception:
        batched = None
    if isinstance(batched, list) and len(batched) == 1 and isinstance(batched[0], str):
        if not batched[0].strip():
            raise DataError(f"{where}: formatting_func returned an empty string")
        return batched[0]
    if first_error is not None:
        raise DataError(
            f"{where}: formatting_func raised {type(first_error).__name__}: {first_error}"
        ) from first_error
    raise DataError(
        f"{where}: formatting_func must return one string per example, got {type(result).__name__}"
        + (f" of {len(result)} items" if isinstance(result, list) else "")
    )


# --------------------------------------------------------------------------- conversations


def _messages(value, field: str, where: str) -> list[dict]:
    if value is None:
        raise DataError(f"{where}, field {field!r}: is missing (null); the dataset may mix formats")
    if not isinstance(value, list):
        raise DataError(
            f"{where}, field {field!r}: expected a list of messages like "
            f'[{{"role": "user", "content": "..."}}], got {type(value).__name__} ({value!r:.60})'
        )
    if not value:
        raise DataError(f"{where}, field {field!r}: the list of messages is empty")
    return [_message(m, f"{where}, {field}[{i}]") for i, m in enumerate(value)]


def _message(msg, where: str) -> dict:
    """One message, role/content or ShareGPT from/value, -> {"role", "content", ...}."""
    if not isinstance(msg, dict):
        raise DataError(
            f"{where}: expected a message dict with 'role' and 'content', got {type(msg).__name__}"
        )
    if msg.get("role") is not None:
        role, content = msg["role"], msg.get("content")
    elif msg.get("from") is not None:
        speaker = msg["from"]
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(
                f"{where}: unknown ShareGPT speaker {speaker!r}; known: {', '.join(SHAREGPT_ROLES)}"
            )
        content = msg.get("value")
        if speaker == "function_call":
            return _sharegpt_function_call(content, where)
    else:
        raise DataError(f"{where}: a message needs 'role' and 'content' (or ShareGPT 'from' and 'value'); "
                        f"keys found: {', '.join(k for k, v in msg.items() if v is not None)}")  # fmt: skip
    if role not in ROLES:
        close = difflib.get_close_matches(str(role), ROLES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"{where}: unknown role {role!r}{hint}; roles: {', '.join(ROLES)}")

    out = {"role": role}
    tool_calls = msg.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise DataError(f"{where}: only assistant messages may have tool_calls, this one is {role!r}")
        out["tool_calls"] = _tool_calls(tool_calls, where)
    if isinstance(content, list):  # multimodal-style parts: keep the text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise DataError(f"{where}, content: only text parts are supported")
        content = "".join(p.get("text") or "" for p in content)
    reasoning = _reasoning(msg, role, where)
    if content is None and ("tool_calls" in out or reasoning is not None):
        content = ""
    if not isinstance(content, str):
        raise DataError(
            f"{where}, content: expected a string, got {type(content).__name__} ({content!r:.60})"
        )
    if not content.strip() and "tool_calls" not in out and reasoning is None:
        raise DataError(f"{where}, content: is an empty string; remove the message or fill it in")
    out["content"] = content
    for key in ("name", "tool_call_id"):  # some templates render these for tool messages
        if msg.get(key) is not None:
            out[key] = msg[key]
    if reasoning is not None:
        # both names: Qwen3 / DeepSeek-style templates read reasoning_content, gpt-oss-style ones thinking
        out["reasoning_content"] = out["thinking"] = reasoning
    return out


def _reasoning(msg: dict, role: str, where: str) -> str | None:
    """An assistant message's reasoning trace: `reasoning_content`, or `thinking` (the same field under
    the name gpt-oss-style templates use). None when absent, null or blank (Arrow gives null to a
    message without the key when another message of the dataset has it)."""
    given = {key: msg.get(key) for key in REASONING_KEYS if msg.get(key) is not None}
    if not given:
        return None
    if role != "assistant":
        raise DataError(
            f"{where}: only assistant messages may have {' / '.join(given)}, this one is {role!r}"
        )
    for key, value in given.items():
        if not isinstance(value, str):
            raise DataError(
                f"{where}, {key}: expected a string (the reasoning text), got {type(value).__name__} ({value!r:.60})"
            )
    values = [v for v in given.values() if v.strip()]
    if len(set(values)) > 1:
        raise DataError(
            f"{where}: reasoning_content and thinking hold different texts; keep one of them (they are one field)"
        )
    return values[0] if values else None


def _sharegpt_function_call(value, where: str) -> dict:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: a function_call turn needs its call as a string value")
    try:
        call = json.loads(value)
    except json.JSONDecodeError:
        return {"role": "assistant", "content": value}  # free-form call text: train it as written
    if isinstance(call, dict) and "name" in call:
        return {"role": "assistant", "content": "", "tool_calls": _tool_calls([call], where)}
    return {"role": "assistant", "content": value}


def _tool_calls(calls, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise DataError(f"{where}, tool_calls: expected a list, got {type(calls).__name__}")
    out = []
    for i, call in enumerate(calls):
        if not isinstance(call, dict):
            raise DataError(f"{where}, tool_calls[{i}]: expected a dict, got {type(call).__name__}")
        function = call.get("function") or call  # {"type": "function", "function": {...}} or bare
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}, tool_calls[{i}]: needs a function 'name'")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as err:
                raise DataError(f"{where}, tool_calls[{i}].arguments: not valid JSON ({err.msg})") from None
        out.append(
            {"type": "function", "function": {"name": name, "arguments": _drop_nulls(arguments or {})}}
        )
    return out


def _with_tools(out: dict, example: dict, where: str) -> dict:
    tools = example.get("tools")
    if tools is None:
        return out
    if isinstance(tools, str):
        if not tools.strip():
            return out
        tools = _json_field(tools, where, "tools")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}, field 'tools': expected a list of tool (JSON schema) dicts")
    if tools:
        out["tools"] = [_drop_nulls(t) for t in tools]
    return out


def with_system_prompt(normalized: dict, system_prompt: str, fmt: str, index=None) -> dict:
    """A normalised conversation with `system_prompt` as its system message, unless it has one of its
    own (the example's wins). Only conversations have a system turn: other kinds are an error.

        >>> with_system_prompt({"messages": [{"role": "user", "content": "hi"}]}, "Be brief.", "messages")
        {'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'hi'}]}
    """
    key = "messages" if "messages" in normalized else "prompt"
    turns = normalized.get(key)
    if not isinstance(turns, list):
        raise DataError(
            f"{_where(index)}: system_prompt applies to conversations (messages, ShareGPT, conversational "
            f"prompt/completion), but this source is {fmt!r}; put the instruction in the prompt text instead"
        )
    if turns and turns[0]["role"] == "system":
        return normalized
    return {**normalized, key: [{"role": "system", "content": system_prompt}, *turns]}


def _with_template_kwargs(out: dict, example: dict, where: str) -> dict:
    """The example's own `chat_template_kwargs` column (a dict, or a JSON object as a string), e.g.
    {"enable_thinking": false}: extra variables for the chat template, over the config's."""
    value = example.get(TEMPLATE_KWARGS_COLUMN)
    if value is None or (isinstance(value, str) and not value.strip()):
        return out
    if isinstance(value, str):
        value = _json_field(value, where, TEMPLATE_KWARGS_COLUMN)
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise DataError(
            f"{where}, field {TEMPLATE_KWARGS_COLUMN!r}: expected a mapping of template variables, e.g. "
            f'{{"enable_thinking": false}}, got {type(value).__name__} ({value!r:.60})'
        )
    value = {k: v for k, v in value.items() if v is not None}  # Arrow's nulls for keys of other rows
    if value:
        out[TEMPLATE_KWARGS_COLUMN] = value
    return out


def _json_field(text: str, where: str, field: str):
    """A field stored as a JSON string, parsed; JSON only: nothing from the data is ever evaluated."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}, field {field!r}: not valid JSON ({err.msg}, column {err.colno})") from None


def _drop_nulls(value):
    # Arrow stores a list of dicts as one struct type, so a key present in one tool schema
    # appears as null in all the others; dropping nulls gives back what the user wrote.
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _a(word: str) -> str:
    return "an" if word == "assistant" else "a"  # the roles: system, user, assistant, tool


def check_roles(messages: list[dict], *, where: str = "example", field: str = "messages") -> None:
    """Check the turn order: an optional system message first, then user, then assistant
    (with tool results after an assistant turn), and so on, ending on an assistant turn.

        user, assistant, user, assistant                      ok
        system, user, assistant(tool_calls), tool, assistant  ok
        system, assistant, ...                                error: assistant before any user turn
    """
    # role -> roles allowed next
    allowed = {
        None: ("system", "user"),
        "system": ("user",),
        "user": ("assistant",),
        "assistant": ("user", "tool"),
        "tool": ("tool", "assistant"),
    }
    previous = None
    for i, msg in enumerate(messages):
        role = msg["role"]
        if role not in allowed[previous]:
            raise DataError(
                f"{where}, {field}[{i}]: {_a(role)} {role!r} message cannot follow "
                f"{'the start' if previous is None else _a(previous) + ' ' + repr(previous) + ' message'}; expected "
                f"{' or '.join(allowed[previous])}. Turns go: system (optional), user, assistant, user, ... "
                "(tool results after an assistant turn)"
            )
        previous = role
    if previous != "assistant":
        raise DataError(
            f"{where}, {field}: the conversation ends on a {previous!r} message; it must end with an "
            "assistant turn (there is nothing to learn after the last assistant message)"
        )
