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
    if is_processor(tokenizer):
        set_pad_token(tokenizer.tokenizer, args)
        if args.chat_template is not None or args.chat_template_path is not None:
            from tunesmith.data.templates import resolve_chat_template

            tokenizer.chat_template = resolve_chat_template(
                tokenizer.tokenizer,
                chat_template=args.chat_template,
                chat_template_path=args.chat_template_path,
            )
        return tokenizer
    if tokenizer is None:
        from tunesmith.models.load import load_tokenizer

        tokenizer = load_tokenizer(
            model_name(model),
            trust_remote_code=args.trust_remote_code,
            pad_token=args.pad_token,
            eos_token=args.eos_token,
        )
    set_pad_token(tokenizer, args)
    if args.chat_template is not None or args.chat_template_path is not None:
        from tunesmith.data.templates import resolve_chat_template

        # set on the tokenizer so that generation and the saved tokenizer use the template we train with
        tokenizer.chat_template = resolve_chat_template(
            tokenizer, chat_template=args.chat_template, chat_template_path=args.chat_template_path
        )
    return tokenizer


def set_pad_token(tokenizer, args: SFTConfig) -> None:
    """`models.load.set_special_tokens` (the one pad-token policy) with the config's pad_token."""
    from tunesmith.models.tokens import set_special_tokens

    set_special_tokens(tokenizer, pad_token=args.pad_token, name=model_name_of(tokenizer))


def model_name_of(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or "the model"
