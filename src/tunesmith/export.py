"""Turn a training result into something other tools load: a merged 16-bit model, or a GGUF file.

- `merge_adapter`: a LoRA adapter folder -> base + adapter merged, saved as safetensors with the
  tokenizer, loadable by plain `AutoModelForCausalLM.from_pretrained`.
- `export_gguf`: a model folder (or an adapter folder, merged first) -> one GGUF file for the
  Llama architecture, in f16, bf16 or q8_0, readable by llama.cpp and by transformers' GGUF loader.

Heavy libraries are imported inside the functions, so `tunesmith --help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_TYPES = ("f16", "bf16", "q8_0")
_ADAPTER_CONFIG = "adapter_config.json"


class ExportError(ValueError):
    """A model that cannot be exported as asked; the message says why and what to do."""


def is_adapter_dir(path: str | Path) -> bool:
    """True for a PEFT adapter folder (it holds `adapter_config.json`)."""
    return (Path(path) / _ADAPTER_CONFIG).is_file()


def _load_tokenizer(*folders: Path):
    """The tokenizer saved in the first folder that has one (adapter folders usually do)."""
    from transformers import AutoTokenizer

    for folder in folders:
        if any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(folder)
    raise ExportError(f"no tokenizer found in {', '.join(str(f) for f in folders)}")


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, *, dtype="bfloat16") -> Path:
    """Merge a LoRA adapter into its base model and save it as `dtype` safetensors + tokenizer.

    The merge happens in float32 (W + B @ A * scale) and is cast to `dtype` once at the end, so
    rounding is that of a single cast. Returns `output_dir`.
    """
    import torch
    from peft import PeftModel

    from tunesmith.models.load import load_model

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if not is_adapter_dir(adapter_dir):
        raise ExportError(
            f"{adapter_dir} is not a LoRA adapter folder (no {_ADAPTER_CONFIG}); "
            "a full model needs no merge: load it directly or pass it to `tunesmith export`"
        )
    from tunesmith.models.load import check_safetensors_files

    check_safetensors_files(adapter_dir)  # a torn adapter is named before the base model loads
    base = json.loads((adapter_dir / _ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ExportError(f"{adapter_dir / _ADAPTER_CONFIG} names no base_model_name_or_path")
    if not Path(base).exists():
        logger.info("base model %s is not a local folder; loading it by name", base)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    # tunesmith's loader: the same sources as training (folders, GGUF, `default`), safetensors only
    model = load_model(base, dtype=torch.float32)
    from tunesmith.models.adapters import peft_deprecations_silenced

    with peft_deprecations_silenced():
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.to(torch_dtype)
    from tunesmith.checkpoint import STAGING, is_disk_full, publish_files, space_error, staging_dir

    # written into a staging folder, then moved into place file by file: a crash leaves each file of
    # `output_dir` old or new, never torn
    staged = staging_dir(output_dir.parent, f"merge-{output_dir.name}")
    try:
        model.save_pretrained(staged, safe_serialization=True)
        base_dir = Path(base) if Path(base).exists() else adapter_dir
        _load_tokenizer(adapter_dir, base_dir).save_pretrained(staged)
        publish_files(staged, output_dir)
    except BaseException as err:  # also a KeyboardInterrupt: the half-written staging folder goes
        shutil.rmtree(staged, ignore_errors=True)
        _remove_empty(output_dir.parent / STAGING)
        if isinstance(err, Exception) and is_disk_full(err, output_dir.parent):
            needed = sum(p.numel() * p.element_size() for p in model.parameters())
            raise space_error(output_dir, "the merged model", needed, err) from None
        raise
    logger.info("merged %s into %s (%s) -> %s", adapter_dir, base, torch_dtype, output_dir)
    return output_dir


# Hugging Face Llama parameter names -> llama.cpp GGUF tensor names ("{i}" is the layer index).
_LLAMA_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def gguf_tensor_name(hf_name: str) -> str:
    """The llama.cpp name of a Hugging Face Llama parameter.

    >>> gguf_tensor_name("model.layers.3.self_attn.k_proj.weight")
    'blk.3.attn_k.weight'
    """
    parts = hf_name.split(".")
    if len(parts) > 2 and parts[:2] == ["model", "layers"]:
        pattern, layer = ".".join(parts[:2] + ["{i}"] + parts[3:]), parts[2]
    else:
        pattern, layer = hf_name, ""
    if pattern not in _LLAMA_NAMES:
        raise ExportError(f"parameter {hf_name!r} has no GGUF name for the llama architecture")
    return _LLAMA_NAMES[pattern].format(i=layer)


def permute_for_gguf(weight, n_head: int):
    """Reorder the rows of a Q or K projection from Hugging Face's rotary layout to llama.cpp's.

    Hugging Face rotates the two halves of each head (dims d and d + head_dim/2 form a pair);
    llama.cpp rotates adjacent dims (2d, 2d+1). Per head, rows [h0 h1 h2 h3 | h4 h5 h6 h7] become
    [h0 h4 h1 h5 h2 h6 h3 h7]. `weight` is (n_head * head_dim, hidden); K uses the KV head count.

    >>> import numpy as np
    >>> permute_for_gguf(np.arange(8).reshape(8, 1), 1)[:, 0].tolist()
    [0, 4, 1, 5, 2, 6, 3, 7]
    """
    rows = weight.shape[0]
    # (n_head, 2 halves, head_dim/2, ...) -> (n_head, head_dim/2, 2, ...): interleave the halves
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def quantize_q8_0(data):
    """Q8_0 blocks: per 32 consecutive values one fp16 scale (max |x| / 127) + 32 int8.

    `data` (..., K) float32 with K % 32 == 0 -> uint8 (..., K // 32 * 34), the byte layout GGUF
    stores. Rounding is half away from zero, as llama.cpp's reference quantizer does.

    >>> import numpy as np
    >>> x = np.zeros((1, 32), np.float32); x[0, 0] = 127.0; x[0, 1] = -63.5
    >>> q = quantize_q8_0(x); q.shape, q[0, 2:4].view(np.int8).tolist()
    ((1, 34), [127, -64])
    """
    import numpy as np

    if data.shape[-1] % 32:
        raise ValueError(f"Q8_0 needs rows that are a multiple of 32 values, got {data.shape[-1]}")
    blocks = data.astype(np.float32).reshape(-1, 32)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 127.0
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    q = np.trunc(blocks * inv + np.copysign(0.5, blocks)).clip(-127, 127).astype(np.int8)
    packed = np.concatenate([scale.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return packed.reshape(*data.shape[:-1], data.shape[-1] // 32 * 34)


def _encode_tensor(data, type: str):
    """float32 ndarray -> (array to write, GGML type). Norms and other 1-D tensors stay float32,
    as llama.cpp keeps them; q8_0 falls back to f16 for rows that are not blocks of 32."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if data.ndim == 1:
        return data.astype(np.float32), Q.F32
    if type == "q8_0" and data.shape[-1] % 32 == 0:
        return quantize_q8_0(data), Q.Q8_0
    if type == "bf16":
        return quants.quantize(data.astype(np.float32), Q.BF16), Q.BF16
    return data.astype(np.float16), Q.F16


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """gpt2-style BPE tokenizer metadata: tokens by id, their types, merges, special ids, template."""
    import gguf

    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')}")
    size = max(vocab_size, max(vocab.values()) + 1)
    # llama.cpp expects one entry per embedding row; ids with no token get a placeholder.
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, index in vocab.items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    for name, token_id in special.items():
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def export_gguf(model_dir: str | Path, out_file: str | Path, *, type: str = "f16") -> Path:
    """Write a Llama-architecture model folder (or adapter folder, merged first) as one GGUF file.

    `type`: "f16", "bf16" or "q8_0" for the 2-D weights; norms stay float32. Returns `out_file`.
    """
    if type not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {type!r}; choose one of {', '.join(GGUF_TYPES)}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    if is_adapter_dir(model_dir):
        with tempfile.TemporaryDirectory(prefix="tunesmith-merge-") as merged:
            # merge in float32 so the only rounding is the GGUF type's own
            merge_adapter(model_dir, merged, dtype="float32")
            return export_gguf(merged, out_file, type=type)
    return _write_llama_gguf(model_dir, out_file, type)


def _write_llama_gguf(model_dir: Path, out_file: Path, type: str) -> Path:
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "llama":
        raise ExportError(
            f"GGUF export supports the llama architecture; {model_dir} is {config.model_type!r}. "
            "Merge it (`tunesmith merge`) and use llama.cpp's convert_hf_to_gguf.py for other architectures."
        )
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ExportError(f"GGUF export does not write rope scaling yet (this model uses {rope_type!r})")

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: llama.cpp (and transformers) reuse token_embd

    out_file.parent.mkdir(parents=True, exist_ok=True)
    from tunesmith.checkpoint import atomic_file, is_disk_full, space_error

    try:
        # FILE.partial, renamed onto FILE once written: a crash leaves the old file (or none), never torn
        with atomic_file(out_file) as partial:
            _write_gguf(gguf.GGUFWriter(str(partial), "llama"), model_dir, config, state, type)
    except Exception as err:
        if is_disk_full(err, out_file.parent):
            raise space_error(out_file.parent, out_file.name, None, err) from None
        raise
    logger.info("wrote %s (%s, %d tensors)", out_file, type, len(state))
    return out_file


def _write_gguf(writer, model_dir: Path, config, state: dict, type: str) -> None:
    import gguf

    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_name(model_dir.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    file_types = {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(file_types[type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, _load_tokenizer(model_dir), config.vocab_size)

    for hf_name, tensor in state.items():
        name = gguf_tensor_name(hf_name)
        data = tensor.detach().float().numpy()
        if name.endswith("attn_q.weight"):
            data = permute_for_gguf(data, n_head)
        elif name.endswith("attn_k.weight"):
            data = permute_for_gguf(data, n_kv)
        encoded, ggml_type = _encode_tensor(data, type)
        writer.add_tensor(name, encoded, raw_dtype=ggml_type)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _remove_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()
