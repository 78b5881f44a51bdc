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

The YAML file is SFTConfig's serialised form (see `tunesmith.config`; `tunesmith config --list` lists
its keys) plus one section the CLI reads itself, naming the data:

    dataset:
      train: data/train.jsonl   # a file, a folder, or a Hub dataset name; "quickstart" = the built-in task
      eval: data/eval.jsonl     # optional
      split: train              # optional: the split of a Hub dataset / DatasetDict
      eval_split: test          # optional

(`dataset: data/train.jsonl` is short for `dataset: {train: data/train.jsonl}`.)

Everything heavy (torch, transformers) is imported inside the command that needs it, so `--help`
answers at once. Errors in the configuration print one line and exit with status 2.

Modules: `run_config` (what the commands share), `train`, `data` (preprocess, inspect), `generate`
(generate, chat), `export` (merge, export); the parser and `main` live here.
"""

from __future__ import annotations

import argparse
import sys

from tunesmith.cli.data import cmd_inspect, cmd_preprocess
from tunesmith.cli.data import format_histogram as format_histogram
from tunesmith.cli.data import render_tokens as render_tokens
from tunesmith.cli.export import cmd_export, cmd_merge
from tunesmith.cli.generate import _template_kwargs as _template_kwargs
from tunesmith.cli.generate import cmd_chat, cmd_generate
from tunesmith.cli.run_config import CONFIG_SECTIONS, EXIT_CONFIG_ERROR, UsageError
from tunesmith.cli.run_config import read_run_config as read_run_config
from tunesmith.cli.train import cmd_train


def cmd_config(args) -> int:
    if not args.list:
        raise UsageError("say what to show: `tunesmith config --list` prints every config key")
    from tunesmith.config.listing import format_keys

    print(format_keys(args.section))
    return 0


def cmd_doctor(args) -> int:
    from tunesmith.doctor import main as doctor

    return doctor(as_json=args.json, check_kernels=not args.no_check)


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
