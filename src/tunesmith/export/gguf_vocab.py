"""The tokenizer half of a GGUF file: tokens, merges, special ids, and the pre-tokenizer.

llama.cpp does not run the Hugging Face tokenizer. It re-implements each tokenizer family and
picks the way it splits text into words before BPE (the *pre-tokenizer*) by the name in
`tokenizer.ggml.pre`. A wrong name gives a model that loads, runs, and sees different tokens from
the ones it was trained on: under `default`, ` (`, ` =`, ` #` become a space plus the symbol.

llama.cpp's own converter identifies a tokenizer by hashing its tokens for one fixed text and
looking the hash up in a table of known models. We identify it by what it does instead: the
pre-tokenizer in `tokenizer.json` is read as the list of regular expressions it splits text with,
in order, and matched against the expressions llama.cpp applies for each name
(`llama-vocab.cpp`, `llm_tokenizer_bpe`), together with the two switches the name also sets there:
whether decoding cleans up spaces before punctuation (`clean_up_tokenization_spaces`) and whether a
word that is itself a vocabulary entry skips the merges (`ignore_merges`). That works for a
fine-tune of any model with one of these tokenizers, and refuses, with the reason, one it does not
know.

    >>> pre_tokenizer_splits({"type": "Sequence", "pretokenizers": [
    ...     {"type": "Digits", "individual_digits": True},
    ...     {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}) == (DIGIT, GPT2)
    True
    >>> choose_pre_tokenizer((DIGIT, GPT2), clean_spaces=False, ignore_merges=False)
    'smollm'
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from tunesmith.export.errors import ExportError

logger = logging.getLogger(__name__)

# The split expressions, written as in tokenizer.json (llama.cpp spells some of them differently,
# e.g. `(?i:'s|...)` as `'[sS]|...`, because its regex engine lacks inline flags; they match alike).
# GPT-2's: what ByteLevel(use_regex=True) splits with.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
DIGIT = r"\p{N}"  # Digits(individual_digits=True): every digit on its own
DIGITS = r"\p{N}+"  # Digits(individual_digits=False)
LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN = (  # Mistral NeMo and later Mistral models
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O = (  # Phi-4, Llama 4
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    """One `tokenizer.ggml.pre` name and what llama.cpp does under it."""

    name: str
    splits: tuple[str, ...]
    clean_spaces: bool
    ignore_merges: bool = False
    example: str = ""


# Per name: the expressions and switches of llama-vocab.cpp (llama.cpp b7xxx, as vendored by
# llama-cpp-python 0.3.36). Several names share expressions and differ only in the switches.
PRE_TOKENIZERS = (
    PreTokenizer("smollm", (DIGIT, GPT2), clean_spaces=False, example="SmolLM / SmolLM2"),
    PreTokenizer("starcoder", (DIGIT, GPT2), clean_spaces=True, example="StarCoder"),
    PreTokenizer("gpt-2", (GPT2,), clean_spaces=True, example="GPT-2, Phi-2"),
    # the same split as gpt-2 without the clean-up of spaces when decoding
    PreTokenizer("trillion", (GPT2,), clean_spaces=False, example="byte-level BPE without space clean-up"),
    PreTokenizer("llama-bpe", (LLAMA3,), clean_spaces=True, ignore_merges=True, example="Llama 3"),
    PreTokenizer("qwen2", (QWEN2,), clean_spaces=False, example="Qwen2, Qwen2.5, Qwen3"),
    PreTokenizer("stablelm2", (QWEN2,), clean_spaces=True, example="StableLM 2"),
    PreTokenizer("tekken", (TEKKEN,), clean_spaces=False, ignore_merges=True, example="Mistral NeMo"),
    PreTokenizer("gpt-4o", (GPT4O,), clean_spaces=False, example="Phi-4, Llama 4"),
)


def _regex(split: dict) -> str:
    pattern = split.get("pattern", {})
    if "Regex" in pattern:
        return pattern["Regex"]
    import re

    return re.escape(pattern.get("String", ""))


def pre_tokenizer_splits(spec: dict | None) -> tuple[str, ...]:
    """The expressions a tokenizer.json `pre_tokenizer` splits text with, in order.

    Raises ExportError for a step llama.cpp has no equivalent of (the message names it).
    """
    if spec is None:
        return ()
    kind = spec.get("type")
    if kind == "Sequence":
        return tuple(s for step in spec["pretokenizers"] for s in pre_tokenizer_splits(step))
    if kind == "ByteLevel":
        if spec.get("add_prefix_space"):
            raise ExportError("ByteLevel(add_prefix_space=True): llama.cpp's BPE adds no space in front")
        return (GPT2,) if spec.get("use_regex", True) else ()
    if kind == "Digits":
        return (DIGIT,) if spec.get("individual_digits") else (DIGITS,)
    if kind == "Split" and spec.get("behavior") == "Isolated" and not spec.get("invert"):
        return (_regex(spec),)
    raise ExportError(f"pre-tokenizer step {json.dumps(spec)[:200]} has no llama.cpp equivalent")


def choose_pre_tokenizer(splits: tuple[str, ...], *, clean_spaces: bool, ignore_merges: bool) -> str:
    """The llama.cpp name that splits with exactly `splits`, preferring one whose two switches also
    match. Raises ExportError when no name splits that way."""
    same_split = [p for p in PRE_TOKENIZERS if p.splits == splits]
    if not same_split:
        known = "; ".join(f"{p.name} ({p.example})" for p in PRE_TOKENIZERS)
        raise ExportError(
            f"this tokenizer's pre-tokenizer (splits {list(splits)}) matches none llama.cpp implements "
            f"that tunesmith knows: {known}. If you know llama.cpp's name for it, pass "
            "pre_tokenizer=NAME (`--pre-tokenizer NAME`)"
        )
    best = max(
        same_split, key=lambda p: (p.clean_spaces == clean_spaces) + (p.ignore_merges == ignore_merges)
    )
    if best.clean_spaces != clean_spaces or best.ignore_merges != ignore_merges:
        logger.warning(
            "GGUF pre-tokenizer %s splits text as this tokenizer does, but sets clean_spaces=%s and "
            "ignore_merges=%s where the tokenizer has %s and %s: llama.cpp may decode or merge a few "
            "tokens differently",
            best.name,
            best.clean_spaces,
            best.ignore_merges,
            clean_spaces,
            ignore_merges,
        )
    return best.name


def tokenizer_pre_name(tokenizer) -> str:
    """`tokenizer.ggml.pre` for a Hugging Face fast tokenizer with a BPE model."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") not in ("NFC",):
        # NFC (Qwen) leaves text that is already composed unchanged; llama.cpp applies none
        raise ExportError(
            f"the tokenizer's normalizer {json.dumps(normalizer)[:200]} has no equivalent in llama.cpp's BPE"
        )
    splits = pre_tokenizer_splits(spec.get("pre_tokenizer"))
    return choose_pre_tokenizer(
        splits,
        clean_spaces=bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)),
        ignore_merges=bool(spec["model"].get("ignore_merges", False)),
    )


