"""Several datasets in one run: each source prepared (and cached) on its own, then mixed by weight.

    sources ─► prepare_dataset per source ─► take each source's share ─► shuffle ─► pack
               (one cache entry each; the          (seeded: whole passes          (the mixture's rows,
                weights are not in its key)          + a random remainder)         as `packing` says)

A source says how much of it goes into the mixture with one of:

    weight: w        its share of the weighted sources' examples is w / (sum of their weights); the
                     weighted part of the mixture has as many examples as those sources hold together.
                     A source with fewer examples than its share is OVERSAMPLED (its examples repeated,
                     then a seeded random subset for the remainder) with a notice; one with more is
                     subsampled (a seeded random subset), also with a notice.
    fraction: f      round(f x its examples) (f > 1 repeats the source on purpose)
    max_examples: k  min(k, its examples): capped, never repeated
    (none)           weight 1

Worked example (seed fixed): a = 6 examples, b = 2, weights a: 1, b: 1 -> the weighted part has
6 + 2 = 8 examples, 4 from each: a is subsampled to 4 (2 left out), b is repeated twice (2x).

Every source may bring an eval set (`eval:` a file or Hub name, `eval_split:` a split of its own
Hub dataset, or `eval_examples: k` held out of its prepared examples, seeded); the trainer then
evaluates each and logs `eval_<name>_loss`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tunesmith.data import packing as packing_ops
from tunesmith.data.pipeline import DataStats, prepare_dataset
from tunesmith.data.settings import DataSettings
from tunesmith.data.sources import DataError, describe_source

logger = logging.getLogger("tunesmith.data")

__all__ = [
    "DatasetSource",
    "PreparedMixture",
    "MixtureStats",
    "parse_sources",
    "is_mixture",
    "prepare_mixture",
]


@dataclass
class DatasetSource:
    """One entry of a `datasets:` list. `path`: a file, folder or Hub name (or, in Python, a Dataset or
    a list of rows); `name`: the label in summaries and metrics (`eval_<name>_loss`; default from the
    path); `format`: dataset_format for this source; `columns`: {source column: new name};
    `system_prompt`: the system message of conversations that have none; `chat_template_kwargs`: template
    variables for this source (over the config's). One of `weight`, `fraction`, `max_examples` (see the
    module docstring); `eval` / `eval_split` / `eval_examples`: its eval set."""

    path: Any
    name: str | None = None
    split: str | None = None
    format: str | None = None
    columns: dict[str, str] | None = None
    system_prompt: str | None = None
    weight: float | None = None
    fraction: float | None = None
    max_examples: int | None = None
    eval: Any = None
    eval_split: str | None = None
    eval_examples: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # over the config's, for this source's examples


SOURCE_KEYS = tuple(f.name for f in dataclasses.fields(DatasetSource))


def is_mixture(value) -> bool:
    """A train_dataset that names several sources: a plain dict (name -> source), or a list whose items
    are all DatasetSource. (A list of row dicts is one dataset, as in TRL; a DatasetDict holds splits.)"""
    if type(value) is dict:
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, DatasetSource) for v in value)


def parse_sources(value, where: str = "datasets") -> list[DatasetSource]:
    """DatasetSource list from YAML / Python: a list of entries (dicts with `path`, a path string, or
    DatasetSource) or a dict {name: path | entry}. Names are made unique and checked."""
    if isinstance(value, dict):
        items = []
        for name, entry in value.items():
            if isinstance(entry, DatasetSource):
                entry = dataclasses.replace(entry, name=entry.name or str(name))
            elif isinstance(entry, dict) and "path" in entry:
                entry = {**entry, "name": entry.get("name", str(name))}
            else:
                entry = {"path": entry, "name": str(name)}
            items.append(entry)
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise DataError(
            f"{where}: expected a list of sources (each with a `path`) or a mapping name -> source"
        )
    if not items:
        raise DataError(f"{where}: the list of sources is empty")
    sources = [_source(item, f"{where}[{i}]") for i, item in enumerate(items)]
    seen: dict[str, int] = {}
    for i, source in enumerate(sources):
        if source.name is None:
            base = _default_name(source.path, i)
            source.name = base if base not in seen else f"{base}_{i}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", source.name):
            raise DataError(
                f"{where}[{i}].name={source.name!r}: use letters, digits, '_', '-' or '.' (it names the "
                f"metrics, eval_{{name}}_loss)"
            )
        if source.name in seen:
            raise DataError(
                f"{where}[{i}]: the name {source.name!r} is also {where}[{seen[source.name]}]'s; give each source "
                "its own `name`"
            )
        seen[source.name] = i
    return sources


def _source(item, where: str) -> DatasetSource:
    if isinstance(item, DatasetSource):
        source = dataclasses.replace(item)
    elif isinstance(item, (str, Path)):
        source = DatasetSource(path=str(item))
    elif isinstance(item, dict):
        unknown = [k for k in item if k not in SOURCE_KEYS]
        if unknown:
            import difflib

            close = difflib.get_close_matches(str(unknown[0]), SOURCE_KEYS, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else f" Keys: {', '.join(SOURCE_KEYS)}."
            raise DataError(f"{where}: unknown key `{unknown[0]}`.{hint}")
        if item.get("path") is None:
            raise DataError(f"{where}: needs a `path` (a file, folder or Hub dataset name)")
        source = DatasetSource(**item)
    else:
        raise DataError(f"{where}: expected a source entry with a `path`, got {type(item).__name__}")
    given = [k for k in ("weight", "fraction", "max_examples") if getattr(source, k) is not None]
    if len(given) > 1:
        raise DataError(f"{where}: give one of weight, fraction, max_examples, not {' and '.join(given)}")
    for key, ok, need in (
        (
            "weight",
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
            "a number > 0",
        ),
        (
            "fraction",
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
            "a number > 0",
        ),
        ("max_examples", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "an int > 0"),
        ("eval_examples", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "an int > 0"),
    ):
        value = getattr(source, key)
        if value is not None and not ok(value):
            raise DataError(f"{where}.{key}: expects {need}, got {value!r}")
    if source.columns is not None and (
        not isinstance(source.columns, dict) or not all(isinstance(v, str) for v in source.columns.values())
    ):
        raise DataError(
            f"{where}.columns: expects a mapping {{source column: new name}}, e.g. {{question: prompt}}"
        )
    if source.eval is not None and source.eval_examples is not None:
        raise DataError(f"{where}: give `eval` or `eval_examples`, not both")
    if not given:
        source.weight = 1.0
    return source


def _default_name(path, index: int) -> str:
    if isinstance(path, (str, Path)):
        text = Path(str(path)).stem if Path(str(path)).suffix else str(path).rstrip("/").split("/")[-1]
        text = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")
        if text:
            return text
    return f"source{index}"


@dataclass
class SourceStats:
    """One source's line of the mixture summary."""

    name: str
    prepared: DataStats
    examples_used: int = 0  # examples of the source in the mixture (repeats counted)
    repeats: float = 0.0  # examples_used / prepared examples
    tokens: int = 0  # tokens it brings into the mixture
    supervised_tokens: int = 0
    eval_examples: int = 0
    rule: str = ""  # "weight 2 (40.0%)", "fraction 0.5", "max_examples 100"


