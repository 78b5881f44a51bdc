"""tunesmith: supervised fine-tuning of causal language models.

Importing tunesmith changes nothing in any other library. The public names below are
loaded lazily, so `import tunesmith` stays fast for the command line.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "SFTConfig": "tunesmith.config",
    "SFTTrainer": "tunesmith.trainer",
    "UnslothTrainingArguments": "tunesmith.config",
    "UnslothTrainer": "tunesmith.trainer",
    "FastLanguageModel": "tunesmith.models.fast",
    "FastModel": "tunesmith.models.fast",
    "is_bfloat16_supported": "tunesmith.models.fast",
    "prepare_dataset": "tunesmith.data.pipeline",
    "load_model": "tunesmith.models.load",
    "load_tokenizer": "tunesmith.models.load",
    "optimize": "tunesmith.ops.apply",
    "unoptimize": "tunesmith.ops.apply",
    "linear_cross_entropy": "tunesmith.ops.linear_cross_entropy",
    "generate": "tunesmith.generation",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")
