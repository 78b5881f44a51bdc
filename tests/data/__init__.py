"""Tests of the data pipeline. The helper below builds a word-level tokenizer in memory, so
every expected token id in these tests can be worked out by hand from WORDS."""

from tokenizers import Tokenizer, models, pre_tokenizers, processors

# Special tokens of the chat formats we test: split out of the text wherever they appear.
SPECIALS = [
    "[UNK]", "<s>", "</s>", "<pad>",                                   # 0-3
    "<|im_start|>", "<|im_end|>",                                      # 4-5   chatml
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",          # 6-8   llama-3
    "[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",                                              # 9-15  mistral
    "<start_of_turn>", "<end_of_turn>",                                # 16-17 gemma
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",              # 18-21 phi-3
    "<tool_call>", "</tool_call>",                                     # 22-23
]  # fmt: skip
# Plain words, ids from 24 on: system=24, user=25, assistant=26, tool=27, model=28, ...
WORDS = [
    "system", "user", "assistant", "tool", "model", "ipython",          # 24-29
    "2", "+", "=", "4", "hi", "hello", "Be", "brief.",                  # 30-37
    "What", "is", "the", "capital", "of", "France?", "Paris.",          # 38-44
    "Thanks!", "Welcome!",                                              # 45-46
]  # fmt: skip
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}


def word_tokenizer(*, add_bos=True, chat_template=None, extra_words=(), chat_specials=True):
    """A whitespace word-level tokenizer: id = position in SPECIALS + WORDS (+ extra_words).

    `add_bos=True` makes `tokenizer(text)` put `<s>` in front, as Llama's does; eos = `</s>`,
    pad = `<pad>`. Special tokens are split out even without spaces around them;
    `chat_specials=False` leaves out the chat markers (a base model's tokenizer).
    """
    from transformers import PreTrainedTokenizerFast

    vocab = dict(VOCAB)
    for word in extra_words:
        vocab.setdefault(word, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="[UNK]",
        additional_special_tokens=SPECIALS[4:] if chat_specials else [],
    )
    tok.chat_template = chat_template
    return tok