def special_token_ids(tokenizer) -> dict[str, int]:
    """bos/eos/unk/pad ids the tokenizer defines (those it leaves unset are left out)."""
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    return {name: i for name, i in ids.items() if i is not None}


def adds_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether encoding a text puts bos in front / eos at the end: read from what the tokenizer does,
    since some say it in `add_bos_token` and others only in their post-processor."""
    ids = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id is not None and len(ids) > 1 and ids[0] == tokenizer.bos_token_id
    eos = tokenizer.eos_token_id is not None and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id
    return bos, eos


def add_bpe_tokenizer(writer, tokenizer, vocab_size: int, *, pre_tokenizer: str | None = None) -> str:
    """gpt2-style BPE metadata: tokens by id and their types, merges, the pre-tokenizer, special ids,
    add_bos/add_eos and the chat template. Returns the pre-tokenizer name written."""
    import gguf

    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ExportError(
            f"a gpt2-style GGUF vocabulary needs a BPE tokenizer; this one is {model.get('type')}"
        )
    pre = pre_tokenizer or tokenizer_pre_name(tokenizer)
    size = _checked_size(vocab, vocab_size)
    # llama.cpp expects one entry per embedding row; rows with no token get a placeholder
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, index in vocab.items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _add_specials_and_template(writer, tokenizer)
    return pre


def _checked_size(vocab: dict[str, int], vocab_size: int) -> int:
    """One token entry per embedding row (rows without a token get a placeholder, as llama.cpp's
    converter writes them); a token id past the last row is an error: llama.cpp refuses such a file."""
    beyond = sorted((i, t) for t, i in vocab.items() if i >= vocab_size)
    if beyond:
        raise ExportError(
            f"the tokenizer has {len(beyond)} token(s) with ids past the model's {vocab_size} embedding rows "
            f"(e.g. {beyond[0][1]!r} = {beyond[0][0]}); resize the embeddings to the tokenizer "
            "(model.resize_token_embeddings(len(tokenizer))) and train them, or remove the tokens"
        )
    return vocab_size


def _add_specials_and_template(writer, tokenizer) -> None:
    for name, token_id in special_token_ids(tokenizer).items():
        getattr(writer, f"add_{name}_token_id")(token_id)
    bos, eos = adds_bos_eos(tokenizer)
    writer.add_add_bos_token(bos)
    writer.add_add_eos_token(eos)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def is_sentencepiece_style(spec: dict) -> bool:
    """A tokenizer.json converted from SentencePiece (Llama 2, Mistral v0.x, Gemma, Phi-3): BPE over
    text whose spaces became '▁', with unknown characters spelled as <0xNN> byte tokens."""
    model = spec.get("model", {})
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and "\\u2581" in text


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the SentencePiece-style tokenizer puts '▁' in front of the text (Llama 2, Mistral)
    or not (Gemma)."""
    steps = [spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}]
    flat = []
    while steps:
        step = steps.pop()
        flat.append(step)
        steps.extend(step.get("normalizers", []) + step.get("pretokenizers", []))
    for step in flat:
        if step.get("type") == "Prepend":
            return True
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return False


