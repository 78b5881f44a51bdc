"""`tunesmith generate` and `tunesmith chat`: text from an adapter folder, a model folder or `default`."""

from __future__ import annotations

import sys
from pathlib import Path

from tunesmith.cli.run_config import UsageError, _apply_threads, _check_model


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
