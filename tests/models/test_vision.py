"""models.vision: which modules LoRA adapts and which train on each tiny VLM family."""

from __future__ import annotations

import pytest

from tests.tiny import tiny_model
from tests.tiny_vision import FAMILIES, tiny_vlm
from tunesmith.models.adapters import apply_lora
from tunesmith.models.vision import (
    is_vision_model,
    language_model_prefix,
    projector_names,
    vision_tower_names,
)

# family -> (language model, vision tower, projector) module names
PARTS = {
    "llava": ("model.language_model", ["model.vision_tower"], ["model.multi_modal_projector"]),
    "llava_next": ("model.language_model", ["model.vision_tower"], ["model.multi_modal_projector"]),
    "qwen2_vl": ("model.language_model", ["model.visual"], ["model.visual.merger"]),
    "qwen2_5_vl": ("model.language_model", ["model.visual"], ["model.visual.merger"]),
    "idefics3": ("model.text_model", ["model.vision_model"], ["model.connector"]),
    "gemma3": ("model.language_model", ["model.vision_tower"], ["model.multi_modal_projector"]),
}


def _trainable(model) -> list[str]:
    return [n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_are_found(family):
    model = tiny_vlm(family)
    language, tower, projector = PARTS[family]
    assert is_vision_model(model) and not is_vision_model(tiny_model("llama"))
    assert language_model_prefix(model) == language
    assert vision_tower_names(model) == tower and projector_names(model) == projector


@pytest.mark.parametrize("family", FAMILIES)
def test_default_lora_is_on_the_language_model_only(family):
    language, tower, projector = PARTS[family]
    trainable = _trainable(apply_lora(tiny_vlm(family), r=4))
    # 2 layers x 7 linears (q, k, v, o, gate, up, down) x (A, B)
    assert len(trainable) == 28
    assert all(n.startswith(language + ".") and ".lora_" in n for n in trainable)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tower_lora_and_projector_training(family):
    language, tower, projector = PARTS[family]
    model = tiny_vlm(family)
    trainable = _trainable(apply_lora(model, r=4, vision_tower=True, train_projector=True))
    in_tower = [n for n in trainable if n.startswith(tower[0] + ".") and not n.startswith(projector[0] + ".")]
    in_projector = [n for n in trainable if n.startswith(projector[0] + ".")]
    assert in_tower and all(".lora_" in n for n in in_tower)
    # the projector trains in full (a PEFT modules_to_save copy), no LoRA on it
    assert in_projector and all(".modules_to_save." in n for n in in_projector)
    rest = [n for n in trainable if n not in in_tower and n not in in_projector]
    assert all(n.startswith(language + ".") and ".lora_" in n for n in rest) and len(rest) == 28


def test_vision_options_on_a_text_model_are_refused():
    with pytest.raises(ValueError, match="vision-language models only"):
        apply_lora(tiny_model("llama"), vision_tower=True)


def test_memory_policy_checkpoints_the_language_model_when_the_tower_is_frozen():
    from tunesmith.ops.offload import decoder_layers

    lora = apply_lora(tiny_vlm("llava"), r=4)
    assert len(decoder_layers(lora)) == 2  # the language model's 2 layers, not the frozen CLIP layer
    assert len(decoder_layers(tiny_vlm("llava"))) == 3  # full fine-tuning: the tower trains too
    assert len(decoder_layers(apply_lora(tiny_vlm("llava"), r=4, vision_tower=True))) == 3


def test_fast_vision_model_switches(tmp_path):
    """Unsloth's FastVisionModel: load a saved VLM folder with its processor; the finetune_* switches pick the
    LoRA layers (Unsloth's defaults: vision and language, attention and MLP)."""
    from tests.tiny_vision import tiny_processor
    from tunesmith import FastVisionModel

    tiny_vlm("llava").save_pretrained(tmp_path)
    tiny_processor("llava").save_pretrained(tmp_path)
    model, processor = FastVisionModel.from_pretrained(str(tmp_path), dtype="float32")
    assert hasattr(processor, "image_processor") and is_vision_model(model)

    def adapted(**switches):
        peft = FastVisionModel.get_peft_model(
            FastVisionModel.from_pretrained(str(tmp_path))[0], r=4, **switches
        )
        return {n.split(".lora_")[0].removeprefix("base_model.model.") for n in _trainable(peft)}

    everything = adapted()
    assert any(n.startswith("model.vision_tower.") for n in everything)
    assert not any(n.startswith("model.multi_modal_projector.") for n in everything)
    language_mlp = adapted(finetune_vision_layers=False, finetune_attention_modules=False)
    assert language_mlp and all(n.startswith("model.language_model.") and ".mlp." in n for n in language_mlp)
    assert len(language_mlp) == 2 * 3  # gate, up, down in 2 layers
