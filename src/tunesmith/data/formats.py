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
import logging
from collections.abc import Callable
from dataclasses import dataclass

from tunesmith.data.conversations import (  # noqa: F401 (the role and key names are re-exported)
    REASONING_KEYS,
    ROLES,
    SHAREGPT_ROLES,
    TEMPLATE_KWARGS_COLUMN,
    _messages,
    _where,
    _with_template_kwargs,
    _with_tools,
    check_roles,
    with_system_prompt,
)
from tunesmith.data.sources import DataError

logger = logging.getLogger(__name__)


# Column names we know, for "did you mean" suggestions on misspelled columns.
KNOWN_COLUMNS = ("text", "prompt", "response", "completion", "instruction", "input", "output",
                 "messages", "conversations", "tools", "input_ids", "labels", "chat_template_kwargs")  # fmt: skip

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
    spec = SOURCE_FORMATS.get(fmt)
    if spec is None:
        raise DataError(f"dataset format {fmt!r} is not known; formats: {', '.join(FORMATS)}")
    return spec.normalize(
        example, _where(index), dataset_text_field=dataset_text_field, formatting_func=formatting_func
    )


def _text(example, where, *, dataset_text_field, formatting_func) -> dict:
    return {"text": _string(example, dataset_text_field or "text", where)}


def _prompt_completion(example, where, **_) -> dict:
    return {"prompt": _string(example, "prompt", where), "completion": _string(example, "completion", where)}


def _prompt_response(example, where, **_) -> dict:
    prompt, response = _string(example, "prompt", where), _string(example, "response", where)
    if not (prompt[-1].isspace() or response[0].isspace()):
        response = "\n" + response
    return {"prompt": prompt, "completion": response}


def _alpaca(example, where, **_) -> dict:
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


def _conversation(field: str):
    def normalize(example, where, **_) -> dict:
        messages = _messages(example.get(field), field, where)
        check_roles(messages, where=where, field=field)
        return _with_template_kwargs(_with_tools({"messages": messages}, example, where), example, where)

    return normalize


def _conversational_prompt_completion(example, where, **_) -> dict:
    prompt = _messages(example.get("prompt"), "prompt", where)
    completion = _messages(example.get("completion"), "completion", where)
    if completion[0]["role"] != "assistant":
        raise DataError(
            f"{where}, field 'completion': must start with an assistant message, starts with {completion[0]['role']!r}"
        )
    check_roles(prompt + completion, where=where, field="prompt + completion")
    out = _with_tools({"prompt": prompt, "completion": completion}, example, where)
    return _with_template_kwargs(out, example, where)


def _tokenized_example(example, where, **_) -> dict:
    return _tokenized(example, where)


def _formatted(example, where, *, dataset_text_field, formatting_func) -> dict:
    if formatting_func is None:
        raise DataError("dataset format 'formatting_func' needs a formatting_func")
    return {"text": _apply_formatting_func(formatting_func, example, where)}


@dataclass(frozen=True)
class SourceFormat:
    """One source format: the columns that identify it (all required; "text" reads
    `dataset_text_field`), the function that normalises an example of it, and whether its examples
    are conversations (what assistant_only_loss needs)."""

    columns: tuple[str, ...]
    normalize: Callable[..., dict]
    conversational: bool = False


# The one table of source formats. detect_format tries them by their columns (the order of its
# rules settles the overlaps: a formatting_func, then input_ids, then dataset_text_field, ...).
SOURCE_FORMATS: dict[str, SourceFormat] = {
    "text": SourceFormat(("text",), _text),
    "prompt_response": SourceFormat(("prompt", "response"), _prompt_response),
    "prompt_completion": SourceFormat(("prompt", "completion"), _prompt_completion),
    "conversational_prompt_completion": SourceFormat(
        ("prompt", "completion"), _conversational_prompt_completion, conversational=True
    ),
    "alpaca": SourceFormat(("instruction", "output"), _alpaca),
    "messages": SourceFormat(("messages",), _conversation("messages"), conversational=True),
    "sharegpt": SourceFormat(("conversations",), _conversation("conversations"), conversational=True),
    "tokenized": SourceFormat(("input_ids",), _tokenized_example),
    "formatting_func": SourceFormat((), _formatted),
}
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {name: spec.columns for name, spec in SOURCE_FORMATS.items()}
FORMATS: tuple[str, ...] = tuple(SOURCE_FORMATS)
# Source formats whose examples are conversations (what assistant_only_loss needs)
CONVERSATIONAL_FORMATS = tuple(name for name, spec in SOURCE_FORMATS.items() if spec.conversational)


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
