"""Every config key with its section, type, default and help text, from SFTConfig's field metadata (the
one source): what `tunesmith config --list` and `tunesmith train --help` print.

Keys inherited from `transformers.TrainingArguments` carry their own `metadata["help"]` and are listed
under `training`; tunesmith's fields name their section in `metadata["group"]`.
"""

from __future__ import annotations

import dataclasses
import textwrap
import typing
from dataclasses import dataclass

from tunesmith.config.fields import SECTIONS
from tunesmith.config.sft import SFTConfig, _plain, config_fields
from tunesmith.config.yaml import _type_name


@dataclass(frozen=True)
class ConfigKey:
    """One key as the YAML file spells it inside its section, and the SFTConfig field it sets."""

    section: str
    key: str
    field: str
    type: str
    default: typing.Any
    help: str


def config_keys() -> dict[str, list[ConfigKey]]:
    """SFTConfig's keys grouped by YAML section (in SECTIONS' order), each section in field order."""
    hints = typing.get_type_hints(SFTConfig)
    grouped: dict[str, list[ConfigKey]] = {name: [] for name in SECTIONS}
    for f in config_fields().values():
        section = f.metadata.get("group", "training")
        prefix = SECTIONS[section]
        key = f.name[len(prefix) :] if prefix and f.name.startswith(prefix) else f.name
        grouped[section].append(
            ConfigKey(
                section=section,
                key=key,
                field=f.name,
                type=_type_name(hints.get(f.name, typing.Any)),
                default=_default(f),
                help=" ".join(str(f.metadata.get("help", "")).split()),
            )
        )
    return grouped


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return _plain(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _plain(f.default_factory())
    return None


def _shown(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def format_keys(section: str | None = None, width: int = 100) -> str:
    """The listing as text: a heading per section, then `key (field): type = default` and the help."""
    lines = ["Config keys, by YAML section (`section: {key: value}`; a top-level `field: value` works too):"]
    for name, keys in config_keys().items():
        if section is not None and name != section:
            continue
        lines += ["", f"{name}:"]
        for k in keys:
            spelled = k.key if k.key == k.field else f"{k.key} ({k.field})"
            head = f"{spelled}: {k.type} = {_shown(k.default)}"
            lines += textwrap.wrap(head, width, initial_indent="  ", subsequent_indent=" " * 6)
            if k.help:
                lines += textwrap.wrap(k.help, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)
