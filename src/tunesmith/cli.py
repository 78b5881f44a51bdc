"""`tunesmith`: one YAML file to a fine-tuned model.

    tunesmith train [CONFIG.yaml] [key=value ...]   no config: the built-in quick start
    tunesmith preprocess CONFIG [key=value ...]     tokenize, pack, cache; print the statistics
    tunesmith inspect CONFIG|DATA [key=value ...]   examples as the model sees them, trained vs masked
    tunesmith generate MODEL --prompt TEXT          from an adapter folder or a model
    tunesmith chat MODEL                            a conversation on stdin
    tunesmith merge ADAPTER --output DIR            LoRA merged into 16-bit safetensors
    tunesmith export MODEL --gguf FILE [--type] [--ollama DIR]   GGUF (+ Ollama Modelfile)
    tunesmith doctor [--json]                       device, versions, and a check of every Triton kernel
    tunesmith config --list [--section NAME]        every config key: section, type, default, help

The YAML file is SFTConfig's serialised form (see `tunesmith.config`) plus one section the CLI
reads itself, naming the data:

    dataset:
      train: data/train.jsonl   # a file, a folder, or a Hub dataset name; "quickstart" = the built-in task
      eval: data/eval.jsonl     # optional
      split: train              # optional: the split of a Hub dataset / DatasetDict
      eval_split: test          # optional

(`dataset: data/train.jsonl` is short for `dataset: {train: data/train.jsonl}`.)

Everything heavy (torch, transformers) is imported inside the command that needs it, so `--help`
answers at once. Errors in the configuration print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path

EXIT_CONFIG_ERROR = 2
DATA_KEYS = ("train", "eval", "split", "eval_split")
QUICKSTART_DATA = "quickstart"
# config.SECTIONS' names, here so that the parser does not import the config (and transformers)
CONFIG_SECTIONS = ("model", "lora", "data", "training", "kernels", "eval")


class UsageError(ValueError):
    """A problem with what the user asked for (config, paths): one line, exit status 2."""


# ----------------------------------------------------------------------------- config + data


@dataclass
class DataSpec:
    train: str | None = None
    eval: str | None = None
    split: str | None = None
    eval_split: str | None = None


def _data_spec(value, where: str) -> DataSpec:
    if value is None:
        return DataSpec()
    if isinstance(value, str):
        return DataSpec(train=value)
    if not isinstance(value, dict):
        raise UsageError(
            f"{where}: `dataset` is a path or a section with {', '.join(DATA_KEYS)}; got {value!r}"
        )
    for key in value:
        if key not in DATA_KEYS:
            close = difflib.get_close_matches(str(key), DATA_KEYS, n=1)
            hint = f" Did you mean `dataset.{close[0]}`?" if close else f" Valid: {', '.join(DATA_KEYS)}."
            raise UsageError(f"{where}: unknown key `dataset.{key}`.{hint}")
        if value[key] is not None and not isinstance(value[key], str):
            raise UsageError(f"{where}: `dataset.{key}` expects a string, got {value[key]!r}")
    return DataSpec(**value)


def read_run_config(path: str | Path | None, overrides=()):
    """(SFTConfig, DataSpec, raw config dict) from a YAML file (None: defaults) and key=value overrides.

    The `dataset` section and `dataset.*` overrides are read here; everything else goes through
    `load_config`, whose messages name the file.
    """
    import yaml

    from tunesmith.config import ConfigError, load_config

    where = str(path) if path else "<defaults>"
    raw: dict = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise UsageError(f"{where}: no such config file")
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise UsageError(f"{where}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise UsageError(f"{where}: the top level must be a mapping of keys to values")
    raw = dict(raw)
    data = _data_spec(raw.pop("dataset", None), where)
    rest = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if key == "dataset" or key.startswith("dataset."):
            sub = key.partition(".")[2] or "train"
            if not sep:
                raise UsageError(f"override {item!r}: write it as key=value, e.g. dataset.train=data.jsonl")
            data = _data_spec({**vars(data), sub: value or None}, f"override {item!r}")
        else:
            rest.append(item)
    try:
        config = load_config(raw, rest)
    except ConfigError as err:
        # load_config saw a dict; name the file the user wrote instead
        raise UsageError(str(err).replace("<dict>", where, 1)) from None
    return config, data, raw


def _check_model(name: str | None) -> str:
    """The model to load; a path that does not exist is a config error (a Hub id is not checked here)."""
    from tunesmith.models.load import DEFAULT_ALIASES

    if name is None or name.lower() in DEFAULT_ALIASES:
        return name or "default"
    looks_local = name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1
    if looks_local and not Path(name).expanduser().exists():
        raise UsageError(
            f"model.name_or_path: {name} does not exist. Give a local model folder, a .gguf file, "
            "a Hub id, or `default` for the built-in SmolLM2-135M-Instruct"
        )
    return name


def _load_source(source: str, split: str | None):
    """A file/folder/Hub name as prepare_dataset reads it; with a split, loaded here with that split."""
    if split is None:
        return source
    from tunesmith.data.sources import load_source

    return load_source(source, split=split)


# ----------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    if args.config and "=" in args.config and not Path(args.config).exists():
        # `tunesmith train lora.r=8`: no config file, only overrides of the quick start
        args.overrides, args.config = [args.config, *args.overrides], None
    config, data, raw = read_run_config(args.config, args.overrides)
    if config.datasets and data.train is not None:
        raise UsageError(f"{args.config}: give either `dataset` or `datasets` (several sources), not both")
    if data.train in (None, QUICKSTART_DATA) and not config.datasets:
        if args.config is not None and data.train is None:
            raise UsageError(
                f"{args.config}: no `dataset` section; add `dataset: {{train: path/to/data.jsonl}}`"
            )
        from tunesmith.quickstart import run_quickstart

        resume = _resume_command(args)
        _apply_threads(show=True)
        if args.config is None:  # the quick start's own settings plus the overrides
            run_quickstart([o for o in args.overrides if not o.startswith("dataset")], resume_command=resume)
        else:  # the file's settings, overrides applied
            run_quickstart(config=config, resume_command=resume)
        return 0

    from tunesmith.callbacks import (
        ProgressLineCallback,
        TrainingStopped,
        no_save_progress_bars,
        progress_lines_only,
    )
    from tunesmith.checkpoint import check_output_dir
    from tunesmith.report import MetricsCallback, samples_from_history, write_report
    from tunesmith.trainer import SFTTrainer

    model = _check_model(config.model_name_or_path)
    check_output_dir(
        config.output_dir, overwrite=config.overwrite_output_dir, resume=config.resume_from_checkpoint
    )
    threads = _apply_threads(show=True)
    config.save_resolved(config.output_dir)
    trainer = SFTTrainer(
        model,
        args=config,
        train_dataset=_load_source(data.train, data.split) if data.train else None,
        eval_dataset=_load_source(data.eval, data.eval_split) if data.eval else None,
        callbacks=[MetricsCallback(), ProgressLineCallback()],
    )
    progress_lines_only(trainer)
    if "train" in trainer.data_stats:  # examples in/out, truncated, dropped, how the file was read
        print(trainer.data_stats["train"].summary(), file=sys.stderr, flush=True)
    with no_save_progress_bars():
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    final = {k: v for r in trainer.state.log_history for k, v in r.items() if k in ("loss", "eval_loss")}
    notes = [f"final {k}: {v:.4f}" for k, v in final.items()] + [f"data: {data.train}", f"model: {model}"]
    if trainer.mixture_stats is not None:  # several sources: the data line per source
        notes[-2] = "data:\n\n```\n" + trainer.mixture_stats.summary() + "\n```\n"
    notes.append(threads.line())
    title = f"tunesmith run: {Path(config.output_dir).name}"
    sections = _evaluation_sections(trainer)
    generations = samples_from_history(trainer.state.log_history)
    if trainer.stopped_by:
        # not finished: no final model in output_dir (the checkpoint holds it), a report that says so
        stop = TrainingStopped(
            trainer.stopped_by, trainer.state.global_step, trainer.state.max_steps, _resume_command(args)
        )
        write_report(
            config.output_dir,
            title=f"{title} (STOPPED EARLY)",
            notes=[f"**{stop}**", *notes],
            sections=sections,
            generations=generations,
        )
        raise stop
    with no_save_progress_bars():
        trainer.save_model()
    write_report(config.output_dir, title=title, notes=notes, sections=sections, generations=generations)
    print(f"done: model and report in {config.output_dir}")
    return 0


def _apply_threads(show: bool = False):
    """The thread rule of `tunesmith.threads`, for every command; `show`: print it (a training run)."""
    from tunesmith.threads import apply_thread_rule

    choice = apply_thread_rule()
    if show:
        print(choice.line(), file=sys.stderr, flush=True)
    return choice


def _resume_command(args) -> str:
    """The command line that resumes this `tunesmith train` run."""
    import shlex

    kept = [o for o in args.overrides if not o.startswith("resume_from_checkpoint=")]
    words = ["tunesmith", "train", *([args.config] if args.config else []), *kept]
    return shlex.join([*words, "resume_from_checkpoint=true"])


def _evaluation_sections(trainer) -> list[str]:
    """report.md's evaluation part: the last eval metrics per eval set, the best checkpoint, generations."""
    from tunesmith.evaluation import report_sections

    state, args = trainer.state, trainer.args
    return report_sections(
        state.log_history,
        samples=trainer.generation_eval.samples if trainer.generation_eval is not None else (),
        best_checkpoint=state.best_model_checkpoint,
        best_metric=state.best_metric,
        metric_name=args.metric_for_best_model,
    )


