"""The `tunesmith` command line, in process, on a tiny Llama with a byte-level BPE tokenizer."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_export import build_llama, build_tokenizer
from tunesmith.cli import format_histogram, main, render_tokens

PROMPT, ANSWER = "what is the capital of france", "paris"


@pytest.fixture
def tiny_run(tmp_path):
    """A model folder, a one-example dataset (repeated) and a config that trains LoRA on it."""
    tok = build_tokenizer(tmp_path / "model")
    build_llama(tmp_path / "model", tok, tie=False)
    rows = [
        {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}]}
    ] * 16
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.yaml").write_text(
        f"""
output_dir: {tmp_path / "run"}
model: {{name_or_path: {tmp_path / "model"}, dtype: float32}}
dataset: {{train: {tmp_path / "data.jsonl"}}}
lora: {{r: 8, alpha: 16, dropout: 0.0}}
data: {{max_length: 64}}
training:
  use_peft: true
  learning_rate: 1.0e-2
  max_steps: 30
  per_device_train_batch_size: 8
  logging_steps: 5
  save_strategy: "no"
  report_to: none
  use_cpu: true
  disable_tqdm: true
  seed: 0
"""
    )
    return tmp_path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_generate_merge_export_and_load_back(tiny_run, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    tmp = tiny_run
    code, out, err = run_cli(capsys, "train", tmp / "run.yaml", "max_steps=30")
    assert code == 0, err
    run = tmp / "run"
    for name in ("adapter_config.json", "tunesmith_config.yaml", "metrics.jsonl", "loss.png", "report.md"):
        assert (run / name).exists(), name
    losses = [
        r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert len(losses) == 6  # 30 steps, a log every 5
    # one example repeated: LoRA memorises it, so the loss on its 2 answer tokens + end of turn falls
    # from the random model's ~ln(vocab) = 5.7 to near zero
    assert losses[0] > 2.0 and losses[-1] < 0.1, losses

    # greedy generation from the adapter folder reproduces the trained answer
    code, out, err = run_cli(capsys, "generate", run, "--prompt", PROMPT, "--max-new-tokens", "8")
    assert code == 0, err
    assert out.strip() == ANSWER

    # chat reads turns from stdin (not a terminal here: no prompt text), one reply per line
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPT}\n"))
    code, out, err = run_cli(capsys, "chat", run, "--max-new-tokens", "8")
    assert (code, out.strip()) == (0, ANSWER)

    code, out, err = run_cli(capsys, "merge", run, "--output", tmp / "merged")
    assert code == 0, err
    code, out, err = run_cli(capsys, "generate", tmp / "merged", "--prompt", PROMPT, "--max-new-tokens", "8")
    assert out.strip() == ANSWER  # the merged bf16 model answers the same

    code, out, err = run_cli(capsys, "export", tmp / "merged", "--gguf", tmp / "merged.gguf", "--type", "f16")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp / "merged", dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(tmp, gguf_file="merged.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 40, 41, 42, 43]])
    with torch.no_grad():
        expected, got = merged(ids).logits, back(ids).logits
    # bf16 weights are exact in f16 unless tiny (below f16's normal range), so the logits agree closely
    assert (got - expected).abs().max() / expected.abs().max() < 1e-3

    # straight from the adapter folder to GGUF + Ollama Modelfile, and the lines that say how to run them
    code, out, err = run_cli(capsys, "export", run, "--ollama", tmp / "ollama", "--type", "q8_0")
    assert code == 0, err
    gguf = tmp / "ollama" / "run-q8_0.gguf"
    assert gguf.exists() and (tmp / "ollama" / "Modelfile").read_text().startswith("# Written by tunesmith")
    assert f"llama-cli -m {gguf}" in out and "ollama create" in out
    code, out, err = run_cli(capsys, "export", run)
    assert code == 2 and "give --gguf FILE, --ollama DIR, or both" in err


CONFIG_ERRORS = [
    # (YAML line, override, the message the user sees)
    ("lora: {rr: 8}", None, "unknown key `lora.rr`. Did you mean `lora.r`?"),
    ("", "learnin_rate=1e-4", "unknown key `learnin_rate`. Did you mean `learning_rate`?"),
    ("learning_rate: fast", None, "`learning_rate` expects float"),
    ("model: ./no-such-model", None, "model.name_or_path: ./no-such-model does not exist"),
    ("dataset: {trian: x.jsonl}", None, "unknown key `dataset.trian`. Did you mean `dataset.train`?"),
]


@pytest.mark.parametrize(("line", "override", "message"), CONFIG_ERRORS)
def test_config_errors_are_one_clear_line_and_exit_2(tmp_path, capsys, line, override, message):
    config = tmp_path / "bad.yaml"
    config.write_text(
        f"dataset: {tmp_path / 'data.jsonl'}\n{line}\n" if "dataset" not in line else line + "\n"
    )
    code, out, err = run_cli(capsys, "train", config, *([override] if override else []))
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_missing_config_file(capsys):
    code, _, err = run_cli(capsys, "train", "nope.yaml")
    assert (code, err.strip()) == (2, "tunesmith train: nope.yaml: no such config file")


def test_inspect_marks_trained_tokens(tiny_run, capsys):
    tmp = tiny_run
    common = ("inspect", tmp / "data.jsonl", "--model", tmp / "model", "-n", "1", "max_length=64")
    code, out, err = run_cli(capsys, *common, "assistant_only_loss=false")
    assert code == 0, err
    # TRL's default (assistant_only_loss false): every token of a conversation is trained
    assert "[[<|im_start|>user\nwhat is the capital of france<|im_end|>\n<|im_start|>assistant\nparis" in out

    code, out, err = run_cli(capsys, *common)
    assert code == 0, err
    # tunesmith's default, assistant-only loss: the answer and its end-of-turn token are trained; the prompt, the role
    # headers and the newline after <|im_end|> (not part of the turn) are masked
    expected = "<|im_start|>user\nwhat is the capital of france<|im_end|>\n<|im_start|>assistant\n[[paris<|im_end|>]]\n"
    assert expected in out
    assert "examples: 16 in, 16 out" in out and "example lengths (tokens):" in out


def test_preprocess_prints_the_statistics(tiny_run, capsys):
    code, out, err = run_cli(capsys, "preprocess", tiny_run / "run.yaml")  # assistant-only by default
    assert code == 0, err
    # 16 copies of a 51-token conversation; trained per copy: "paris" (5 single-byte tokens, as the
    # test BPE learned no merge for it) + <|im_end|> = 6
    assert "[train]" in out and "examples: 16 in, 16 out" in out
    assert "tokens: 816, of which trained: 96 (11.8%)" in out


def test_render_tokens_with_and_without_colour(tmp_path):
    tok = build_tokenizer(tmp_path)
    ids = tok("ab cd")["input_ids"]
    labels = [-100] * (len(ids) - 1) + [ids[-1]]
    plain = render_tokens(tok, ids, labels, color=False)
    assert plain.endswith("]]") and plain.count("[[") == 1
    assert plain.replace("[[", "").replace("]]", "") == "ab cd"
    colored = render_tokens(tok, ids, labels, color=True)
    assert "\033[1;32m" in colored and "\033[2;37m" in colored and "[[" not in colored


def test_histogram_text():
    text = format_histogram({"edges": [32, 64, 70], "counts": [4, 0, 2]}, width=4)
    assert text.splitlines()[1:] == ["         0-31   ████ 4", "        32-63    0", "        64-70   ██ 2"]


def test_help_is_fast_and_imports_no_torch():
    # `tunesmith --help` must not pay for torch / transformers
    code = "import sys; from tunesmith import cli; cli.build_parser(); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    result = subprocess.run([sys.executable, "-m", "tunesmith.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout and "export" in result.stdout


def test_generate_from_a_missing_folder_is_one_line(capsys):
    code, _, err = run_cli(capsys, "generate", "./no-such-run", "--prompt", "hi")
    assert code == 2 and "./no-such-run does not exist" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "merge", "./no-such-run", "--output", "x")
    assert (code, err.strip()) == (
        2,
        "tunesmith merge: ./no-such-run: no such folder (expected a model or adapter folder)",
    )


def test_train_without_data_runs_the_quick_start(monkeypatch, capsys):
    import tunesmith.quickstart

    calls = []
    monkeypatch.setattr(tunesmith.quickstart, "run_quickstart", lambda *a, **kw: calls.append((a, kw)))
    assert main(["train", "max_steps=5"]) == 0
    # no file: the built-in settings + overrides (and the command that would resume it)
    assert calls[-1] == (
        (["max_steps=5"],),
        {"resume_command": "tunesmith train max_steps=5 resume_from_checkpoint=true"},
    )
    config = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
    assert main(["train", str(config), "max_steps=7"]) == 0
    assert calls[-1][1]["config"].max_steps == 7  # the file's settings, overrides applied


def test_config_list_and_train_help_print_every_key(capsys):
    from tunesmith.cli import CONFIG_SECTIONS
    from tunesmith.config import SECTIONS, config_fields

    assert CONFIG_SECTIONS == tuple(SECTIONS)  # the parser's copy, kept so that it imports no config

    code, out, _ = run_cli(capsys, "config", "--list")
    assert code == 0
    for section in ("model:", "lora:", "data:", "training:", "kernels:", "eval:"):
        assert f"\n{section}\n" in out
    assert "  r (lora_r): int = 16" in out and "LoRA rank." in out
    assert all(f"({name})" in out or f"  {name}:" in out for name in config_fields())
    code, only, _ = run_cli(capsys, "config", "--list", "--section", "eval")
    assert code == 0 and "sample_max_new_tokens" in only and "lora_r" not in only
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: tunesmith train") and out in help_text
    code, _, err = run_cli(capsys, "config")
    assert code == 2 and "tunesmith config --list" in err


def test_the_cli_loads_the_tokenizer_with_the_configs_eos_token(tiny_run):
    # preprocess / inspect load the tokenizer through build.tokenizer.load_by_name, as the trainer
    # does: a config's eos_token must reach it there too, or their data would differ from training's
    from tunesmith import SFTConfig
    from tunesmith.build.tokenizer import load_by_name

    args = SFTConfig(output_dir=str(tiny_run / "out"), eos_token="<|im_start|>")
    tokenizer = load_by_name(tiny_run / "model", args, vision=False)
    assert tokenizer.eos_token == "<|im_start|>"
    assert (
        load_by_name(tiny_run / "model", SFTConfig(output_dir=str(tiny_run / "out")), vision=False).eos_token
        != "<|im_start|>"
    )
