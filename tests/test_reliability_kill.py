"""SIGKILL at several points of a checkpoint save (and during a step) of a real `tunesmith train`
subprocess, then `resume_from_checkpoint=true`: the run resumes from the newest complete checkpoint
and its loss curve equals the uninterrupted run's.

The child process installs its kill point by wrapping the writer the save calls (peft's safetensors
writer, torch.save, os.rename, shutil.rmtree, the loss) before it calls `tunesmith.cli.main`: the
kill then lands exactly there, every time, with no timing involved.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_export import build_llama, build_tokenizer
from tunesmith.checkpoint import STAGING, checkpoint_problem, list_checkpoints
from tunesmith.cli import main

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # subprocess runs of the CLI: about 3 minutes for the file on 2 loaded cores

CHILD = textwrap.dedent(
    """
    import io, os, shutil, signal, sys

    point = os.environ["KILL_POINT"]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def half_written(path, data):
        with open(path, "wb") as f:  # a torn file, as a kill in the middle of the write leaves it
            f.write(data[: len(data) // 2])
            f.flush()
        die()

    import torch
    import peft.peft_model
    import safetensors.torch

    if point == "adapter":  # in the middle of the adapter weights of checkpoint-6
        real = peft.peft_model.safe_save_file
        def save_file(tensors, filename, metadata=None):
            if "checkpoint-6" in str(filename):
                half_written(filename, safetensors.torch.save(tensors, metadata=metadata))
            return real(tensors, filename, metadata=metadata)
        peft.peft_model.safe_save_file = save_file
    elif point in ("optimizer", "rng"):  # in the middle of optimizer.pt / after the RNG states
        real = torch.save
        def save(obj, f, *a, **k):
            name = str(f)
            if "checkpoint-6" in name and name.endswith("optimizer.pt") and point == "optimizer":
                buffer = io.BytesIO()
                real(obj, buffer)
                half_written(name, buffer.getvalue())
            real(obj, f, *a, **k)
            if "checkpoint-6" in name and "rng_state" in name and point == "rng":
                die()
        torch.save = save
    elif point == "publish":  # every file written and flushed, the rename not done
        real = os.rename
        def rename(src, dst, *a, **k):
            if str(dst).endswith("checkpoint-6"):
                die()
            return real(src, dst, *a, **k)
        os.rename = rename
    elif point == "rotate":  # checkpoint-6 in place, checkpoint-3 being deleted (save_total_limit=1)
        real = shutil.rmtree
        def rmtree(path, *a, **k):
            if str(path).endswith("checkpoint-3"):
                die()
            return real(path, *a, **k)
        shutil.rmtree = rmtree
    elif point == "step":  # in the forward of step 8, after checkpoint-6
        import tunesmith.trainer
        real = tunesmith.trainer.SFTTrainer.compute_loss
        def compute_loss(self, *a, **k):
            if self.state.global_step == 7:
                die()
            return real(self, *a, **k)
        tunesmith.trainer.SFTTrainer.compute_loss = compute_loss

    elif point in ("SIGTERM", "SIGINT"):  # a signal in the forward of step 4: that step ends, is saved
        import tunesmith.trainer
        real = tunesmith.trainer.SFTTrainer.compute_loss
        def compute_loss(self, *a, **k):
            if self.state.global_step == 3 and self.model.training:
                os.kill(os.getpid(), getattr(signal, point))
            return real(self, *a, **k)
        tunesmith.trainer.SFTTrainer.compute_loss = compute_loss

    from tunesmith.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    tok = build_tokenizer(tmp / "model")
    build_llama(tmp / "model", tok, tie=False)
    rows = [{"text": f"the quick brown fox {i} jumps over the lazy dog {i * 7}"} for i in range(40)]
    (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "child.py").write_text(CHILD)
    baseline = run_config(tmp, "baseline")
    assert main(["train", str(baseline)]) == 0
    return tmp, losses(tmp / "baseline")


def run_child(tmp: Path, point: str, config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_POINT": point, "PYTHONPATH": str(ROOT / "src") + os.pathsep + str(ROOT)}
    return subprocess.run(
        [sys.executable, str(tmp / "child.py"), "train", str(config), *extra],
        env=env,
        capture_output=True,
        text=True,
    )


def run_config(tmp: Path, name: str, **extra) -> Path:
    values = {
        "output_dir": str(tmp / name),
        "model": {"name_or_path": str(tmp / "model"), "dtype": "float32"},
        "dataset": {"train": str(tmp / "data.jsonl")},
        "lora": {"r": 4, "alpha": 8},
        "data": {"max_length": 32},
        "training": {
            "use_peft": True,
            "learning_rate": 5.0e-3,
            "lr_scheduler_type": "linear",
            "warmup_steps": 2,
            "max_steps": 8,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "save_strategy": "steps",
            "save_steps": 3,
            "report_to": "none",
            "use_cpu": True,
            "disable_tqdm": True,
            "dataset_cache_dir": False,
            "seed": 3,
            **extra,
        },
    }
    path = tmp / f"{name}.json"  # JSON is YAML
    path.write_text(json.dumps(values))
    return path


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize(
    "point, limit, resumed_from",
    [
        ("adapter", None, 3),
        ("optimizer", None, 3),
        ("rng", None, 3),
        ("publish", None, 3),
        ("rotate", 1, 6),
        ("step", None, 6),
    ],
)
def test_sigkill_then_resume_gives_the_uninterrupted_curve(setup, point, limit, resumed_from, caplog):
    tmp, expected = setup
    name = f"killed-{point}"
    extra = {"save_total_limit": limit} if limit else {}
    config = run_config(tmp, name, **extra)
    child = run_child(tmp, point, config)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]

    run = tmp / name
    # what the kill left: every checkpoint-N folder is complete; a torn save is only in the staging area
    for _, folder in list_checkpoints(run):
        assert checkpoint_problem(folder) is None, folder
    names = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))
    assert f"checkpoint-{resumed_from}" in names, names
    if point in ("adapter", "optimizer", "rng", "publish"):
        assert "checkpoint-6" not in names
        assert (run / STAGING / "checkpoint-6").is_dir()  # the torn one, kept out of the way

    caplog.set_level("WARNING", logger="tunesmith.checkpoint")
    assert main(["train", str(config), "resume_from_checkpoint=true"]) == 0
    assert f"resuming from {run / f'checkpoint-{resumed_from}'} (step {resumed_from})" in caplog.text
    curve = losses(run)
    assert sorted(curve) == list(range(1, 9))
    # steps 1..N from the killed process, the rest from the resumed one: all equal the uninterrupted run
    # (another process: the seed fixes LoRA's initialisation, so separate CLI runs agree from step 1)
    for step in range(1, 9):
        assert curve[step] == pytest.approx(expected[step], abs=1e-6), (step, curve, expected)
    assert curve[8] < curve[1]  # the curve moved (a resume that restarted would still match nothing)
    assert not (run / STAGING).exists()  # the next save cleared the torn staging folder


