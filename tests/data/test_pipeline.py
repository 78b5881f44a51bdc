"""prepare_dataset end to end: counts and logs, cache reuse, streaming, parallel tokenization."""

import doctest
import json
import logging

import pytest

from tunesmith.data import pipeline, streaming
from tunesmith.data.pipeline import prepare_dataset


def _rows(lengths, prompt=1):
    """Pre-tokenized examples; example i holds tokens 1000*i + position, the first `prompt` untrained."""
    return [
        {
            "input_ids": [1000 * i + t for t in range(n)],
            "labels": [-100 if t < prompt else 1000 * i + t for t in range(n)],
        }
        for i, n in enumerate(lengths)
    ]


@pytest.fixture
def data_log(caplog):
    caplog.set_level(logging.INFO, logger="tunesmith.data")
    return caplog


def test_docstring_example_holds():
    result = doctest.testmod(pipeline)
    assert result.attempted >= 3 and result.failed == 0


def test_unpacked_rows_get_one_document_each():
    prepared = prepare_dataset(_rows([3, 2]), None, max_length=8, cache_dir=False)
    assert prepared.dataset.column_names == ["input_ids", "labels", "seq_lengths"]
    assert prepared.dataset.to_list() == [
        {"input_ids": [0, 1, 2], "labels": [-100, 1, 2], "seq_lengths": [3]},
        {"input_ids": [1000, 1001], "labels": [-100, 1001], "seq_lengths": [2]},
    ]
    stats = prepared.stats
    assert (stats.examples_in, stats.examples_out, stats.rows, stats.tokens) == (2, 2, 2, 5)
    assert stats.supervised_tokens == 3  # one prompt token per example is untrained
    assert stats.packing_strategy is None and stats.packing_efficiency is None
    assert stats.format == "tokenized"


# One example of 10 tokens among two of 3, max_length 4: what each mode does with it.
@pytest.mark.parametrize(
    "packing, strategy, mode, tokens_out, truncated, dropped, log",
    [
        # cut to 4: 6 tokens lost
        (False, None, "keep_start", 4 + 3 + 3, 1, 0, "truncated 1 of 3 examples to max_length=4"),
        (False, None, "keep_end", 4 + 3 + 3, 1, 0, "truncated 1 of 3 examples to max_length=4"),
        (False, None, "drop", 3 + 3, 0, 1, "dropped 1 of 3 examples longer than max_length=4"),
        (True, "bfd", "keep_start", 4 + 3 + 3, 1, 0, "truncated 1 of 3 examples to max_length=4"),
        # bfd_split and wrapped keep all 16 tokens, the long example spread over 3 rows
        (True, "bfd_split", "keep_start", 16, 0, 0, "packing (bfd_split) split 1 documents"),
        (True, "wrapped", "keep_start", 16, 0, 0, "packing (wrapped) split"),
        # drop wins over spreading: the user asked for overlong examples to go
        (True, "wrapped", "drop", 6, 0, 1, "dropped 1 of 3 examples longer than max_length=4"),
    ],
)
def test_an_overlong_example_is_counted_and_logged(
    data_log, packing, strategy, mode, tokens_out, truncated, dropped, log
):
    kwargs = {"packing_strategy": strategy} if packing else {}
    prepared = prepare_dataset(
        _rows([3, 10, 3]),
        None,
        max_length=4,
        truncation_mode=mode,
        packing=packing,
        cache_dir=False,
        **kwargs,
    )
    stats = prepared.stats
    assert stats.tokens == tokens_out
    assert sum(len(r["input_ids"]) for r in prepared.dataset.to_list()) == tokens_out
    assert all(len(r["input_ids"]) <= 4 for r in prepared.dataset.to_list())
    assert stats.truncated == truncated and stats.tokens_truncated == (6 if truncated else 0)
    assert stats.dropped["longer_than_max_length"] == dropped
    assert log in data_log.text
    if mode == "keep_end" and not packing:
        assert prepared.dataset[1]["input_ids"] == [1006, 1007, 1008, 1009]


def test_examples_with_nothing_to_train_are_dropped(data_log):
    rows = _rows([3, 3]) + [{"input_ids": [7, 8], "labels": [-100, -100]}]
    prepared = prepare_dataset(rows, None, max_length=8, cache_dir=False)
    assert prepared.stats.dropped["no_trained_token"] == 1 and prepared.stats.examples_out == 2
    assert "dropped 1 of 3 examples with no trained token" in data_log.text
    assert "dropped: 1 examples (no trained token)" in prepared.stats.summary()


