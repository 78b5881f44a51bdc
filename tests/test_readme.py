"""The README's Python examples run: the drop-in one exactly as written, the vision-language one with its
Hub model swapped for a tiny LLaVA saved to a folder (the Hub is not reachable from the tests)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 2, "the README has two Python examples (drop-in, vision); these tests run them"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 10
    # the tutorial case: with dataset_text_field="prompt" on prompt/response data the responses are
    # trained, so every example has supervised tokens and none was dropped
    assert len(trainer.train_dataset) == 2
    assert (tmp_path / "readme-run" / "adapter_config.json").exists() is False  # full fine-tuning here
    assert (tmp_path / "readme-run" / "model.safetensors").exists()


VLM_HUB_NAME = '"HuggingFaceTB/SmolVLM-256M-Instruct"'


@pytest.mark.slow
def test_readme_vision_example_runs(tmp_path, monkeypatch):
    from tests.tiny_vision import shape_image, tiny_processor, tiny_vlm

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    code = blocks[1]
    assert VLM_HUB_NAME in code and 'output_dir="runs/vlm"' in code
    monkeypatch.chdir(tmp_path)
    tiny_vlm("llava").save_pretrained("tiny-llava")
    tiny_processor("llava").save_pretrained("tiny-llava")
    (tmp_path / "img").mkdir()
    shape_image("red", "square").save("img/red_square.png")  # the example's relative image path
    code = code.replace(VLM_HUB_NAME, '"tiny-llava"').replace(
        'output_dir="runs/vlm"', 'output_dir="runs/vlm", max_steps=2'
    )
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2
    # the one example trains its assistant answer: a finite, positive loss on supervised tokens (with
    # nothing trained the token-normalised loss would be 0)
    train_loss = trainer.state.log_history[-1]["train_loss"]
    assert 0 < train_loss < 100
    assert (tmp_path / "runs" / "vlm").is_dir()
