"""One normalised example -> `{"input_ids", "labels"}`, with `-100` on tokens that are not
trained. Labels are not shifted here (`collate.shift_labels` does that, once).

What is trained, by kind (`train_on_inputs=True` trains every token of every kind):

    text                      every token, and an EOS appended when missing
    prompt_completion         the completion and its appended EOS (completion_only_loss, default on)
    messages                  the assistant turns, each with its end-of-turn token (assistant_only_loss,
                              default on); of their reasoning blocks, those train_on_reasoning names
                              (last = the final turn's, the default; all; none)
    conversational p/c        the assistant turns of the completion (completion_only_loss, default on)
    tokenized                 the given labels, or every token

Worked example, prompt "2 + 2 =" and completion "4" on a word-level tokenizer that adds BOS:

    tokens    <s>    2     +     2     =     4    </s>
    labels   -100  -100  -100  -100  -100    4    </s>

Where we differ from TRL: `assistant_only_loss=None` means True for conversations. TRL
trains on every token of a conversation unless told otherwise, which teaches the model to
write the user's turns and the system prompt too; that is rarely what anyone wants.
"""

from __future__ import annotations

import logging
import weakref

from tunesmith.common import once
from tunesmith.data.sources import DataError
from tunesmith.data.templates import assistant_parts, check_template_kwargs

logger = logging.getLogger(__name__)

IGNORE = -100

# tokenizer -> whether its plain `tokenizer(text)` call puts BOS in front (looked up once)
_ADDS_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenize_example(
    example: dict,
    tokenizer,
    *,
    completion_only_loss=None,
    assistant_only_loss=None,
    train_on_inputs=False,
    chat_template=None,
    eos_token=None,
    chat_template_kwargs=None,
    train_on_reasoning="last",
    index=None,
) -> dict:
    """Tokenize and label one normalised example (see the module docstring for what is trained).

        >>> tok = word_tokenizer()  # tests/data: <s>=1 </s>=2 "2"=30 "+"=31 "="=32 "4"=33, adds BOS
        >>> tokenize_example({"prompt": "2 + 2 =", "completion": " 4"}, tok)
        {'input_ids': [1, 30, 31, 30, 32, 33, 2], 'labels': [-100, -100, -100, -100, -100, 33, 2]}

    `chat_template` is a built-in name or a jinja string (None: the tokenizer's own);
    `eos_token` overrides the tokenizer's EOS for plain text and completions. No double BOS:
    BOS is put in front only when the tokenizer adds one and the text does not already start
    with it; chat templates write their own BOS.

    Defaults: `completion_only_loss=None` and `assistant_only_loss=None` both mean True. The
    second is where we deliberately differ from TRL, which trains on every token of a
    conversation unless told otherwise: training on the user's turns and the system prompt
    teaches the model to write them, which is sloppy. `train_on_inputs=True` trains every
    token of every kind (given `labels` of pre-tokenized data included).

    Conversations: `chat_template_kwargs` (the config's) and the example's own
    `chat_template_kwargs` (which win) are passed to the template; `train_on_reasoning`
    (`last`, `all`, `none`) says whose reasoning blocks are trained in the assistant-only mask:
    the final assistant turn's, every turn's, or none (the answer and end-of-turn token of each
    trained turn train in every case).
    """
    where = f"example {index}" if index is not None else "example"
    train_all = bool(train_on_inputs)

    if "input_ids" in example:
        ids = list(example["input_ids"])
        labels = example.get("labels")
        labels = list(ids) if labels is None or train_all else list(labels)
        return {"input_ids": ids, "labels": labels}

    if "text" in example:
        ids = _encode_text(tokenizer, example["text"], bos=True)
        ids = _with_eos(ids, _eos_id(tokenizer, eos_token, where))
        return {"input_ids": ids, "labels": list(ids)}

    if "messages" in example:
        messages = example["messages"]
        rendered = _render(tokenizer, messages, example, chat_template, chat_template_kwargs, where)
        if train_all or assistant_only_loss is False:
            return {"input_ids": rendered.input_ids, "labels": list(rendered.input_ids)}
        trained = _reasoning_rule(rendered, messages, train_on_reasoning, first_trained=0, where=where)
        out = {"input_ids": rendered.input_ids, "labels": _masked(rendered.input_ids, trained)}
        return _with_dropped_turns(out, rendered, messages, example, tokenizer, chat_template,
                                   chat_template_kwargs, train_on_reasoning, 0, where)  # fmt: skip

    prompt, completion = example.get("prompt"), example.get("completion")
    if isinstance(prompt, list):
        return _conversational_prompt_completion(
            example, tokenizer, chat_template, chat_template_kwargs, train_on_reasoning, where,
            completion_only=completion_only_loss is not False and not train_all,
            assistant_only=assistant_only_loss is not False and not train_all,
        )  # fmt: skip
    if isinstance(prompt, str) and isinstance(completion, str):
        eos_id = _eos_id(tokenizer, eos_token, where)
        prompt_ids, completion_ids = _encode_prompt_completion(tokenizer, prompt, completion)
        completion_ids = _with_eos(completion_ids, eos_id)
        ids = prompt_ids + completion_ids
        if train_all or completion_only_loss is False:
            return {"input_ids": ids, "labels": list(ids)}
        return {"input_ids": ids, "labels": [IGNORE] * len(prompt_ids) + completion_ids}

    raise DataError(
        f"{where}: not a normalised example (expected text, prompt/completion, messages or input_ids); "
        f"keys: {', '.join(example)}. Pass it through formats.normalize_example first."
    )


