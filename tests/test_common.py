"""The shared pieces (tunesmith.common) and the typed data settings (tunesmith.data.settings)."""

import dataclasses
import hashlib

from tunesmith import common
from tunesmith.config import SFTConfig
from tunesmith.data.pipeline import prepare_dataset
from tunesmith.data.settings import DataSettings


def test_one_ignore_index_everywhere():
    # every module that masks labels uses the one constant (-100, Hugging Face's ignore index)
    from tunesmith import trainer
    from tunesmith.data import collate, packing, vision

    assert common.IGNORE_INDEX == -100
    assert trainer.IGNORE_INDEX is collate.IGNORE_INDEX is packing.IGNORE_INDEX is vision.IGNORE_INDEX


def test_once_remembers_each_key_until_reset():
    key = ("test-common", "a")
    assert common.once(key) and not common.once(key)
    common.reset_once("other-prefix")  # another prefix's keys are not forgotten
    assert not common.once(key)
    common.reset_once("test-common")
    assert common.once(key)


def test_file_digest_is_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * (3 << 20))  # three 1 MiB blocks
    assert common.file_sha256(path) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()


def test_data_settings_from_config_are_the_config_fields_prepare_dataset_takes(tmp_path):
    # every non-default value must arrive under its name, exactly as the trainer's by-name pick gives it
    config = SFTConfig(
        output_dir=str(tmp_path), max_length=77, truncation_mode="keep_end", packing=True,
        packing_strategy="wrapped", shuffle_dataset=True, seed=5, dataset_text_field="body",
        train_on_reasoning="all", chat_template_kwargs={"enable_thinking": False}, dataset_cache_dir=False,
    )  # fmt: skip
    # what must arrive: every "data" field of SFTConfig that prepare_dataset takes, under the same name
    # (dataset_cache_dir is prepare_dataset's cache_dir), and the seed; prepare_dataset takes the fields
    # of DataSettings, as one object or as keywords
    params = {f.name for f in dataclasses.fields(DataSettings)}
    by_name = {
        ("cache_dir" if f.name == "dataset_cache_dir" else f.name): getattr(config, f.name)
        for f in dataclasses.fields(SFTConfig)
        if f.metadata.get("group") == "data" and (f.name == "dataset_cache_dir" or f.name in params)
    }
    by_name["seed"] = config.seed
    assert len(by_name) == 19
    settings = DataSettings.from_config(config).as_kwargs()
    assert {k: settings[k] for k in by_name} == by_name
    # the per-source fields a config does not have stay at their defaults
    assert {k: settings[k] for k in set(settings) - set(by_name)} == {
        "split": None, "column_mapping": None, "system_prompt": None, "streaming": False,
    }  # fmt: skip
    assert DataSettings.from_config(config, packing=False).packing is False
    assert dataclasses.is_dataclass(DataSettings) and DataSettings.__dataclass_params__.frozen


def test_prepare_dataset_takes_the_settings_or_the_keywords_alike():
    rows = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}, {"input_ids": [6, 7, 8, 9, 10]}]
    typed = prepare_dataset(rows, None, DataSettings(max_length=4, packing=True, cache_dir=False))
    keywords = prepare_dataset(rows, None, max_length=4, packing=True, cache_dir=False)
    assert typed.dataset.to_list() == keywords.dataset.to_list()
    # the five-token example is cut to four (keep_start), then three rows are packed into three rows
    assert typed.dataset.to_list()[0]["input_ids"] == [6, 7, 8, 9]
    assert typed.stats.truncated == 1 and typed.stats.rows == 3
