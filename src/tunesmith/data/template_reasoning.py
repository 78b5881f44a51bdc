"""Reasoning in chat templates: a message's reasoning and answer (`reasoning_content`, or a leading
`<think>` block), where the rendered text shows the reasoning block of a turn, and the check of
`chat_template_kwargs` (the template variables such as `enable_thinking`).
"""

from __future__ import annotations

from tunesmith.data.sources import DataError

# apply_chat_template's own parameters: a template variable of one of these names would not reach the template
_RESERVED_TEMPLATE_KWARGS = (
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "messages",
)  # fmt: skip


def check_template_kwargs(chat_template_kwargs, where: str = "chat_template_kwargs") -> dict:
    """The template variables as a dict ({} for None); a clear error for a non-mapping or a name that
    apply_chat_template keeps for itself (`tools`, `add_generation_prompt`, ...)."""
    if chat_template_kwargs is None:
        return {}
    if not isinstance(chat_template_kwargs, dict) or not all(
        isinstance(k, str) for k in chat_template_kwargs
    ):
        raise DataError(
            f"{where}: expected a mapping of template variables, e.g. {{enable_thinking: false}}, "
            f"got {chat_template_kwargs!r:.60}"
        )
    reserved = [k for k in chat_template_kwargs if k in _RESERVED_TEMPLATE_KWARGS]
    if reserved:
        raise DataError(
            f"{where}: {', '.join(map(repr, reserved))} cannot be a template variable (apply_chat_template "
            "sets it itself); tools come from the data's `tools` column"
        )
    return dict(chat_template_kwargs)


def reasoning_and_answer(message: dict) -> tuple[str | None, str]:
    r"""(reasoning, answer) of a message: its `reasoning_content` and content, or, without one, a
    leading `<think>...</think>` block of the content and what follows it.

        >>> reasoning_and_answer({"role": "assistant", "content": "<think>2+2 is 4</think>\n4"})
        ('2+2 is 4', '\n4')
    """
    content = message.get("content") or ""
    if not isinstance(content, str):  # content parts (vision data): the answer is their text
        content = "".join(
            p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    reasoning = message.get("reasoning_content")
    if reasoning is not None and reasoning.strip():
        return reasoning, content
    if (
        message.get("role") == "assistant"
        and content.lstrip().startswith("<think>")
        and "</think>" in content
    ):
        inner, _, answer = content.lstrip()[len("<think>") :].partition("</think>")
        if inner.strip():
            return inner, answer
    return None, content


_REASONING_PROBE, _ANSWER_PROBE = "tunesmith-reasoning-probe", "tunesmith-answer-probe"


_GLUE: dict[tuple[str, str], str] = {}  # (template, template kwargs) -> what _probe_glue found


def _reasoning_glue(render, key) -> str:
    """What the template writes between a turn's reasoning and its answer (e.g. "\\n</think>\\n\\n"),
    from a probe conversation rendered once per template; "" when the template does not render it."""
    if key not in _GLUE:
        _GLUE[key] = _probe_glue(render)
    return _GLUE[key]


def _probe_glue(render) -> str:
    probe = [
        {"role": "user", "content": "probe"},
        {"role": "assistant", "content": _ANSWER_PROBE, "reasoning_content": _REASONING_PROBE,
         "thinking": _REASONING_PROBE},
    ]  # fmt: skip
    try:
        (text,) = render([probe], False)
    except DataError:
        return ""
    at, answer = text.find(_REASONING_PROBE), text.find(_ANSWER_PROBE)
    if at < 0 or answer < at:
        return ""
    return text[at + len(_REASONING_PROBE) : answer]


def _reasoning_block(text: str, start: int, end: int, message: dict, glue) -> tuple[int, int] | None:
    """Character span of the reasoning block of the assistant turn at text[start:end], or None when
    the message has no reasoning or the text does not show it. `glue()` gives what the template
    writes between reasoning and answer: the answer is looked for after it."""
    reasoning, answer = reasoning_and_answer(message)
    if reasoning is None:
        return None
    reasoning, answer = reasoning.strip(), answer.strip()
    at = text.find(reasoning, start, end)
    if at < 0:
        return None
    reasoning_end = at + len(reasoning)
    if answer and text.find(answer, start, at) >= 0 and text.find(answer, reasoning_end, end) < 0:
        # the answer is written before the reasoning: the block is the reasoning text alone
        return at, reasoning_end
    # past the template's closing marker (e.g. "</think>"), then to the answer, which ends the turn
    cursor = reasoning_end
    for closing in (glue().strip(), "</think>"):  # the template's marker; the data's own, inline
        gap = text[cursor:end]
        if closing and gap.lstrip().startswith(closing):
            cursor += len(gap) - len(gap.lstrip()) + len(closing)
    answer_at = text.find(answer, cursor, end) if answer else -1
    if answer_at >= 0:
        return start, answer_at
    while cursor < end and text[cursor].isspace():  # no answer text (a turn of tool calls only)
        cursor += 1
    return start, cursor
