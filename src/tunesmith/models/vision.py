"""Vision-language models: tell one from a text model, load it with its processor, and choose what trains.

A VLM in transformers is a language model (`get_decoder()`), a vision tower and a projector between them:

    family       vision tower            projector                  language model
    LLaVA        model.vision_tower      model.multi_modal_projector model.language_model
    Qwen2-VL     model.visual            model.visual.merger         model.language_model
    Idefics3     model.vision_model      model.connector             model.text_model
    Gemma 3      model.vision_tower      model.multi_modal_projector model.language_model

LoRA's default targets on a VLM are the language model's linear layers only; the vision tower and the
projector stay frozen. `vision_tower=True` adds LoRA to the tower's linear layers, `train_projector=True`
trains the projector in full (PEFT `modules_to_save`).
"""

from __future__ import annotations

import logging

from torch import nn

from tunesmith.models.introspect import unwrap

logger = logging.getLogger(__name__)

# Attribute names (anywhere in the module tree) of the vision tower and of the projector.
VISION_TOWER_NAMES = ("vision_tower", "visual", "vision_model")
PROJECTOR_NAMES = ("multi_modal_projector", "merger", "connector")


def is_vision_config(config) -> bool:
    """True for the config of an image-text model (it has a `vision_config`)."""
    return getattr(config, "vision_config", None) is not None


def is_vision_model(model) -> bool:
    """True for an image-text model (through PEFT / DDP wrappers)."""
    return is_vision_config(getattr(unwrap(model), "config", None))


def _prefix(root: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((name for name, m in root.named_modules() if m is module), None)


def language_model_prefix(model) -> str:
    """The module name of the language model inside `model` (e.g. "model.language_model")."""
    base = unwrap(model)
    prefix = _prefix(base, base.get_decoder())
    if not prefix:
        raise ValueError(f"{type(base).__name__}: cannot find its language model (get_decoder())")
    return prefix


def _named(model, names) -> list[str]:
    """Full module names whose last part is in `names`, outermost only."""
    found = []
    for name, _ in unwrap(model).named_modules():
        if name.rsplit(".", 1)[-1] in names and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def projector_names(model) -> list[str]:
    return _named(model, PROJECTOR_NAMES)


def vision_tower_names(model) -> list[str]:
    return _named(model, VISION_TOWER_NAMES)


def _linears(model, prefixes, exclude=()) -> list[str]:
    out = []
    for name, module in unwrap(model).named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if any(name.startswith(p + ".") for p in prefixes) and not any(
            name == e or name.startswith(e + ".") for e in exclude
        ):
            out.append(name)
    return out


def lora_targets(model, *, vision_tower: bool = False) -> list[str]:
    """Full names of the linear layers LoRA adapts on a VLM: the language model's (never the LM head),
    plus the vision tower's (its projector excluded) when `vision_tower`.

    Names are full paths, so PEFT matches exactly these modules and nothing of the same short name elsewhere.
    """
    targets = _linears(model, [language_model_prefix(model)])
    if vision_tower:
        targets += _linears(model, vision_tower_names(model), exclude=projector_names(model))
    if not targets:
        raise ValueError(
            f"{type(unwrap(model)).__name__}: no linear layer found in the language model for LoRA"
        )
    return targets


def language_model_if_tower_frozen(model) -> nn.Module | None:
    """The language model of a VLM whose vision tower has no trainable parameter, else None."""
    if not is_vision_model(model):
        return None
    base = unwrap(model)
    towers = [base.get_submodule(name) for name in vision_tower_names(model)]
    if any(p.requires_grad for tower in towers for p in tower.parameters()):
        return None
    return base.get_decoder()


def image_text_class(source, *, trust_remote_code: bool = False, **hub_kwargs):
    """`AutoModelForImageTextToText` when the checkpoint at `source` is a vision-language model, else None."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForImageTextToText

    from tunesmith.models.load import DEFAULT_ALIASES

    path = Path(str(source)).expanduser()
    if path.is_dir() and not (path / "config.json").exists():
        return None
    if not path.is_dir() and (path.suffix == ".gguf" or str(source).lower() in DEFAULT_ALIASES):
        return None  # GGUF files and the built-in model are text models
    try:
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code, **hub_kwargs)
    except Exception:  # not a transformers folder (from_pretrained will say why), or a config-less source
        return None
    return AutoModelForImageTextToText if is_vision_config(config) else None


def load_processor(name_or_path, *, trust_remote_code: bool = False, **kwargs):
    """`AutoProcessor.from_pretrained`: the model's tokenizer + image processor + chat template."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code, **kwargs)
    except Exception as err:
        raise ValueError(
            f"cannot load the processor of the vision-language model {name_or_path}: {type(err).__name__}: "
            f"{err}. Pass it as processing_class=... (e.g. AutoProcessor.from_pretrained(...))"
        ) from err
