"""Every Python example in the seed documents (/work/shared/seeds, copied from a TRL tutorial and
an Unsloth page) runs with tunesmith, changed only where this offline CPU machine forces it:

- the import: `from trl import` / `from unsloth import` -> `from tunesmith import`;
- model and dataset names -> a tiny local model (saved in tmp_path) / a local alpaca-style folder;
- `.cuda()` removed (no GPU);
- steps capped at 2: `num_train_epochs=3` gets `max_steps=2` added, `max_steps = 60/100` becomes 2,
  so each example trains for seconds.

A page's blocks run in order in one namespace, as a reader runs them (the second page's packing
example uses the `dataset` of its first). Blocks that are not runnable Python are skipped and listed
here: the JSON data sample and the `pip install` line of the tutorial, and the Unsloth page's
"Signature" block (a call written with type annotations, `model: PreTrainedModel`, which is
documentation syntax, not Python).
"""

import json
import re
from pathlib import Path

import pytest

from tests.tiny import tiny_model, tiny_tokenizer
from tunesmith.common import reset_once

SEEDS = Path("/work/shared/seeds")
TUTORIAL = SEEDS / "000_1f6f6ddacba6565f.txt"
UNSLOTH = SEEDS / "001_34642c3424418439.txt"

MODEL_NAMES = ["meta-llama/Llama-2-7b-hf", "unsloth/Llama-3.2-1B-Instruct"]
HUB_DATASETS = ["tatsu-lab/alpaca"]


def tutorial_blocks(text: str) -> list[str]:
    """Python blocks of the tutorial: each starts at a `pythonCopyEdit` marker and runs until a
    line of prose (one that does not compile, or a bare title such as `Evaluation`)."""
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("pythonCopyEdit"):
            current = [line[len("pythonCopyEdit") :]]
            blocks.append(current)
        elif current is not None:
            if line.strip() and _is_prose(line):
                current = None
            else:
                current.append(line)
    return ["\n".join(block).strip() + "\n" for block in blocks]


def _is_prose(line: str) -> bool:
    if line[:1].isspace() or line.rstrip().endswith(("(", "[", "{", ",")) or line.strip() in (")", "]", "}"):
        return False  # inside or closing a multi-line call
    if re.fullmatch(r"[A-Z][A-Za-z ]*", line.strip()):
        return True  # a title ("Evaluation") would compile as a bare name
    try:
        compile(line, "<line>", "exec")
        return False
    except SyntaxError:
        return True


def unsloth_blocks(text: str) -> list[str]:
    """Python blocks of the Unsloth page (<syntaxhighlight lang="python">), minus the Signature block."""
    blocks = re.findall(r'<syntaxhighlight lang="python">\n(.*?)</syntaxhighlight>', text, flags=re.S)
    runnable = [b for b in blocks if "model: PreTrainedModel" not in b]
    assert len(blocks) - len(runnable) == 1  # only the Signature block is skipped
    return runnable


def adapt(code: str, model_dir: Path, data_dir: Path) -> str:
    """The only edits (see the module docstring)."""
    code = code.replace("from trl import", "from tunesmith import").replace(
        "from unsloth import", "from tunesmith import"
    )
    for name in MODEL_NAMES:
        code = code.replace(f'"{name}"', repr(str(model_dir)))
    for name in HUB_DATASETS:
        code = code.replace(f'"{name}"', repr(str(data_dir)))
    code = code.replace(".cuda()", "")
    code = code.replace("num_train_epochs=3,", "num_train_epochs=3, max_steps=2,")
    code = re.sub(r"max_steps = \d+", "max_steps = 2", code)
    return code


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    reset_once("notice")
    model_dir = tmp_path / "tiny-model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data_dir = tmp_path / "alpaca"
    data_dir.mkdir()
    rows = [
        {"instruction": "Name a fruit.", "input": "", "output": "Apple."},
        {"instruction": "Say yes.", "input": "", "output": "Yes."},
    ]
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the Unsloth page reads a local train.jsonl of pre-formatted text
    texts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n", "The sky is blue."]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    monkeypatch.chdir(tmp_path)  # the examples write ./outputs, ./llama2-finetuned, ...
    return model_dir, data_dir


def run_page(blocks, model_dir, data_dir) -> list[dict]:
    """Run the blocks in order in one namespace; return a snapshot of it after each block."""
    namespace: dict = {"__name__": "__seed__"}
    snapshots = []
    for code in blocks:
        exec(compile(adapt(code, model_dir, data_dir), "<seed example>", "exec"), namespace)
        snapshots.append(dict(namespace))
    return snapshots


def test_the_extractors_find_every_example():
    tutorial = tutorial_blocks(TUTORIAL.read_text())
    # alpaca from the Hub; load model; dataset from a list; trainer; train; LoRA; evaluation; save
    assert len(tutorial) == 8
    assert tutorial[0].startswith("from datasets import load_dataset")
    assert "examples = [" in tutorial[2] and tutorial[4] == "trainer.train()\n"
    assert tutorial[6].startswith('prompt = "List three benefits of exercise."')
    assert len(unsloth_blocks(UNSLOTH.read_text())) == 4  # import + three usage examples


def test_trl_tutorial_runs(workspace, capsys):
    model_dir, data_dir = workspace
    snapshots = run_page(tutorial_blocks(TUTORIAL.read_text()), model_dir, data_dir)
    # the page's first block loads alpaca "from the Hub" (here a local folder); Step 2 then replaces it
    assert snapshots[0]["dataset"].column_names == ["instruction", "input", "output"]
    assert snapshots[2]["dataset"].column_names == ["prompt", "response"]
    # Step 4 trained 2 steps; the LoRA block builds a second trainer that the page never trains
    assert snapshots[4]["trainer"].state.global_step == 2 and snapshots[-1]["trainer"].state.global_step == 0
    assert (Path("llama2-alpaca-lora") / "adapter_model.safetensors").exists()
    assert "tokenizer.json" in {p.name for p in Path("llama2-alpaca-lora").iterdir()}
    assert capsys.readouterr().out.strip() != ""  # the evaluation block printed a generation


def test_unsloth_page_runs(workspace):
    model_dir, data_dir = workspace
    trainer = run_page(unsloth_blocks(UNSLOTH.read_text()), model_dir, data_dir)[-1]["trainer"]
    assert trainer.state.global_step == 2
    # the last example passes no max_seq_length to the trainer: it comes from FastLanguageModel's 2048
    assert trainer.args.max_length == 2048
    # the last example: embeddings and LM head trained at their own learning rate
    lrs = {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}  # "lr" has decayed to 0
    assert lrs["embedding"] == 5e-5 and lrs["decay"] == 2e-4