def test_packing_efficiency_and_summary():
    # lengths 6, 2, 5, 3 into rows of 8: bfd -> [6, 2], [5, 3]: 16 tokens in 2 rows of 8 = 100%
    prepared = prepare_dataset(_rows([6, 2, 5, 3]), None, max_length=8, packing=True, cache_dir=False)
    assert [r["seq_lengths"] for r in prepared.dataset.to_list()] == [[6, 2], [5, 3]]
    assert prepared.stats.packing_efficiency == 1.0
    summary = prepared.stats.summary()
    assert "packed (bfd) into 2 rows of 8: efficiency 100.0%" in summary
    assert "example length: median 4, p90 5, max 6 tokens" in summary


def test_shuffle_is_deterministic_in_the_seed():
    rows = _rows([2] * 20)
    first = prepare_dataset(rows, None, shuffle_dataset=True, seed=1, cache_dir=False).dataset["input_ids"]
    again = prepare_dataset(rows, None, shuffle_dataset=True, seed=1, cache_dir=False).dataset["input_ids"]
    other = prepare_dataset(rows, None, shuffle_dataset=True, seed=2, cache_dir=False).dataset["input_ids"]
    assert first == again and first != other
    assert sorted(first) == [r["input_ids"] for r in rows]


def test_bad_settings_are_explained():
    with pytest.raises(ValueError, match="truncation_mode='middle' is not one of keep_start, keep_end, drop"):
        prepare_dataset(_rows([2]), None, truncation_mode="middle", cache_dir=False)
    with pytest.raises(ValueError, match="packing=True needs max_length"):
        prepare_dataset(_rows([2]), None, packing=True, max_length=None, cache_dir=False)


# ---- cache ----------------------------------------------------------------------------------


def _count_tokenize_calls(monkeypatch):
    calls = []
    real = pipeline._tokenize_dataset

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_tokenize_dataset", counting)
    return calls


def test_second_call_reuses_the_cache(tmp_path, data_log, monkeypatch):
    calls = _count_tokenize_calls(monkeypatch)
    rows = _rows([5, 3, 9, 2])
    first = prepare_dataset(rows, None, max_length=8, packing=True, cache_dir=tmp_path)
    assert calls == [1] and not first.stats.cache_hit
    second = prepare_dataset(rows, None, max_length=8, packing=True, cache_dir=tmp_path)
    # the tokenize step did not run again, and the log says where the data came from
    assert calls == [1] and second.stats.cache_hit
    assert f"reusing prepared data from {second.stats.cache_path}" in data_log.text
    assert second.dataset.to_list() == first.dataset.to_list()
    assert second.stats.truncated == first.stats.truncated == 1
    # another setting is another entry
    prepare_dataset(rows, None, max_length=16, packing=True, cache_dir=tmp_path)
    assert calls == [1, 1]


def test_file_source_cache_follows_the_content(tmp_path, monkeypatch):
    calls = _count_tokenize_calls(monkeypatch)
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows([3, 4])) + "\n")
    prepare_dataset(str(path), None, cache_dir=tmp_path / "cache")
    assert prepare_dataset(str(path), None, cache_dir=tmp_path / "cache").stats.cache_hit
    path.write_text("\n".join(json.dumps(r) for r in _rows([3, 5])) + "\n")
    changed = prepare_dataset(str(path), None, cache_dir=tmp_path / "cache")
    assert not changed.stats.cache_hit and changed.stats.tokens == 8
    assert calls == [1, 1]


# ---- streaming and parallel tokenization ------------------------------------------------------


@pytest.mark.parametrize("buffer", [2, 1000])
def test_streaming_wrapped_gives_the_same_rows(monkeypatch, buffer):
    # a small buffer makes the partial last row carry over between windows
    monkeypatch.setattr(streaming, "STREAM_PACKING_BUFFER", buffer)
    rows = _rows([5, 3, 9, 2, 7, 1, 4])
    kwargs = {"max_length": 4, "packing": True, "packing_strategy": "wrapped", "cache_dir": False}
    eager = prepare_dataset(rows, None, **kwargs)
    streamed = prepare_dataset(rows, None, streaming=True, **kwargs)
    assert list(streamed.dataset) == eager.dataset.to_list()
    # 31 tokens less the length-1 example, which holds only its untrained prompt and is dropped
    assert (streamed.stats.rows, streamed.stats.tokens) == (eager.stats.rows, eager.stats.tokens) == (8, 30)
    assert streamed.stats.examples_in == 7


