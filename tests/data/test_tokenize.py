"""Each format, end to end through normalize_example + tokenize_example, gives exactly these
input_ids / labels on the word-level tokenizer of tests/data/__init__.py.

Ids used below (position in SPECIALS + WORDS): <s>=1 </s>=2 <|im_start|>=4 <|im_end|>=5
<|start_header_id|>=6 <|end_header_id|>=7 <|eot_id|>=8 system=24 user=25 assistant=26 tool=27
"2"=30 "+"=31 "="=32 "4"=33 hi=34 hello=35 Be=36 brief.=37 Paris.=44 Thanks!=45 Welcome!=46.
"""

import pytest

from tunesmith.data.formats import ALPACA_PROMPT, detect_format, normalize_example
from tunesmith.data.tokenize import tokenize_example

from . import word_tokenizer

X = -100  # not trained


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(chat_template="chatml")


def run(row, tok, **kwargs):
    """The pipeline's per-example path: detect from the columns, normalise, tokenize."""
    fmt = detect_format(
        list(row), first_example=row, dataset_text_field=kwargs.pop("dataset_text_field", None)
    )
    example = normalize_example(row, fmt, index=0)
    return tokenize_example(example, tok, chat_template="chatml", index=0, **kwargs)


def test_text_adds_bos_and_eos_and_trains_everything(tok):
    # "hi hello" -> <s> hi hello </s>: the tokenizer adds BOS, we append EOS; all trained.
    assert run({"text": "hi hello"}, tok) == {"input_ids": [1, 34, 35, 2], "labels": [1, 34, 35, 2]}


def test_text_already_ending_in_eos_and_starting_with_bos_is_not_doubled(tok):
    assert run({"text": "<s> hi hello </s>"}, tok)["input_ids"] == [1, 34, 35, 2]


def test_eos_token_override_is_appended_instead(tok):
    out = tokenize_example({"text": "hi"}, tok, eos_token="<|im_end|>")
    assert out["input_ids"] == [1, 34, 5]


def test_prompt_completion_trains_completion_and_eos_only(tok):
    # <s> 2 + 2 = | 4 </s>: the prompt's 5 tokens are context.
    out = run({"prompt": "2 + 2 =", "completion": " 4"}, tok)
    assert out == {"input_ids": [1, 30, 31, 30, 32, 33, 2], "labels": [X, X, X, X, X, 33, 2]}


def test_prompt_completion_boundary_exact_when_tokens_would_merge(tok):
    # "2 + 2 =" + "4" is "2 + 2 =4": as one string "=4" is one (unknown) word. The prompt keeps
    # its own tokens and the completion is tokenized alone, so the boundary stays exact.
    out = run({"prompt": "2 + 2 =", "completion": "4"}, tok)
    assert out == {"input_ids": [1, 30, 31, 30, 32, 33, 2], "labels": [X, X, X, X, X, 33, 2]}


def test_prompt_completion_without_completion_only_loss_trains_all(tok):
    out = run({"prompt": "2 + 2 =", "completion": " 4"}, tok, completion_only_loss=False)
    assert out["labels"] == [1, 30, 31, 30, 32, 33, 2]
    assert (
        run({"prompt": "2 + 2 =", "completion": " 4"}, tok, train_on_inputs=True)["labels"] == out["labels"]
    )


def test_prompt_response_with_text_field_prompt_trains_prompt_plus_response(tok, caplog):
    # The TRL tutorials set dataset_text_field="prompt" on prompt/response data and expect the
    # response to be learned. We read it as prompt/response (a newline joins the two) and say so.
    with caplog.at_level("INFO", logger="tunesmith.data.formats"):
        out = run({"prompt": "hi", "response": "hello"}, tok, dataset_text_field="prompt")
    assert out == {"input_ids": [1, 34, 35, 2], "labels": [X, X, 35, 2]}
    assert "prompt + response" in caplog.text


def test_alpaca_without_input():
    # The standard Alpaca prompt (no-input variant), word by word, then the output and EOS;
    # the prompt's words are added to the vocabulary so none is [UNK].
    expected_prompt = ["<s>"] + ALPACA_PROMPT.format(instruction="hi").split()
    tok = word_tokenizer(extra_words=expected_prompt[1:])
    out = run({"instruction": "hi", "input": "", "output": "hello"}, tok)
    tokens = tok.convert_ids_to_tokens(out["input_ids"])
    assert tokens == expected_prompt + ["hello", "</s>"]
    assert out["labels"] == [X] * len(expected_prompt) + [35, 2]


def test_alpaca_with_input_uses_the_input_variant(tok):
    example = normalize_example({"instruction": "hi", "input": "Paris.", "output": "hello"}, "alpaca")
    assert example["prompt"].endswith("### Instruction:\nhi\n\n### Input:\nParis.\n\n### Response:\n")
    assert example["prompt"].startswith("Below is an instruction that describes a task, paired with an input")
    assert example["completion"] == "hello"