def _masked(ids: list[int], mask: list[int]) -> list[int]:
    return [t if m else IGNORE for t, m in zip(ids, mask)]


TRAIN_ON_REASONING = ("last", "all", "none")


def _render(tokenizer, messages, example, chat_template, chat_template_kwargs, where):
    try:
        kwargs = {**check_template_kwargs(chat_template_kwargs), **example.get("chat_template_kwargs", {})}
        return assistant_parts(
            tokenizer,
            messages,
            tools=example.get("tools"),
            chat_template=chat_template,
            chat_template_kwargs=kwargs,
        )
    except DataError as err:
        raise DataError(f"{where}: {err}") from err


def _reasoning_rule(rendered, messages, train_on_reasoning, *, first_trained: int, where: str) -> list[int]:
    """Per token, 1 if it trains: it is in an assistant turn at or after message `first_trained`,
    and not in a reasoning block that `train_on_reasoning` leaves out.

        train_on_reasoning   reasoning blocks trained       answers + end-of-turn tokens
        last (default)       the final assistant turn's      every trained turn
        all                  every trained turn's            every trained turn
        none                 none                            every trained turn
    """
    if train_on_reasoning not in TRAIN_ON_REASONING:
        raise DataError(
            f"train_on_reasoning={train_on_reasoning!r} is not one of {', '.join(TRAIN_ON_REASONING)}"
        )
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if rendered.unrendered_reasoning and rendered.unrendered_reasoning[-1] == last >= first_trained:
        _warn_if_reasoning_unrendered(rendered, last, last, where)
    keep_reasoning = {"all": lambda turn: True, "none": lambda turn: False, "last": lambda turn: turn == last}
    keep = keep_reasoning[train_on_reasoning]
    return [
        int(turn >= first_trained and turn >= 0 and (not in_reasoning or keep(turn)))
        for turn, in_reasoning in zip(rendered.turns, rendered.reasoning)
    ]


def _warn_if_reasoning_unrendered(rendered, first: int, last: int, where: str) -> None:
    """The final turn's reasoning is not in the rendered text: the template ignores it. Say so, once."""
    if not once(("tokenize", "final-reasoning")):
        return
    logger.warning(
        "%s: the chat template does not render the reasoning (reasoning_content / thinking) of the final "
        "assistant turn (message %d), so it is not trained; use a template that renders it (Qwen3-style "
        "<think>, gpt-oss channels), or check chat_template_kwargs (e.g. enable_thinking). Logged once.",
        where,
        last,
    )


def _conversational_prompt_completion(
    example, tokenizer, chat_template, chat_template_kwargs, train_on_reasoning, where, *, completion_only,
    assistant_only,
):  # fmt: skip
    """Render prompt + completion as one conversation; the completion's assistant turns are the
    ones the model learns (with completion_only off: every assistant turn, or every token)."""
    messages = example["prompt"] + example["completion"]
    rendered = _render(tokenizer, messages, example, chat_template, chat_template_kwargs, where)
    ids = rendered.input_ids
    if not completion_only and not assistant_only:
        return {"input_ids": ids, "labels": list(ids)}
    first = len(example["prompt"]) if completion_only else 0  # messages at or after this index train
    trained = _reasoning_rule(rendered, messages, train_on_reasoning, first_trained=first, where=where)
    out = {"input_ids": ids, "labels": _masked(ids, trained)}
    return _with_dropped_turns(out, rendered, messages, example, tokenizer, chat_template,
                               chat_template_kwargs, train_on_reasoning, first, where)  # fmt: skip


