"""Crash-safe outputs: checkpoints that are whole or absent, resuming from the newest whole one.

A kill -9, an OOM kill, a pre-empted machine or a power cut can stop a run in the middle of a save.
What each output does about it:

- **Checkpoints** are written into `output_dir/.tunesmith-staging/checkpoint-N/`, every file is
  flushed to disk (fsync), a manifest (`tunesmith_checkpoint.json`: each file and its size) is
  written last, and only then is the folder renamed to `output_dir/checkpoint-N` (one rename: it
  happens or it does not). Old checkpoints are rotated away (`save_total_limit`) only after that
  rename, so the newest complete checkpoint is never deleted before a newer one is complete.
- **The final model, merged models, the resolved config** are written into a staging folder and
  then moved file by file with `os.replace`: after a crash each file is the old one or the new one.
- **GGUF files** are written to `FILE.partial` and renamed onto `FILE` when complete.

    output_dir/
      checkpoint-3/                 complete (has its manifest)
      .tunesmith-staging/
        checkpoint-6/               a save that was killed: never looked at by a resume
      checkpoint-6/                 (only after the rename: then complete)

`resolve_resume(output_dir, True)` is the newest checkpoint that passes `checkpoint_problem` (a
folder from before this module, or from plain transformers, has no manifest: then its trainer state
must parse and its weights' safetensors headers must match the file sizes). It logs which one it
took and why each newer one was skipped.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path

__all__ = [
    "CheckpointError",
    "MANIFEST",
    "STAGING",
    "check_output_dir",
    "checkpoint_problem",
    "safetensors_problem",
    "list_checkpoints",
    "resolve_resume",
    "fsync_tree",
    "write_manifest",
    "publish_checkpoint",
    "publish_files",
    "atomic_file",
    "staging_dir",
    "folder_size",
    "space_error",
]

logger = logging.getLogger(__name__)

STAGING = ".tunesmith-staging"
MANIFEST = "tunesmith_checkpoint.json"
TRAINER_STATE = "trainer_state.json"
# what `save_model` leaves at the top of output_dir when a run finished
_FINAL = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = (
    "model.safetensors",
    "adapter_model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_model.bin",
    "pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):  # ValueError: what Trainer raises for "no valid checkpoint found"
    """A checkpoint or output that cannot be used or written; the message names it and what to do."""


# ----------------------------------------------------------------------------- checking


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a complete checkpoint, or None when it is.

    With a manifest: every file it lists exists with its size. Without one (a checkpoint written by
    plain transformers or an older tunesmith): the trainer state parses, a weights file exists, and
    each safetensors file is as long as its header says.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    manifest = folder / MANIFEST
    if manifest.exists():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"its {MANIFEST} is unreadable"
        for name, size in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} is {path.stat().st_size} bytes, the manifest says {size}"
        return None
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE} (the save did not finish)"
    try:
        json.loads(state.read_text())
    except ValueError:
        return f"{TRAINER_STATE} is torn (not valid JSON)"
    if not any((folder / name).is_file() for name in _WEIGHTS):
        return "no model or adapter weights"
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            return f"{path.name} {problem}"
    return None


def safetensors_problem(path: str | Path) -> str | None:
    """None for a whole safetensors file, else what is wrong with it. A safetensors file is an 8-byte header length, a JSON header, then the data; the header's
    largest end offset says how long the file must be."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"is truncated ({size} bytes)"
            length = int.from_bytes(head, "little")
            if length > size - 8:
                return f"is truncated ({size} bytes, the header alone needs {length + 8})"
            header = json.loads(f.read(length))
    except (OSError, ValueError):
        return "has an unreadable header"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + length + end:
        return f"is truncated ({size} bytes, its header needs {8 + length + end})"
    return None


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of the `checkpoint-N` folders in `output_dir`, newest (highest step) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))
    ]
    return sorted(found, key=lambda item: item[0], reverse=True)


def resolve_resume(output_dir: str | Path, value) -> str | None:
    """The checkpoint folder to resume from, for `resume_from_checkpoint=value`.

    - None / False: None (a fresh run).
    - True: the newest complete `checkpoint-N` in `output_dir`; newer incomplete ones are skipped
      with the reason logged. None complete: CheckpointError.
    - a path: that folder, if complete; otherwise CheckpointError naming what is missing and the
      newest complete checkpoint beside it.
    """
    if value is None or value is False:
        return None
    if value is True:
        skipped = []
        for step, folder in list_checkpoints(output_dir):
            problem = checkpoint_problem(folder)
            if problem is None:
                why = "; ".join(f"skipped {name}: {reason}" for name, reason in skipped)
                logger.warning(
                    "resuming from %s (step %d), the newest complete checkpoint%s",
                    folder,
                    step,
                    f"; {why}" if why else "",
                )
                _note_staging(output_dir)
                return str(folder)
            skipped.append((folder.name, problem))
        detail = "; ".join(f"{name}: {reason}" for name, reason in skipped)
        raise CheckpointError(
            f"resume_from_checkpoint=true: no complete checkpoint in {output_dir}"
            + (f" ({detail})" if detail else " (no checkpoint-N folder)")
            + "; set resume_from_checkpoint to a checkpoint folder, or to false to start afresh"
        )
    folder = Path(str(value)).expanduser()
    problem = checkpoint_problem(folder)
    if problem is None:
        return str(folder)
    newest = next((f for _, f in list_checkpoints(folder.parent) if checkpoint_problem(f) is None), None)
    hint = (
        f"resume from {newest} instead (or resume_from_checkpoint=true: the newest complete one)"
        if newest
        else "no complete checkpoint is beside it; start afresh with resume_from_checkpoint=false"
    )
    raise CheckpointError(f"resume_from_checkpoint={value}: not a complete checkpoint ({problem}); {hint}")


