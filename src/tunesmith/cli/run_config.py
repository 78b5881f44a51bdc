"""What the commands share: the run's YAML file read into an SFTConfig and a DataSpec (the CLI's own
`dataset` section), the model name checked, data sources loaded, the thread rule applied; `UsageError`.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass
from pathlib import Path

EXIT_CONFIG_ERROR = 2


DATA_KEYS = ("train", "eval", "split", "eval_split")


QUICKSTART_DATA = "quickstart"


# config.SECTIONS' names, here so that the parser does not import the config (and transformers)
CONFIG_SECTIONS = ("model", "lora", "data", "training", "kernels", "eval")


class UsageError(ValueError):
    """A problem with what the user asked for (config, paths): one line, exit status 2."""


@dataclass
class DataSpec:
    train: str | None = None
    eval: str | None = None
    split: str | None = None
    eval_split: str | None = None


def _data_spec(value, where: str) -> DataSpec:
    if value is None:
        return DataSpec()
    if isinstance(value, str):
        return DataSpec(train=value)
    if not isinstance(value, dict):
        raise UsageError(
            f"{where}: `dataset` is a path or a section with {', '.join(DATA_KEYS)}; got {value!r}"
        )
    for key in value:
        if key not in DATA_KEYS:
            close = difflib.get_close_matches(str(key), DATA_KEYS, n=1)
            hint = f" Did you mean `dataset.{close[0]}`?" if close else f" Valid: {', '.join(DATA_KEYS)}."
            raise UsageError(f"{where}: unknown key `dataset.{key}`.{hint}")
        if value[key] is not None and not isinstance(value[key], str):
            raise UsageError(f"{where}: `dataset.{key}` expects a string, got {value[key]!r}")
    return DataSpec(**value)


def read_run_config(path: str | Path | None, overrides=()):
    """(SFTConfig, DataSpec, raw config dict) from a YAML file (None: defaults) and key=value overrides.

    The `dataset` section and `dataset.*` overrides are read here; everything else goes through
    `load_config`, whose messages name the file.
    """

    from tunesmith.config import ConfigError, load_config
    from tunesmith.config.yaml import read_yaml_mapping

    where = str(path) if path else "<defaults>"
    raw: dict = {}
    if path is not None:
        raw = read_yaml_mapping(path, error=UsageError)
    raw = dict(raw)
    data = _data_spec(raw.pop("dataset", None), where)
    rest = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if key == "dataset" or key.startswith("dataset."):
            sub = key.partition(".")[2] or "train"
            if not sep:
                raise UsageError(f"override {item!r}: write it as key=value, e.g. dataset.train=data.jsonl")
            data = _data_spec({**vars(data), sub: value or None}, f"override {item!r}")
        else:
            rest.append(item)
    try:
        config = load_config(raw, rest)
    except ConfigError as err:
        # load_config saw a dict; name the file the user wrote instead
        raise UsageError(str(err).replace("<dict>", where, 1)) from None
    return config, data, raw


def _check_model(name: str | None) -> str:
    """The model to load; a path that does not exist is a config error (a Hub id is not checked here)."""
    from tunesmith.models.load import DEFAULT_ALIASES

    if name is None or name.lower() in DEFAULT_ALIASES:
        return name or "default"
    looks_local = name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1
    if looks_local and not Path(name).expanduser().exists():
        raise UsageError(
            f"model.name_or_path: {name} does not exist. Give a local model folder, a .gguf file, "
            "a Hub id, or `default` for the built-in SmolLM2-135M-Instruct"
        )
    return name


def _load_source(source: str, split: str | None):
    """A file/folder/Hub name as prepare_dataset reads it; with a split, loaded here with that split."""
    if split is None:
        return source
    from tunesmith.data.sources import load_source

    return load_source(source, split=split)


def _apply_threads(show: bool = False):
    """The thread rule of `tunesmith.threads`, for every command; `show`: print it (a training run)."""
    from tunesmith.threads import apply_thread_rule

    choice = apply_thread_rule()
    if show:
        print(choice.line(), file=sys.stderr, flush=True)
    return choice


def _need_folder(path: str) -> None:
    if not Path(path).is_dir():
        raise UsageError(f"{path}: no such folder (expected a model or adapter folder)")
