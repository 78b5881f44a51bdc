"""Conversations in source data, normalised: messages with known roles (ShareGPT speakers mapped),
reasoning traces, tool calls and tools, per-example template variables, and the system prompt a
source adds. formats.py calls these for the `messages`, `sharegpt` and conversational
prompt/completion formats.
"""

from __future__ import annotations

import difflib
import json

from tunesmith.data.sources import DataError


def _where(index) -> str:
    return f"example {index}" if index is not None else "example"


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
