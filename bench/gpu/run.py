"""The first GPU run: verify every kernel and measure tunesmith against TRL, in one go.

    python bench/gpu/run.py                     # on a machine with one NVIDIA GPU (H100/H200 class)
    python bench/gpu/run.py --dry-run           # on any machine: everything but the GPU steps
    python bench/gpu/run.py --only tests e2e    # a subset of the steps

Made for a machine with no internet and only torch, transformers, peft, accelerate and triton:
the missing wheels travel with it in `.whl/` (`bench/gpu/fetch_wheels.sh` downloads them
beforehand where the registry is reachable). It writes ONE results file (`--out`, default
`bench/out/gpu_results.json`) after every step, so a run cut short keeps what it measured, and
prints a summary of what passed, what fell back and the figures. Steps, in order of importance:

1. setup   install the wheels into a private folder (`--site`), nothing of the machine's replaced;
           record the versions
2. doctor  `tunesmith doctor --json`: device, bf16/TF32, and every Triton kernel's check against its
           PyTorch reference at Llama-3.2-1B shapes in bf16 and fp16 (what fell back, and why)
3. tests   the `gpu`-marked tests (tests/gpu and the ops tests: every kernel vs its reference,
           compiled, fp32/fp16/bf16, odd shapes, forward and backward)
4. e2e     Llama-3.2-1B-shaped model (random weights), bf16, LoRA r=16 on all linear layers, sequences of
           2,048 tokens, packed: tunesmith, TRL defaults and TRL with Liger kernels (and tunesmith with
           TUNESMITH_KERNELS=off, to see what the kernels give), each run in its own process, the order
           alternating between repeats: non-padding tokens/s, peak GPU memory, MFU against a bf16 matmul
           peak measured in the same run, loss per step
5. qlora   the same with the base weights in 4-bit NF4 (bitsandbytes)
6. dist    LoRA through accelerate at world size 1: FSDP2, and DeepSpeed ZeRO-3 where deepspeed is
           installed: train 4 steps (checkpoints at 2 and 4), resume a new run from step 2; the resumed
           adapter must equal the saved one, and its step-4 adapter the uninterrupted run's

What `--dry-run` does instead of the GPU steps: the same code on the CPU at toy sizes (a 2-layer model,
a few steps, each contender whose library is installed), the `gpu` tests collected (not run), the
accelerate configs parsed, the distributed worker's save/resume logic run in one CPU process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# import bench/ and tests/ modules from the repository root; tunesmith from src/ (not installed there)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
for path in (str(ROOT / "src"), str(ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)

# Llama-3.2-1B's architecture (random weights: no download)
from bench.model_shapes import LLAMA_1B, flops_per_token  # noqa: E402

# the dry run's toy: same code path, CPU-sized
TOY = dict(LLAMA_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=4096)  # fmt: skip

# contender -> (library, SFTConfig overrides, environment)
CONTENDERS = {
    "tunesmith": ("tunesmith", {}, {}),
    "trl_default": ("trl", {}, {}),
    "trl_liger": ("trl", {"use_liger_kernel": True}, {}),
    "tunesmith_no_triton": ("tunesmith", {}, {"TUNESMITH_KERNELS": "off"}),
}
TARGETS = {"x_trl_default": 2.0, "x_trl_liger": 1.15, "memory_x_trl_default": 0.4}
REQUIRED_WHEELS = (
    "transformers",
    "peft",
    "datasets",
    "dill",
    "multiprocess",
    "trl",
    "liger_kernel",
    "bitsandbytes",
)


# ---------------------------------------------------------------- the run's record


class Record:
    """The one results file: rewritten after every step."""

    def __init__(self, path: Path, dry_run: bool):
        self.path = path
        self.data = {"dry_run": dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                     "machine": platform.node(), "steps": {}}  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)

    def step(self, name: str, status: str, seconds: float, **details) -> None:
        self.data["steps"][name] = {"status": status, "seconds": round(seconds, 1), **details}
        self.path.write_text(json.dumps(self.data, indent=1, default=str))
        print(f"[{name}] {status} in {seconds:.0f} s" + (f": {details.get('why')}" if details.get("why") else ""),
              flush=True)  # fmt: skip


def _env(site: Path | None, extra: dict | None = None) -> dict:
    paths = [str(site)] if site and site.exists() else []
    paths += [str(ROOT / "src"), str(ROOT)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    env.update({"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    env.update(extra or {})
    return env


def _run(cmd: list[str], env: dict, timeout: float, log: Path) -> subprocess.CompletedProcess:
    """Run `cmd`, its output into `log` (and the last lines kept for the record)."""
    with open(log, "w") as out:
        return subprocess.run(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=max(timeout, 1), cwd=ROOT
        )


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------- 1. setup


def step_setup(args, record: Record) -> None:
    start = time.perf_counter()
    wheels = sorted(args.wheels.glob("*.whl")) if args.wheels.exists() else []
    names = {w.name.split("-")[0].lower() for w in wheels}
    missing = [n for n in REQUIRED_WHEELS if n not in names]
    details = {"wheels": [w.name for w in wheels], "missing_wheels": missing}
    if wheels and not args.dry_run:
        args.site.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(args.site), *map(str, wheels)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            record.step("setup", "failed", time.perf_counter() - start, why=done.stderr[-2000:], **details)
            return
    probe = (
        "import importlib, json\n"
        "out = {}\n"
        "for name in ['torch', 'transformers', 'peft', 'accelerate', 'datasets', 'triton', 'trl', 'liger_kernel',"
        " 'bitsandbytes', 'deepspeed', 'pyarrow', 'fsspec', 'tokenizers', 'huggingface_hub', 'tunesmith']:\n"
        "    try:\n"
        "        m = importlib.import_module(name); out[name] = getattr(m, '__version__', 'yes')\n"
        "    except Exception as e:\n"
        "        out[name] = f'ERROR {type(e).__name__}: {str(e)[:200]}'\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=_env(args.site), capture_output=True, text=True, cwd=ROOT
    )
    try:
        versions = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        versions = {"probe_error": done.stderr[-2000:]}
    details["versions"] = versions
    broken = [n for n in ("torch", "transformers", "peft", "accelerate", "datasets", "tunesmith")
              if str(versions.get(n, "ERROR")).startswith("ERROR")]  # fmt: skip
    status = "failed" if broken else "passed"
    why = f"cannot import {', '.join(broken)}" if broken else None
    if not wheels:
        why = (
            why + "; " if why else ""
        ) + f"no wheels in {args.wheels} (bench/gpu/fetch_wheels.sh makes them)"
    if args.site.exists() and not args.dry_run and str(args.site) not in sys.path:
        sys.path.insert(0, str(args.site))  # this process builds the model with the same transformers
    record.step("setup", status, time.perf_counter() - start, why=why, **details)


# ---------------------------------------------------------------- 2. doctor (the self-check)


def step_doctor(args, record: Record) -> None:
    start = time.perf_counter()
    log = args.logs / "doctor.log"
    out = args.logs / "doctor.json"
    cmd = [sys.executable, "-c",
           "import json, sys; from tunesmith.doctor import collect; "
           f"json.dump(collect(), open({str(out)!r}, 'w'), indent=1)"]  # fmt: skip
    done = _run(cmd, _env(args.site), args.remaining(120), log)
    if done.returncode != 0 or not out.exists():
        record.step("doctor", "failed", time.perf_counter() - start, why=_tail(log))
        return
    report = json.loads(out.read_text())
    checks = report["kernels"]["checks"]
    fell_back = [f"{c['op']} {c['shape_class']}: {c['error']}" for c in checks if not c["passed"]]
    status = "failed" if fell_back else "passed"
    if not checks:
        status = "skipped" if args.dry_run else "failed"
    record.step("doctor", status, time.perf_counter() - start, why=report["kernels"]["mode"] if not checks else None,
                fell_back=fell_back, checks=len(checks), report=report)  # fmt: skip


# ---------------------------------------------------------------- 3. gpu tests


def step_tests(args, record: Record) -> None:
    start = time.perf_counter()
    log = args.logs / "tests.log"
    junit = args.logs / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "tests/ops", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "-o", "addopts="]  # fmt: skip
    if args.dry_run:
        cmd.append("--collect-only")
    elif _has_module("xdist"):
        cmd += ["-n", "4"]  # compiling the kernels is most of the time; 4 processes share the GPU
    try:
        done = _run(cmd, _env(args.site), args.remaining(240), log)
    except subprocess.TimeoutExpired:
        record.step("tests", "failed", time.perf_counter() - start, why="timed out", tail=_tail(log))
        return
    counts = _junit_counts(junit)
    if args.dry_run:
        collected = sum(1 for line in log.read_text().splitlines() if "::" in line)
        status = "passed" if done.returncode == 0 and collected else "failed"
        record.step("tests", status, time.perf_counter() - start, why=f"dry run: {collected} gpu tests collected",
                    collected=collected, tail=_tail(log, 5))  # fmt: skip
        return
    status = (
        "passed" if done.returncode == 0 and counts.get("tests", 0) > counts.get("skipped", 0) else "failed"
    )
    record.step("tests", status, time.perf_counter() - start, **counts, tail=_tail(log, 30))


def _junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    return {k: int(suite.get(k, 0)) for k in keys} if suite is not None else {}


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------- 4/5. end to end


def _make_model_and_data(args) -> tuple[Path, Path, dict]:
    """A random Llama-3.2-1B-shaped model saved as safetensors (every contender loads the same
    file), and packed-length documents of random tokens as JSONL."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    shapes = TOY if args.dry_run else LLAMA_1B
    model_dir = args.work / ("toy" if args.dry_run else "llama-3.2-1b-shaped")
    if not (model_dir / "config.json").exists():
        torch.manual_seed(0)
        device = "cpu" if args.dry_run else "cuda"
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**shapes), dtype=torch.bfloat16)
        model.save_pretrained(model_dir, safe_serialization=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    # document lengths like instruction data: log-normal, median 350 tokens, at most the sequence length
    rng = random.Random(0)
    lengths = [
        max(16, min(args.seq_len, int(rng.lognormvariate(math.log(350), 0.9)))) for _ in range(args.documents)
    ]
    data = args.work / f"documents_{args.seq_len}_{args.documents}_{shapes['vocab_size']}.jsonl"
    if not data.exists():
        with open(data, "w") as f:
            for n in lengths:
                f.write(
                    json.dumps({"input_ids": [rng.randrange(7, shapes["vocab_size"]) for _ in range(n)]})
                    + "\n"
                )
    return model_dir, data, {"shapes": shapes, "lengths": lengths}


def matmul_peak_tflops() -> float:
    """bf16 matmul throughput of this GPU, measured now (8192³, mean of 10 after 3 warm-ups)."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    del a, b
    torch.cuda.empty_cache()
    return 2 * 8192**3 / seconds / 1e12


def step_e2e(args, record: Record, quant: str) -> None:
    name = "e2e" if quant == "none" else "qlora"
    start = time.perf_counter()
    if quant == "4bit" and args.dry_run:
        from transformers import BitsAndBytesConfig

        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")  # what the worker builds
        record.step(
            name, "skipped", 0.0, why="dry run: 4-bit weights need bitsandbytes on CUDA; e2e ran the worker"
        )
        return
    if quant == "4bit" and not _has_module_in(args, "bitsandbytes"):
        record.step(name, "failed", 0.0, why="bitsandbytes is not importable (no wheel in .whl?)")
        return
    model_dir, data, info = _make_model_and_data(args)
    contenders = [c for c in args.contenders if c in CONTENDERS]
    if quant == "4bit":
        contenders = [c for c in contenders if c != "tunesmith_no_triton"]
    available = {c: _has_module_in(args, CONTENDERS[c][0]) and
                 (c != "trl_liger" or _has_module_in(args, "liger_kernel")) for c in contenders}  # fmt: skip
    skipped = {c: "library not importable" for c, ok in available.items() if not ok}
    contenders = [c for c in contenders if available[c]]
    peak = None if args.dry_run else matmul_peak_tflops()
    fpt = flops_per_token(info["shapes"], info["lengths"])
    repeats = 1 if (args.dry_run or quant == "4bit") else args.repeats
    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    failures: dict[str, str] = {}
    for repeat in range(repeats):
        order = contenders if repeat % 2 == 0 else list(reversed(contenders))
        for contender in order:
            if contender == "tunesmith_no_triton" and repeat > 0:
                continue  # one run is enough to see what the kernels give
            if args.remaining(0) < 60:
                failures[contender] = "skipped: the time budget ran out"
                continue
            out = args.logs / f"{name}_{contender}_{repeat}.json"
            log = args.logs / f"{name}_{contender}_{repeat}.log"
            cmd = [sys.executable, __file__, "worker-e2e", "--contender", contender, "--quant", quant,
                   "--model", str(model_dir), "--data", str(data), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--seq-len", str(args.seq_len), "--batch", str(args.batch),
                   "--accum", str(args.accum), "--out", str(out)] + (["--dry-run"] if args.dry_run else [])  # fmt: skip
            print(f"[{name}] {contender} (repeat {repeat})", flush=True)
            try:
                done = _run(cmd, _env(args.site, CONTENDERS[contender][2]), args.remaining(60) - 30, log)
            except subprocess.TimeoutExpired:
                failures[contender] = "timed out"
                continue
            if done.returncode != 0 or not out.exists():
                failures[contender] = _tail(log)
                continue
            result = json.loads(out.read_text())
            if peak:
                result["mfu"] = result["tokens_per_s"] * fpt / (peak * 1e12)
            runs[contender].append(result)
    summary = _summarise(runs)
    # the training runs' own kernel checks (the shapes and dtypes they met): any that fell back
    fell_back = sorted({f"{c['op']} {c['shape_class']}: {c['error']}" for results in runs.values()
                        for r in results for c in r.get("kernel_checks", []) if not c["passed"]})  # fmt: skip
    status = "passed" if summary and not failures else ("failed" if not summary else "partial")
    record.step(name, status, time.perf_counter() - start, summary=summary, failures=failures, skipped=skipped,
                fell_back=fell_back,
                matmul_peak_tflops=peak, flops_per_token=fpt, loss_agreement=_loss_agreement(runs), runs=runs,
                targets=_targets(summary) if quant == "none" and not args.dry_run else None)  # fmt: skip


def _has_module_in(args, name: str) -> bool:
    versions = args.record.data["steps"].get("setup", {}).get("versions", {})
    if name in versions:
        return not str(versions[name]).startswith("ERROR")
    return _has_module(name)


def _summarise(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for contender, results in runs.items():
        if not results:
            continue
        out[contender] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
            "peak_allocated_gb": statistics.median(r["peak_allocated_gb"] for r in results),
            "peak_reserved_gb": statistics.median(r["peak_reserved_gb"] for r in results),
            "mfu": statistics.median(r["mfu"] for r in results) if all("mfu" in r for r in results) else None,
            "runs": len(results),
        }
    base, liger = out.get("trl_default"), out.get("trl_liger")
    for s in out.values():
        if base:
            s["x_trl_default"] = s["tokens_per_s"] / base["tokens_per_s"]
            if base["peak_allocated_gb"] > 0:  # 0 on the CPU (dry run): not measured
                s["memory_x_trl_default"] = s["peak_allocated_gb"] / base["peak_allocated_gb"]
        if liger:
            s["x_trl_liger"] = s["tokens_per_s"] / liger["tokens_per_s"]
    return out


def _targets(summary: dict) -> dict:
    ours = summary.get("tunesmith", {})
    met = {}
    for key, target in TARGETS.items():
        value = ours.get(key)
        if value is not None:
            met[key] = {"value": round(value, 3), "target": target,
                        "met": value <= target if key.startswith("memory") else value >= target}  # fmt: skip
    return met


def _loss_agreement(runs: dict[str, list[dict]]) -> dict:
    """Per contender against TRL default (first runs): mean and max |loss difference| over common steps,
    and the first and last losses. Packing differs between the libraries (which documents share a row),
    so the same steps see different rows: the curves agree in level and slope, not step by step."""
    base = runs.get("trl_default", [None])[0] if runs.get("trl_default") else None
    out = {}
    for contender, results in runs.items():
        if not results:
            continue
        losses = dict(results[0]["losses"])
        entry = {
            "first": losses.get(min(losses)) if losses else None,
            "last": losses.get(max(losses)) if losses else None,
        }
        if base and contender != "trl_default":
            ref = dict(base["losses"])
            common = sorted(set(losses) & set(ref))
            diffs = [abs(losses[s] - ref[s]) for s in common]
            if diffs:
                entry.update(
                    mean_abs_diff=statistics.fmean(diffs), max_abs_diff=max(diffs), steps=len(common)
                )
        out[contender] = entry
    return out


def worker_e2e(args) -> None:
    """One contender's run, in its own process: loads the saved model, trains `steps` optimizer steps,
    writes tokens/s (after `warmup` steps), peak GPU memory and the loss per step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback

    from bench.bench_e2e import TokenCounter
    from tests.tiny import tiny_tokenizer

    library, overrides, _ = CONTENDERS[args.contender]
    cuda = torch.cuda.is_available() and not args.dry_run
    torch.manual_seed(0)
    load = {"dtype": torch.bfloat16}
    if cuda:
        load["device_map"] = {"": 0}
    if args.quant == "4bit":
        from transformers import BitsAndBytesConfig

        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(args.model, **load)
    tokenizer = tiny_tokenizer()  # ids only matter for pad (0) / eos (2); the data is pre-tokenized
    rows = [json.loads(line) for line in open(args.data)]
    dataset = Dataset.from_list(rows)
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    common = dict(
        output_dir=str(Path(args.out).with_suffix("")) + "_out", per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum, max_length=args.seq_len, packing=True, learning_rate=2e-4,
        bf16=True, logging_steps=1, max_steps=args.steps, save_strategy="no", report_to="none", seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    if not cuda:
        common["use_cpu"] = True
    common.update(overrides)
    if library == "trl":
        from trl import SFTConfig, SFTTrainer
    else:
        from tunesmith import SFTConfig, SFTTrainer
    trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora)  # fmt: skip
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    marks, losses = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            marks.append((state.global_step, time.perf_counter(), counter.tokens))

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append((state.global_step, float(logs["loss"])))

    trainer.add_callback(Clock())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    warm = min(args.warmup, len(marks) - 2)
    (s0, t0, k0), (s1, t1, k1) = marks[warm], marks[-1]
    result = {
        "contender": args.contender, "quant": args.quant, "library": library, "measured_steps": s1 - s0,
        "seconds": t1 - t0, "tokens_per_s": (k1 - k0) / (t1 - t0), "losses": losses,
        "peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
        "environment": {k: os.environ.get(k) for k in ("TUNESMITH_KERNELS",)},
    }  # fmt: skip
    if library == "tunesmith":
        from tunesmith.ops import selfcheck

        result["kernel_checks"] = [r.as_dict() for r in selfcheck.results()]
    Path(args.out).write_text(json.dumps(result))


# ---------------------------------------------------------------- 6. distributed at world size 1


def accelerate_configs(work: Path) -> dict[str, Path]:
    """The shipped accelerate configs (configs/accelerate/fsdp.yaml: FSDP2; deepspeed-zero3.yaml:
    ZeRO-3) at world size 1, written to `work`; returned by name."""
    import yaml

    paths = {}
    for name, shipped in (("fsdp2", "fsdp.yaml"), ("zero3", "deepspeed-zero3.yaml")):
        config = yaml.safe_load((ROOT / "configs" / "accelerate" / shipped).read_text())
        config["num_processes"] = 1
        paths[name] = work / f"accelerate_{name}.yaml"
        paths[name].write_text(yaml.safe_dump(config))
    return paths


def step_dist(args, record: Record) -> None:
    start = time.perf_counter()
    configs = accelerate_configs(args.work)
    from accelerate.commands.config.config_args import load_config_from_file

    parsed = {name: load_config_from_file(str(path)).distributed_type.value for name, path in configs.items()}
    results, failures = {}, {}
    for backend in ("fsdp2", "zero3"):
        if backend == "zero3" and not _has_module_in(args, "deepspeed"):
            failures[backend] = (
                "skipped: deepspeed is not installed (bench/gpu/fetch_wheels.sh --with-deepspeed)"
            )
            continue
        folder = args.work / f"dist_{backend}"
        shutil.rmtree(folder, ignore_errors=True)
        outcome = {}
        for phase in ("full", "resume"):
            out, log = args.logs / f"dist_{backend}_{phase}.json", args.logs / f"dist_{backend}_{phase}.log"
            worker = [__file__, "worker-dist", "--phase", phase, "--folder", str(folder), "--out", str(out)]
            if args.dry_run:  # the worker's logic in one CPU process; the launch itself needs a GPU
                cmd = [sys.executable, *worker, "--dry-run"]
            else:
                cmd = [
                    sys.executable,
                    "-m",
                    "accelerate.commands.launch",
                    "--config_file",
                    str(configs[backend]),
                    *worker,
                ]
            try:
                done = _run(cmd, _env(args.site), min(args.remaining(30), 240), log)
            except subprocess.TimeoutExpired:
                outcome[phase] = {"ok": False, "why": "timed out"}
                break
            if done.returncode != 0 or not out.exists():
                outcome[phase] = {"ok": False, "why": _tail(log)}
                break
            outcome[phase] = json.loads(out.read_text())
        results[backend] = outcome
        if not all(o.get("ok") for o in outcome.values()) or len(outcome) < 2:
            failures[backend] = json.dumps(
                {p: o.get("why", "") for p, o in outcome.items() if not o.get("ok")}
            )[:3000]
            if args.dry_run:
                break  # one backend shows the logic; the second would run the same code
        if args.dry_run:
            break
    ran = [b for b in results if all(o.get("ok") for o in results[b].values()) and len(results[b]) == 2]
    real_failures = {b: w for b, w in failures.items() if not w.startswith("skipped")}
    status = "failed" if real_failures or not ran else ("partial" if failures else "passed")
    record.step(
        "dist", status, time.perf_counter() - start, configs=parsed, results=results, failures=failures
    )


def worker_dist(args) -> None:
    """LoRA on a small Llama through tunesmith's trainer under accelerate (FSDP2 / ZeRO-3 at world size 1).

    phase "full": 4 steps; Trainer checkpoints at 2 and 4, and `save_model` (what a user calls) after
    steps 2 and 4 into adapter-2 / adapter-4. phase "resume": a new trainer resumes from checkpoint-2;
    its adapter right after loading (saved the same way) must equal adapter-2 exactly, and after step 4
    the full run's adapter-4 (same data order and seed; up to 1e-3 relative for GPU reduction order).
    """
    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback

    from tests.tiny import tiny_tokenizer
    from tunesmith import SFTConfig, SFTTrainer

    folder = Path(args.folder)
    shapes = dict(LLAMA_1B, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, vocab_size=512)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**shapes), dtype=torch.float32)
    rng = random.Random(0)
    data = [{"input_ids": [rng.randrange(7, 512) for _ in range(rng.randrange(20, 120))]} for _ in range(64)]
    config = SFTConfig(
        output_dir=str(folder), per_device_train_batch_size=4, max_steps=4, save_steps=2, save_strategy="steps",
        logging_steps=1, report_to="none", seed=0, learning_rate=1e-3, bf16=not args.dry_run,
        use_cpu=args.dry_run, dataset_cache_dir=False, disable_tqdm=True,
    )  # fmt: skip
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tiny_tokenizer(),
                         peft_config=lora)  # fmt: skip
    result = {"phase": args.phase, "ok": True}

    def saved_adapter(name: str) -> dict:
        # the adapter as a user saves it (gathered from the shards by save_model)
        trainer.save_model(str(folder / name))
        files = sorted(p.name for p in (folder / name).iterdir())
        if "adapter_model.safetensors" not in files:
            raise FileNotFoundError(
                f"save_model wrote no adapter_model.safetensors in {folder / name}: {files}"
            )
        return load_file(str(folder / name / "adapter_model.safetensors"))

    def max_relative_diff(a: dict, b: dict) -> float:
        assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
        return max(
            ((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-12)).item() for k in a
        )

    class SaveAt(TrainerCallback):
        def __init__(self, steps: tuple[int, ...], prefix: str):
            self.steps, self.prefix = steps, prefix

        def on_train_begin(self, a, state, control, **kw):
            if 0 in self.steps or (self.prefix == "resumed" and state.global_step in self.steps):
                saved_adapter(f"{self.prefix}-{state.global_step}")

        def on_step_end(self, a, state, control, **kw):
            if state.global_step in self.steps:
                saved_adapter(f"{self.prefix}-{state.global_step}")

    if args.phase == "full":
        trainer.add_callback(SaveAt((2, 4), "adapter"))
        trainer.train()
        result["checkpoints"] = sorted(p.name for p in folder.glob("checkpoint-*"))
        result["ok"] = result["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
    else:
        trainer.add_callback(SaveAt((2, 4), "resumed"))
        trainer.train(resume_from_checkpoint=str(folder / "checkpoint-2"))
        saved = {
            step: load_file(str(folder / f"adapter-{step}" / "adapter_model.safetensors")) for step in (2, 4)
        }
        resumed = {step: load_file(str(folder / f"resumed-{step}" / "adapter_model.safetensors"))
                   for step in (2, 4) if (folder / f"resumed-{step}").exists()}  # fmt: skip
        if 2 not in resumed:
            result.update(ok=False, why="the resumed run did not start at step 2")
        else:
            result["resumed_vs_saved_step_2"] = max_relative_diff(resumed[2], saved[2])
            result["final_vs_uninterrupted_step_4"] = max_relative_diff(resumed[4], saved[4])
            result["ok"] = (
                result["resumed_vs_saved_step_2"] == 0.0 and result["final_vs_uninterrupted_step_4"] <= 1e-3
            )
    Path(args.out).write_text(json.dumps(result))


# ---------------------------------------------------------------- summary and main


def summary_text(data: dict) -> str:
    lines = [f"GPU run {'(DRY RUN: no GPU steps) ' if data['dry_run'] else ''}started {data['started']}"]
    for name, step in data["steps"].items():
        lines.append(
            f"  {name:7s} {step['status']:8s} {step['seconds']:6.0f} s  {step.get('why') or ''}".rstrip()
        )
        if step.get("fell_back"):
            lines += [f"          fell back: {f}" for f in step["fell_back"]]
        if name == "tests" and "tests" in step:
            lines.append(f"          {step['tests']} tests, {step['failures']} failed, {step['errors']} errors, "
                         f"{step['skipped']} skipped")  # fmt: skip
        for contender, s in (step.get("summary") or {}).items():
            mfu = f", MFU {s['mfu']:.1%}" if s.get("mfu") else ""
            rel = f", {s['x_trl_default']:.2f}x TRL default" if "x_trl_default" in s else ""
            rel += f", {s['x_trl_liger']:.2f}x TRL+Liger" if "x_trl_liger" in s else ""
            mem = f", memory {s['memory_x_trl_default']:.2f}x" if "memory_x_trl_default" in s else ""
            lines.append(f"          {contender}: {s['tokens_per_s']:.0f} tok/s, peak {s['peak_allocated_gb']:.1f} GB"
                         f"{mfu}{rel}{mem} ({s['runs']} runs)")  # fmt: skip
        for contender, agree in (step.get("loss_agreement") or {}).items():
            if agree.get("first") is None:
                continue
            vs = (
                f", mean |loss - TRL default's| {agree['mean_abs_diff']:.4f} over {agree['steps']} steps"
                if "steps" in agree
                else ""
            )
            lines.append(f"          {contender} loss {agree['first']:.4f} -> {agree['last']:.4f}{vs}")
        for key, t in (step.get("targets") or {}).items():
            lines.append(
                f"          target {key}: {t['value']} (target {t['target']}): {'met' if t['met'] else 'NOT met'}"
            )
        for what, why in (step.get("failures") or {}).items():
            lines.append(f"          {what}: {str(why).splitlines()[-1] if str(why).strip() else why}")
    return "\n".join(lines)


STEPS = ("setup", "doctor", "tests", "e2e", "qlora", "dist")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode")
    for name in ("worker-e2e", "worker-dist"):
        w = sub.add_parser(name)
        w.add_argument("--out", required=True)
        w.add_argument("--dry-run", action="store_true")
    we, wd = sub.choices["worker-e2e"], sub.choices["worker-dist"]
    we.add_argument("--contender", choices=list(CONTENDERS), required=True)
    we.add_argument("--quant", choices=("none", "4bit"), default="none")
    for flag in ("--model", "--data"):
        we.add_argument(flag, required=True)
    for flag, default in (
        ("--steps", 13),
        ("--warmup", 3),
        ("--seq-len", 2048),
        ("--batch", 4),
        ("--accum", 2),
    ):
        we.add_argument(flag, type=int, default=default)
    wd.add_argument("--phase", choices=("full", "resume"), required=True)
    wd.add_argument("--folder", required=True)

    parser.add_argument("--dry-run", action="store_true", help="everything but the GPU steps, on the CPU")
    parser.add_argument("--only", nargs="+", choices=STEPS, help="run only these steps (setup always runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu_results.json")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    parser.add_argument("--site", type=Path, default=Path("/tmp/tunesmith-site"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunesmith-gpu"))
    parser.add_argument(
        "--budget", type=float, default=570.0, help="seconds for the whole run; later steps skip"
    )
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=13, help="optimizer steps per e2e run")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps excluded from the timing")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--documents", type=int, default=1500)
    args = parser.parse_args(argv)
    if args.mode == "worker-e2e":
        worker_e2e(args)
        return 0
    if args.mode == "worker-dist":
        worker_dist(args)
        return 0

    deadline = time.perf_counter() + args.budget
    args.remaining = lambda reserve: deadline - time.perf_counter() - reserve
    if args.dry_run:  # toy sizes: the same code in seconds
        args.steps, args.warmup, args.seq_len, args.batch, args.accum, args.documents = 3, 1, 256, 2, 1, 40
    args.work.mkdir(parents=True, exist_ok=True)
    args.logs = args.out.parent / "gpu_logs"
    args.logs.mkdir(parents=True, exist_ok=True)
    record = args.record = Record(args.out, args.dry_run)
    steps = [s for s in STEPS if s == "setup" or not args.only or s in args.only]
    actions = {"setup": step_setup, "doctor": step_doctor, "tests": step_tests, "dist": step_dist,
               "e2e": lambda a, r: step_e2e(a, r, "none"), "qlora": lambda a, r: step_e2e(a, r, "4bit")}  # fmt: skip
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run on a machine without a GPU", file=sys.stderr)
            return 2
    for name in steps:
        if args.remaining(0) < 20:
            record.step(name, "skipped", 0.0, why="the time budget ran out")
            continue
        step_start = time.perf_counter()
        try:
            actions[name](args, record)
        except Exception as exc:  # one broken step must not lose the others' results
            import traceback

            record.step(name, "failed", time.perf_counter() - step_start, why=f"{type(exc).__name__}: {exc}",
                        traceback=traceback.format_exc()[-3000:])  # fmt: skip
    text = summary_text(record.data)
    record.data["summary"] = text
    record.path.write_text(json.dumps(record.data, indent=1, default=str))
    print(text)
    print(f"results: {record.path}")
    failed = [n for n, s in record.data["steps"].items() if s["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
