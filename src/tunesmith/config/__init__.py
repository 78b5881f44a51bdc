"""The configuration of a tunesmith run: `SFTConfig`, every option with its help text, and its YAML form.

`SFTConfig` is a `transformers.TrainingArguments` with TRL 1.x's SFT fields (same names, same
meaning) and tunesmith's own (model, LoRA, kernels, memory). It is the single source of truth:
the YAML file the CLI reads is its serialised form, and `load_config` checks a file against its
fields (unknown key -> the closest valid one; wrong type -> the key, the type and the value).

YAML may group keys in sections; a section only prefixes or groups, it holds no other meaning:

    model:                      # model.X -> model_X when that field exists, else X
      name_or_path: ./my-model  #   -> model_name_or_path
      trust_remote_code: false  #   -> trust_remote_code
    lora: {r: 16, alpha: 32}    # -> lora_r, lora_alpha
    data: {max_length: 512}     # -> max_length
    training: {learning_rate: 2.0e-4}

and `load_config(path, ["lora.r=8", "learning_rate=1e-4"])` applies dotted overrides, each value
read with `yaml.safe_load` (so `1e-4`, `true`, `[q_proj, v_proj]` mean what they look like).

Modules: `fields` (the section mixins and their help), `sft` (SFTConfig itself), `yaml` (load_config),
`listing` (every key with its type, default and help, for `tunesmith config --list`), `errors`.
"""

from tunesmith.config.errors import ConfigError, deprecation_notice, notice_once
from tunesmith.config.fields import SECTIONS
from tunesmith.config.sft import SFTConfig, UnslothTrainingArguments, config_fields
from tunesmith.config.sft import _has_accelerator as _has_accelerator
from tunesmith.config.yaml import _section_key as _section_key
from tunesmith.config.yaml import load_config

__all__ = [
    "SFTConfig",
    "UnslothTrainingArguments",
    "ConfigError",
    "load_config",
    "config_fields",
    "deprecation_notice",
    "notice_once",
    "SECTIONS",
]
