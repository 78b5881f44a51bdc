"""Data parallelism on CPU: 2 processes (gloo, launched by torchrun) give the same loss curve as
one process with the same global batch, on examples with very different supervised-token counts
(so a per-process mean instead of the global token mean would show)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from tests.tiny import tiny_model, tiny_tokenizer
    from tunesmith import SFTConfig, SFTTrainer

    out, batch = sys.argv[1], int(sys.argv[2])
    words = "apple banana cat dog sun sky water red green blue day night one two three four".split()
    # completions of 1 to 16 words: very different supervised-token counts per example
    data = [{"prompt": f"Say {w}.", "completion": " ".join(words[: i + 1]) + "."} for i, w in enumerate(words)]
    args = SFTConfig(
        output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=2, max_steps=4,
        logging_steps=1, learning_rate=3e-3, max_grad_norm=0.0, report_to="none", save_strategy="no",
        dataset_cache_dir=False, memory_policy="none", seed=3,
    )
    torch.manual_seed(0)
    trainer = SFTTrainer(tiny_model("llama", initializer_range=0.5), args=args, train_dataset=data,
                         processing_class=tiny_tokenizer())
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        json.dump({"losses": losses, "world_size": trainer.args.world_size}, open(out + "/losses.json", "w"))
    # shut gloo down before the interpreter does: left to exit, a rank sometimes aborted
    # ("terminate called without an active exception") after training had finished
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    """
)


def _run(tmp_path, name, nproc, batch):
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'src'}",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if nproc == 1:
        cmd = [sys.executable, str(script), str(out), str(batch)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            # torchrun binds its own free port: a port probed here could be taken before it binds
            "--standalone",
            str(script),
            str(out),
            str(batch),
        ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "losses.json").read_text())


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    one = _run(tmp_path, "one", nproc=1, batch=4)  # 4 per micro-batch x 2 accumulation = 8 per step
    two = _run(tmp_path, "two", nproc=2, batch=2)  # 2 per micro-batch x 2 accumulation x 2 processes = 8
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(one["losses"]) == len(two["losses"]) == 4
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert one["losses"][-1] < one["losses"][0]  # it trained, so the later steps test the synced gradients
