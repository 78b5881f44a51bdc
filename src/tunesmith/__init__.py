"""tunesmith: supervised fine-tuning of causal language models.

Importing tunesmith changes nothing in any other library. The public names below are
loaded lazily, so `import tunesmith` stays fast for the command line; the import only checks the
installed versions of the libraries it needs (`tunesmith._versions`).
"""

from importlib import import_module

from tunesmith._versions import check_versions

__version__ = "0.1.0"

# One clear ImportError for a too-old torch / transformers / peft / accelerate / datasets, instead of
# a failure deep inside a run (reads package metadata only; imports and changes nothing).
check_versions()

# public name -> module that defines it
_EXPORTS = {
    "SFTConfig": "tunesmith.config",
    "SFTTrainer": "tunesmith.trainer",
    "UnslothTrainingArguments": "tunesmith.config",
    "UnslothTrainer": "tunesmith.trainer",
    "FastLanguageModel": "tunesmith.models.fast",
    "FastModel": "tunesmith.models.fast",
    "FastVisionModel": "tunesmith.models.fast",
    "UnslothVisionDataCollator": "tunesmith.data.vision",
    "is_bfloat16_supported": "tunesmith.models.fast",
    "prepare_dataset": "tunesmith.data.pipeline",
    "DatasetSource": "tunesmith.data.mixture",
    "prepare_mixture": "tunesmith.data.mixture",
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
