"""The on-disk cache of prepared datasets: the key (source, tokenizer, `DataSettings`, formatting
function, code of the data modules), and reading / writing an entry atomically.

An entry is a folder `<cache_dir>/<key>/` holding `dataset/` (`Dataset.save_to_disk`) and
`stats.json` (`DataStats.to_dict`). The key covers the source (file path, size, mtime and content
hash; a Dataset's fingerprint; a list's content), the tokenizer (its full serialised vocabulary,
special tokens and chat template), the settings that change the rows, and the code of the data
modules; a second call with the same key loads the result and logs "reusing prepared data from ...".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tunesmith.common import file_sha256, sha256_hex
from tunesmith.data.settings import DataSettings
from tunesmith.data.sources import load_source
from tunesmith.data.stats import DataStats, PreparedDataset

logger = logging.getLogger("tunesmith.data")

# Bump when the on-disk layout or the meaning of a prepared dataset changes.
CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path("~/.cache/tunesmith/data")
# Settings that change how the rows are made, not which rows come out.
_NOT_IN_KEY = ("streaming", "dataset_num_proc", "cache_dir")


def cache_path(settings: DataSettings, key: str) -> Path:
    return Path(settings.cache_dir or DEFAULT_CACHE_DIR).expanduser() / key


def settings_key(settings: DataSettings) -> dict:
    """The fields of `settings` that decide the rows, as plain values: the chat template file by its
    content, the packing strategy only when packing, the seed only when shuffling, and
    `dataset_kwargs` without `skip_prepare_dataset` (a skipped dataset is never cached)."""
    key = {
        f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name not in _NOT_IN_KEY
    }
    if settings.chat_template_path:
        key["chat_template_path"] = file_sha256(settings.chat_template_path)
    if not settings.packing:
        key["packing_strategy"] = None
    if not settings.shuffle_dataset:
        key["seed"] = None
    key["dataset_kwargs"] = settings.load_kwargs
    return key


def cache_key(source, tokenizer, settings: DataSettings, formatting_func):
    """(key, loaded dataset or None). The key is None when the source cannot be fingerprinted."""
    import datasets

    loaded = None
    if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
        source_key = _path_fingerprint(Path(source))
    elif isinstance(source, list):
        source_key = "list:" + sha256_hex(json.dumps(source, sort_keys=True, default=repr).encode())
    elif isinstance(source, datasets.Dataset):
        source_key = "dataset:" + source._fingerprint
    elif isinstance(source, datasets.DatasetDict):
        source_key = "datasetdict:" + ",".join(
            f"{name}={ds._fingerprint}" for name, ds in sorted(source.items())
        )
    else:
        # a Hub name (or anything else load_source reads): the loaded dataset's fingerprint
        loaded = load_source(source, split=settings.split, streaming=False, **settings.load_kwargs)
        if not isinstance(loaded, datasets.Dataset):
            return None, loaded
        source_key = "dataset:" + loaded._fingerprint
    func_key = None
    if formatting_func is not None:
        try:
            from datasets.fingerprint import Hasher

            func_key = Hasher.hash(formatting_func)
        except Exception as error:  # an unpicklable function: correct results matter more than the cache
            logger.warning(
                "formatting_func cannot be fingerprinted (%s); prepared data will not be cached", error
            )
            return None, loaded
    parts = {
        "version": CACHE_VERSION,
        "source": source_key,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "settings": settings_key(settings),
        "formatting_func": func_key,
        "code": _code_fingerprint(),
    }
    return sha256_hex(json.dumps(parts, sort_keys=True, default=repr).encode())[:24], loaded


def _path_fingerprint(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    entries = []
    for file in files:
        stat = file.stat()
        entries.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns, file_sha256(file)])
    return "files:" + sha256_hex(json.dumps(entries).encode())


def _tokenizer_fingerprint(tokenizer) -> str | None:
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # the whole fast tokenizer: vocabulary, merges, normalizer, pre-tokenizer, added tokens
        vocab = backend.to_str()
    else:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [
        type(tokenizer).__name__,
        sha256_hex(vocab.encode()),
        getattr(tokenizer, "chat_template", None),
        getattr(tokenizer, "special_tokens_map", None),
        sorted(getattr(tokenizer, "all_special_ids", [])),
        getattr(tokenizer, "add_bos_token", None),
        getattr(tokenizer, "add_eos_token", None),
    ]
    return sha256_hex(json.dumps(parts, sort_keys=True, default=repr).encode())


@functools.lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """The data modules' source: a change in how data is prepared invalidates old results."""
    folder = Path(__file__).parent
    return sha256_hex(b"".join(path.read_bytes() for path in sorted(folder.glob("*.py"))))


def load_cached(path: Path) -> PreparedDataset | None:
    import datasets

    if not (path / "stats.json").exists():
        return None
    try:
        dataset = datasets.load_from_disk(str(path / "dataset"))
        stats = DataStats.from_dict(json.loads((path / "stats.json").read_text()))
    except Exception as error:  # a damaged cache entry is rebuilt, not trusted
        logger.warning("ignoring unreadable cache entry %s (%s); preparing the data again", path, error)
        return None
    stats.cache_hit, stats.cache_path = True, str(path)
    logger.info(
        "reusing prepared data from %s (%d rows; delete the folder to prepare again)", path, len(dataset)
    )
    logger.info("%s", stats.summary())
    return PreparedDataset(dataset, stats)


def save_cached(path: Path, dataset, stats: DataStats) -> None:
    stats.cache_path = str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # write into a sibling folder, then rename: a crash never leaves a half-written entry
    staging = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        dataset.save_to_disk(str(staging / "dataset"))
        (staging / "stats.json").write_text(json.dumps(stats.to_dict(), indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        logger.warning("could not write the data cache to %s (%s); continuing without it", path, error)
        return
    logger.info("saved prepared data to %s", path)
