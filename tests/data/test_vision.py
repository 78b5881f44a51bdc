"""Vision data: image loading, placeholder checks, the trained-token mask and the processor collator, on the
tiny processors of every family in tests/tiny_vision.py (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny_vision import FAMILIES, shape_image, tiny_processor
from tunesmith.data.sources import DataError
from tunesmith.data.vision import (
    VisionCollator,
    expand_labels,
    load_image,
    prepare_vision_dataset,
    vision_example,
)

IGNORE = -100


def _user(text, images=1):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def _two_turns():
    """Two user turns with an image each (and one text-only turn between): three trained assistant replies."""
    return {
        "messages": [
            {"role": "system", "content": "you are helpful"},
            _user("what is in the picture"),
            {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]},
            {"role": "user", "content": "and what color is it"},
            {"role": "assistant", "content": "red"},
            _user("and this one"),
            {"role": "assistant", "content": "a blue circle"},
        ],
        "images": [shape_image("red", "square"), shape_image("blue", "circle", (80, 40))],
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_tokens_are_exactly_the_assistant_text(family):
    processor = tiny_processor(family)
    tok = processor.tokenizer
    rows = [
        _two_turns(),
        {"prompt": "what color", "completion": "green", "image": shape_image("green", "triangle")},
    ]
    data = prepare_vision_dataset(rows, processor, max_length=None)
    batch = VisionCollator(processor)([data[0], data[1]])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    header = tok.convert_tokens_to_ids(["<|im_start|>", "assistant", "\n"])
    end = tok.convert_tokens_to_ids("<|im_end|>")
    replies = [["a red square", "red", "a blue circle"], ["green"]]
    for row in range(2):
        seq = ids[row].tolist()
        # expected: the tokens after each "<|im_start|> assistant \n" up to and including the next <|im_end|>
        expected = set()
        for t in range(len(seq) - 2):
            if seq[t : t + 3] == header:
                stop = seq.index(end, t + 3)
                expected |= set(range(t + 3, stop + 1))
        trained = {t for t, label in enumerate(labels[row].tolist()) if label != IGNORE}
        assert trained == expected
        assert all(labels[row, t] == ids[row, t] for t in trained)
        want = tok("".join(f"{r}<|im_end|>" for r in replies[row]), add_special_tokens=False).input_ids
        assert [seq[t] for t in sorted(trained)] == want
        # image tokens and padding are never trained
        image_ids = {processor.tokenizer.convert_tokens_to_ids(processor.image_token)}
        image_ids.add(getattr(processor, "image_token_id", -1))
        assert not any(seq[t] in image_ids for t in trained)
        assert not any(mask[row, t] == 0 for t in trained)
    # the shift happens once: position t holds the label of t + 1
    assert torch.equal(batch["shift_labels"][:, :-1], labels[:, 1:])
    assert (batch["shift_labels"][:, -1] == IGNORE).all()
    assert "pixel_values" in batch
    assert data.stats.images == 3 and data.stats.examples_out == 2


def test_expand_labels_places_text_between_several_images():
    # [a, <img>, b, c, d, e, f, <img>, g, h, T1, T2] with <img> (9) expanded to 3 tokens each
    text = [1, 9, 2, 3, 4, 5, 6, 9, 7, 8, 10, 11]
    trained = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1]
    expanded = [1, 9, 9, 9, 2, 3, 4, 5, 6, 9, 9, 9, 7, 8, 10, 11]
    labels = expand_labels(text, trained, expanded, 9)
    assert labels == [IGNORE] * 6 + [4] + [IGNORE] * 7 + [10, 11]


def test_expand_labels_refuses_text_it_cannot_find():
    with pytest.raises(DataError, match="example 3: the processor's tokens do not contain"):
        expand_labels(
            [1, 9, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 1, 1], [1, 9, 9, 2, 3, 4, 5, 7], 9, where="example 3"
        )


def test_idefics3_image_splitting_mask():
    """SmolVLM / Idefics3 tile a large image: row/column markers and newlines inside the expansion."""
    import transformers

    from tests.tiny_vision import tiny_vlm_tokenizer

    tokenizer = tiny_vlm_tokenizer("idefics3")
    images = transformers.Idefics3ImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": 56}, max_image_size={"longest_edge": 28}
    )
    processor = transformers.Idefics3Processor(
        image_processor=images, tokenizer=tokenizer, image_seq_len=4, chat_template=tokenizer.chat_template
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    data = prepare_vision_dataset([_two_turns()], processor, max_length=None)
    batch = VisionCollator(processor)([data[0]])
    # 56x56: 2 x 2 tiles + the global view; 80x40: 2 x 1 tiles + the global view
    assert batch["pixel_values"].shape[1] == 8
    trained = [t for t in batch["labels"][0].tolist() if t != IGNORE]
    want = tokenizer("a red square<|im_end|>red<|im_end|>a blue circle<|im_end|>", add_special_tokens=False)
    assert trained == want.input_ids


def test_expand_labels_with_a_byte_level_bpe_that_merges_newlines_around_images():
    """Gemma 3 writes "\n\n" around each image; with byte-level BPE they merge with the template's own
    newline into other tokens. The assistant text is still found and only it is trained."""
    from tests.tiny import tiny_bpe_tokenizer

    texts = ["user\n\n\n\nwhat is it\n\n", "assistant\na red square\n\n\n"] * 50
    tok = tiny_bpe_tokenizer(texts, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<IMG>", "<boi>", "<soft>", "<eoi>"]})
    text = "<|im_start|>user\n<IMG>what is it<|im_end|>\n<|im_start|>assistant\na red square<|im_end|>\n"
    expanded = text.replace("<IMG>", "\n\n<boi>" + "<soft>" * 4 + "<eoi>\n\n")
    ids = tok(text, add_special_tokens=False).input_ids
    start = text.index("a red square")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = [int(s >= start and e <= len(text) - 1) for s, e in enc.offset_mapping]
    e_ids = tok(expanded, add_special_tokens=False).input_ids
    assert len(e_ids) > len(ids)
    labels = expand_labels(ids, trained, e_ids, tok.convert_tokens_to_ids("<IMG>"))
    assert tok.decode([t for t in labels if t != IGNORE]) == "a red square<|im_end|>"


def test_prompt_completion_and_single_image_column():
    ex = vision_example({"prompt": "what is it", "completion": "a square", "image": "a.png"})
    assert ex.messages[0] == {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "what is it"}],
    }
    assert ex.messages[1]["role"] == "assistant" and ex.trained_from == 1 and ex.images == ["a.png"]


def test_images_inline_in_the_parts():
    part = {"type": "image", "image": "a.png"}
    ex = vision_example(
        {"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "x"}]}
    )
    assert ex.images == ["a.png"] and ex.messages[0]["content"] == [{"type": "image"}]
    both = {"messages": [{"role": "user", "content": [part]}], "images": ["b.png"]}
    with pytest.raises(DataError, match="images both inside the messages"):
        vision_example(both)
    with pytest.raises(DataError, match="example 2, image 0: image 'https://x/y.png' is a URL"):
        load_image("https://x/y.png", where="example 2, image 0")


def test_images_without_placeholders_go_to_the_first_user_turn():
    ex = vision_example(
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
            "images": ["a.png", "b.png"],
        }
    )
    assert [p["type"] for p in ex.messages[0]["content"]] == ["image", "image", "text"]


def test_placeholder_count_must_match_the_images():
    two = {"messages": [_user("hi", images=2), {"role": "assistant", "content": "yes"}], "images": ["a.png"]}
    with pytest.raises(DataError, match=r"example 4: 2 image placeholder\(s\).*but 1 image"):
        vision_example(two, "example 4")
    one = {"messages": [_user("hi"), {"role": "assistant", "content": "yes"}], "images": ["a.png", "b.png"]}
    with pytest.raises(DataError, match=r"1 image placeholder\(s\).*but 2 image"):
        vision_example(one)


def test_image_in_an_assistant_turn_is_refused():
    bad = {
        "messages": [_user("hi"), {"role": "assistant", "content": [{"type": "image"}]}],
        "images": ["a", "b"],
    }
    with pytest.raises(DataError, match="message 1 \\(assistant\\) holds an image"):
        vision_example(bad)


def test_paths_relative_to_the_data_file_missing_and_unreadable(tmp_path):
    (tmp_path / "img").mkdir()
    shape_image("red", "square").save(tmp_path / "img" / "red.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not an image")
    rows = [
        {
            "messages": [_user("what is it"), {"role": "assistant", "content": "a red square"}],
            "images": ["img/red.png"],
        },
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prepared = prepare_vision_dataset(str(data), tiny_processor("llava"), max_length=None)
    assert prepared[0]["images"] == [str(tmp_path / "img" / "red.png")]

    rows.append({**rows[0], "images": ["img/missing.png"]})
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(
        DataError, match=r"train.jsonl: example 1, image 0: image file .*missing.png' does not exist"
    ):
        prepare_vision_dataset(str(data), tiny_processor("llava"), max_length=None)

    rows[1]["images"] = ["img/broken.png"]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"example 1, image 0: cannot read image .*broken.png"):
        prepare_vision_dataset(str(data), tiny_processor("llava"), max_length=None)


def test_bytes_as_datasets_image_stores_them(tmp_path):
    import io

    buffer = io.BytesIO()
    shape_image("blue", "circle").save(buffer, format="PNG")
    image = load_image({"bytes": buffer.getvalue(), "path": None})
    assert image.size == (56, 56) and image.getpixel((28, 28)) == (30, 60, 220)


def test_too_long_examples_are_dropped_and_counted():
    processor = tiny_processor("qwen2_vl")
    rows = [
        {
            "prompt": "what is it",
            "completion": "a square",
            "image": shape_image("red", "square"),
        },  # 4 image tokens
        {"prompt": "what is it", "completion": "a square", "images": [shape_image("red", "square")] * 2},
    ]
    full = prepare_vision_dataset(rows, processor, max_length=None)
    lengths = [row["length"] for row in full.rows]
    assert lengths[1] == lengths[0] + 6  # a second image: 4 image tokens between vision start and end
    cut = prepare_vision_dataset(rows, processor, max_length=lengths[0])
    assert len(cut) == 1 and cut.stats.dropped["longer_than_max_length"] == 1
    assert "dropped: 1 examples (longer than max length)" in cut.stats.summary()


def test_docstring_examples():
    import doctest

    from tunesmith.data import vision, vision_examples

    results = [doctest.testmod(module, verbose=False) for module in (vision, vision_examples)]
    assert sum(r.attempted for r in results) >= 3 and sum(r.failed for r in results) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_rows_batch_with_image_rows(family):
    from tests.tiny_vision import tiny_vlm

    processor = tiny_processor(family)
    rows = [
        {"messages": [_user("what shape"), {"role": "assistant", "content": "a red square"}],
         "images": [shape_image("red", "square")]},
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]},
    ]  # fmt: skip
    data = prepare_vision_dataset(rows, processor, max_length=None)
    batch = VisionCollator(processor)([data[1], data[0]])
    tok = processor.tokenizer
    assert [tok.decode([t for t in row.tolist() if t != IGNORE]) for row in batch["labels"]] == [
        "hi <|im_end|>",
        "a red square <|im_end|>",
    ]
    forward = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
    logits = tiny_vlm(family)(**forward).logits
    assert logits.shape[:2] == batch["input_ids"].shape


def test_a_datasets_image_column_is_kept_lazily():
    """Images decoded from a datasets.Dataset are not held by the prepared rows: they are read back from the
    dataset per batch (RowImage), so a large image set is not all decoded in memory at once."""
    from datasets import Dataset, Features, Image, Value

    from tunesmith.data.vision import RowImage

    features = Features({"prompt": Value("string"), "completion": Value("string"), "image": Image()})
    rows = Dataset.from_dict(
        {"prompt": ["what is it"] * 2, "completion": ["a red square", "a blue circle"],
         "image": [shape_image("red", "square"), shape_image("blue", "circle")]},
        features=features,
    )  # fmt: skip
    processor = tiny_processor("qwen2_vl")
    data = prepare_vision_dataset(rows, processor, max_length=None)
    assert all(isinstance(ref, RowImage) for row in data.rows for ref in row["images"])
    assert load_image(data[1]["images"][0]).getpixel((28, 28)) == (30, 60, 220)
    batch = VisionCollator(processor)([data[0], data[1]])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]


def test_unsloth_vision_collator_takes_raw_rows():
    from tunesmith import UnslothVisionDataCollator

    processor = tiny_processor("qwen2_vl")
    raw = [{"messages": [_user("what is it"), {"role": "assistant", "content": "a red square"}],
            "images": [shape_image("red", "square")]}]  # fmt: skip
    collator = UnslothVisionDataCollator(None, processor, train_on_responses_only=True)
    batch = collator(raw)
    expected = VisionCollator(processor)([prepare_vision_dataset(raw, processor, max_length=None)[0]])
    assert torch.equal(batch["input_ids"], expected["input_ids"]) and torch.equal(
        batch["labels"], expected["labels"]
    )
    with pytest.raises(DataError, match="batch example 0: 22 tokens .* more than max_seq_length=8"):
        UnslothVisionDataCollator(None, processor, max_seq_length=8)(raw)


def test_llava_instruct_mix_rows_from_arrow():
    """Rows as HuggingFaceH4/llava-instruct-mix-vsft stores them (TRL's sft_vlm data): every part has
    `type`, `text` and `index` (None where unused), the images a list column of datasets.Image."""
    from datasets import Dataset, Features, Image, Sequence, Value

    part = {"index": Value("int64"), "text": Value("string"), "type": Value("string")}
    features = Features(
        {
            "messages": [{"role": Value("string"), "content": [part]}],
            "images": Sequence(Image()),
        }
    )
    row = {
        "messages": [
            {"role": "user", "content": [{"index": 0, "text": None, "type": "image"},
                                         {"index": None, "text": "\nwhat is in the picture", "type": "text"}]},
            {"role": "assistant", "content": [{"index": None, "text": "a red square", "type": "text"}]},
        ],
        "images": [shape_image("red", "square")],
    }  # fmt: skip
    processor = tiny_processor("idefics3")
    data = prepare_vision_dataset(Dataset.from_list([row], features=features), processor, max_length=None)
    batch = VisionCollator(processor)([data[0]])
    trained = [t for t in batch["labels"][0].tolist() if t != IGNORE]
    assert processor.tokenizer.decode(trained) == "a red square <|im_end|>"
