"""`DataSettings`: every setting that decides what `prepare_dataset` makes of a source, typed, frozen,
built once (from an `SFTConfig` by `DataSettings.from_config`, or by hand) and handed down by name.

The fields are those of `SFTConfig` with the same names (`cache_dir` is `SFTConfig.dataset_cache_dir`),
plus the per-source ones a mixture entry sets (`split`, `column_mapping`, `system_prompt`) and
`streaming`. The formatting function is not a setting: it is code, passed beside.

    >>> s = DataSettings(max_length=512, packing=True)
    >>> s.max_length, s.packing, s.truncation_mode
    (512, True, 'keep_start')
    >>> s.replace(packing=False).packing
    False
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DataSettings:
    # where the rows come from
    split: str | None = None
    dataset_kwargs: dict[str, Any] | None = None
    column_mapping: dict[str, str] | None = None
    streaming: bool = False
    shuffle_dataset: bool = False
    seed: int = 42
    dataset_num_proc: int | None = None
    cache_dir: str | bool | None = None
    # how an example becomes text and which tokens train
    dataset_text_field: str | None = None
    dataset_format: str | None = None
    system_prompt: str | None = None
    chat_template: str | None = None
    chat_template_path: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    eos_token: str | None = None
    completion_only_loss: bool | None = None
    assistant_only_loss: bool | None = None
    train_on_inputs: bool = False
    train_on_reasoning: str = "last"
    # lengths and rows
    max_length: int | None = 1024
    truncation_mode: str = "keep_start"
    packing: bool = False
    packing_strategy: str = "bfd"

    @classmethod
    def from_config(cls, config, *, packing: bool | None = None) -> DataSettings:
        """The data settings of an `SFTConfig`; `packing` overrides `config.packing` (eval sets use
        `eval_packing`)."""
        return cls(
            dataset_kwargs=config.dataset_kwargs,
            shuffle_dataset=config.shuffle_dataset,
            seed=config.seed,
            dataset_num_proc=config.dataset_num_proc,
            cache_dir=config.dataset_cache_dir,
            dataset_text_field=config.dataset_text_field,
            dataset_format=config.dataset_format,
            chat_template=config.chat_template,
            chat_template_path=config.chat_template_path,
            chat_template_kwargs=config.chat_template_kwargs,
            eos_token=config.eos_token,
            completion_only_loss=config.completion_only_loss,
            assistant_only_loss=config.assistant_only_loss,
            train_on_inputs=config.train_on_inputs,
            train_on_reasoning=config.train_on_reasoning,
            max_length=config.max_length,
            truncation_mode=config.truncation_mode,
            packing=config.packing if packing is None else packing,
            packing_strategy=config.packing_strategy,
        )

    def replace(self, **changes) -> DataSettings:
        return dataclasses.replace(self, **changes)

    @property
    def skip_prepare(self) -> bool:
        """`dataset_kwargs={"skip_prepare_dataset": True}`: the data is used as loaded (as TRL does)."""
        return bool((self.dataset_kwargs or {}).get("skip_prepare_dataset"))

    @property
    def load_kwargs(self) -> dict[str, Any]:
        """`dataset_kwargs` less `skip_prepare_dataset`: what `sources.load_source` takes."""
        return {k: v for k, v in (self.dataset_kwargs or {}).items() if k != "skip_prepare_dataset"}

    def as_kwargs(self) -> dict[str, Any]:
        """The settings as `prepare_dataset`'s keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
