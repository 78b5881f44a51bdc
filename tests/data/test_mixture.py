"""Several datasets in one run (`data.mixture`): exact shares by weight / fraction / max_examples,
deterministic under the seed, one cache entry per source (a weight change re-tokenises nothing), a
summary line per source, per-source eval sets reaching the trainer as eval_<name>_loss."""

import json
import logging

import pytest

from tunesmith.data.mixture import DatasetSource, _counts, parse_sources, prepare_mixture
from tunesmith.data.sources import DataError

from . import word_tokenizer

# Each source's examples hold a word of their own, so a row says which source it came from.
WORDS = ["alpha", "beta", "gamma"]


def write_sources(tmp_path, sizes=(6, 2, 3)):
    """a: prompt/completion under other column names; b: conversations; c: prompt/completion."""
    paths = {}
    a = [{"question": f"alpha {i} =", "answer": " 4"} for i in range(sizes[0])]
    b = [{"messages": [{"role": "user", "content": f"beta {i}"}, {"role": "assistant", "content": "hello"}]}
         for i in range(sizes[1])]  # fmt: skip
    c = [{"prompt": f"gamma {i} =", "completion": " 4"} for i in range(sizes[2])]
    for name, rows in (("a", a), ("b", b), ("c", c)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def tokenizer():
    return word_tokenizer(extra_words=WORDS + [str(i) for i in range(10)])


def source_of(row, tok) -> str:
    tokens = tok.convert_ids_to_tokens(row["input_ids"])
    (word,) = [w for w in WORDS if w in tokens]
    return {"alpha": "a", "beta": "b", "gamma": "c"}[word]


def entries(paths, **rules):
    out = [
        {"path": str(paths["a"]), "columns": {"question": "prompt", "answer": "completion"}},
        {"path": str(paths["b"]), "system_prompt": "Be brief."},
        {"path": str(paths["c"])},
    ]
    for entry, name in zip(out, "abc"):
        entry.update(rules.get(name, {}))
    return out


def mix(paths, tmp_path, seed=0, **rules):
    return prepare_mixture(
        entries(paths, **rules), tokenizer(), chat_template="chatml", cache_dir=tmp_path / "cache", seed=seed
    )


def test_counts_split_weights_exactly_by_largest_remainder():
    # 3 : 1 over 10 + 10 examples -> 15 and 5
    assert _counts([DatasetSource("a", weight=3), DatasetSource("b", weight=1)], [10, 10]) == [15, 5]
    # 1 : 1 : 1 over 10 examples: 3.33 each, the one example left goes to the first (ties: earlier source)
    assert _counts([DatasetSource(x, weight=1) for x in "abc"], [4, 3, 3]) == [4, 3, 3]
    assert _counts([DatasetSource(x, weight=1) for x in "abc"], [5, 3, 2]) == [4, 3, 3]
    # fraction and max_examples are counts of their own; max_examples caps, never repeats
    rules = [
        DatasetSource("a", fraction=0.5),
        DatasetSource("b", max_examples=50),
        DatasetSource("c", fraction=2.0),
    ]
    assert _counts(rules, [10, 7, 3]) == [5, 7, 6]


def test_mixture_honours_weights_exactly_and_names_each_source(tmp_path, caplog):
    paths = write_sources(tmp_path)
    with caplog.at_level(logging.INFO, logger="tunesmith.data"):
        mixture = mix(paths, tmp_path, a={"weight": 2}, b={"weight": 1}, c={"max_examples": 2})
    tok = tokenizer()
    rows = mixture.dataset.to_list()
    sources = [source_of(r, tok) for r in rows]
    # weighted part: a + b hold 6 + 2 = 8 examples, split 2 : 1 -> 5.33 / 2.67 -> 5 and 3 (largest remainder)
    assert (sources.count("a"), sources.count("b"), sources.count("c")) == (5, 3, 2)
    # b (2 examples, share 3) is oversampled with a notice; a (6, share 5) subsampled with a notice
    assert "b has 2 examples but its share of the mixture is 3: oversampled 1.50x" in caplog.text
    assert "a has 6 examples but its share of the mixture is 5: 1 left out" in caplog.text
    # the column mapping made a prompt/completion source; the system prompt went into b's conversations
    summary = mixture.stats.summary()
    assert (
        "a (a.jsonl, prompt_completion): examples 6 in, 6 out; 5 in the mixture (0.83x, weight 2" in summary
    )
    assert "b (b.jsonl, messages): examples 2 in, 2 out; 3 in the mixture (1.50x" in summary
    assert (
        "c (c.jsonl, prompt_completion): examples 3 in, 3 out; 2 in the mixture (0.67x, max_examples 2)"
        in summary
    )
    assert "share 50.0% of examples" in summary  # a: 5 of 10
    b_row = next(r for r, s in zip(rows, sources) if s == "b")
    assert tok.convert_ids_to_tokens(b_row["input_ids"])[:4] == ["<|im_start|>", "system", "Be", "brief."]
    # each trained-token count adds up: a and c train " 4" + eos (2 tokens), b "hello <|im_end|>" (2)
    assert mixture.stats.total.supervised_tokens == 2 * 10
    assert summary in caplog.text


def test_mixing_is_deterministic_under_the_seed(tmp_path):
    paths = write_sources(tmp_path)
    first = mix(paths, tmp_path, seed=1).dataset.to_list()
    assert mix(paths, tmp_path, seed=1).dataset.to_list() == first
    other = mix(paths, tmp_path, seed=2).dataset.to_list()
    assert other != first and sorted(map(str, other)) != [] and len(other) == len(first)


def test_changing_a_weight_reuses_every_source_from_the_cache(tmp_path):
    paths = write_sources(tmp_path)
    first = mix(paths, tmp_path, a={"weight": 1})
    assert [s.prepared.cache_hit for s in first.stats.sources] == [False, False, False]
    again = mix(paths, tmp_path, a={"weight": 5})
    assert [s.prepared.cache_hit for s in again.stats.sources] == [True, True, True]  # nothing re-tokenised
    assert [s.examples_used for s in again.stats.sources] != [s.examples_used for s in first.stats.sources]
    # a setting that changes what a source's examples are (its system prompt) re-tokenises that source only
    third = mix(paths, tmp_path, b={"system_prompt": "Be long."})
    assert [s.prepared.cache_hit for s in third.stats.sources] == [True, False, True]


def test_packing_the_mixture_keeps_every_token(tmp_path):
    paths = write_sources(tmp_path)
    unpacked = mix(paths, tmp_path)
    packed = prepare_mixture(
        entries(paths), tokenizer(), chat_template="chatml", cache_dir=tmp_path / "cache", seed=0,
        packing=True, max_length=64,
    )  # fmt: skip
    assert packed.stats.total.tokens == unpacked.stats.total.tokens
    assert packed.stats.total.rows < unpacked.stats.total.rows
    tok = tokenizer()
    row_sources = [
        {w for w in WORDS if w in tok.convert_ids_to_tokens(r["input_ids"])} for r in packed.dataset
    ]
    assert any(len(s) > 1 for s in row_sources)  # rows mix sources


def test_eval_sets_per_source(tmp_path):
    paths = write_sources(tmp_path)
    mixture = mix(paths, tmp_path, a={"eval_examples": 2}, c={"eval": str(paths["c"])})
    assert sorted(mixture.eval_datasets) == ["a", "c"]
    assert len(mixture.eval_datasets["a"]) == 2 and len(mixture.eval_datasets["c"]) == 3
    tok = tokenizer()
    held = {tuple(r["input_ids"]) for r in mixture.eval_datasets["a"]}
    trained = {tuple(r["input_ids"]) for r in mixture.dataset if source_of(r, tok) == "a"}
    assert held and not held & trained  # held-out examples never train
    assert mixture.stats.sources[0].prepared.examples_out == 6 and mixture.stats.sources[0].eval_examples == 2
    assert "2 held out for eval" in mixture.stats.summary()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([{"path": "a.jsonl", "wieght": 2}], r"datasets\[0\]: unknown key `wieght`. Did you mean `weight`\?"),
        (
            [{"path": "a.jsonl", "weight": 1, "fraction": 0.5}],
            "give one of weight, fraction, max_examples, not weight and fraction",
        ),
        ([{"path": "a.jsonl", "weight": -1}], r"datasets\[0\].weight: expects a number > 0, got -1"),
        (
            [{"path": "a.jsonl"}, {"path": "b.jsonl", "name": "a"}],
            r"datasets\[1\]: the name 'a' is also datasets\[0\]'s",
        ),
        ([{"split": "train"}], r"datasets\[0\]: needs a `path`"),
        ([], "the list of sources is empty"),
    ],
)
def test_bad_source_lists_are_one_clear_error(value, message):
    with pytest.raises(DataError, match=message):
        parse_sources(value)


