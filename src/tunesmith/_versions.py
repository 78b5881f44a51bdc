"""The oldest versions of the libraries tunesmith is tested with, checked once at import.

These are the floors `pyproject.toml` declares (a test keeps the two equal) and `make test-compat`
runs the suite at. Below them things fail in ways that are hard to trace back to a version, some
silently: before peft 0.19 a LoRA run with `modules_to_save` unties a tied embedding and LM head and
trains two copies; before transformers 5.18 SmolLM2's GGUF tokenizer loads with `<|im_start|>` as its
EOS; transformers 4.x has another mask-function signature (every padding-free run fails). So an older
version stops the import with one message naming the package, the version found and the one needed.

Only package metadata is read (no library is imported here), and nothing is changed.
"""

from __future__ import annotations

from importlib import metadata

# package -> oldest supported version (keep equal to pyproject.toml's `>=` floors)
MINIMUM_VERSIONS = {
    "torch": "2.6",
    "transformers": "5.18.0",
    "peft": "0.19.0",
    "accelerate": "1.3.0",
    "datasets": "3.6.0",
}


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "2.13.0+cpu" -> (2, 13, 0); "5.0.0rc1" -> (5, 0, 0)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) < len(piece):
            break  # "0rc1": a pre-release of 0; stop here
    return tuple(parts)


def too_old(installed: dict[str, str | None] | None = None) -> list[str]:
    """One line per required package that is missing or older than its floor.

    >>> too_old({"torch": "2.13.0+cpu", "transformers": "4.57.6", "peft": "0.19.0",
    ...          "accelerate": "1.3.0", "datasets": None})  # doctest: +NORMALIZE_WHITESPACE
    ['transformers 4.57.6 is installed; tunesmith needs transformers>=5.18.0',
     'datasets is not installed; tunesmith needs datasets>=3.6.0']
    """
    problems = []
    for package, floor in MINIMUM_VERSIONS.items():
        if installed is not None:
            found = installed.get(package)
        else:
            try:
                found = metadata.version(package)
            except metadata.PackageNotFoundError:
                found = None
        if found is None:
            problems.append(f"{package} is not installed; tunesmith needs {package}>={floor}")
        elif _release(found) < _release(floor):
            problems.append(f"{package} {found} is installed; tunesmith needs {package}>={floor}")
    return problems


def check_versions() -> None:
    """Raise ImportError naming every package below its floor, and the command that fixes it."""
    problems = too_old()
    if problems:
        upgrade = " ".join(f'"{line.split("needs ")[1]}"' for line in problems)
        raise ImportError("tunesmith: " + "; ".join(problems) + f". Upgrade with: pip install -U {upgrade}")
