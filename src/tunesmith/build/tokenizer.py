"""Building the tokenizer (or a vision-language model's processor): pad token and chat template."""

from __future__ import annotations

from tunesmith.config import SFTConfig
from tunesmith.models.introspect import model_name


def build_tokenizer(tokenizer, model, args: SFTConfig):
    """The given tokenizer, or the model's; with a pad token and the configured chat template. A
    vision-language model gets its processor (`AutoProcessor`), whose tokenizer is set up the same way."""
    from tunesmith.data.vision import is_processor
    from tunesmith.models.vision import is_vision_model

    loaded_text_tokenizer = False
    if tokenizer is None:
        vision = is_vision_model(model)
        tokenizer = load_by_name(model_name(model), args, vision=vision)
        loaded_text_tokenizer = not vision  # the loader applied the pad-token policy itself
    if not loaded_text_tokenizer:
        set_pad_token(tokenizer.tokenizer if is_processor(tokenizer) else tokenizer, args)
    if args.chat_template is not None or args.chat_template_path is not None:
        from tunesmith.data.templates import resolve_chat_template

        # set on the tokenizer (or the processor) so that generation and the saved files use the template
        # we train with; a processor's template is resolved against its text tokenizer
        tokenizer.chat_template = resolve_chat_template(
            tokenizer.tokenizer if is_processor(tokenizer) else tokenizer,
            chat_template=args.chat_template,
            chat_template_path=args.chat_template_path,
        )
    return tokenizer


def load_by_name(name, args: SFTConfig, *, vision: bool, gguf_file=None):
    """The tokenizer of the model `name` (or its `gguf_file`), with the config's pad token through
    the loader's pad-token policy and the config's `eos_token` if set; or, when `vision`, its processor as
    `AutoProcessor` gives it. What the trainer, `tunesmith preprocess / inspect` and the quick start
    load a tokenizer with."""
    if vision:
        from tunesmith.models.vision import load_processor

        return load_processor(name, trust_remote_code=args.trust_remote_code)
    from tunesmith.models.load import load_tokenizer

    return load_tokenizer(
        name,
        trust_remote_code=args.trust_remote_code,
        gguf_file=gguf_file,
        pad_token=args.pad_token,
        eos_token=args.eos_token,
    )


def set_pad_token(tokenizer, args: SFTConfig) -> None:
    """`models.tokens.set_special_tokens` (the one pad-token policy) with the config's pad_token."""
    from tunesmith.models.tokens import set_special_tokens

    name = getattr(tokenizer, "name_or_path", None) or "the model"
    set_special_tokens(tokenizer, pad_token=args.pad_token, name=name)
