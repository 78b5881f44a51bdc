"""Reasoning spans beyond the word-level tokenizer: the real SmolLM2 byte-level BPE tokenizer, and a
`chat_template_kwargs` column read from a JSONL file (templates and helpers from test_reasoning)."""

import json

import pytest

from tunesmith.data.tokenize import tokenize_example

from .test_reasoning import KEEP, STRIP, TWO_TURNS, messages_example, tokenizer


@pytest.mark.parametrize(
    ("template", "rule", "expected"),
    [
        (STRIP, "last", ["four<|im_end|>", "<think>\nthree and three make six\n</think>\n\nsix<|im_end|>"]),
        (STRIP, "none", ["four<|im_end|>", "six<|im_end|>"]),
        (KEEP, "all", ["<think>\ntwo and two make four\n</think>\nfour<|im_end|>",
                       "<think>\nthree and three make six\n</think>\nsix<|im_end|>"]),
    ],
)  # fmt: skip
def test_trained_spans_on_the_real_smollm2_tokenizer(smollm2_tokenizer, template, rule, expected):
    # byte-level BPE merges whitespace with what follows; the spans must still fall on the right tokens
    tok = smollm2_tokenizer
    out = tokenize_example(messages_example(TWO_TURNS), tok, chat_template=template, train_on_reasoning=rule)
    runs, current = [], []
    for token, label in zip(out["input_ids"], out["labels"]):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    assert runs + ([tok.decode(current)] if current else []) == expected


def test_template_kwargs_column_from_a_jsonl_file(tmp_path):
    # through Arrow: the column is a struct, null on the row without it
    from tunesmith.data.pipeline import prepare_dataset

    plain = [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"}]
    path = tmp_path / "kwargs.jsonl"
    rows = [{"messages": plain, "chat_template_kwargs": {"enable_thinking": False}}, {"messages": plain}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = prepare_dataset(str(path), tokenizer(), chat_template=STRIP, cache_dir=False)
    assert prepared.stats.format == "messages"
    # row 0: "four <|im_end|>" (the empty think block is prompt); row 1: "<think> </think> four <|im_end|>"
    assert [sum(label != -100 for label in row["labels"]) for row in prepared.dataset] == [2, 4]
