"""The README's Python example runs exactly as written (in a temporary folder)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    # examples that say they need the network (a Hub model: the vision-language one) cannot run here
    blocks = [b for b in blocks if "needs network" not in b]
    assert len(blocks) == 1, "the README has one offline Python example; this test runs it"
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