def test_streaming_bfd_keeps_every_token_and_counts_truncation(monkeypatch):
    monkeypatch.setattr(streaming, "STREAM_PACKING_BUFFER", 3)
    rows = _rows([5, 3, 9, 2, 7, 1, 4])
    streamed = prepare_dataset(rows, None, max_length=6, packing=True, streaming=True, cache_dir=False)
    out = list(streamed.dataset)
    tokens = sorted(t for r in out for t in r["input_ids"])
    # 9 -> 6 and 7 -> 6: 4 tokens cut; example 5 (length 1) has only its untrained prompt: dropped
    expected = sorted(t for r in _rows([5, 3, 6, 2, 6, 0, 4]) for t in r["input_ids"])
    assert tokens == expected
    assert all(len(r["input_ids"]) <= 6 and sum(r["seq_lengths"]) == len(r["input_ids"]) for r in out)
    stats = streamed.stats
    assert (stats.truncated, stats.tokens_truncated, stats.dropped["no_trained_token"]) == (2, 4, 1)


def test_parallel_tokenization_gives_the_same_rows():
    from tests.tiny import tiny_tokenizer

    # the tokenizer and the options travel to the worker processes
    rows = [
        {"prompt": "what is the capital of france", "completion": "paris"},
        {"prompt": "hello", "completion": "hi"},
    ] * 8
    one = prepare_dataset(rows, tiny_tokenizer(), max_length=8, packing=True, cache_dir=False)
    two = prepare_dataset(
        rows, tiny_tokenizer(), max_length=8, packing=True, dataset_num_proc=2, cache_dir=False
    )
    assert two.dataset.to_list() == one.dataset.to_list()
    # 8 x (6 prompt words + "paris" + EOS) + 8 x ("hello" + "hi" + EOS)
    assert two.stats.tokens == one.stats.tokens == 8 * 8 + 8 * 3


def test_nothing_left_to_train_on_is_an_error():
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}]
    with pytest.raises(ValueError, match=r"no example is left to train on .*'no_trained_token': 1"):
        prepare_dataset(rows, None, cache_dir=False)


# ---- through the tokenizer (formats.py + tokenize.py) ---------------------------------------


def test_prompt_completion_text_is_tokenized_and_masked():
    from tests.tiny import EOS, tiny_tokenizer

    tok = tiny_tokenizer()
    ids = tok.convert_tokens_to_ids
    rows = [
        {"prompt": "what is the capital of france", "completion": "paris"},
        {"prompt": "hello", "completion": "hi"},
    ]
    prepared = prepare_dataset(rows, tok, max_length=16, cache_dir=False)
    prompt = ids(["what", "is", "the", "capital", "of", "france"])
    # completion-only loss (TRL's default): the prompt is -100, the completion and its EOS are trained
    assert prepared.dataset.to_list() == [
        {
            "input_ids": prompt + [ids("paris"), EOS],
            "labels": [-100] * 6 + [ids("paris"), EOS],
            "seq_lengths": [8],
        },
        {"input_ids": [ids("hello"), ids("hi"), EOS], "labels": [-100, ids("hi"), EOS], "seq_lengths": [3]},
    ]
    assert prepared.stats.format == "prompt_completion"
    assert (prepared.stats.tokens, prepared.stats.supervised_tokens) == (11, 4)


def test_messages_train_only_the_assistant_turn():
    from tests.tiny import IM_END, IM_START, NEWLINE, tiny_tokenizer

    tok = tiny_tokenizer()
    ids = tok.convert_tokens_to_ids
    rows = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}]
    prepared = prepare_dataset(rows, tok, chat_template="chatml", cache_dir=False)
    user = [IM_START, ids("user"), NEWLINE, ids("hello"), IM_END, NEWLINE]
    assistant = [IM_START, ids("assistant"), NEWLINE, ids("hi"), IM_END, NEWLINE]
    row = prepared.dataset[0]
    assert row["input_ids"] == user + assistant
    # trained: the reply and the <|im_end|> that ends it; not the header, not the trailing newline
    assert row["labels"] == [-100] * 9 + [ids("hi"), IM_END, -100]


def test_another_tokenizer_misses_the_cache(tmp_path, monkeypatch):
    from tests.tiny import tiny_tokenizer

    calls = _count_tokenize_calls(monkeypatch)
    rows = [{"text": "hello world"}]
    prepare_dataset(rows, tiny_tokenizer(), cache_dir=tmp_path)
    assert prepare_dataset(rows, tiny_tokenizer(), cache_dir=tmp_path).stats.cache_hit
    # one more word in the vocabulary is another tokenizer
    assert not prepare_dataset(rows, tiny_tokenizer(vocab=["zebra"]), cache_dir=tmp_path).stats.cache_hit
    assert calls == [1, 1]