def test_dict_of_sources_names_them():
    sources = parse_sources({"math": "m.jsonl", "chat": {"path": "c.jsonl", "weight": 3}})
    assert [(s.name, s.path, s.weight) for s in sources] == [("math", "m.jsonl", 1.0), ("chat", "c.jsonl", 3)]
    # names from the paths, made unique when two files share a stem
    assert [s.name for s in parse_sources(["x/a.jsonl", "y/a.jsonl", "org/hub-set"])] == [
        "a",
        "a_1",
        "hub-set",
    ]


def test_column_mapping_and_system_prompt_errors(tmp_path):
    paths = write_sources(tmp_path)
    with pytest.raises(DataError, match=r"a.jsonl: the column mapping names column\(s\) 'query'"):
        prepare_mixture(
            [{"path": str(paths["a"]), "columns": {"query": "prompt"}}], tokenizer(), cache_dir=False
        )
    with pytest.raises(DataError, match="system_prompt applies to conversations"):
        prepare_mixture([{"path": str(paths["c"]), "system_prompt": "x"}], tokenizer(), cache_dir=False)


def test_trainer_trains_the_mixture_and_logs_eval_loss_per_source(tmp_path):
    from tests.test_trainer import config
    from tests.tiny import tiny_model, tiny_tokenizer
    from tunesmith import SFTTrainer

    rows_a = [{"prompt": "What is the capital of France?", "completion": " Paris."}] * 4
    rows_b = [
        {"messages": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}]}
    ] * 2
    sources = {
        "capitals": DatasetSource(rows_a, weight=1, eval=rows_a[:2]),
        "yes": DatasetSource(rows_b, weight=1, eval=rows_b[:1]),
    }
    trainer = SFTTrainer(
        tiny_model("llama"), args=config(tmp_path), train_dataset=sources, processing_class=tiny_tokenizer()
    )
    assert len(trainer.train_dataset) == 6  # 3 of each (4 + 2 examples, equal weights)
    assert [s.name for s in trainer.mixture_stats.sources] == ["capitals", "yes"]
    metrics = trainer.evaluate()
    assert {"eval_capitals_loss", "eval_yes_loss"} <= set(metrics)
    # an eval set's loss is its own: the two sources' answers differ, so their losses do too
    assert metrics["eval_capitals_loss"] != metrics["eval_yes_loss"]


