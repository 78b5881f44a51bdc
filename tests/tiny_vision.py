"""Tiny random vision-language models and their processors, built offline, for tests that must not download.

    from tests.tiny_vision import FAMILIES, tiny_vlm, tiny_processor, shape_image

    processor = tiny_processor("qwen2_vl")    # the tests' word tokenizer + a slow (PIL) image processor
    model = tiny_vlm("qwen2_vl")              # text: hidden 64, 2 layers; vision: 1 layer of 32
    image = shape_image("red", "square")      # a 56x56 PIL image: a red square on white

Every family shares `tests.tiny`'s word-level tokenizer (pad 0, bos 1, eos 2, <|im_start|> 4, <|im_end|> 5)
plus the family's image tokens, a chatml template that renders `{"type": "image"}` parts as the family's
placeholder, and a 256-token vocabulary. Images are processed at 28x28 (LLaVA, Idefics3, Gemma 3: 4 image
tokens each) or with Qwen2-VL's dynamic resolution (a 56x56 image: 4 tokens after the 2x2 merge).

Why the processors are built by hand: there is no Hub here, torchvision does not import next to the CPU
torch, and transformers 5's `Qwen2VLProcessor` requires a (torchvision) video processor. The slow
`*ImageProcessorPil` classes need only PIL; Qwen2-VL gets `ImageOnlyQwen2VLProcessor`, a subclass whose
constructor takes no video processor (nothing in transformers is changed).
"""

from __future__ import annotations

import torch

from tests.tiny import BOS, EOS, PAD, tiny_tokenizer

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3")

# Words the vision tests use, added to the base vocabulary.
WORDS = ["circle", "square", "triangle", "shape", "image", "picture", "yellow", "black", "white"]

# The text each family's chat template writes for one {"type": "image"} part.
PLACEHOLDERS = {
    "llava": "<image>",
    "llava_next": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "idefics3": "<image>",
    "gemma3": "<start_of_image>",
}
_SPECIAL_TOKENS = {
    "llava": ["<image>"],
    "llava_next": ["<image>"],
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "qwen2_5_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "idefics3": ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"],
    "gemma3": ["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
}


def chat_template(family: str) -> str:
    """chatml whose messages may hold content parts: text as is, images as the family's placeholder."""
    placeholder = PLACEHOLDERS[family]
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '" + placeholder + "' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


def tiny_vlm_tokenizer(family: str):
    """`tests.tiny.tiny_tokenizer` with `WORDS`, the family's image tokens (special) and its chat template."""
    tokenizer = tiny_tokenizer(vocab=WORDS)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *_SPECIAL_TOKENS[family]]}
    )
    if family == "gemma3":  # Gemma3Processor reads these names off the tokenizer
        tokenizer.boi_token, tokenizer.eoi_token = "<start_of_image>", "<end_of_image>"
        tokenizer.image_token = "<image_soft_token>"
        tokenizer.boi_token_id = tokenizer.convert_tokens_to_ids("<start_of_image>")
        tokenizer.eoi_token_id = tokenizer.convert_tokens_to_ids("<end_of_image>")
        tokenizer.image_token_id = tokenizer.convert_tokens_to_ids("<image_soft_token>")
    tokenizer.chat_template = chat_template(family)
    assert len(tokenizer) <= 256, len(tokenizer)
    return tokenizer


def _image_only(processor_class):
    """A subclass of Qwen2VLProcessor / Qwen2_5_VLProcessor without a video processor (transformers 5
    requires one, and it is built on torchvision)."""
    from transformers.processing_utils import ProcessorMixin

    class ImageOnly(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{processor_class.__name__}"
    return ImageOnly


# LLaVA-Next's "anyres" grid: an image is tiled at the best of these resolutions, plus a base view
GRID_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]


def tiny_processor(family: str):
    """The family's processor: `tiny_vlm_tokenizer(family)` + a slow PIL image processor, 28x28 images."""
    import transformers

    tokenizer = tiny_vlm_tokenizer(family)
    template = tokenizer.chat_template
    if family == "llava":
        images = transformers.CLIPImageProcessorPil(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
        )
        return transformers.LlavaProcessor(
            image_processor=images,
            tokenizer=tokenizer,
            patch_size=14,
            num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
            vision_feature_select_strategy="default",
            chat_template=template,
        )
    if family == "llava_next":
        images = transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": 28},
            crop_size={"height": 28, "width": 28},
            image_grid_pinpoints=GRID_PINPOINTS,
        )
        return transformers.LlavaNextProcessor(
            image_processor=images,
            tokenizer=tokenizer,
            patch_size=14,
            num_additional_image_tokens=1,
            vision_feature_select_strategy="default",
            chat_template=template,
        )
    if family in ("qwen2_vl", "qwen2_5_vl"):
        images = transformers.Qwen2VLImageProcessorPil(
            min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
        )
        cls = transformers.Qwen2VLProcessor if family == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
        return _image_only(cls)(image_processor=images, tokenizer=tokenizer, chat_template=template)
    if family == "idefics3":
        images = transformers.Idefics3ImageProcessorPil(
            do_image_splitting=False, size={"longest_edge": 28}, max_image_size={"longest_edge": 28}
        )
        processor = transformers.Idefics3Processor(
            image_processor=images, tokenizer=tokenizer, image_seq_len=4, chat_template=template
        )
        # its constructor replaces the tokenizer's additional special tokens with its own: add ours back
        tokenizer.add_special_tokens(
            {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *_SPECIAL_TOKENS[family]]}
        )
        return processor
    if family == "gemma3":
        images = transformers.Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
        return transformers.Gemma3Processor(
            image_processor=images, tokenizer=tokenizer, image_seq_length=4, chat_template=template
        )
    raise ValueError(f"unknown tiny vision family {family!r}; choose one of {', '.join(FAMILIES)}")