@dataclass
class MixtureStats:
    sources: list[SourceStats] = field(default_factory=list)
    total: DataStats = field(default_factory=DataStats)

    def summary(self) -> str:
        total = self.total
        lines = [
            f"data: mixture of {len(self.sources)} sources, {total.examples_out} examples, {total.tokens} tokens "
            f"({total.supervised_tokens} trained)"
        ]
        for s in self.sources:
            p = s.prepared
            share = 100 * s.examples_used / total.examples_out if total.examples_out else 0.0
            token_share = (
                100 * s.supervised_tokens / total.supervised_tokens if total.supervised_tokens else 0.0
            )
            cached = ", cached" if p.cache_hit else ""
            held = f", {s.eval_examples} held out for eval" if s.eval_examples else ""
            lines.append(
                f"  {s.name} ({p.source}, {p.format}{cached}): examples {p.examples_in} in, {p.examples_out} out"
                f"{held}; {s.examples_used} in the mixture ({s.repeats:.2f}x, {s.rule}); tokens {s.tokens}, "
                f"trained {s.supervised_tokens}; share {share:.1f}% of examples, {token_share:.1f}% of trained tokens"
            )
        if total.packing_strategy:
            lines.append(
                f"  packed ({total.packing_strategy}) into {total.rows} rows of {total.max_length}: "
                f"efficiency {100 * (total.packing_efficiency or 0):.1f}%"
            )
        else:
            lines.append(f"  rows: {total.rows} (not packed)")
        return "\n".join(lines)