def _prepare(config, source, split, tokenizer):
    from tunesmith.data.pipeline import prepare_dataset
    from tunesmith.data.settings import DataSettings
    from tunesmith.data.vision import is_processor, prepare_vision_dataset

    if is_processor(tokenizer):  # a vision-language model: what the trainer would prepare
        return prepare_vision_dataset(_load_source(source, split), tokenizer, max_length=config.max_length)
    return prepare_dataset(_load_source(source, split), tokenizer, DataSettings.from_config(config))


def _prepare_mixture(config, tokenizer):
    from tunesmith.data.mixture import prepare_mixture
    from tunesmith.data.settings import DataSettings

    settings = DataSettings.from_config(config)
    return prepare_mixture(config.datasets, tokenizer, settings, eval_packing=config.eval_packing)


def _tokenizer_for(config):
    """The model's tokenizer, or its processor for a vision-language model."""
    from tunesmith.models.load import load_tokenizer
    from tunesmith.models.vision import image_text_class, load_processor

    name = _check_model(config.model_name_or_path)
    if config.model_gguf_file is None and image_text_class(name, trust_remote_code=config.trust_remote_code):
        return load_processor(name, trust_remote_code=config.trust_remote_code)
    return load_tokenizer(
        _check_model(config.model_name_or_path),
        trust_remote_code=config.trust_remote_code,
        gguf_file=config.model_gguf_file,
        pad_token=config.pad_token,
    )


