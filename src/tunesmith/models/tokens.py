"""The pad and eos tokens of a tokenizer: the one policy the loader and the trainer's build share."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# dedicated padding tokens, in order of preference, used when a tokenizer has no pad token
PAD_TOKEN_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|padding|>")


def _token_in_vocab(tokenizer, token: str) -> bool:
    return token in tokenizer.get_vocab()


def set_special_tokens(tokenizer, *, pad_token=None, eos_token=None, name="the model") -> None:
    """The one pad-token policy (the loader and the trainer's tokenizer build both use it).

    `pad_token` / `eos_token` (TRL's SFTConfig fields) replace the tokenizer's own; each must be in the
    vocabulary. Without a pad token, a dedicated one from the vocabulary is used
    (<|finetune_right_pad_id|>, <pad>, ...), else eos: safe here because our labels mark the trained
    tokens explicitly, so padding with eos never hides the real eos from the loss.
    """
    for field, token in (("eos_token", eos_token), ("pad_token", pad_token)):
        if token is None:
            continue
        if not _token_in_vocab(tokenizer, token):
            raise ValueError(
                f"{field}={token!r} is not in the vocabulary of {name}: choose a token the "
                f"tokenizer has (its special tokens: {', '.join(tokenizer.all_special_tokens)})"
            )
        setattr(tokenizer, field, token)

    if tokenizer.pad_token is None:
        dedicated = [
            t for t in PAD_TOKEN_CANDIDATES if _token_in_vocab(tokenizer, t) and t != tokenizer.eos_token
        ]
        if dedicated:
            tokenizer.pad_token = dedicated[0]
            logger.info("tokenizer has no pad token: using its dedicated %r", dedicated[0])
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            logger.info(
                "tokenizer has no pad token: padding with eos %r (safe: labels mark trained tokens "
                "explicitly, so eos is still trained)",
                tokenizer.eos_token,
            )
        else:
            raise ValueError(
                f"the tokenizer of {name} has neither a pad nor an eos token: pass pad_token=... "
                "(SFTConfig.pad_token) with a token from its vocabulary"
            )