def test_messages_chatml_trains_assistant_turns_with_end_of_turn(tok):
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]}  # fmt: skip
    out = run(row, tok)
    # <|im_start|> system Be brief. <|im_end|> <|im_start|> user hi <|im_end|> <|im_start|> assistant | hello <|im_end|>
    # No BOS: chatml writes none, and chat text is never given the tokenizer's own BOS.
    assert out["input_ids"] == [4, 24, 36, 37, 5, 4, 25, 34, 5, 4, 26, 35, 5]
    assert out["labels"] == [X] * 11 + [35, 5]


def test_messages_assistant_only_loss_false_trains_every_token(tok):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    out = run(row, tok, assistant_only_loss=False)
    assert out["labels"] == out["input_ids"] == [4, 25, 34, 5, 4, 26, 35, 5]


def test_sharegpt_conversations_map_to_messages(tok):
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    out = run(row, tok)
    assert out == {"input_ids": [4, 25, 34, 5, 4, 26, 35, 5], "labels": [X] * 6 + [35, 5]}


def test_conversational_prompt_completion_trains_only_the_completion(tok):
    # The prompt holds an earlier assistant turn ("hello"): context, not trained by default.
    row = {
        "prompt": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "Thanks!"},
        ],
        "completion": [{"role": "assistant", "content": "Welcome!"}],
    }
    ids = [4, 25, 34, 5, 4, 26, 35, 5, 4, 25, 45, 5, 4, 26, 46, 5]
    out = run(row, tok)
    assert out == {"input_ids": ids, "labels": [X] * 14 + [46, 5]}
    # completion_only_loss=False: every assistant turn (assistant_only_loss defaults on).
    assert run(row, tok, completion_only_loss=False)["labels"] == [X] * 6 + [35, 5] + [X] * 6 + [46, 5]
    assert run(row, tok, train_on_inputs=True)["labels"] == ids


def test_sharegpt_inside_prompt_completion_lists(tok):
    row = {"prompt": [{"from": "human", "value": "hi"}], "completion": [{"from": "gpt", "value": "hello"}]}
    assert run(row, tok) == {"input_ids": [4, 25, 34, 5, 4, 26, 35, 5], "labels": [X] * 6 + [35, 5]}


def test_llama3_template_bos_not_doubled(tok):
    # The llama-3 template writes <s> (bos_token) itself; the tokenizer also adds BOS to plain
    # text. Chat text is tokenized without special tokens, so exactly one <s>.
    example = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    out = tokenize_example(example, tok, chat_template="llama-3")
    assert out["input_ids"] == [1, 6, 25, 7, 34, 8, 6, 26, 7, 35, 8]
    assert out["labels"] == [X] * 9 + [35, 8]


def test_tokenized_passes_through(tok):
    assert run({"input_ids": [34, 35]}, tok) == {"input_ids": [34, 35], "labels": [34, 35]}
    out = run({"input_ids": [34, 35], "labels": [X, 35]}, tok)
    assert out == {"input_ids": [34, 35], "labels": [X, 35]}
    assert run({"input_ids": [34, 35], "labels": [X, 35]}, tok, train_on_inputs=True)["labels"] == [34, 35]


def test_formatting_func_per_example_and_batched_style(tok):
    def per_example(ex):
        return f"{ex['q']} {ex['a']}"

    def batched(batch):  # TRL 0.x / Unsloth notebook style: columns in, one string per row out
        return [f"{q} {a}" for q, a in zip(batch["q"], batch["a"])]

    row = {"q": "hi", "a": "hello"}
    for func in (per_example, batched):
        fmt = detect_format(list(row), formatting_func=func)
        example = normalize_example(row, fmt, formatting_func=func, index=0)
        assert example == {"text": "hi hello"}
        assert tokenize_example(example, tok)["input_ids"] == [1, 34, 35, 2]


def test_smollm2_messages_train_the_reply_and_im_end(smollm2_tokenizer):
    # The real SmolLM2 tokenizer: no BOS added to chat text, eos = <|im_end|> (id 2) is trained.
    example = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    out = tokenize_example(example, smollm2_tokenizer)
    tok = smollm2_tokenizer
    trained = [t for t in out["labels"] if t != X]
    assert tok.decode(trained) == "Hello!<|im_end|>"
    # SmolLM2's template adds its default system prompt when the conversation has none.
    assert tok.decode(out["input_ids"]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )
    assert trained[-1] == tok.eos_token_id == 2


def test_smollm2_prompt_completion_exact_ids(smollm2_tokenizer):
    # SmolLM2 adds no BOS to plain text; its EOS is <|im_end|> (2). The ids are the tokenizer's
    # own for "The"=504 " capital"=3575 " of"=282 " France"=4649 " is"=314 " Paris"=7042 "."=30,
    # i.e. the prompt's tokens followed by the completion's with no merge across the boundary.
    out = tokenize_example({"prompt": "The capital of France is", "completion": " Paris."}, smollm2_tokenizer)
    assert smollm2_tokenizer("The capital of France is")["input_ids"] == [504, 3575, 282, 4649, 314]
    assert out == {
        "input_ids": [504, 3575, 282, 4649, 314, 7042, 30, 2],
        "labels": [X, X, X, X, X, 7042, 30, 2],
    }