def cmd_preprocess(args) -> int:
    config, data, _ = read_run_config(args.config, args.overrides)
    if config.datasets:
        _apply_threads()
        mixture = _prepare_mixture(config, _tokenizer_for(config))
        print(f"[train]\n{mixture.stats.summary()}")
        for name, rows in mixture.eval_datasets.items():
            print(f"[eval_{name}] {len(rows)} rows")
        return 0
    if data.train in (None, QUICKSTART_DATA):
        raise UsageError(f"{args.config}: preprocess needs `dataset.train` (a file, folder or Hub name)")
    _apply_threads()
    tokenizer = _tokenizer_for(config)
    for name, source, split in (("train", data.train, data.split), ("eval", data.eval, data.eval_split)):
        if source:
            stats = _prepare(config, source, split, tokenizer).stats
            print(f"[{name}]\n{stats.summary()}\n{format_histogram(stats.length_histogram)}")
    return 0


def cmd_inspect(args) -> int:
    target = Path(args.target)
    if target.suffix in (".yaml", ".yml"):
        config, data, _ = read_run_config(target, args.overrides)
        if data.train == QUICKSTART_DATA:
            data.train = None
        source, split = data.train, data.split
        if source is None and not config.datasets:
            from tunesmith.quickstart import make_splits

            source = make_splits(num_train=200, num_heldout=1).train  # the built-in task's data
    else:
        config, _, _ = read_run_config(None, args.overrides)
        source, split = args.target, None
        if not target.exists() and args.target.startswith((".", "/", "~")):
            raise UsageError(f"{args.target}: no such file or folder")
    if args.model:
        config.model_name_or_path = args.model
    _apply_threads()
    tokenizer = _tokenizer_for(config)
    if config.datasets and target.suffix in (".yaml", ".yml"):  # several sources: the mixture's rows
        prepared = _prepare_mixture(config, tokenizer)
    else:
        prepared = _prepare(config, source, split, tokenizer)
    color = sys.stdout.isatty() and not args.no_color
    if hasattr(prepared, "rows"):  # vision data (data.vision.VisionDataset)
        return _inspect_vision(prepared, tokenizer, args.num, color)
    legend = (
        f"{_TRAINED}trained{_RESET} / {_MASKED}masked{_RESET}"
        if color
        else "[[trained]] tokens are in double brackets; the rest is masked (label -100)"
    )
    print(f"{len(prepared.dataset)} rows; showing {min(args.num, len(prepared.dataset))}. {legend}\n")
    for i, row in enumerate(prepared.dataset.select(range(min(args.num, len(prepared.dataset))))):
        lengths = row.get("seq_lengths") or [len(row["input_ids"])]
        print(f"--- row {i}: {len(row['input_ids'])} tokens, {len(lengths)} document(s) {lengths}")
        start = 0
        for d, length in enumerate(lengths):  # packed rows: each document under its own header
            if len(lengths) > 1:
                print(f"· document {d + 1}/{len(lengths)}, {length} tokens")
            end = start + length
            print(
                render_tokens(tokenizer, row["input_ids"][start:end], row["labels"][start:end], color=color)
            )
            start = end
        print()
    print(prepared.stats.summary())
    print(format_histogram(getattr(prepared.stats, "length_histogram", {})))
    return 0


