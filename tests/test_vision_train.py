"""End to end on tiny VLMs: SFTTrainer (LoRA, fused loss, kernels as configured) memorises answers about
three synthetic images and generation then reproduces them. A model that ignored the images could answer
at most one of the three right (the prompts are identical), so three right answers need the pixels."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_vision import FAMILIES, shape_image, tiny_processor, tiny_vlm
from tunesmith import SFTConfig, SFTTrainer

SHAPES = [("red", "square"), ("green", "circle"), ("blue", "triangle")]
QUESTION = "what is in the picture"


def shape_rows():
    return [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": f"a {colour} {shape}"},
            ],
            "images": [shape_image(colour, shape)],
        }
        for colour, shape in SHAPES
    ]


def config(tmp_path, **overrides):
    fields = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=80,
        learning_rate=1e-2,
        per_device_train_batch_size=3,
        logging_steps=40,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        dataset_cache_dir=False,
        disable_tqdm=True,
        use_peft=True,  # LoRA r=16 (the CLI's default; SFTTrainer alone fine-tunes in full, as TRL)
        # a random tiny LM head (std 0.02) bounds the logits near 0, where LoRA alone cannot lower the loss
        # far in a few steps: train the head too (the vision tower and projector stay frozen)
        lora_modules_to_save=["lm_head"],
    )
    fields.update(overrides)
    return SFTConfig(**fields)


def answer(model, processor, image) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_vlm_memorises_three_images(family, tmp_path):
    processor, model = tiny_processor(family), tiny_vlm(family)
    trainer = SFTTrainer(
        model=model, args=config(tmp_path), train_dataset=shape_rows(), processing_class=processor
    )
    frozen = {
        n: p.detach().clone() for n, p in trainer.model.named_parameters() if "vision" in n or "visual" in n
    }
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # 3 examples x 4 trained tokens ("a", colour, shape, <|im_end|>) per step; 80 steps
    assert logs[-1]["num_supervised_tokens"] == 80 * 12
    # tokens seen count text and image tokens, not padding: every step is the whole (3-example) data set
    assert logs[-1]["num_tokens"] == 80 * trainer.train_dataset.stats.tokens
    metrics = trainer.evaluate(eval_dataset=shape_rows())
    assert metrics["eval_num_supervised_tokens"] == 12
    assert metrics["eval_loss"] < 0.05, metrics  # memorised (it starts at ln(256) = 5.5)
    model = trainer.model.eval()
    for colour, shape in SHAPES:
        assert answer(model, processor, shape_image(colour, shape)) == f"a {colour} {shape}"
    # the vision tower stayed frozen (LoRA on the language model only, by default)
    for name, param in trainer.model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


def test_vision_loss_is_the_logits_loss(tmp_path):
    """The fused loss on the language model's hidden states equals the cross-entropy of the model's own
    logits on the same batch (labels -100 on image tokens, padding and prompt)."""
    from tunesmith.data.vision import VisionCollator, prepare_vision_dataset
    from tunesmith.trainer import logits_loss_sum

    processor, model = tiny_processor("qwen2_vl"), tiny_vlm("qwen2_vl")
    trainer = SFTTrainer(
        model=model, args=config(tmp_path), train_dataset=shape_rows(), processing_class=processor
    )
    data = prepare_vision_dataset(shape_rows(), processor, max_length=None)
    batch = VisionCollator(processor)([data[0], data[1], data[2]])
    head_outputs = []
    head = trainer.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: head_outputs.append(tuple(out.shape)))
    fused, correct, _ = trainer._loss_sum(trainer.model, dict(batch))
    handle.remove()
    assert all(shape[1] == 0 for shape in head_outputs)  # the fused loss never had the LM head build logits
    reference, ref_correct, _ = logits_loss_sum(trainer.model, dict(batch))
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    assert int(correct) == int(ref_correct)


def test_settings_vision_data_cannot_follow_are_named(tmp_path, caplog):
    from tunesmith.common import reset_once

    reset_once("notice")  # the notice is logged once per process: forget that it was
    processor, model = tiny_processor("llava"), tiny_vlm("llava")
    with caplog.at_level("WARNING"):
        SFTTrainer(
            model=model,
            args=config(tmp_path, packing=True, train_on_inputs=True),
            train_dataset=shape_rows(),
            processing_class=processor,
        )
    assert "vision-language data: ignoring packing=True" in caplog.text
    assert "training on prompts" in caplog.text


def test_trl_style_custom_collator_gets_the_raw_rows(tmp_path):
    """TRL's older sft_vlm recipe: the user's collate_fn renders and processes the raw rows itself (and
    masks padding and image tokens); the trainer neither prepares the data nor drops its columns."""
    from datasets import Dataset

    processor, model = tiny_processor("llava"), tiny_vlm("llava")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    seen = []

    def collate_fn(examples):
        seen.append(sorted(examples[0]))
        texts = [processor.apply_chat_template(ex["messages"], tokenize=False) for ex in examples]
        batch = processor(
            text=texts, images=[ex["images"] for ex in examples], return_tensors="pt", padding=True
        )
        labels = batch["input_ids"].clone()
        labels[(labels == processor.tokenizer.pad_token_id) | (labels == image_id)] = -100
        batch["labels"] = labels
        return batch

    raw = shape_rows()
    for row in raw:  # Arrow wants one type per column: every content a list of parts
        reply = row["messages"][1]
        reply["content"] = [{"type": "text", "text": reply["content"]}]
    rows = Dataset.from_list(raw)
    trainer = SFTTrainer(
        model=model,
        args=config(tmp_path, max_steps=30, logging_steps=30),
        train_dataset=rows,
        processing_class=processor,
        data_collator=collate_fn,
    )
    trainer.train()
    assert seen and seen[0] == ["images", "messages"]
    # every step is the 3 rows; what the user's labels train (after the one shift), 30 times
    per_step = int((collate_fn([rows[i] for i in range(3)])["labels"][:, 1:] != -100).sum())
    assert trainer.state.log_history[0]["num_supervised_tokens"] == 30 * per_step


def test_images_with_a_plain_tokenizer_are_refused(tmp_path):
    processor, model = tiny_processor("llava"), tiny_vlm("llava")
    with pytest.raises(ValueError, match="the train data has images, but processing_class is a tokenizer"):
        SFTTrainer(
            model=model,
            args=config(tmp_path),
            train_dataset=shape_rows(),
            processing_class=processor.tokenizer,
        )


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vision_tower_lora_and_projector_get_gradients(family, tmp_path):
    """lora_vision_tower / lora_train_projector: the tower's LoRA B matrices start at zero and the projector at
    its loaded values; after a few steps both moved, so the loss reaches them through the image tokens."""
    processor, model = tiny_processor(family), tiny_vlm(family)
    args = config(tmp_path, max_steps=5, logging_steps=5, lora_vision_tower=True, lora_train_projector=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=shape_rows(), processing_class=processor)
    params = dict(trainer.model.named_parameters())
    tower_b = [n for n in params if ("vision_tower" in n or "visual.blocks" in n) and "lora_B" in n]
    projector = [
        n for n in params if ("multi_modal_projector" in n or "merger" in n) and "modules_to_save" in n
    ]
    assert tower_b and projector
    before = {n: params[n].detach().clone() for n in projector}
    assert all(params[n].abs().sum() == 0 for n in tower_b)
    trainer.train()
    assert all(params[n].abs().sum() > 0 for n in tower_b)
    assert all(not torch.equal(params[n], before[n]) for n in projector)


def test_vision_data_summary_is_in_data_stats(tmp_path):
    """`tunesmith train` prints trainer.data_stats["train"].summary() before the first step: vision data too."""
    processor, model = tiny_processor("llava"), tiny_vlm("llava")
    trainer = SFTTrainer(
        model=model, args=config(tmp_path), train_dataset=shape_rows(), processing_class=processor
    )
    summary = trainer.data_stats["train"].summary()
    assert "examples: 3 in, 3 out" in summary and "images: 3 (12 image tokens)" in summary
