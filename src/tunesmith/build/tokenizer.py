"""Building the tokenizer (or a vision-language model's processor): pad token and chat template."""

from __future__ import annotations

from tunesmith.config import SFTConfig
from tunesmith.models.introspect import model_name


def build_tokenizer(tokenizer, model, args: SFTConfig):
    """The given tokenizer, or the model's; with a pad token and the configured chat template. A
    vision-language model gets its processor (`AutoProcessor`), whose tokenizer is set up the same way."""
    from tunesmith.data.vision import is_processor
    from tunesmith.models.vision import is_vision_model

    if tokenizer is None and is_vision_model(model):
        from tunesmith.models.vision import load_processor

        tokenizer = load_processor(model_name(model), trust_remote_code=args.trust_remote_code)
    if tokenizer is None:
        from tunesmith.models.load import load_tokenizer

        # the loader applies the pad-token policy itself
        tokenizer = load_tokenizer(
            model_name(model),
            trust_remote_code=args.trust_remote_code,
            pad_token=args.pad_token,
            eos_token=args.eos_token,
        )
    else:
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


def set_pad_token(tokenizer, args: SFTConfig) -> None:
    """`models.tokens.set_special_tokens` (the one pad-token policy) with the config's pad_token."""
    from tunesmith.models.tokens import set_special_tokens

    name = getattr(tokenizer, "name_or_path", None) or "the model"
    set_special_tokens(tokenizer, pad_token=args.pad_token, name=name)