def _inspect_vision(prepared, processor, num: int, color: bool) -> int:
    from tunesmith.data.vision import render_row

    tokenizer = processor.tokenizer
    legend = (
        f"{_TRAINED}trained{_RESET} / {_MASKED}masked{_RESET}"
        if color
        else "[[trained]] tokens are in double brackets; the rest is masked (label -100)"
    )
    shown = min(num, len(prepared))
    print(f"{len(prepared)} rows; showing {shown}. {legend}; images are never trained\n")
    for i in range(shown):
        row = prepared[i]
        print(
            f"--- row {i}: {row['length']} tokens, of which {row['image_tokens']} for {len(row['images'])} image(s)"
        )
        print(
            render_row(processor, row, lambda ids, labels: render_tokens(tokenizer, ids, labels, color=color))
        )
        print()
    print(prepared.stats.summary())
    return 0


def _images(args, tokenizer):
    """The --image files as generate()'s images argument (None without any); checked here."""
    if not args.image:
        return None
    if not hasattr(tokenizer, "image_processor"):
        raise UsageError(f"{args.model}: --image needs a vision-language model; this one reads text only")
    for path in args.image:
        if not Path(path).is_file():
            raise UsageError(f"--image {path}: no such file")
    return [list(args.image)]


def cmd_generate(args) -> int:
    from tunesmith.generation import generate

    _apply_threads()
    model, tokenizer = _load_for_generation(args.model)
    images = _images(args, tokenizer)
    if images and args.raw:
        raise UsageError("--image and --raw do not go together: images are placed by the chat template")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    prompt = args.prompt if args.raw or not tokenizer.chat_template else messages
    (text,) = generate(
        model,
        tokenizer,
        [prompt],
        max_new_tokens=args.max_new_tokens,
        chat_template_kwargs=_template_kwargs(args),
        images=images,
        **_sampling(args.temperature),
    )
    print(text)
    return 0


def cmd_chat(args) -> int:
    from tunesmith.generation import generate

    _apply_threads()
    model, tokenizer = _load_for_generation(args.model)
    images = _images(args, tokenizer)  # shown with the first user message of the conversation
    if not tokenizer.chat_template:
        raise UsageError(f"{args.model}: the tokenizer has no chat template; use `tunesmith generate --raw`")
    history = [{"role": "system", "content": args.system}] if args.system else []
    template_kwargs = _template_kwargs(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: type a message; an empty line or Ctrl-D ends, /reset forgets the conversation")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        (reply,) = generate(
            model,
            tokenizer,
            [history],
            max_new_tokens=args.max_new_tokens,
            chat_template_kwargs=template_kwargs,
            images=images,
            **_sampling(args.temperature),
        )
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)


