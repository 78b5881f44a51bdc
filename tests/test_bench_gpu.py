"""bench/gpu/run.py, the prepared first GPU run: its arithmetic, and its --dry-run on this CPU machine
(every step's code but the GPU work: toy-sized training runs of each installed contender, the gpu tests
collected, the accelerate configs parsed, the distributed save/resume logic in one process)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu.run import LLAMA_1B, flops_per_token

ROOT = Path(__file__).resolve().parents[1]


def test_flops_per_token_of_a_llama_1b_lora_step():
    # per layer: q 2048·2048 + k, v 2·2048·512 + o 2048·2048 + gate, up, down 3·2048·8192 = 60,817,408;
    # 16 layers + the LM head 128,256·2048 = 1,235,746,816 matmul parameters, 4 FLOPs each per token
    # (forward 2, input gradients 2); LoRA r=16: 6·16·44,032 per layer = 67,633,152; attention over
    # 1,000-token documents: 16 layers · 6 · 1,000 · 2,048 = 196,608,000
    assert flops_per_token(LLAMA_1B, [1000]) == 4 * 1_235_746_816 + 67_633_152 + 196_608_000
    # Σn²/Σn: documents of 100 and 300 tokens attend over (100² + 300²) / 400 = 250 on average
    assert flops_per_token(LLAMA_1B, [100, 300]) - flops_per_token(LLAMA_1B, [1]) == 16 * 6 * 249 * 2048


@pytest.mark.slow
def test_dry_run_checks_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_results.json"
    cmd = [sys.executable, "bench/gpu/run.py", "--dry-run", "--out", str(out), "--work", str(tmp_path / "work"),
           "--wheels", str(tmp_path / "no-wheels")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = json.loads(out.read_text())["steps"]
    assert list(steps) == ["setup", "doctor", "tests", "e2e", "qlora", "dist"]
    assert steps["setup"]["status"] == "passed" and "no wheels in" in steps["setup"]["why"]
    for package in ("torch", "transformers", "peft", "accelerate", "datasets", "tunesmith"):
        assert not str(steps["setup"]["versions"][package]).startswith("ERROR"), package
    # no CUDA here: doctor says what runs instead, and checks nothing
    assert steps["doctor"]["status"] == "skipped" and steps["doctor"]["checks"] == 0
    # every test in tests/gpu (and the gpu-marked ones in tests/ops) collected
    assert steps["tests"]["status"] == "passed" and steps["tests"]["collected"] >= 60
    e2e = steps["e2e"]
    assert e2e["status"] == "passed", e2e["failures"]
    assert {"tunesmith", "trl_default", "tunesmith_no_triton"} <= set(e2e["summary"])
    for contender, summary in e2e["summary"].items():
        assert summary["tokens_per_s"] > 0 and summary["runs"] == 1, contender
    # the toy model trains on the same documents in every run: the losses start at about ln(512) = 6.24
    # (random tokens) and the libraries' curves agree (the same rows, packed alike)
    agreement = e2e["loss_agreement"]
    assert 5.5 < agreement["trl_default"]["first"] < 7.0
    assert agreement["tunesmith"]["steps"] == 3 and agreement["tunesmith"]["max_abs_diff"] < 0.05
    assert e2e["targets"] is None  # toy CPU runs are no measurement
    assert steps["qlora"]["status"] == "skipped"
    dist = steps["dist"]
    assert dist["status"] == "passed", dist["failures"]
    assert dist["configs"] == {"fsdp2": "FSDP", "zero3": "DEEPSPEED"}
    resumed = dist["results"]["fsdp2"]["resume"]
    # the adapter right after resuming from checkpoint-2 is the one saved at step 2, bit for bit, and
    # the resumed run's step 4 is the uninterrupted run's (here on the CPU: exactly)
    assert resumed["resumed_vs_saved_step_2"] == 0.0 and resumed["final_vs_uninterrupted_step_4"] == 0.0
    assert "GPU run (DRY RUN" in done.stdout and "results:" in done.stdout
