"""Constants and small helpers that more than one layer needs, each defined here and only here.

- `IGNORE_INDEX`: the label of a token that is not trained (Hugging Face's convention, -100).
- `once(key)`: True the first time a key is seen in this process, False after; the one memory of
  "warned already" (notices, per-example warnings, kernel fallbacks), so a warning about a million
  examples is printed once. `reset_once()` forgets (tests).
- `sha256_hex(data)`, `file_sha256(path)`: content digests, for cache keys and integrity checks.

    >>> once("doctest-key"), once("doctest-key")
    (True, False)
    >>> sha256_hex(b"")[:12]
    'e3b0c44298fc'
"""

from __future__ import annotations

import hashlib

IGNORE_INDEX = -100

_seen: set = set()


def once(key) -> bool:
    """True the first time `key` (any hashable) is passed in this process, False every later time."""
    if key in _seen:
        return False
    _seen.add(key)
    return True


def reset_once(prefix=None) -> None:
    """Forget the keys seen (all, or the tuple keys whose first item is `prefix`)."""
    if prefix is None:
        _seen.clear()
    else:
        _seen.difference_update({k for k in _seen if isinstance(k, tuple) and k and k[0] == prefix})


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()