def cmd_merge(args) -> int:
    from tunesmith.export import merge_adapter

    _need_folder(args.adapter)
    _apply_threads()
    out = merge_adapter(args.adapter, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"merged model written to {out}")
    return 0


def cmd_export(args) -> int:
    from tunesmith.export import export_gguf

    _need_folder(args.model)
    if args.gguf is None and args.ollama is None:
        raise UsageError("export: give --gguf FILE, --ollama DIR, or both")
    _apply_threads()
    gguf = (
        Path(args.gguf)
        if args.gguf
        else Path(args.ollama) / f"{Path(args.model).resolve().name}-{args.type}.gguf"
    )
    out = export_gguf(
        args.model, gguf, type=args.type, pre_tokenizer=args.pre_tokenizer, max_shard_size=args.max_shard_size
    )
    shards = (
        sorted(out.parent.glob(out.name.replace("-00001-of-", "-*-of-")))
        if "-00001-of-" in out.name
        else [out]
    )
    size = sum(p.stat().st_size for p in shards) / 2**20
    where = f"{out} (+ {len(shards) - 1} more shards)" if len(shards) > 1 else str(out)
    print(f"GGUF ({args.type}) written to {where} ({size:.1f} MiB)")
    print(f"  run it in llama.cpp: llama-cli -m {out} -cnv   (or llama-server -m {out})")
    if args.ollama:
        from tunesmith.export.ollama import write_modelfile

        modelfile = write_modelfile(args.model, args.ollama, out)
        print(f"Ollama Modelfile written to {modelfile}")
        print(f"  run it in Ollama: ollama create my-model -f {modelfile} && ollama run my-model")
        if len(shards) > 1:
            print(
                "  note: Ollama releases before split-GGUF import (ollama/ollama#5245) refuse sharded files; "
                "for those, export without --max-shard-size"
            )
    return 0


def cmd_config(args) -> int:
    if not args.list:
        raise UsageError("say what to show: `tunesmith config --list` prints every config key")
    from tunesmith.config.listing import format_keys

    print(format_keys(args.section))
    return 0


def cmd_doctor(args) -> int:
    from tunesmith.doctor import main as doctor

    return doctor(as_json=args.json, check_kernels=not args.no_check)


def _need_folder(path: str) -> None:
    if not Path(path).is_dir():
        raise UsageError(f"{path}: no such folder (expected a model or adapter folder)")


def _template_kwargs(args) -> dict | None:
    """--chat-template-kwargs JSON, else the `data.chat_template_kwargs` the run was trained with (its
    tunesmith_config.yaml in the model folder), else None: generation renders prompts as training did."""
    import json

    if args.chat_template_kwargs is not None:
        try:
            value = json.loads(args.chat_template_kwargs)
        except json.JSONDecodeError as err:
            raise UsageError(
                f"--chat-template-kwargs: not valid JSON ({err.msg}); e.g. '{{\"enable_thinking\": false}}'"
            ) from None
        if not isinstance(value, dict):
            raise UsageError(f"--chat-template-kwargs: expected a JSON object, got {value!r}")
        return value
    saved = Path(args.model) / "tunesmith_config.yaml"
    if saved.is_file():
        import yaml

        data = (yaml.safe_load(saved.read_text()) or {}).get("data") or {}
        return data.get("chat_template_kwargs") or None
    return None


def _sampling(temperature: float) -> dict:
    return {"do_sample": True, "temperature": temperature} if temperature > 0 else {}


def _load_for_generation(path: str):
    """(model, tokenizer) from an adapter folder (base + adapter), a model folder, a .gguf or `default`;
    a vision-language model comes with its processor in place of the tokenizer."""
    from tunesmith.export import is_adapter_dir
    from tunesmith.models.load import check_safetensors_files, load_model, load_tokenizer
    from tunesmith.models.vision import image_text_class, load_processor

    if is_adapter_dir(path):
        import json

        check_safetensors_files(path)  # a torn adapter is named before the base model loads
        from peft import PeftModel

        base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
        has_tokenizer = (Path(path) / "tokenizer_config.json").exists()
        if image_text_class(base):
            has_processor = any(
                (Path(path) / f).exists() for f in ("processor_config.json", "preprocessor_config.json")
            )
            tokenizer = load_processor(path if has_processor else base)
        else:
            tokenizer = load_tokenizer(path if has_tokenizer else base)
        from tunesmith.models.adapters import peft_deprecations_silenced

        with peft_deprecations_silenced():
            return PeftModel.from_pretrained(load_model(base), path).eval(), tokenizer
    name = _check_model(path)
    if not name.endswith(".gguf") and image_text_class(name):
        return load_model(name).eval(), load_processor(name)
    return load_model(name).eval(), load_tokenizer(name)