def add_spm_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """SentencePiece metadata (`tokenizer.ggml.model = llama`) from a tokenizer.json: pieces, scores,
    types. llama.cpp merges the adjacent pair whose joined piece scores highest; the Hugging Face
    file orders its merges instead, so a piece scores minus the rank of the merge that makes it."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    size = _checked_size(vocab, vocab_size)
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-1e9] * size
    types = [gguf.TokenType.UNUSED] * size
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in spec["model"].get("merges", [])]
    rank = {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(a + b, r)
    for token, index in vocab.items():
        tokens[index] = token
        if re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types[index], scores[index] = gguf.TokenType.BYTE, 0.0
        elif len(token) == 1:  # single characters: where merging starts, never the result of one
            types[index], scores[index] = gguf.TokenType.NORMAL, 0.0
        else:
            types[index] = gguf.TokenType.NORMAL
            scores[index] = -float(rank[token]) if token in rank else -1e9
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
        scores[index] = 0.0
    if tokenizer.unk_token_id is not None:
        types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_adds_space_prefix(spec))
    _add_specials_and_template(writer, tokenizer)


def add_tokenizer(writer, tokenizer, vocab_size: int, *, pre_tokenizer: str | None = None) -> str:
    """The tokenizer metadata llama.cpp needs, SentencePiece-style or byte-level BPE; returns the
    pre-tokenizer name written ('default' for SentencePiece, which has none)."""
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise ExportError(
            f"GGUF export needs a fast tokenizer (tokenizer.json); got {type(tokenizer).__name__}"
        )
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if is_sentencepiece_style(spec):
        add_spm_tokenizer(writer, tokenizer, vocab_size)
        return "default"
    return add_bpe_tokenizer(writer, tokenizer, vocab_size, pre_tokenizer=pre_tokenizer)
