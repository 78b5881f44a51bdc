"""Turn a training result into something other tools load: a merged 16-bit model, a GGUF file for
llama.cpp / LM Studio, an Ollama Modelfile.

- `merge_adapter`: a LoRA adapter folder -> base + adapter merged, saved as safetensors with the
  tokenizer, loadable by plain `AutoModelForCausalLM.from_pretrained` (merge.py).
- `export_gguf`: a model folder (or an adapter folder, merged first) -> a GGUF file for Llama
  (incl. SmolLM2), Mistral, Qwen2/2.5, Qwen3, Gemma 1/2/3 (text) or Phi-3, in f32, f16, bf16, q8_0,
  q4_0, q4_1, q5_0, q5_1 (written here) or q4_k_m, q5_k_m, q6_k (llama.cpp's quantizer)
  (gguf_file.py; the tokenizer in gguf_vocab.py, the architectures in gguf_arch.py).

Heavy libraries are imported inside the functions, so `tunesmith --help` stays fast.
"""

from tunesmith.export.errors import ExportError
from tunesmith.export.gguf_arch import FAMILIES, permute_for_gguf
from tunesmith.export.gguf_file import DIRECT_TYPES, GGUF_TYPES, LLAMA_CPP_TYPES, export_gguf
from tunesmith.export.merge import is_adapter_dir, merge_adapter

__all__ = [
    "DIRECT_TYPES",
    "FAMILIES",
    "GGUF_TYPES",
    "LLAMA_CPP_TYPES",
    "ExportError",
    "export_gguf",
    "is_adapter_dir",
    "merge_adapter",
    "permute_for_gguf",
]