# ----------------------------------------------------------------------------- display helpers

_TRAINED, _MASKED, _RESET = "\033[1;32m", "\033[2;37m", "\033[0m"


def render_tokens(tokenizer, input_ids, labels, *, color: bool) -> str:
    """The example's text with trained and masked tokens told apart.

    Runs of consecutive tokens with the same status are decoded together (byte-level BPE tokens
    are not always text on their own). Without colour, trained runs are wrapped in `[[...]]`:

        input_ids  "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello<|im_end|>\\n"
        labels     -100 ... -100 (prompt)                                   trained  trained  -100
        rendered   "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n[[Hello<|im_end|>]]\\n"
    """
    pieces = []
    start = 0
    trained = [label != -100 for label in labels]
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or trained[end] != trained[start]:
            text = tokenizer.decode(input_ids[start:end], skip_special_tokens=False)
            if color:
                pieces.append(f"{_TRAINED if trained[start] else _MASKED}{text}{_RESET}")
            else:
                pieces.append(f"[[{text}]]" if trained[start] else text)
            start = end
    return "".join(pieces)


def format_histogram(histogram: dict, width: int = 40) -> str:
    """Lengths as a text bar chart; bins are [previous edge, edge), the last one includes the maximum.

    >>> print(format_histogram({"edges": [32, 50], "counts": [3, 1]}, width=6))
    example lengths (tokens):
             0-31   ██████ 3
            32-50   ██ 1
    """
    if not histogram or not histogram.get("counts"):
        return "example lengths: (none)"
    edges, counts = histogram["edges"], histogram["counts"]
    top = max(counts) or 1
    lines = ["example lengths (tokens):"]
    for i, count in enumerate(counts):
        low, high = (edges[i - 1] if i else 0), (edges[i] if i == len(counts) - 1 else edges[i] - 1)
        bar = "█" * max(1 if count else 0, round(width * count / top))
        lines.append(f"  {f'{low}-{high}':>11}   {bar} {count}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunesmith",
        description="Supervised fine-tuning of causal language models, from one YAML file.",
        epilog="`tunesmith train` with no config runs the built-in quick start (offline, CPU, about 5 minutes on 2 idle cores).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    overrides = {
        "nargs": "*",
        "default": [],
        "metavar": "key=value",
        "help": "override config keys (dotted: lora.r=8)",
    }

    p = sub.add_parser(
        "train",
        help="train from a YAML config (none: the built-in quick start)",
        add_help=False,
        epilog="Every config key follows (also: tunesmith config --list).",
    )
    p.add_argument("-h", "--help", action=_HelpWithConfigKeys, help="show this help and every config key")
    p.add_argument("config", nargs="?", help="YAML config file; omit for the quick start")
    p.add_argument("overrides", **overrides)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("preprocess", help="tokenize, pack and cache the config's data; print statistics")
    p.add_argument("config")
    p.add_argument("overrides", **overrides)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("inspect", help="show examples as the model sees them: trained vs masked tokens")
    p.add_argument("target", help="a YAML config, or a data file/folder")
    p.add_argument("overrides", **overrides)
    p.add_argument("-n", "--num", type=int, default=3, help="rows to show (default 3)")
    p.add_argument("--model", help="tokenizer to use (default: the config's model, else the built-in one)")
    p.add_argument("--no-color", action="store_true", help="plain [[trained]] markers even on a terminal")
    p.set_defaults(func=cmd_inspect)

    for name, helptext in (("generate", "generate from a prompt"), ("chat", "chat on stdin")):
        p = sub.add_parser(name, help=f"{helptext} with an adapter folder, a model folder or `default`")
        p.add_argument("model")
        if name == "generate":
            p.add_argument("--prompt", required=True)
            p.add_argument("--raw", action="store_true", help="do not apply the chat template")
        p.add_argument("--system", help="system message")
        p.add_argument(
            "--image",
            action="append",
            default=[],
            metavar="PATH",
            help="an image for a vision-language model (repeat for several; shown with the first message)",
        )
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        p.add_argument(
            "--chat-template-kwargs",
            metavar="JSON",
            help="template variables, e.g. '{\"enable_thinking\": false}' (default: the training run's "
            "chat_template_kwargs from the folder's tunesmith_config.yaml)",
        )
        p.set_defaults(func=cmd_generate if name == "generate" else cmd_chat)

    p = sub.add_parser("merge", help="merge a LoRA adapter into 16-bit safetensors")
    p.add_argument("adapter")
    p.add_argument("--output", required=True, help="folder for the merged model")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--max-shard-size", help="safetensors shards of at most this size, e.g. 5GB")
    p.set_defaults(func=cmd_merge)

    from tunesmith.export.gguf_file import GGUF_TYPES

    p = sub.add_parser(
        "export",
        help="write a model or adapter folder as GGUF (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3) "
        "and an Ollama Modelfile",
    )
    p.add_argument("model")
    p.add_argument("--gguf", help="output .gguf file (default with --ollama: DIR/NAME-TYPE.gguf)")
    p.add_argument(
        "--type",
        default="f16",
        choices=GGUF_TYPES,
        help="f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 written directly; q4_k_m q5_k_m q6_k by llama.cpp's "
        "quantizer (pip install 'tunesmith[gguf]')",
    )
    p.add_argument("--ollama", metavar="DIR", help="also write DIR/Modelfile (chat template, stop tokens)")
    p.add_argument("--max-shard-size", help="split the GGUF into shards of at most this size, e.g. 2GB")
    p.add_argument("--pre-tokenizer", help="llama.cpp's pre-tokenizer name, if the one detected is wrong")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "doctor", help="device, versions, precision, attention, 4-bit, and a check of every Triton kernel"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-check", action="store_true", help="do not run the kernel checks")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("config", help="list every config key with its section, type, default and help")
    p.add_argument("--list", action="store_true", help="print every key, grouped by YAML section")
    p.add_argument("--section", choices=CONFIG_SECTIONS, help="only this section's keys")
    p.set_defaults(func=cmd_config)
    return parser