def test_yaml_datasets_reach_the_trainer(tmp_path):
    from tests.tiny import tiny_model, tiny_tokenizer
    from tunesmith import SFTTrainer
    from tunesmith.config import load_config

    paths = write_sources(tmp_path)
    config = load_config(
        {
            "output_dir": str(tmp_path / "out"), "report_to": "none", "dataset_cache_dir": False,
            "datasets": [{"path": str(paths["c"]), "name": "gamma", "max_examples": 2}, str(paths["b"])],
        }
    )  # fmt: skip
    trainer = SFTTrainer(tiny_model("llama"), args=config, processing_class=tiny_tokenizer(vocab=WORDS))
    assert [(s.name, s.examples_used) for s in trainer.mixture_stats.sources] == [("gamma", 2), ("b", 2)]


def test_docstring_examples_hold():
    import doctest

    from tunesmith.data import mixture

    result = doctest.testmod(mixture, verbose=False)
    assert result.failed == 0 and result.attempted == 2


def test_cli_preprocess_prints_a_line_per_source(tmp_path, capsys):
    from tests.test_export import build_tokenizer
    from tunesmith.cli import main

    build_tokenizer(tmp_path / "model")
    paths = write_sources(tmp_path)
    (tmp_path / "run.yaml").write_text(
        f"model: {{name_or_path: {tmp_path / 'model'}}}\ndata: {{dataset_cache_dir: false}}\n"
        f"datasets:\n  - {{path: {paths['b']}, name: chat, weight: 3}}\n  - {{path: {paths['c']}, eval_examples: 1}}\n"
    )
    assert main(["preprocess", str(tmp_path / "run.yaml")]) == 0
    out = capsys.readouterr().out
    # weighted part: 2 + 2 (c after its held-out example) = 4 examples, 3 : 1
    assert "chat (b.jsonl, messages): examples 2 in, 2 out; 3 in the mixture (1.50x" in out
    assert (
        "c (c.jsonl, prompt_completion): examples 3 in, 3 out, 1 held out for eval; 1 in the mixture" in out
    )
    assert "[eval_c] 1 rows" in out
    # inspect shows the mixture's rows and its per-source summary
    assert main(["inspect", str(tmp_path / "run.yaml"), "-n", "1", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "4 rows; showing 1." in out and "data: mixture of 2 sources, 4 examples" in out


def test_a_source_has_its_own_template_kwargs(tmp_path):
    from .test_reasoning import STRIP

    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(plain) + "\n")
    tok = word_tokenizer(extra_words=["<think>", "</think>"])
    sources = [{"path": str(path), "name": "think"},
               {"path": str(path), "name": "plain", "chat_template_kwargs": {"enable_thinking": False}}]  # fmt: skip
    mixture = prepare_mixture(sources, tok, chat_template=STRIP, cache_dir=False)
    # thinking on: the empty block trains with the answer; off: it is part of the prompt
    assert sorted(s.supervised_tokens for s in mixture.stats.sources) == [2, 4]
