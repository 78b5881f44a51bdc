"""`tunesmith preprocess` and `tunesmith inspect`: the config's data prepared as the trainer would, its
statistics, and examples shown as the model sees them (trained vs masked tokens).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tunesmith.cli.run_config import (
    QUICKSTART_DATA,
    UsageError,
    _apply_threads,
    _check_model,
    _load_source,
    read_run_config,
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
    """The model's tokenizer, or its processor for a vision-language model (`build.tokenizer.load_by_name`;
    without the config's eos_token, which only the trainer applies)."""
    from tunesmith.build.tokenizer import load_by_name
    from tunesmith.models.vision import image_text_class

    name = _check_model(config.model_name_or_path)
    vision = config.model_gguf_file is None and bool(
        image_text_class(name, trust_remote_code=config.trust_remote_code)
    )
    return load_by_name(name, config, vision=vision, gguf_file=config.model_gguf_file)


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