@dataclass
class PreparedMixture:
    dataset: Any  # datasets.Dataset of rows (input_ids, labels, seq_lengths)
    stats: MixtureStats
    eval_datasets: dict[str, Any]  # source name -> prepared eval rows (empty when no source has one)


def prepare_mixture(sources, tokenizer, settings: DataSettings | None = None, *, eval_packing=None,
                    formatting_func=None, **keywords) -> PreparedMixture:  # fmt: skip
    """Prepare each source with `prepare_dataset` (unpacked, one cache entry each), take its share,
    shuffle the mixture under `settings.seed`, then pack it as `packing` / `packing_strategy` say.

    `settings` (a `DataSettings`, or without one `keywords` naming its fields) are the same for every
    source; a source's `format`, `split`, `columns`, `system_prompt` and `chat_template_kwargs` are its
    own. Streaming and `shuffle_dataset` do not apply (the mixture is always shuffled).
    """
    import datasets

    if settings is None:  # the keyword form, for Python callers
        settings = DataSettings(**keywords)
    seed, max_length = settings.seed, settings.max_length
    packing, packing_strategy = settings.packing, settings.packing_strategy
    eval_packing = packing if eval_packing is None else eval_packing
    sources = parse_sources(sources)
    shared = settings.replace(streaming=False, shuffle_dataset=False)
    spreads = packing and packing_strategy in ("bfd_split", "wrapped") and settings.truncation_mode != "drop"
    per_source = []
    for source in sources:
        source_settings = _source_settings(source, shared, source.split)
        prepared = prepare_dataset(
            source.path, tokenizer, source_settings.replace(packing=False, max_length=None if spreads else max_length),
            formatting_func=formatting_func,
        )  # fmt: skip
        if not isinstance(prepared.dataset, datasets.Dataset):
            raise DataError(
                f"datasets: {source.name}: a mixture needs map-style data (streaming is not supported)"
            )
        per_source.append(prepared)

    tables, evals, stats = [], {}, MixtureStats()
    counts = _counts(sources, [len(p.dataset) - (s.eval_examples or 0) for s, p in zip(sources, per_source)])
    for source, prepared, count in zip(sources, per_source, counts):
        table = prepared.dataset.data.table.select(["input_ids", "labels"])
        rng = np.random.default_rng([seed, zlib.crc32(source.name.encode())])
        held = 0
        if source.eval_examples:
            if source.eval_examples >= len(table):
                raise DataError(
                    f"datasets: {source.name}: eval_examples={source.eval_examples} leaves nothing to train on "
                    f"({len(table)} prepared examples)"
                )
            order = rng.permutation(len(table))
            eval_rows, train_rows = (
                np.sort(order[: source.eval_examples]),
                np.sort(order[source.eval_examples :]),
            )
            evals[source.name] = _rows(table.take(eval_rows), max_length, eval_packing, packing_strategy)
            table, held = table.take(train_rows), len(eval_rows)
        chosen = _take(len(table), count, rng)
        if count > len(table):
            logger.warning(
                "datasets: %s has %d examples but its share of the mixture is %d: oversampled %.2fx (every example "
                "%d times, %d of them once more)",
                source.name, len(table), count, count / len(table), count // len(table), count % len(table),
            )  # fmt: skip
        elif count < len(table) and source.max_examples is None and source.fraction is None:
            logger.warning(
                "datasets: %s has %d examples but its share of the mixture is %d: %d left out (a seeded random subset "
                "is used)",
                source.name, len(table), count, len(table) - count,
            )  # fmt: skip
        picked = table.take(chosen)
        tables.append(picked)
        labels = pc.list_flatten(picked["labels"])
        stats.sources.append(
            SourceStats(
                name=source.name,
                prepared=prepared.stats,
                examples_used=len(picked),
                repeats=len(picked) / len(table),
                tokens=len(labels),
                supervised_tokens=int(pc.sum(pc.not_equal(labels, packing_ops.IGNORE_INDEX)).as_py() or 0),
                eval_examples=held,
                rule=_rule(source, sources),
            )
        )
        if source.eval is not None or source.eval_split is not None:
            evals[source.name] = prepare_dataset(
                source.eval if source.eval is not None else source.path,
                tokenizer,
                _source_settings(source, shared, source.eval_split).replace(packing=eval_packing),
                formatting_func=formatting_func,
            ).dataset

    mixed = pa.concat_tables(tables)
    if len(mixed) == 0:
        raise DataError("datasets: the mixture is empty (every source's share is 0 examples)")
    mixed = mixed.take(np.random.default_rng(seed).permutation(len(mixed)))
    stats.total = DataStats(
        source=f"mixture of {len(sources)} sources", format="mixture", max_length=max_length,
        examples_in=sum(s.prepared.examples_in or 0 for s in stats.sources), examples_out=len(mixed),
    )  # fmt: skip
    dataset = _rows(mixed.select(["input_ids", "labels"]), max_length, packing, packing_strategy, stats.total)
    logger.info("%s", stats.summary())
    return PreparedMixture(dataset, stats, evals)