def _with_dropped_turns(out, rendered, messages, example, tokenizer, chat_template, chat_template_kwargs,
                        train_on_reasoning, first_trained, where) -> dict:  # fmt: skip
    """train_on_reasoning=all on a template that drops past reasoning (Qwen3): each earlier trained turn
    whose reasoning is not in the text is also rendered as the last turn of its own conversation
    (messages[:i + 1], as the model sees it when it writes that turn) and trained there, reasoning
    included; those examples go in `out["extra_examples"]`. Turn i of [u, a1(r1), u, a3(r3)]:

        out                  ... a1 <|im_end|> ... <think> r3 </think> a3 <|im_end|>   (a1's answer, a3 whole)
        extra_examples[0]    ... <think> r1 </think> a1 <|im_end|>                      (a1 whole, nothing else)
    """
    if train_on_reasoning != "all":
        return out
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    extra = []
    for i in rendered.unrendered_reasoning:
        if i < first_trained or i == last:
            continue
        prefix = messages[: i + 1]
        alone = _render(tokenizer, prefix, example, chat_template, chat_template_kwargs, where)
        if i in alone.unrendered_reasoning:
            continue  # the template does not render reasoning even in the last turn (logged by _reasoning_rule)
        trained = _reasoning_rule(alone, prefix, "all", first_trained=i, where=where)
        extra.append({"input_ids": alone.input_ids, "labels": _masked(alone.input_ids, trained)})
    if extra:
        out["extra_examples"] = extra
    return out


def _adds_bos(tokenizer) -> bool:
    try:
        return _ADDS_BOS[tokenizer]
    except (KeyError, TypeError):
        pass
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds = bos is not None and len(with_special) > len(without) and with_special[0] == bos
    try:
        _ADDS_BOS[tokenizer] = adds
    except TypeError:
        pass  # not weak-referenceable: look it up every time
    return adds


def _encode_text(tokenizer, text: str, *, bos: bool) -> list[int]:
    # Special tokens are added by hand: some tokenizers' post-processors also append EOS,
    # which would end a prompt mid-example. BOS only when the tokenizer would add it and the
    # text does not already begin with it (no double BOS).
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if bos and _adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids.insert(0, tokenizer.bos_token_id)
    return ids


def _encode_prompt_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the completion, split exactly at their boundary.

    prompt + completion is tokenized as one string, so the completion's tokens are those the
    model sees in context. When that string's tokens do not start with the prompt's own tokens
    (a token merged across the boundary, e.g. "Answer:" + "4" -> "Answer:4"), the completion
    is tokenized on its own instead: the prompt's tokens are then exactly those of the prompt
    at inference, where generation starts from them.
    """
    prompt_ids = _encode_text(tokenizer, prompt, bos=True)
    full_ids = _encode_text(tokenizer, prompt + completion, bos=True)
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return prompt_ids, full_ids[len(prompt_ids) :]
    return prompt_ids, list(tokenizer(completion, add_special_tokens=False)["input_ids"])


def _eos_id(tokenizer, eos_token, where) -> int | None:
    if eos_token is None:
        return tokenizer.eos_token_id
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    # An unknown string converts to the unk id; the unk token itself (SmolLM2's <|endoftext|> is
    # its eos, bos and unk at once) converts to the same id and is a token like any other.
    if eos_id is None or (eos_id == tokenizer.unk_token_id and eos_token != tokenizer.unk_token):
        raise DataError(
            f"eos_token={eos_token!r} is not a token of the tokenizer; use one of its tokens, e.g. its "
            f"special tokens {', '.join(map(repr, tokenizer.all_special_tokens))}"
        )
    return eos_id


def _with_eos(ids: list[int], eos_id: int | None) -> list[int]:
    if eos_id is None:
        if once(("tokenize", "no-eos")):  # once per process, not once per example
            logger.warning(
                "the tokenizer has no EOS token: examples end without one; set eos_token to fix that"
            )
        return ids
    return ids if ids and ids[-1] == eos_id else ids + [eos_id]
