"""SFTConfig: TRL's fields and defaults, the old spelling, YAML loading, errors and round trip."""

import dataclasses

import pytest
import yaml

from tunesmith import config as config_module
from tunesmith.common import reset_once
from tunesmith.config import ConfigError, SFTConfig, UnslothTrainingArguments, config_fields, load_config

TRL_SFT_FIELDS = {
    # TRL 1.16 SFTConfig field -> its default there
    "model_init_kwargs": None,
    "chat_template_path": None,
    "dataset_text_field": "text",
    "dataset_kwargs": None,
    "dataset_num_proc": None,
    "eos_token": None,
    "pad_token": None,
    "max_length": 1024,
    "truncation_mode": "keep_start",
    "shuffle_dataset": False,
    "packing": False,
    "packing_strategy": "bfd",
    "pad_to_multiple_of": None,
    "eval_packing": None,
    "completion_only_loss": None,
    "loss_type": "nll",
    "activation_offloading": False,
}


@pytest.fixture(autouse=True)
def _fresh_notices():
    reset_once("notice")


def test_trl_fields_and_defaults(tmp_path):
    cfg = SFTConfig(output_dir=str(tmp_path))
    assert {name: getattr(cfg, name) for name in TRL_SFT_FIELDS} == TRL_SFT_FIELDS
    # TRL's defaults that change the result are kept: lr 2e-5 (TrainingArguments: 5e-5), logging every 10
    assert cfg.learning_rate == 2e-5 and cfg.logging_steps == 10
    # our deviation, documented on the class: memory_policy decides instead of gradient checkpointing
    assert cfg.gradient_checkpointing is False and cfg.memory_policy == "auto"
    assert cfg.use_kernels is True and cfg.padding_free is None and cfg.embedding_learning_rate is None
    # deliberate deviation (TRL: False): conversations train on the assistant turns only unless asked
    assert cfg.assistant_only_loss is None


def test_every_field_has_help_text():
    missing = [
        f.name
        for f in dataclasses.fields(SFTConfig)
        if f.init and f.name in SFTConfig.__annotations__ and not f.metadata.get("help")
    ]
    assert missing == []


def test_max_seq_length_is_an_alias_with_one_notice(tmp_path):
    with pytest.warns(FutureWarning, match="max_seq_length.*max_length"):
        cfg = SFTConfig(output_dir=str(tmp_path), max_seq_length=333)
    assert cfg.max_length == 333
    # the second use is silent (one-time notice)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SFTConfig(output_dir=str(tmp_path), max_seq_length=12)
    assert [w for w in caught if "max_seq_length" in str(w.message)] == []


def test_unsloth_training_arguments_takes_embedding_learning_rate(tmp_path):
    cfg = UnslothTrainingArguments(output_dir=str(tmp_path), learning_rate=2e-4, embedding_learning_rate=5e-5)
    assert isinstance(cfg, SFTConfig) and cfg.embedding_learning_rate == 5e-5 and cfg.learning_rate == 2e-4


