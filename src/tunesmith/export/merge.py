"""Merge a LoRA adapter into its base model: the first step of every export from an adapter folder."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

from tunesmith.export.errors import ExportError

logger = logging.getLogger(__name__)

_ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    """True for a PEFT adapter folder (it holds `adapter_config.json`)."""
    return (Path(path) / _ADAPTER_CONFIG).is_file()


def _load_tokenizer(*folders: Path):
    """The tokenizer saved in the first folder that has one (adapter folders usually do)."""
    from transformers import AutoTokenizer

    for folder in folders:
        if any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(folder)
    raise ExportError(f"no tokenizer found in {', '.join(str(f) for f in folders)}")


def _load_processor(adapter_dir: Path, base_dir: Path, base: str):
    """A VLM's processor from the adapter folder (the trainer saves it there) or the base model."""
    from tunesmith.models.vision import load_processor

    for folder in (adapter_dir, base_dir):
        if any((folder / name).exists() for name in ("processor_config.json", "preprocessor_config.json")):
            return load_processor(folder)
    return load_processor(base)


def refuse_vision(model_dir: Path) -> None:
    """GGUF export writes text models: a vision-language model is refused, not cut to its text part."""
    config_file = model_dir / "config.json"
    if is_adapter_dir(model_dir):
        base = json.loads((model_dir / _ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
        config_file = Path(base) / "config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    if config.get("vision_config") is not None:
        raise ExportError(
            f"{model_dir} is a vision-language model ({config.get('model_type', 'unknown type')}); GGUF export "
            "here writes text-only models and would drop the vision tower. Use llama.cpp's "
            "convert_hf_to_gguf.py (with --mmproj for the vision part) on a merged folder (tunesmith merge)"
        )


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    dtype="bfloat16",
    max_shard_size: str | int | None = None,
) -> Path:
    """Merge a LoRA adapter into its base model and save it as `dtype` safetensors + tokenizer.

    The merge happens in float32 (W + B @ A * scale) and is cast to `dtype` once at the end, so
    rounding is that of a single cast. `max_shard_size` ("5GB"): safetensors shards of at most this
    size (transformers' default when None). Returns `output_dir`.
    """
    import torch
    from peft import PeftModel

    from tunesmith.models.load import load_model

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if not is_adapter_dir(adapter_dir):
        raise ExportError(
            f"{adapter_dir} is not a LoRA adapter folder (no {_ADAPTER_CONFIG}); "
            "a full model needs no merge: load it directly or pass it to `tunesmith export`"
        )
    from tunesmith.models.load import check_safetensors_files

    check_safetensors_files(adapter_dir)  # a torn adapter is named before the base model loads
    base = json.loads((adapter_dir / _ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ExportError(f"{adapter_dir / _ADAPTER_CONFIG} names no base_model_name_or_path")
    if not Path(base).exists():
        logger.info("base model %s is not a local folder; loading it by name", base)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    # tunesmith's loader: the same sources as training (folders, GGUF, `default`), safetensors only
    model = load_model(base, dtype=torch.float32)
    from tunesmith.models.adapters import peft_deprecations_silenced

    with peft_deprecations_silenced():
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.to(torch_dtype)
    from tunesmith.checkpoint import STAGING, is_disk_full, publish_files, space_error, staging_dir
    from tunesmith.models.vision import is_vision_model

    # written into a staging folder, then moved into place file by file: a crash leaves each file of
    # `output_dir` old or new, never torn
    staged = staging_dir(output_dir.parent, f"merge-{output_dir.name}")
    try:
        shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(staged, safe_serialization=True, **shards)
        base_dir = Path(base) if Path(base).exists() else adapter_dir
        if is_vision_model(model):  # the processor (tokenizer + image processor + template) goes with it
            _load_processor(adapter_dir, base_dir, base).save_pretrained(staged)
        else:
            _load_tokenizer(adapter_dir, base_dir).save_pretrained(staged)
        publish_files(staged, output_dir)
    except BaseException as err:  # also a KeyboardInterrupt: the half-written staging folder goes
        shutil.rmtree(staged, ignore_errors=True)
        with contextlib.suppress(OSError):
            (output_dir.parent / STAGING).rmdir()
        if isinstance(err, Exception) and is_disk_full(err, output_dir.parent):
            needed = sum(p.numel() * p.element_size() for p in model.parameters())
            raise space_error(output_dir, "the merged model", needed, err) from None
        raise
    logger.info("merged %s into %s (%s) -> %s", adapter_dir, base, torch_dtype, output_dir)
    return output_dir
