"""Reading a YAML config (or a dict) into an SFTConfig: sections flattened to field names, dotted
`key=value` overrides, each value checked against the field's type; unknown keys get the closest valid one."""

from __future__ import annotations

import difflib
import enum
import types
import typing
from pathlib import Path
from typing import Any

from tunesmith.config.errors import ConfigError
from tunesmith.config.fields import SECTIONS
from tunesmith.config.sft import SFTConfig, config_fields


def read_yaml_mapping(path: str | Path, error: type[Exception] = ConfigError) -> dict:
    """The mapping at the top of the YAML file `path` ({} for an empty file). A missing file, invalid
    YAML or another top level raise `error` (ConfigError; the CLI passes its UsageError) naming the file.

    >>> read_yaml_mapping("no/such.yaml")
    Traceback (most recent call last):
    ...
    tunesmith.config.errors.ConfigError: no/such.yaml: no such config file
    """
    import yaml

    where, file = str(path), Path(path)
    if not file.is_file():
        raise error(f"{where}: no such config file")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise error(f"{where}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise error(f"{where}: the top level must be a mapping of keys to values, got {type(raw).__name__}")
    return raw


def load_config(source: str | Path | dict | None = None, overrides: typing.Iterable[str] = ()) -> SFTConfig:
    """Build an SFTConfig from a YAML file (or a dict) plus dotted `key=value` overrides.

    >>> load_config({"lora": {"r": 8}, "learning_rate": 1e-4}, ["model.name_or_path=./m"]).lora_r
    8

    Unknown keys, wrong types and invalid values raise `ConfigError` naming the file and key.
    """
    import yaml

    where = "<dict>"
    if source is None:
        raw: dict = {}
        where = "<defaults>"
    elif isinstance(source, dict):
        raw = source
    else:
        where = str(source)
        raw = read_yaml_mapping(source)

    flat = _flatten(raw, where)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(
                f"override {item!r}: write it as key=value, e.g. learning_rate=1e-4 or lora.r=8"
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {err}") from None
        flat.update(_flatten(_nest(key.strip(), value), f"override {item!r}"))

    hints = typing.get_type_hints(SFTConfig)
    for key, value in list(flat.items()):
        flat[key] = _check_type(key, value, hints.get(key, Any), where)
    try:
        return SFTConfig(**flat)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except ValueError as err:
        raise ConfigError(f"{where}: invalid configuration: {err}") from None


def _nest(dotted: str, value) -> dict:
    head, _, rest = dotted.partition(".")
    return {head: _nest(rest, value) if rest else value}


def _flatten(raw: dict, where: str) -> dict[str, Any]:
    """Map YAML keys (top-level or inside a section) to SFTConfig field names."""
    valid = config_fields()
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key in valid:
            flat[key] = value
        elif key == "model" and isinstance(value, str):
            flat["model_name_or_path"] = value
        elif key in SECTIONS and isinstance(value, dict):
            for sub, sub_value in value.items():
                name = _section_key(key, str(sub))
                if name is None:
                    raise ConfigError(_unknown(f"{key}.{sub}", where))
                flat[name] = sub_value
        elif key in SECTIONS:
            raise ConfigError(f"{where}: `{key}` is a section and holds key: value pairs, got {value!r}")
        else:
            raise ConfigError(_unknown(key, where))
    return flat


def _section_key(section: str, sub: str) -> str | None:
    valid = config_fields()
    prefixed = SECTIONS[section] + sub
    if prefixed in valid:
        return prefixed
    return sub if sub in valid else None


def _all_spellings() -> list[str]:
    names = list(config_fields())
    for section, prefix in SECTIONS.items():
        if prefix:
            names += [f"{section}.{n[len(prefix) :]}" for n in config_fields() if n.startswith(prefix)]
    return names


def _unknown(key: str, where: str) -> str:
    close = difflib.get_close_matches(key, _all_spellings(), n=1, cutoff=0.6)
    section = key.partition(".")[0] if "." in key else None
    listing = "tunesmith config --list" + (f" --section {section}" if section in SECTIONS else "")
    hint = f" Did you mean `{close[0]}`?" if close else f" `{listing}` lists the valid keys."
    return f"{where}: unknown key `{key}`.{hint}"


def _check_type(key: str, value, annotation, where: str):
    """Return `value` (numeric strings made numbers) if it fits `annotation`, else raise ConfigError."""
    ok, converted = _fits(value, annotation)
    if ok:
        return converted
    expected = _type_name(annotation)
    raise ConfigError(f"{where}: `{key}` expects {expected}, got {value!r} ({type(value).__name__})")


def _fits(value, annotation) -> tuple[bool, Any]:
    origin = typing.get_origin(annotation)
    if annotation is Any or annotation is object:
        return True, value
    if origin in (typing.Union, types.UnionType):
        # try the non-str members first so "1e-4" for `float | str` becomes a float
        members = sorted(typing.get_args(annotation), key=lambda a: a is str)
        for member in members:
            ok, converted = _fits(value, member)
            if ok:
                return True, converted
        return False, value
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(annotation)
        if not args:
            return True, list(value)
        results = [_fits(v, args[0]) for v in value]
        return all(ok for ok, _ in results), [v for _, v in results]
    if origin is dict or annotation is dict:
        return isinstance(value, dict), value
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = [m.value for m in annotation]
        return value in values or isinstance(value, annotation), value
    return True, value  # a type we do not check (e.g. a config object): TrainingArguments validates it


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in annotation)
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))