@pytest.mark.parametrize("signame, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_with_its_own_status_a_marked_report_and_the_resume_command(setup, signame, status):
    tmp, expected = setup
    name = f"stopped-{signame}"
    config = run_config(tmp, name)
    child = run_child(tmp, signame, config, "logging_steps=1")
    # 128 + the signal's number, as a shell reports it; not 0 ("done") and not 1/2 (an error)
    assert child.returncode == status, child.stderr[-2000:]
    resume = f"tunesmith train {config} logging_steps=1 resume_from_checkpoint=true"
    assert f"tunesmith train: stopped at step 4 of 8 ({signame}); resume with `{resume}`" in child.stderr
    assert "done:" not in child.stdout
    run = tmp / name
    report = (run / "report.md").read_text()
    assert "(STOPPED EARLY)" in report.splitlines()[0] and "stopped at step 4 of 8" in report
    assert not (run / "adapter_model.safetensors").exists()  # no final model: the run did not finish
    assert checkpoint_problem(run / "checkpoint-4") is None

    # the printed command resumes it; the curve is the uninterrupted one
    assert main(["train", str(config), "logging_steps=1", "resume_from_checkpoint=true"]) == 0
    curve = losses(run)
    for step in range(5, 9):
        assert curve[step] == pytest.approx(expected[step], abs=1e-6), step
    assert "STOPPED" not in (run / "report.md").read_text()


def test_a_finished_output_dir_is_not_overwritten_unless_asked(setup, capsys):
    tmp, _ = setup
    config = run_config(tmp, "baseline")  # finished by the fixture
    before = (tmp / "baseline" / "adapter_model.safetensors").read_bytes()
    assert main(["train", str(config)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tunesmith train: output_dir {tmp / 'baseline'} holds a finished run (")
    assert "resume_from_checkpoint=true" in err and "overwrite_output_dir=true" in err
    assert "\n" not in err
    assert (tmp / "baseline" / "adapter_model.safetensors").read_bytes() == before
    # the finished run's report says how many threads it used and why
    import torch

    assert (
        f"- threads: {torch.get_num_threads()} torch thread" in (tmp / "baseline" / "report.md").read_text()
    )

    # a folder with only checkpoints (a stopped or killed run) is refused too
    other = tmp / "only-checkpoints"
    shutil.copytree(tmp / "baseline" / "checkpoint-3", other / "checkpoint-3")
    assert main(["train", str(run_config(tmp, "only-checkpoints"))]) == 1
    assert "holds checkpoints of an earlier run (checkpoint-3)" in capsys.readouterr().err

    # asked: overwritten, and the old checkpoints are gone (a later resume cannot pick one of them)
    assert (
        main(["train", str(run_config(tmp, "only-checkpoints", max_steps=2)), "overwrite_output_dir=true"])
        == 0
    )
    assert not (other / "checkpoint-3").exists() and (other / "adapter_model.safetensors").exists()


def test_sample_prompts_reach_the_console_metrics_and_report(setup, capsys):
    # no eval set: the generations come at the end of training (with one, at every evaluation too)
    tmp, _ = setup
    config = run_config(tmp, "samples", sample_prompts=["the quick brown"], sample_max_new_tokens=4)
    assert main(["train", str(config)]) == 0
    out, err = capsys.readouterr()
    assert "sample at step 8\n  prompt: the quick brown\n  output: " in out
    # the data summary is shown before training: what was read, kept, truncated, dropped
    assert "data: data.jsonl (text)\n" in err and "  examples: 40 in, 40 out\n" in err
    # one progress display: the step lines, not also Trainer's log dicts / tqdm bar / save bars
    assert (
        "{'loss'" not in out
        and "Writing model shards" not in err
        and "it/s]" not in err.split("tokenizing")[-1]
    )
    assert [line.split(" | ")[0] for line in err.splitlines() if line.startswith("step ")] == [
        f"step {i}/8" for i in range(1, 9)
    ]
    records = [json.loads(line) for line in (tmp / "samples" / "metrics.jsonl").read_text().splitlines()]
    samples = [r for r in records if "sample_output" in r]
    assert len(samples) == 1 and samples[0]["step"] == 8 and samples[0]["sample_prompt"] == "the quick brown"
    # in order: after the losses of steps 1-7, before step 8's (logged after the step's callbacks)
    before = [r["step"] for r in records[: records.index(samples[0])] if "loss" in r]
    assert before == list(range(1, 8))
    printed = out.split("  output: ")[1].splitlines()[0]
    assert samples[0]["sample_output"].strip() == printed.strip()
    report = (tmp / "samples" / "report.md").read_text()
    assert "## Generations from sample_prompts" in report and "| 8 | the quick brown |" in report
