"""Tiny random models and a word-level tokenizer, built in code, for tests that must not download.

    from tests.tiny import tiny_config, tiny_model, tiny_tokenizer

    model = tiny_model("qwen2")               # hidden 64, 2 layers, 4 heads, 2 kv heads, vocab 256
    tok = tiny_tokenizer(vocab=["zebra"])     # the base words plus "zebra"
    tok("hello world.").input_ids             # [id("hello"), id("world"), id(".")]

The tokenizer's ids line up with the models' special ids: pad 0, bos 1, eos 2, unk 3,
<|im_start|> 4, <|im_end|> 5, "\\n" 6. Text is split into words (runs of letters), single
digits, single punctuation marks and newlines; spaces and tabs separate tokens and are not
tokens themselves, so decoding joins tokens with single spaces. A word that is not in the
vocabulary becomes <unk>: pass `vocab=[...]` to add the words a test needs (keep
`len(tokenizer) <= 256`, or build the model with `tiny_model(arch, vocab_size=len(tokenizer))`).
The tokenizer does not add bos/eos by itself; the chat template adds no bos either (as chatml).
"""

from __future__ import annotations

import string
from collections.abc import Iterable

import torch

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3")

PAD, BOS, EOS, UNK, IM_START, IM_END, NEWLINE = 0, 1, 2, 3, 4, 5, 6
VOCAB_SIZE = 256

# The chatml template (what SmolLM2 and Qwen use, without their default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]

# Words the tests in this repository use; roles first so chat turns tokenize without <unk>.
BASE_WORDS = """
system user assistant tool
a an the and or but not no yes of to in on at for with from by as is are was were be been
it this that there here what who which when where why how
i you he she we they me him her us them my your his its our their
do does did done have has had will would can could should may
hello hi please thanks thank ok okay sure sorry
good bad great fine nice big small new old first last next one two three four five
answer question reply say said tell ask list explain describe write wrote read
name word number text story poem joke fact
capital city country france paris
hamlet william shakespeare newton law motion force mass exercise benefits health
cat dog apple banana red green blue color sky sun water
add plus minus sum math count
weather today day night time year world friend
help helpful short long true false
Hello Hi What Who How Why The A I Paris France Hamlet William Shakespeare Newton Yes No
""".split()


def tiny_config(arch: str, **overrides):
    """A transformers config for a tiny random model of `arch` (one of `ARCHS`).

    hidden 64, 2 layers, 4 heads of 16, 2 kv heads, intermediate 128, vocab 256, and the
    tokenizer's special ids (pad 0, bos 1, eos 2). `overrides` replace any field.
    """
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
        "gemma": transformers.GemmaConfig,
        "gemma2": transformers.Gemma2Config,
        "gemma3": transformers.Gemma3TextConfig,
        "phi3": transformers.Phi3Config,
    }
    if arch not in classes:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    fields = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        # Gemma's default head_dim is 256 whatever the hidden size: pin it to hidden / heads.
        head_dim=16,
        intermediate_size=128,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=2048,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    fields.update(overrides)
    return classes[arch](**fields)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random `AutoModelForCausalLM` from `tiny_config(arch, **overrides)` in eval mode; the same
    seed gives the same weights."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def tiny_vocab(vocab: Iterable[str] = ()) -> dict[str, int]:
    """token -> id: the special tokens, newline, punctuation, digits, `BASE_WORDS`, then `vocab`'s new words."""
    tokens = [*_SPECIAL, "\n", *string.punctuation, *string.digits, *BASE_WORDS, *vocab]
    ids: dict[str, int] = {}
    for token in tokens:
        ids.setdefault(token, len(ids))
    return ids


def tiny_tokenizer(vocab: Iterable[str] = ()):
    """A word-level `PreTrainedTokenizerFast` with bos <s>, eos </s>, pad <pad>, unk <unk>, the chatml
    tokens and template. `vocab` adds words to the base vocabulary (ids after the base ones).

    Example: tiny_tokenizer()("hello world.").input_ids == [id("hello"), id("world"), id(".")]
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = tiny_vocab(vocab)
    backend = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # spaces and tabs only separate tokens; newlines are tokens (chatml turns end with one)
            pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_bpe_tokenizer(texts: list[str], *, vocab_size: int, pad_token: str | None = None):
    """A byte-level BPE tokenizer (gpt2-style, the kind GGUF stores, as SmolLM2's) trained on `texts`:
    256 byte tokens, then `<|im_start|>` (256) and `<|im_end|>` (257, also eos), then the merges up to
    `vocab_size`; the chatml template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token=pad_token
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
