"""Every shipped config loads and validates, and the launch commands in them point at real files."""

import re
from pathlib import Path

import pytest
import yaml

from tunesmith.cli import read_run_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RUN_CONFIGS = sorted(CONFIGS.glob("*.yaml"))


def test_the_expected_configs_are_shipped():
    names = {p.name for p in RUN_CONFIGS}
    assert names == {
        "quickstart.yaml",
        "llama3-lora.yaml",
        "qwen-qlora-4bit.yaml",
        "full-finetune.yaml",
        "fsdp-multi-gpu.yaml",
        "deepspeed-zero3.yaml",
        "qwen2-vl-lora.yaml",
    }


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_validates(path):
    config, data, _ = read_run_config(path)  # unknown keys / wrong types would raise here
    assert data.train, f"{path.name} names no training data"
    assert config.output_dir.startswith("runs/")
    assert config.model_name_or_path


def test_config_values_mean_what_the_files_say():
    vlm, _, _ = read_run_config(CONFIGS / "qwen2-vl-lora.yaml")
    assert (vlm.use_peft, vlm.lora_target_modules, vlm.lora_vision_tower, vlm.lora_train_projector) == (
        True,
        None,
        False,
        False,
    )
    qlora, _, _ = read_run_config(CONFIGS / "qwen-qlora-4bit.yaml")
    assert (qlora.model_quantization, qlora.use_peft, qlora.lora_r) == ("4bit", True, 16)
    full, _, _ = read_run_config(CONFIGS / "full-finetune.yaml")
    assert (full.use_peft, full.learning_rate) == (False, 2e-5)
    llama, data, _ = read_run_config(CONFIGS / "llama3-lora.yaml")
    assert (data.split, data.eval_split) == ("train_sft[:20000]", "test_sft[:500]")
    assert llama.lora_target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]


def test_quickstart_file_equals_the_built_in_quick_start():
    from tunesmith.config import load_config
    from tunesmith.quickstart import QUICKSTART_CONFIG

    from_file, data, _ = read_run_config(CONFIGS / "quickstart.yaml")
    assert data.train == "quickstart"
    assert from_file.to_yaml_dict() == load_config(QUICKSTART_CONFIG).to_yaml_dict()


@pytest.mark.parametrize(
    ("name", "accelerate_file", "distributed_type"),
    [
        ("fsdp-multi-gpu.yaml", "fsdp.yaml", "FSDP"),
        ("deepspeed-zero3.yaml", "deepspeed-zero3.yaml", "DEEPSPEED"),
    ],
)
def test_multi_gpu_configs_carry_their_launch_command(name, accelerate_file, distributed_type):
    text = (CONFIGS / name).read_text()
    command = re.search(r"accelerate launch --config_file (\S+) -m tunesmith.cli train (\S+)", text)
    assert command, f"{name} has no accelerate launch command in a comment"
    assert command.group(1) == f"configs/accelerate/{accelerate_file}"
    assert command.group(2) == f"configs/{name}"
    launch = yaml.safe_load((CONFIGS / "accelerate" / accelerate_file).read_text())
    assert launch["distributed_type"] == distributed_type and launch["num_processes"] == 8