def _source_settings(source: DatasetSource, settings: DataSettings, split) -> DataSettings:
    """The shared settings with what a source sets for itself (split, columns, system prompt, format,
    template arguments on top of the shared ones)."""
    changes = {"split": split, "column_mapping": source.columns, "system_prompt": source.system_prompt}
    if source.chat_template_kwargs:
        changes["chat_template_kwargs"] = {
            **(settings.chat_template_kwargs or {}),
            **source.chat_template_kwargs,
        }
    if source.format is not None:
        changes["dataset_format"] = source.format
    return settings.replace(**changes)


def _counts(sources: list[DatasetSource], sizes: list[int]) -> list[int]:
    """Examples each source puts into the mixture (see the module docstring); weights are split by the
    largest-remainder rule, so the weighted counts add up to the weighted sources' size exactly.

        >>> _counts([DatasetSource("a", weight=1), DatasetSource("b", weight=1)], [6, 2])
        [4, 4]
        >>> _counts([DatasetSource("a", weight=2), DatasetSource("b", max_examples=5)], [10, 3])
        [10, 3]
    """
    counts = [0] * len(sources)
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    for i, source in enumerate(sources):
        if source.max_examples is not None:
            counts[i] = min(source.max_examples, sizes[i])
        elif source.fraction is not None:
            counts[i] = int(round(source.fraction * sizes[i]))
    if weighted:
        total = sum(sizes[i] for i in weighted)
        weight_sum = sum(sources[i].weight for i in weighted)
        exact = [total * sources[i].weight / weight_sum for i in weighted]
        floors = [int(np.floor(x)) for x in exact]
        # the largest remainders get the examples left after the floors (ties: the earlier source)
        order = sorted(range(len(weighted)), key=lambda j: (-(exact[j] - floors[j]), j))
        for j in order[: total - sum(floors)]:
            floors[j] += 1
        for j, i in enumerate(weighted):
            counts[i] = floors[j]
    return counts


def _take(size: int, count: int, rng) -> np.ndarray:
    """`count` row indices of `size` rows: whole passes over all rows, then a random subset of the rest."""
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    passes, rest = divmod(count, size)
    return np.concatenate([np.tile(np.arange(size), passes), np.sort(rng.choice(size, rest, replace=False))])


def _rule(source: DatasetSource, sources: list[DatasetSource]) -> str:
    if source.max_examples is not None:
        return f"max_examples {source.max_examples}"
    if source.fraction is not None:
        return f"fraction {source.fraction:g}"
    weight_sum = sum(s.weight for s in sources if s.weight is not None)
    return f"weight {source.weight:g} = {100 * source.weight / weight_sum:.1f}% of the weighted sources"


def _rows(table: pa.Table, max_length, packing: bool, strategy: str, stats: DataStats | None = None):
    """Unpacked examples -> the rows a collator reads (packed when `packing`), as a Dataset."""
    import datasets

    if packing:
        table, packed = packing_ops.pack(table, max_length=max_length, packing_strategy=strategy)
        if stats is not None:
            stats.packing_strategy, stats.packing_efficiency = strategy, round(packed.efficiency, 6)
            stats.split_documents = packed.split_documents
    else:
        lengths = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False)
        seq_lengths = pa.ListArray.from_arrays(
            pa.array(np.arange(len(lengths) + 1, dtype=np.int32)), pa.array(lengths, pa.int32())
        )
        table = table.append_column("seq_lengths", seq_lengths)
    if stats is not None:
        labels = pc.list_flatten(table["labels"])
        stats.rows, stats.tokens = len(table), len(labels)
        stats.supervised_tokens = int(pc.sum(pc.not_equal(labels, packing_ops.IGNORE_INDEX)).as_py() or 0)
    return datasets.Dataset(datasets.table.InMemoryTable(table))


def describe(sources: list[DatasetSource]) -> str:
    return ", ".join(f"{s.name}={describe_source(s.path)}" for s in sources)
