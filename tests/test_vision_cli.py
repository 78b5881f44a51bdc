"""The command line with a tiny LLaVA saved to a folder: inspect shows the images, train memorises three
images from a JSONL file with relative image paths, generate/chat answer with --image, merge keeps the
vision model, export --gguf refuses it."""

from __future__ import annotations

import io
import json

import pytest

from tests.test_cli import run_cli
from tests.test_vision_train import QUESTION, SHAPES
from tests.tiny_vision import shape_image, tiny_processor, tiny_vlm


@pytest.fixture
def vision_run(tmp_path):
    model_dir = tmp_path / "llava"
    tiny_vlm("llava").save_pretrained(model_dir)
    tiny_processor("llava").save_pretrained(model_dir)
    (tmp_path / "img").mkdir()
    rows = []
    for colour, shape in SHAPES:
        shape_image(colour, shape).save(tmp_path / "img" / f"{colour}.png")
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                    {"role": "assistant", "content": f"a {colour} {shape}"},
                ],
                "images": [f"img/{colour}.png"],
            }
        )
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.yaml").write_text(
        f"""
output_dir: {tmp_path / "run"}
model: {{name_or_path: {model_dir}, dtype: float32}}
dataset: {{train: {tmp_path / "data.jsonl"}}}
lora: {{r: 16, modules_to_save: [lm_head]}}
data: {{max_length: 64}}
training:
  use_peft: true
  learning_rate: 1.0e-2
  max_steps: 80
  per_device_train_batch_size: 3
  logging_steps: 40
  save_strategy: "no"
  report_to: none
  use_cpu: true
  disable_tqdm: true
  seed: 0
"""
    )
    return tmp_path


def test_inspect_train_generate_merge_export(vision_run, capsys, monkeypatch):
    tmp = vision_run
    code, out, err = run_cli(capsys, "inspect", tmp / "run.yaml", "--no-color", "-n", "1")
    assert code == 0, err
    # the image as one line (56x56 on disk, 4 tokens at the tiny CLIP's 28x28), the answer trained
    assert "\n[image 1: 56×56 → 4 tokens]what is in the picture <|im_end|>" in out
    assert "[[a red square <|im_end|>]]" in out
    assert "images: 3 (12 image tokens)" in out

    code, out, err = run_cli(capsys, "train", tmp / "run.yaml")
    assert code == 0, err
    run = tmp / "run"
    assert (run / "adapter_config.json").exists() and (run / "processor_config.json").exists()

    for colour, shape in SHAPES:
        image = tmp / "img" / f"{colour}.png"
        code, out, err = run_cli(
            capsys, "generate", run, "--image", image, "--prompt", QUESTION, "--max-new-tokens", "4"
        )
        assert code == 0, err
        assert out.strip() == f"a {colour} {shape}"

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n\n"))
    code, out, err = run_cli(
        capsys, "chat", run, "--image", tmp / "img" / "blue.png", "--max-new-tokens", "4"
    )
    assert code == 0, err
    assert out.strip() == "a blue triangle"

    code, out, err = run_cli(capsys, "merge", run, "--output", tmp / "merged", "--dtype", "float32")
    assert code == 0, err
    config = json.loads((tmp / "merged" / "config.json").read_text())
    assert config["model_type"] == "llava" and (tmp / "merged" / "processor_config.json").exists()
    code, out, err = run_cli(
        capsys,
        "generate",
        tmp / "merged",
        "--image",
        tmp / "img" / "green.png",
        "--prompt",
        QUESTION,
        "--max-new-tokens",
        "4",
    )
    assert code == 0, err
    assert out.strip() == "a green circle"

    for folder in (tmp / "merged", run):
        code, out, err = run_cli(capsys, "export", folder, "--gguf", tmp / "x.gguf")
        assert code == 1 and "is a vision-language model (llava)" in err
        assert not (tmp / "x.gguf").exists()


def test_image_options_are_checked(vision_run, capsys):
    tmp = vision_run
    code, _, err = run_cli(capsys, "generate", tmp / "llava", "--image", tmp / "nope.png", "--prompt", "hi")
    assert code != 0 and "--image" in err and "no such file" in err


def test_preprocess_prints_the_vision_summary(vision_run, capsys):
    code, out, err = run_cli(capsys, "preprocess", vision_run / "run.yaml")
    assert code == 0, err
    assert "examples: 3 in, 3 out" in out and "images: 3 (12 image tokens)" in out
    # every example is 22 tokens once its image is expanded (18 text tokens + 4 image tokens)
    assert "example length: median 22, p90 22, max 22 tokens" in out
    assert "0-22   " in out and out.rstrip().endswith(" 3")  # one histogram bin: all 3 examples
