"""Chat templates: the tokenizer's own, a file, or a built-in one for base models that have
none (template_library.py); and the assistant-span finder behind assistant-only loss, with the
reasoning block of each turn (template_reasoning.py).

Most chat templates in the wild have no `{% generation %}` markers, so the spans of the
assistant turns are found by rendering prefixes of the conversation:

    before  = render(messages[:i], add_generation_prompt=True)   # ...<|im_start|>assistant\\n
    through = render(messages[:i + 1])                           # ...<|im_start|>assistant\\nHi!<|im_end|>\\n
    span    = text[len(before) : len(through.rstrip())]          # "Hi!<|im_end|>"

The span runs from the first character the model would generate to the end-of-turn token
that stops generation (trailing whitespace after it is template glue, not trained). The
character span is mapped to tokens with the tokenizer's offset mapping.

    >>> tok = word_tokenizer()  # the word-level tokenizer of tests/data
    >>> ids, mask = render_messages(tok, [{"role": "user", "content": "hi"},
    ...                                   {"role": "assistant", "content": "hello"}], chat_template="chatml")
    >>> [t for t, m in zip(tok.convert_ids_to_tokens(ids), mask) if m]
    ['hello', '<|im_end|>']
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import json
import logging
from pathlib import Path

from tunesmith.common import once
from tunesmith.data.sources import DataError
from tunesmith.data.template_library import (  # noqa: F401
    BUILTIN_SPECIAL_TOKENS,
    BUILTIN_TEMPLATES,
    NO_TEMPLATE_FIX,
    missing_template_tokens,
)
from tunesmith.data.template_reasoning import (  # re-exported
    _reasoning_block,
    _reasoning_glue,
    check_template_kwargs,
    reasoning_and_answer,
)

logger = logging.getLogger(__name__)


def resolve_chat_template(tokenizer, *, chat_template=None, chat_template_path=None) -> str | None:
    """The jinja template to render conversations with, or None when there is none.

    `chat_template` is a built-in name (`"chatml"`, `"llama-3"`, `"mistral-instruct"`,
    `"gemma"`, `"phi-3"`, `"alpaca"`) or a jinja string; `chat_template_path` is a `.jinja`
    file, a `tokenizer_config.json`, or a folder holding either. Otherwise the tokenizer's own.

        >>> resolve_chat_template(word_tokenizer(), chat_template="chatml") == BUILTIN_TEMPLATES["chatml"]
        True
    """
    if chat_template is not None and chat_template_path is not None:
        raise DataError("set either chat_template or chat_template_path, not both")
    if chat_template is not None:
        if chat_template in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[chat_template]
        if "{{" in chat_template or "{%" in chat_template:
            return chat_template
        close = difflib.get_close_matches(chat_template, list(BUILTIN_TEMPLATES), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DataError(
            f"chat_template={chat_template!r} is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}) "
            f"nor a jinja template.{hint} For a file, use chat_template_path."
        )
    if chat_template_path is not None:
        return _read_template_file(Path(chat_template_path))
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one renders conversations
        own = own.get("default")
    return own or None


def _read_template_file(path: Path) -> str:
    path = path.expanduser()
    if path.is_dir():
        for name in ("chat_template.jinja", "tokenizer_config.json"):
            if (path / name).is_file():
                return _read_template_file(path / name)
        raise DataError(
            f"chat_template_path={path}: the folder has no chat_template.jinja or tokenizer_config.json"
        )
    if not path.is_file():
        raise DataError(f"chat_template_path={path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        template = json.loads(text).get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if not template:
            raise DataError(f"chat_template_path={path}: the file has no 'chat_template'")
        return template
    if not text.strip():
        raise DataError(f"chat_template_path={path}: the file is empty")
    return text


def render_messages(
    tokenizer,
    messages,
    *,
    tools=None,
    chat_template=None,
    add_generation_prompt=False,
    chat_template_kwargs=None,
):
    """Render a conversation with the chat template and mark the tokens of assistant turns.

    Returns `(input_ids, assistant_mask)`, two lists of the same length; `assistant_mask[i]`
    is 1 for the tokens of assistant turns, including the end-of-turn token that stops
    generation (`<|im_end|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>`, ...). Works for any template
    that renders earlier turns the same whether or not later turns follow (all common ones
    do); for one that does not, a template with `{% generation %}` markers is used through
    transformers, and otherwise the error says what to do. `chat_template_kwargs` are extra
    template variables (e.g. `{"enable_thinking": False}`).

        chatml, [user "hi", assistant "hello"]:
        tokens  <|im_start|> user hi <|im_end|> <|im_start|> assistant hello <|im_end|>
        mask         0        0   0     0           0           0       1       1
    """
    ids, turns = assistant_turns(
        tokenizer,
        messages,
        tools=tools,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        chat_template_kwargs=chat_template_kwargs,
    )
    return ids, [int(turn >= 0) for turn in turns]


def assistant_turns(
    tokenizer,
    messages,
    *,
    tools=None,
    chat_template=None,
    add_generation_prompt=False,
    chat_template_kwargs=None,
):
    """Like `render_messages`, but says *which* assistant message each token belongs to:
    `(input_ids, turns)` with `turns[i]` the index in `messages` of the assistant message
    that token `i` is part of, or -1. Used to train only the completion's turns.

        chatml, [user "hi", assistant "hello"]:
        tokens  <|im_start|> user hi <|im_end|> <|im_start|> assistant hello <|im_end|>
        turns       -1       -1  -1    -1          -1          -1       1       1
    """
    rendered = assistant_parts(
        tokenizer,
        messages,
        tools=tools,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        chat_template_kwargs=chat_template_kwargs,
    )
    return rendered.input_ids, rendered.turns


@dataclasses.dataclass
class RenderedTurns:
    """A rendered conversation, token by token (all lists of the same length):

    `turns[t]`: index in `messages` of the assistant message token t belongs to, or -1;
    `reasoning[t]`: 1 when token t is in that turn's reasoning block (the text the template writes
    for `reasoning_content`, its `<think>` / channel markers included, up to where the answer
    starts), else 0. `unrendered_reasoning`: indices of assistant messages that have reasoning the
    rendered text does not show (a template that strips past reasoning, or one that ignores it).
    """

    input_ids: list[int]
    turns: list[int]
    reasoning: list[int]
    unrendered_reasoning: list[int]


def assistant_parts(
    tokenizer,
    messages,
    *,
    tools=None,
    chat_template=None,
    add_generation_prompt=False,
    chat_template_kwargs=None,
) -> RenderedTurns:
    """Render `messages` and say, per token, which assistant turn it belongs to and whether it is
    part of that turn's reasoning.

    Reasoning templates, e.g. Qwen3-style (strips the reasoning of turns before the last user
    message) on [user "q1", assistant (reasoning "r1", "a1"), user "q2", assistant (reasoning "r2", "a2")]:

        text       ...assistant\n a1 <|im_end|> ... assistant\n <think> r2 </think> a2 <|im_end|>
        turns            -1      1      1             -1         3      3     3     3      3
        reasoning         0      0      0              0         1      1     1     0      0
        unrendered_reasoning = [1]   (r1 is not in the text: the model never sees it at inference)

    A reasoning block runs from the turn's first character to where its answer starts, so the
    opening and closing markers go with the reasoning and the end-of-turn token with the answer.
    An assistant message without `reasoning_content` whose content begins with a
    `<think>...</think>` block (DeepSeek-R1-style data) has that block as its reasoning.
    """
    template = resolve_chat_template(tokenizer, chat_template=chat_template)
    if template is None:
        raise DataError(
            f"conversational data needs a chat template and the tokenizer has none; {NO_TEMPLATE_FIX}"
        )
    template_kwargs = check_template_kwargs(chat_template_kwargs)

    def render(conversations: list[list[dict]], generation_prompt: bool) -> list[str]:
        # One batched call per setting: apply_chat_template's own overhead is paid once,
        # not once per prefix.
        if not conversations:
            return []
        try:
            out = tokenizer.apply_chat_template(
                conversations,
                tools=tools,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
                **template_kwargs,
            )
        except Exception as err:  # jinja errors, raise_exception() in the template
            raise DataError(
                f"the chat template failed to render the conversation: {type(err).__name__}: {err}"
            ) from err
        return list(out)

    turns = [i for i, msg in enumerate(messages) if msg["role"] == "assistant"]
    befores = render([messages[:i] for i in turns], True)
    throughs = render([messages[: i + 1] for i in turns] + [messages], add_generation_prompt)
    if add_generation_prompt:  # the full text differs from the last "through": render it apart
        throughs = throughs[:-1] + render([messages], True)
    text = throughs.pop()
    spans = _assistant_spans(turns, befores, throughs, text)
    if None in spans and "generation %}" in template:
        ids, marked = _marked_turns(
            tokenizer, messages, tools, template, add_generation_prompt, template_kwargs
        )
        if any(reasoning_and_answer(m)[0] for m in messages) and once(("templates", "generation-markers")):
            logger.warning(
                "the chat template's {%% generation %%} markers are used to find the assistant turns; their "
                "reasoning cannot be told apart from the answer there, so train_on_reasoning is not applied"
            )
        return RenderedTurns(ids, marked, [0] * len(ids), [])
    if None in spans:
        spans = _search_spans(messages, turns, throughs, text, spans)
    if spans is None:
        raise DataError(
            "cannot find the assistant turns: the chat template renders earlier turns differently once later "
            "turns are added, and not as the message's own text. Train on everything with "
            "train_on_inputs / assistant_only_loss=False, use a template with {% generation %} markers, or "
            f"{NO_TEMPLATE_FIX}"
        )
    _warn_if_no_stop_token(tokenizer, text, spans)
    _warn_if_tools_dropped(messages, tools, text, spans)
    pieces, unrendered = [], []
    glue_key = (template, json.dumps(template_kwargs, sort_keys=True, default=repr))
    for start, end, i in spans:
        block = _reasoning_block(text, start, end, messages[i], lambda: _reasoning_glue(render, glue_key))
        if block is None:
            if reasoning_and_answer(messages[i])[0]:
                unrendered.append(i)
            pieces.append((start, end, (i, 0)))
            continue
        block_start, block_end = block
        for piece in (
            (start, block_start, (i, 0)),
            (block_start, block_end, (i, 1)),
            (block_end, end, (i, 0)),
        ):
            if piece[1] > piece[0]:
                pieces.append(piece)
    ids, labels = _tokenize_spans(tokenizer, text, pieces, default=(-1, 0))
    return RenderedTurns(ids, [turn for turn, _ in labels], [flag for _, flag in labels], unrendered)


def _assistant_spans(turns, befores, throughs, text: str) -> list[tuple[int, int, int] | None]:
    """Character spans (start, end, message index) of the assistant turns in `text`; None for
    a turn the template renders differently once later turns follow (not prefix-stable).

    `befores[k]` is the rendering of the messages before assistant turn `turns[k]` with the
    generation prompt; `throughs[k]` the rendering up to and including that turn."""
    spans = []
    for i, before, through in zip(turns, befores, throughs):
        end = len(through.rstrip())
        stable = text.startswith(through) and through.startswith(before) and end > len(before)
        spans.append((len(before), end, i) if stable else None)
    return spans


def _search_spans(messages, turns, throughs, text: str, spans) -> list[tuple[int, int, int]] | None:
    """Fill the turns `_assistant_spans` could not place by finding the message's own text.

    Some templates change an earlier assistant turn once later turns follow (Qwen3 drops the
    empty `<think></think>` block from turns before the last user message). Such a turn is
    found by walking the messages in order and finding each one's content in `text`; its
    span is the content plus the closing text that the template writes after it when the
    turn is rendered last (e.g. `<|im_end|>`). Returns None when a turn cannot be found.
    """
    by_turn = {i: (span, through) for i, span, through in zip(turns, spans, throughs)}
    out, cursor = [], 0
    for i, msg in enumerate(messages):
        content = msg.get("content") or ""
        if i in by_turn and by_turn[i][0] is not None:
            out.append(by_turn[i][0])
            cursor = max(cursor, by_turn[i][0][1])
            continue
        if not content.strip():
            if i in by_turn:
                return None  # an empty assistant turn (tool calls only) has nothing to search for
            continue
        start = text.find(content.strip(), cursor)
        if i not in by_turn:
            # other turns only move the cursor past their text (so an assistant reply that a
            # user quoted is not matched in the user's turn); a template may not show them as is
            cursor = start + len(content.strip()) if start >= 0 else cursor
            continue
        if start < 0:
            return None
        cursor = start + len(content.strip())
        closing_from = by_turn[i][1].rstrip()
        at = closing_from.rfind(content.strip())
        closing = closing_from[at + len(content.strip()) :] if at >= 0 else ""
        if at < 0 or not text.startswith(closing, cursor):
            return None
        cursor += len(closing)
        out.append((start, cursor, i))
    return out


def _warn_if_no_stop_token(tokenizer, text: str, spans) -> None:
    stops = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    for _, end, _ in spans:
        if not any(text.endswith(stop, 0, end) for stop in stops):
            ending = text[max(0, end - 20) : end]
            if once(("templates", ending)):  # once per ending, not once per example
                logger.warning(
                    "the chat template ends an assistant turn with %r, not a special token: the model may not "
                    "learn to stop. A template that closes turns with a special token (add it with "
                    "missing_template_tokens) fixes that.",
                    ending,
                )
            return


def _warn_if_tools_dropped(messages, tools, text: str, spans) -> None:
    # Many templates (SmolLM2's among them) ignore `tools` and `tool_calls`: the model would be
    # trained to answer a tool-calling turn with nothing. Say so, once per process.
    names = [t.get("function", t).get("name") for t in tools or [] if isinstance(t, dict)]
    if names and not any(name and name in text for name in names) and once(("templates", "tools")):
        logger.warning(
            "the chat template does not show the `tools` column (no tool name appears in the rendered text); "
            "use a template that renders tools, e.g. chat_template: chatml"
        )
    for start, end, i in spans:
        for call in messages[i].get("tool_calls") or []:
            name = call["function"]["name"]
            if name not in text[start:end] and once(("templates", "tool_calls")):
                logger.warning(
                    "the chat template does not render assistant tool_calls (%r is not in the trained turn), "
                    "so the model would learn to answer those turns with nothing; use a template that renders "
                    "them, e.g. chat_template: chatml",
                    name,
                )


def _tokenize_spans(tokenizer, text: str, spans, default=-1) -> tuple[list[int], list]:
    """Tokens of `text` and, per token, the label of the span it overlaps (or `default`); spans are
    (start, end, label) in text order. A token across two spans takes the later span's label."""
    # The template writes BOS itself when the model wants one, so no special tokens are added.
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        enc = backend.encode(text, add_special_tokens=False)
        ids, offsets = list(enc.ids), enc.offsets
        starts = [start for start, _ in offsets]
        ends = [max(end, start + 1) for start, end in offsets]  # zero-width tokens count at their start
        turns = [default] * len(ids)
        for span_start, span_end, turn in spans:
            # tokens overlapping [span_start, span_end): first with end > span_start, up to the
            # last with start < span_end (offsets are non-decreasing along the text)
            first = bisect.bisect_right(ends, span_start)
            last = bisect.bisect_left(starts, span_end)
            turns[first:last] = [turn] * max(0, last - first)
        return ids, turns
    # Slow tokenizers have no offsets: tokenize the pieces between span edges one by one.
    ids, turns, cursor = [], [], 0
    for start, end, turn in spans:
        for piece, label in ((text[cursor:start], default), (text[start:end], turn)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                turns += [label] * len(piece_ids)
        cursor = end
    if text[cursor:]:
        tail = tokenizer(text[cursor:], add_special_tokens=False)["input_ids"]
        ids += tail
        turns += [default] * len(tail)
    return ids, turns


def _marked_turns(tokenizer, messages, tools, template, add_generation_prompt, template_kwargs):
    # The template marks assistant text with {% generation %}; transformers turns the marks
    # into a token mask. Its k-th run of marked tokens is the k-th assistant message.
    out = tokenizer.apply_chat_template(
        messages,
        tools=tools,
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        add_generation_prompt=add_generation_prompt,
        **template_kwargs,
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    assistant = iter([i for i, m in enumerate(messages) if m["role"] == "assistant"])
    turns, current = [], -1
    for t, flag in enumerate(mask):
        if flag and (t == 0 or not mask[t - 1]):
            current = next(assistant, -1)
        turns.append(current if flag else -1)
    return ids, turns
