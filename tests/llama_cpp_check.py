"""Running exported GGUF files in llama.cpp (through llama-cpp-python) from the tests.

llama-cpp-python is the `gguf` extra; `make install` installs it, so CI runs these checks. Where it
is missing, `need_llama_cpp()` skips with the reason, unless TUNESMITH_REQUIRE_LLAMA_CPP=1 (set by
`make test`), where it fails: a check that did not run must not read as passed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def need_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        message = "llama-cpp-python is not installed: pip install 'tunesmith[gguf]' (or `make install`)"
        if os.environ.get("TUNESMITH_REQUIRE_LLAMA_CPP") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return llama_cpp


def load(path, *, vocab_only=False, n_ctx=512, logits_all=False):
    llama_cpp = need_llama_cpp()
    return llama_cpp.Llama(
        model_path=str(path),
        vocab_only=vocab_only,
        n_ctx=n_ctx,
        n_threads=1,
        n_batch=n_ctx,
        logits_all=logits_all,
        # float32 KV cache (GGML_TYPE_F32 = 0): the default f16 cache would round every key and value
        type_k=0,
        type_v=0,
        verbose=False,
        seed=0,
    )


def llama_cpp_tokens(llm, text: str) -> list[int]:
    """Token ids of `text` as llama.cpp splits it: no bos added, special tokens in the text parsed
    (as Hugging Face tokenizers do with added tokens)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) float32 logits of one forward pass over `ids`."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def real_texts(limit_per_kind: int = 150) -> list[str]:
    """A few hundred real texts from this repository: the quick start's prompts and answers in the
    chat template, paragraphs of the README and docs, and blocks of source code (indentation,
    ` (`, ` =`, ` #`, digits after spaces: what a wrong pre-tokenizer splits differently)."""
    from tunesmith.quickstart import make_splits

    splits = make_splits(num_train=limit_per_kind, num_heldout=20, seed=0)
    chats = []
    for example in [*splits.train, *splits.heldout][:limit_per_kind]:
        chats.append(
            "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in example["messages"])
        )
    prose = []
    for doc in ("README.md", "docs/ARCHITECTURE.md", "bench/RESULTS.md"):
        path = REPO / doc
        if path.exists():
            prose += [p for p in path.read_text().split("\n\n") if p.strip()]
    code = []
    for path in sorted((REPO / "src" / "tunesmith").rglob("*.py")):
        lines = path.read_text().splitlines(keepends=True)
        code += ["".join(lines[i : i + 25]) for i in range(0, len(lines), 25)]
    return chats + prose[:limit_per_kind] + code[:limit_per_kind]


def llama_cpp_greedy(llm, ids: list[int], *, max_new_tokens: int, stop_ids) -> list[int]:
    """Greedy continuation of `ids` in llama.cpp: argmax of the last logits, until a stop id."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stop_ids:
            break
        out.append(token)
        llm.eval([token])
    return out


def transformers_greedy(model, ids: list[int], *, max_new_tokens: int, stop_ids) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(stop_ids),
            pad_token_id=next(iter(stop_ids)),
        )[0, len(ids) :].tolist()
    return [t for t in out if t not in stop_ids]