def test_load_config_sections_overrides_and_numeric_strings(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  name_or_path: ./tiny\n  trust_remote_code: false\n"
        "lora: {use_peft: true, r: 8}\n"
        "data: {max_length: 256, packing: true}\n"
        "training: {learning_rate: 1e-4, output_dir: out}\n"
    )
    cfg = load_config(path, ["lora.r=4", "num_train_epochs=2", "lora.target_modules=[q_proj, v_proj]"])
    # "1e-4" is a string to YAML 1.1; a float field reads it as the number it looks like
    assert cfg.learning_rate == 1e-4
    assert (cfg.model_name_or_path, cfg.use_peft, cfg.lora_r, cfg.max_length, cfg.packing) == (
        "./tiny",
        True,
        4,
        256,
        True,
    )
    assert cfg.num_train_epochs == 2.0 and cfg.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "raw, overrides, message",
    [
        ({"learnig_rate": 1e-4}, [], "run.yaml: unknown key `learnig_rate`. Did you mean `learning_rate`?"),
        ({"lora": {"rank": 8}}, [], "unknown key `lora.rank`"),
        ({}, ["lora.rr=3"], "unknown key `lora.rr`. Did you mean `lora.r`?"),
        ({"lora_r": "eight"}, [], "run.yaml: `lora_r` expects int, got 'eight' (str)"),
        ({"max_length": 1.5}, [], "`max_length` expects int or null, got 1.5 (float)"),
        ({"packing": "yes please"}, [], "`packing` expects bool, got 'yes please' (str)"),
        (
            {"packing_strategy": "fifo"},
            [],
            "`packing_strategy` must be one of 'bfd', 'bfd_split', 'wrapped', got 'fifo'",
        ),
        ({}, ["learning_rate"], "write it as key=value"),
    ],
)
def test_config_errors_name_the_file_key_and_fix(tmp_path, raw, overrides, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert message in str(err.value)


def test_yaml_is_safe_load_only(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("learning_rate: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(
        {
            "output_dir": str(tmp_path),
            "use_peft": True,
            "lora_r": 4,
            "eos_token": "<|im_end|>",
            "report_to": "none",
        }
    )
    written = cfg.save_resolved(tmp_path)
    assert written.name == "tunesmith_config.yaml"
    data = yaml.safe_load(written.read_text())
    # grouped in sections; eos_token is kept (TrainingArguments.to_dict would mask every *_token field)
    assert data["lora"]["r"] == 4 and data["data"]["eos_token"] == "<|im_end|>"
    assert "hub_token" not in data["training"]
    again = load_config(written)
    assert again.to_yaml_dict() == cfg.to_yaml_dict()


def test_every_section_key_resolves_to_one_field():
    # the YAML sections are only spelling: each (section, key) written by to_yaml maps back to a field
    cfg_fields = config_fields()
    for section, values in SFTConfig(output_dir="x").to_yaml_dict().items():
        for key in values:
            assert config_module._section_key(section, key) in cfg_fields


def test_bf16_true_runs_on_a_gpu_less_machine(tmp_path):
    # TrainingArguments alone raises "Your setup doesn't support bf16/gpu" here; scripts written for a
    # GPU (the Unsloth seed sets bf16=True) run on the CPU in bf16 autocast instead
    if config_module._has_accelerator():
        pytest.skip("this machine has an accelerator")
    cfg = SFTConfig(output_dir=str(tmp_path), bf16=True)
    assert cfg.bf16 is True and cfg.use_cpu is True
    assert SFTConfig(output_dir=str(tmp_path)).bf16 is False  # the default stays off on CPU


def test_dataset_format_help_lists_every_format_the_pipeline_knows():
    from tunesmith.data.formats import FORMATS

    help_text = config_fields()["dataset_format"].metadata["help"]
    assert [f for f in FORMATS if f not in help_text] == []


def test_listing_shows_every_field_under_its_section_with_its_help():
    from tunesmith.config.listing import config_keys, format_keys

    keys = config_keys()
    assert list(keys) == list(config_module.SECTIONS)
    listed = {k.field: k for section in keys.values() for k in section}
    assert set(listed) == set(config_fields())
    text = format_keys()
    for name, f in config_fields().items():
        key = listed[name]
        assert key.section == f.metadata.get("group", "training")
        assert key.help == " ".join(f.metadata["help"].split()) and key.help
        # the key as listed is the one the section accepts
        assert config_module._section_key(key.section, key.key) == name
        assert f"  {key.key}" in text
    # each section's text holds its own keys (and its help, wrapped)
    lora = format_keys("lora")
    assert "lora:" in lora and "r (lora_r): int = 16" in lora and "LoRA rank." in lora
    assert "learning_rate" not in lora
    training = format_keys("training")
    assert "learning_rate: float = 2e-05" in training and "Peak learning rate of AdamW" in training
    assert "per_device_train_batch_size: int = 8" in training  # a TrainingArguments field, its own help
    assert "The batch size per device for training." in training


def test_unknown_key_without_a_close_match_points_at_the_listing(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown key `zzzzqqq`\. `tunesmith config --list` lists the valid keys"
    ):
        load_config({"zzzzqqq": 1})
    with pytest.raises(ConfigError, match=r"`tunesmith config --list --section lora` lists the valid keys"):
        load_config({"lora": {"zzzzqqq": 1}})


def test_one_yaml_reader_for_load_config_and_the_cli(tmp_path):
    from tunesmith.cli.run_config import UsageError, read_run_config
    from tunesmith.config.yaml import read_yaml_mapping

    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    message = f"{listed}: the top level must be a mapping of keys to values, got list"
    with pytest.raises(ConfigError) as config_error:
        load_config(listed)
    with pytest.raises(UsageError) as usage_error:
        read_run_config(listed)
    assert str(usage_error.value) == message and message in str(config_error.value)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml_mapping(empty) == {}
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path)  # a folder is not a config file