class _HelpWithConfigKeys(argparse.Action):
    """`train --help`: the usual help, then every config key (imports the config only when asked)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from tunesmith.config.listing import format_keys

        parser.print_help()
        print()
        print(format_keys())
        parser.exit()


def main(argv=None) -> int:
    parser = build_parser()
    # overrides may also follow options (`inspect data.jsonl --model m max_length=64`), where argparse
    # leaves them unparsed
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except UsageError as err:
        print(f"tunesmith {args.command}: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except Exception as err:
        from tunesmith.callbacks import TrainingStopped

        if isinstance(err, TrainingStopped):  # saved, not finished: 128 + the signal, as a shell shows it
            print(f"tunesmith {args.command}: {err}", file=sys.stderr)
            return err.exit_status
        # our own "for people" errors (config, data, export) print as one line; anything else is a bug
        # and keeps its traceback
        from tunesmith.config import ConfigError

        known = (ConfigError,) + _known_errors()
        if isinstance(err, known):
            print(f"tunesmith {args.command}: {err}", file=sys.stderr)
            return EXIT_CONFIG_ERROR if isinstance(err, ConfigError) else 1
        if isinstance(err, OSError) and not isinstance(err, (BrokenPipeError, InterruptedError)):
            # from_pretrained's "not a local folder and not on the Hub" (and unreadable files): the
            # message already says what and where
            print(f"tunesmith {args.command}: {err}", file=sys.stderr)
            return 1
        raise


def _known_errors() -> tuple[type[Exception], ...]:
    from tunesmith.callbacks import NonFiniteLossError
    from tunesmith.checkpoint import CheckpointError
    from tunesmith.data.sources import DataError
    from tunesmith.export import ExportError
    from tunesmith.models.load import ModelFileError

    return (DataError, ExportError, CheckpointError, NonFiniteLossError, ModelFileError)


if __name__ == "__main__":
    sys.exit(main())