def _note_staging(output_dir: str | Path) -> None:
    staging = Path(output_dir) / STAGING
    if staging.is_dir():
        torn = sorted(p.name for p in staging.iterdir())
        if torn:
            logger.warning(
                "%s holds %s from a save that did not finish; ignored, and removed at the next save",
                staging,
                ", ".join(torn),
            )


def check_output_dir(output_dir: str | Path, *, overwrite: bool, resume) -> None:
    """Refuse to start a fresh run in a folder that holds a finished run or checkpoints of an earlier one
    (they would be overwritten, or mixed with the new run's), unless `overwrite` (then the old checkpoints
    are removed, so a later resume cannot pick one of them) or `resume` is set."""
    folder = Path(output_dir)
    if resume or not folder.is_dir():
        return
    finished = [name for name in (*_FINAL, "report.md") if (folder / name).exists()]
    checkpoints = [p.name for _, p in list_checkpoints(folder)]
    if not finished and not checkpoints:
        return
    if overwrite:
        for name in checkpoints:
            shutil.rmtree(folder / name)
        shutil.rmtree(folder / STAGING, ignore_errors=True)
        if checkpoints:
            logger.warning("overwrite_output_dir: removed the earlier run's %s", ", ".join(checkpoints))
        return
    held = (
        f"a finished run ({', '.join(finished)})"
        if finished
        else f"checkpoints of an earlier run ({', '.join(checkpoints[:3])})"
    )
    raise CheckpointError(
        f"output_dir {folder} holds {held}: set resume_from_checkpoint=true to continue it, "
        "overwrite_output_dir=true to replace it, or choose another output_dir"
    )


# ----------------------------------------------------------------------------- writing


def staging_dir(output_dir: str | Path, name: str) -> Path:
    """An empty `output_dir/.tunesmith-staging/name` (whatever a killed save left there is removed)."""
    path = Path(output_dir) / STAGING / name
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def fsync_tree(folder: str | Path) -> None:
    """Flush every file under `folder`, and the folders themselves, to the disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str | Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems (and Windows) cannot open a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_manifest(folder: str | Path, step: int) -> Path:
    """Write `folder/tunesmith_checkpoint.json` (each file and its size) last, flushed."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    files.pop(MANIFEST, None)
    path = folder / MANIFEST
    with open(path, "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)
    return path


def publish_checkpoint(staged: str | Path, final: str | Path) -> None:
    """Rename the complete `staged` folder to `final`. A folder already at `final` (left by a run
    that crashed after this step, or an older run) is moved into the staging area first and removed
    after the rename, so `final` is always either the old folder or the new one."""
    staged, final = Path(staged), Path(final)
    old = None
    if final.exists():
        old = staged.parent / f"{final.name}.replaced"
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(staged, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _remove_if_empty(staged.parent)


def publish_files(staged: str | Path, target: str | Path) -> None:
    """Move every file of the complete `staged` folder into `target` with `os.replace` (each file
    atomically: after a crash it is the old file or the new one); a `target` that does not exist
    yet is the renamed `staged` folder itself."""
    staged, target = Path(staged), Path(target)
    fsync_tree(staged)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged, target)
        _fsync_dir(target.parent)
    else:
        for path in sorted(p for p in staged.rglob("*") if p.is_file()):
            dest = target / path.relative_to(staged)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
        _fsync_dir(target)
        shutil.rmtree(staged, ignore_errors=True)
    _remove_if_empty(staged.parent)


def _remove_if_empty(folder: Path) -> None:
    if folder.name == STAGING:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path beside `path` to write to; on success it replaces `path` (flushed), on
    an error it is removed and `path` is left as it was."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield partial
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise


def folder_size(folder: str | Path) -> int:
    """Total bytes of the files under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def is_disk_full(err: BaseException, folder: str | Path | None = None, needed: int | None = None) -> bool:
    """ENOSPC / EDQUOT, the messages torch's and safetensors' writers give for them, or (their messages
    vary: "basic_ios::clear: iostream error", "unexpected pos ...") any write error while `folder`'s
    disk has less than `needed` bytes (or 1 MiB) left."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err).lower()
    if any(s in text for s in ("no space left", "iostream error", "disk quota", "file write failed")):
        return True
    if folder is None:
        return False
    with contextlib.suppress(OSError):
        return shutil.disk_usage(_existing(Path(folder))).free < max(needed or 0, 2**20)
    return False


def space_error(
    folder: str | Path, what: str, needed: int | None, err: BaseException | None = None, *, intact: str = ""
) -> CheckpointError:
    """The one-line error for a full disk: the folder, the space needed and free, what is intact."""
    free = shutil.disk_usage(_existing(Path(folder))).free
    need = f"about {_mib(needed)} needed, " if needed else ""
    cause = f" ({type(err).__name__}: {str(err).splitlines()[0][:120]})" if err is not None else ""
    kept = f"; {intact}" if intact else ""
    return CheckpointError(
        f"not enough disk space in {folder} to write {what}: {need}{_mib(free)} free{cause}{kept}. Free some "
        "space (or point output_dir at a larger disk) and run again"
    )


def newest_complete(output_dir: str | Path) -> Path | None:
    """The newest complete `checkpoint-N` in `output_dir`, or None."""
    return next((f for _, f in list_checkpoints(output_dir) if checkpoint_problem(f) is None), None)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
