"""Every kind of source gives the same rows; split selection and slicing; short names."""

import json

import pytest

from tunesmith.data import sources
from tunesmith.data.sources import DataError, describe_source, load_source

ROWS = [{"prompt": "2 + 2 =", "completion": "4"}, {"prompt": "3 + 3 =", "completion": "6"}]


@pytest.fixture
def cache(tmp_path):
    # datasets' Arrow cache for file sources goes under the test's own folder.
    return str(tmp_path / "hf-cache")


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "name, text",
    [
        ("d.jsonl", "\n".join(json.dumps(r) for r in ROWS) + "\n\n"),  # trailing blank line is fine
        ("d.json", json.dumps(ROWS)),
        ("d.json", json.dumps({"data": ROWS})),  # records under one key
        ("d.json", json.dumps({"prompt": ["2 + 2 =", "3 + 3 ="], "completion": ["4", "6"]})),  # columns
        ("d.csv", "prompt,completion\n2 + 2 =,4\n3 + 3 =,6\n"),
    ],
)
def test_text_files(tmp_path, cache, name, text):
    ds = load_source(write(tmp_path / name, text), cache_dir=cache)
    # CSV reads "4" as a number; every other source keeps the strings.
    expected = (
        [{"prompt": r["prompt"], "completion": int(r["completion"])} for r in ROWS]
        if name.endswith(".csv")
        else ROWS
    )
    assert ds.to_list() == expected


def test_parquet_file_and_folder(tmp_path, cache):
    import datasets

    folder = tmp_path / "shards"
    folder.mkdir()
    datasets.Dataset.from_list(ROWS[:1]).to_parquet(str(folder / "a.parquet"))
    datasets.Dataset.from_list(ROWS[1:]).to_parquet(str(folder / "b.parquet"))
    assert load_source(folder / "a.parquet", cache_dir=cache).to_list() == ROWS[:1]
    assert load_source(folder, cache_dir=cache).to_list() == ROWS  # files in name order


def test_folder_of_mixed_kinds_is_an_error(tmp_path):
    write(tmp_path / "a.jsonl", json.dumps(ROWS[0]))
    write(tmp_path / "b.csv", "prompt,completion\nx,y\n")
    with pytest.raises(DataError, match=r"mixes file kinds \(.csv, .jsonl\)"):
        load_source(tmp_path)


def test_split_slices_on_files_and_streaming(tmp_path, cache):
    import datasets

    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in ROWS))
    assert load_source(path, split="train[:1]", cache_dir=cache).to_list() == ROWS[:1]
    stream = load_source(path, split="train[1:]", streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert list(stream) == ROWS[1:]


def test_dataset_objects_and_lists():
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    assert load_source(ds) is ds
    assert load_source(ds, split="train[1:]").to_list() == ROWS[1:]
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    assert load_source(dd).to_list() == ROWS  # "train" by default
    assert load_source(dd, split="test").to_list() == ROWS[:1]
    assert load_source(dd, split="train[:50%]").to_list() == ROWS[:1]
    with pytest.raises(DataError, match="no split 'validation'; it has: train, test"):
        load_source(dd, split="validation")
    iterable = ds.to_iterable_dataset()
    assert load_source(iterable) is iterable
    assert list(load_source(ROWS, streaming=True)) == ROWS
    # A list whose rows have different keys keeps every key (missing ones are None).
    assert load_source([{"a": 1}, {"b": 2}]).to_list() == [{"a": 1, "b": None}, {"a": None, "b": 2}]


def test_hub_names_go_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_source("trl-lib/Capybara", split="train[:2]").to_list() == ROWS
    assert calls == [("trl-lib/Capybara", {"split": "train[:2]", "streaming": False, "data_files": None})]

    def offline(name, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="'org/missing' is not a local file or folder.*no network"):
        load_source("org/missing")
    # Something that looks like a file is never sent to the Hub.
    with pytest.raises(DataError, match="missing.jsonl: no such file or folder"):
        load_source("missing.jsonl")


def test_describe_source(tmp_path):
    import datasets

    path = write(tmp_path / "train.jsonl", json.dumps(ROWS[0]))
    assert describe_source(path) == "train.jsonl"
    assert describe_source(str(path)) == "train.jsonl"
    assert describe_source(tmp_path) == f"{tmp_path.name}/"
    assert describe_source(ROWS + ROWS[:1]) == "<list of 3 dicts>"
    assert describe_source(datasets.Dataset.from_list(ROWS)) == "<Dataset of 2 rows>"
    assert describe_source(datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})) == (
        "<DatasetDict with splits train>"
    )
    assert describe_source("trl-lib/Capybara") == "trl-lib/Capybara"
    assert sources.FILE_BUILDERS[".jsonl"] == "json"


def test_builder_name_with_data_files_checks_the_files(tmp_path, cache):
    # load_dataset("json", data_files=...) style, as TRL examples write it.
    good = write(tmp_path / "good.jsonl", "\n".join(json.dumps(r) for r in ROWS))
    assert load_source("json", data_files=str(good), cache_dir=cache).to_list() == ROWS
    bad = write(tmp_path / "bad.jsonl", '{"prompt": "a", "completion": "b"}\n{oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_source("json", data_files={"train": [str(bad)]}, cache_dir=cache)


def test_hidden_folders_are_skipped(tmp_path, cache):
    write(tmp_path / "a.jsonl", json.dumps(ROWS[0]))
    (tmp_path / ".ipynb_checkpoints").mkdir()
    write(tmp_path / ".ipynb_checkpoints" / "a.jsonl", json.dumps(ROWS[0]))
    assert load_source(tmp_path, cache_dir=cache).to_list() == ROWS[:1]