def _text_fields(**overrides) -> dict:
    fields = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=2048,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    fields.update(overrides)
    return fields


def tiny_vlm_config(family: str):
    """A transformers config for a tiny random VLM of `family`, matching `tiny_processor(family)`."""
    import transformers

    tokenizer = tiny_vlm_tokenizer(family)
    token = tokenizer.convert_tokens_to_ids
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    if family == "llava":
        return transformers.LlavaConfig(
            # initializer_factor 5: at CLIP's default init a random one-layer tower gives the three test images
            # features so alike that LoRA on the language model could not tell them apart in a few steps
            vision_config=transformers.CLIPVisionConfig(
                **vision, image_size=28, patch_size=14, projection_dim=32, initializer_factor=5.0
            ),
            text_config=transformers.LlamaConfig(**_text_fields()),
            image_token_index=token("<image>"),
            vision_feature_layer=-1,
        )
    if family == "llava_next":
        return transformers.LlavaNextConfig(
            vision_config=transformers.CLIPVisionConfig(
                **vision, image_size=28, patch_size=14, projection_dim=32, initializer_factor=5.0
            ),
            text_config=transformers.LlamaConfig(**_text_fields()),
            image_token_index=token("<image>"),
            image_grid_pinpoints=GRID_PINPOINTS,
            vision_feature_layer=-1,
        )
    if family in ("qwen2_vl", "qwen2_5_vl"):
        # mrope_section sums to head_dim / 2
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}
        if family == "qwen2_vl":
            cls, tower = (
                transformers.Qwen2VLConfig,
                dict(embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
            )
        else:  # Qwen2.5-VL: window attention in the tower (its one block attends fully), RMSNorm, SwiGLU
            cls = transformers.Qwen2_5_VLConfig
            tower = dict(
                hidden_size=32,
                out_hidden_size=64,
                intermediate_size=64,
                num_heads=2,
                fullatt_block_indexes=[0],
            )
        return cls(
            text_config=_text_fields(rope_parameters=rope),
            vision_config=dict(depth=1, patch_size=14, spatial_merge_size=2, **tower),
            image_token_id=token("<|image_pad|>"),
            video_token_id=token("<|video_pad|>"),
            vision_start_token_id=token("<|vision_start|>"),
            vision_end_token_id=token("<|vision_end|>"),
        )
    if family == "idefics3":
        return transformers.Idefics3Config(
            vision_config=transformers.Idefics3VisionConfig(**vision, image_size=28, patch_size=7),
            text_config=transformers.LlamaConfig(**_text_fields()),
            scale_factor=2,  # (28/7)^2 patches / 2^2 = 4 image tokens
            image_token_id=token("<image>"),
            pad_token_id=PAD,
        )
    if family == "gemma3":
        return transformers.Gemma3Config(
            text_config=transformers.Gemma3TextConfig(**_text_fields()),
            vision_config=transformers.SiglipVisionConfig(**vision, image_size=28, patch_size=7),
            mm_tokens_per_image=4,
            boi_token_index=token("<start_of_image>"),
            eoi_token_index=token("<end_of_image>"),
            image_token_index=token("<image_soft_token>"),
        )
    raise ValueError(f"unknown tiny vision family {family!r}; choose one of {', '.join(FAMILIES)}")


def tiny_vlm(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random `AutoModelForImageTextToText` of `family` in eval mode; the same seed gives the same weights."""
    from transformers import AutoModelForImageTextToText

    config = tiny_vlm_config(family)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    if family == "gemma3":
        # Gemma 3 initialises its projection (vision -> text) to zeros: every image would then be the same
        # (zero) input to the language model. A trained checkpoint has a real one; give the tiny model a random one.
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    return model.eval()


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}


def shape_image(colour: str, shape: str, size: tuple[int, int] = (56, 56)):
    """A PIL image of a `colour` ("red", "green", "blue", "yellow") `shape` ("circle", "square", "triangle")
    on white."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    w, h = size
    box = (w // 6, h // 6, w - w // 6, h - h // 6)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(w // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image
