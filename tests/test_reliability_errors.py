"""Errors that used to be tracebacks (or name the wrong place) are one line, early, naming what and where;
files as people have them (UTF-8 BOM, CRLF) are read, with a line in the data summary."""

import json

import pytest

from tests.test_export import build_llama, build_tokenizer
from tests.tiny import tiny_tokenizer
from tunesmith.cli import main
from tunesmith.config import ConfigError, load_config
from tunesmith.data.pipeline import prepare_dataset
from tunesmith.data.sources import DataError, load_source
from tunesmith.models.load import ModelFileError, load_model


@pytest.mark.parametrize(
    "override, message",
    [
        ("learning_rate=-1e-4", "`learning_rate` must be >= 0, got -0.0001"),
        ("per_device_train_batch_size=0", "`per_device_train_batch_size` must be a whole number >= 1, got 0"),
        ("gradient_accumulation_steps=0", "`gradient_accumulation_steps` must be a whole number >= 1, got 0"),
        ("lora.r=0", "`lora_r` must be a whole number >= 1, got 0"),
        ("max_length=0", "`max_length` must be >= 1"),
    ],
)
def test_bad_numbers_are_refused_when_the_config_is_read(tmp_path, capsys, override, message):
    config = tmp_path / "run.yaml"
    # the model does not exist: the error must come from the config, before anything is loaded
    config.write_text(f"output_dir: {tmp_path / 'out'}\nmodel: ./nowhere\ndataset: {{train: d.jsonl}}\n")
    assert main(["train", str(config), override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tunesmith train: {config}: SFTConfig: ") and message in err and "\n" not in err
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_a_torn_safetensors_file_is_named(tmp_path, capsys):
    tok = build_tokenizer(tmp_path / "model")
    build_llama(tmp_path / "model", tok)
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match=rf"^{weights}: the weights file is truncated \(5000 bytes"):
        load_model(str(tmp_path / "model"))
    capsys.readouterr()  # the progress bars of writing the model
    assert main(["generate", str(tmp_path / "model"), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tunesmith generate: {weights}: the weights file is truncated") and "\n" not in err


def test_a_torn_gguf_file_is_named(tmp_path):
    from tunesmith.export import export_gguf

    tok = build_tokenizer(tmp_path / "model")
    build_llama(tmp_path / "model", tok)
    gguf = export_gguf(tmp_path / "model", tmp_path / "m.gguf")
    gguf.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    with pytest.raises(ModelFileError, match=rf"^{gguf}: the GGUF file is (damaged or incomplete|truncated)"):
        load_model(str(gguf))
    gguf.write_bytes(b"<html>not found</html>")
    with pytest.raises(ModelFileError, match=r"not a GGUF file \(it starts with b'<htm'"):
        load_model(str(gguf))


def test_a_column_mixing_text_and_numbers_names_the_line_where_it_changes(tmp_path):
    # Arrow would read "4" and 6 as one number column (the "4" silently becomes 4), and the format check
    # then blamed example 0, whose value was the right kind
    data = tmp_path / "d.jsonl"
    rows = [
        {"prompt": "2+2=", "completion": "4"},
        {"prompt": "3+3=", "completion": "6"},
        {"prompt": "1+5=", "completion": 6},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        load_source(str(data))
    assert str(err.value) == (
        f"{data}:3: field 'completion' is a number here (6) but a string in line 1 ('4'); give every row's "
        "'completion' the same type (quote the numbers to make them text)"
    )
    # the same in a JSON array file
    array = tmp_path / "d.json"
    array.write_text(json.dumps(rows))
    with pytest.raises(
        DataError,
        match=r"d.json: element 2: field 'completion' is a number here \(6\) but a string in element 0",
    ):
        load_source(str(array))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_utf8_bom_and_crlf_files_are_read_with_a_summary_line(tmp_path, suffix):
    rows = [{"text": "hello world ."}, {"text": "good day ."}]
    if suffix == ".jsonl":
        body = "\r\n".join(json.dumps(r) for r in rows) + "\r\n"
    elif suffix == ".json":
        body = json.dumps(rows, indent=1).replace("\n", "\r\n")
    else:
        body = "text\r\n" + "\r\n".join(r["text"] for r in rows) + "\r\n"
    windows, plain = tmp_path / f"windows{suffix}", tmp_path / f"plain{suffix}"
    windows.write_bytes(b"\xef\xbb\xbf" + body.encode())
    plain.write_bytes(body.replace("\r\n", "\n").encode())
    assert load_source(str(windows)).to_list() == rows  # the column is "text", not "\ufefftext"

    tok = tiny_tokenizer()
    read = prepare_dataset(str(windows), tok, cache_dir=False, dataset_text_field="text")
    reference = prepare_dataset(str(plain), tok, cache_dir=False, dataset_text_field="text")
    assert read.dataset["input_ids"] == reference.dataset["input_ids"]
    summary = read.stats.summary()
    assert f"  read: UTF-8 byte-order mark at the start of {windows.name}: skipped" in summary
    assert f"  read: Windows (CRLF) line ends in {windows.name}: read as line ends" in summary
    assert "read:" not in reference.stats.summary()


def test_a_torn_adapter_is_named_by_generate_and_merge(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from tests.test_export import base_without_adapter

    tok = build_tokenizer(tmp_path / "base")
    build_llama(tmp_path / "base", tok)
    peft_model = get_peft_model(
        base_without_adapter(tmp_path / "base"), LoraConfig(r=4, target_modules="all-linear")
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    capsys.readouterr()
    for argv in (
        ["generate", tmp_path / "adapter", "--prompt", "hi"],
        ["merge", tmp_path / "adapter", "--output", tmp_path / "m"],
    ):
        assert main([str(a) for a in argv]) == 1
        err = capsys.readouterr().err.strip()
        assert (
            err.startswith(f"tunesmith {argv[0]}: {weights}: the weights file is truncated")
            and "\n" not in err
        )
    assert not (tmp_path / "m").exists()
