"""The architecture half of a GGUF file: per family, the llama.cpp architecture name, its
hyperparameter keys, and how Hugging Face tensors become llama.cpp tensors.

Tensor *names* come from the `gguf` package's own map (`gguf.get_tensor_name_map`, the table
llama.cpp's converter uses); this module holds only what the map does not: which rows to reorder,
which norms to shift, which keys each architecture reads. The facts are those of llama.cpp's
`convert_hf_to_gguf.py` and `src/models/*.cpp`, cited where they are not obvious.

    >>> family_of("qwen2").arch, family_of("mistral").arch
    ('qwen2', 'llama')
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

from tunesmith.export.errors import ExportError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """How one Hugging Face `model_type` is written for llama.cpp."""

    model_type: str
    arch: str  # gguf.MODEL_ARCH_NAMES value: the `general.architecture` llama.cpp dispatches on
    # Llama-style models rotate the two halves of each head in Hugging Face and adjacent pairs in
    # llama.cpp ("normal" vs "neox" rope); llama.cpp's llama arch wants Q/K rows reordered.
    permute_qk: bool = False
    # Gemma's RMSNorm multiplies by (1 + w), llama.cpp's by w: the file stores w + 1.
    norm_shift: float = 0.0
    # Gemma ties lm_head to the embeddings and llama.cpp's gemma archs have no output tensor.
    always_tied: bool = False


FAMILIES = {
    f.model_type: f
    for f in (
        Family("llama", "llama", permute_qk=True),
        Family("mistral", "llama", permute_qk=True),  # llama.cpp converts Mistral as Llama
        Family("qwen2", "qwen2"),
        Family("qwen3", "qwen3"),
        Family("gemma", "gemma", norm_shift=1.0, always_tied=True),
        Family("gemma2", "gemma2", norm_shift=1.0, always_tied=True),
        Family("gemma3_text", "gemma3", norm_shift=1.0, always_tied=True),
        Family("phi3", "phi3"),
    )
}


def family_of(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ExportError(
            f"GGUF export does not support the {model_type!r} architecture; supported: "
            f"{', '.join(sorted(FAMILIES))}. Merge the model (`tunesmith merge`) and try llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    return FAMILIES[model_type]


def permute_for_gguf(weight, n_head: int):
    """Reorder the rows of a Q or K projection from Hugging Face's rotary layout to llama.cpp's.

    Hugging Face rotates the two halves of each head (dims d and d + head_dim/2 form a pair);
    llama.cpp's llama arch rotates adjacent dims (2d, 2d+1). Per head, rows
    [h0 h1 h2 h3 | h4 h5 h6 h7] become [h0 h4 h1 h5 h2 h6 h3 h7]. `weight` is
    (n_head * head_dim, ...); K uses the KV head count.

    >>> import numpy as np
    >>> permute_for_gguf(np.arange(8).reshape(8, 1), 1)[:, 0].tolist()
    [0, 4, 1, 5, 2, 6, 3, 7]
    """
    rows = weight.shape[0]
    # (n_head, 2 halves, head_dim/2, ...) -> (n_head, head_dim/2, 2, ...): interleave the halves
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config) -> tuple[dict, dict | None]:
    """(full-attention rope parameters, sliding-attention ones or None), whichever way the config
    stores them (transformers 5 `rope_parameters`, per layer type or flat; older `rope_scaling`)."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:
        return params["full_attention"], params.get("sliding_attention")
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params, None


def write_hparams(writer, config, family: Family) -> None:
    """The `{arch}.*` keys llama.cpp reads for this family."""
    import gguf

    head_dim = _head_dim(config)
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)

    rope, rope_swa = _rope(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rotary = int(head_dim * rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    writer.add_rope_dimension_count(rotary)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        if (attention_factor := rope.get("attention_factor")) is not None:
            writer.add_rope_scaling_yarn_attn_factor(float(attention_factor))
        for key, add in (
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            if rope.get(key) is not None:
                add(float(rope[key]))
    elif kind == "longrope":
        if family.arch != "phi3":
            raise ExportError(f"rope_type 'longrope' is written for phi3 only, not {family.model_type}")
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        # the attention factor Phi-3 uses: given, or from the context extension (as transformers does)
        scale = config.max_position_embeddings / rope["original_max_position_embeddings"]
        factor = rope.get("attention_factor")
        if factor is None:
            factor = (
                math.sqrt(1 + math.log(scale) / math.log(rope["original_max_position_embeddings"]))
                if scale > 1
                else 1.0
            )
        writer.add_rope_scaling_attn_factors(float(factor))
    elif kind not in ("default", "llama3"):  # llama3: a rope_freqs tensor (extra_tensors)
        raise ExportError(
            f"rope_type {kind!r} ({family.model_type}) has no llama.cpp equivalent that tunesmith writes; "
            "supported: default, linear, yarn, llama3, longrope (phi3)"
        )
    if rope_swa is not None:
        writer.add_rope_freq_base_swa(float(rope_swa.get("rope_theta", 10000.0)))

    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    uses_window = bool(window) and (layer_types is None or "sliding_attention" in layer_types)
    if family.arch in ("gemma2", "gemma3"):
        _check_gemma_attention_scale(config, family)
        if getattr(config, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        if uses_window:
            writer.add_sliding_window(int(window))
            if (
                layer_types is not None
            ):  # else llama.cpp's own pattern for the arch (Gemma 2: 1 in 2, 3: 5 in 6)
                writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        elif family.arch == "gemma3":
            writer.add_sliding_window(0)  # gemma3: 0 = every layer attends to everything
    elif family.arch == "phi3":
        # phi3 reads the window always (0 = none, as for Phi-4) and the original context length
        writer.add_sliding_window(int(window) if uses_window else 0)
        if rope.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif uses_window and window < config.max_position_embeddings:
        # llama.cpp's llama/qwen2/qwen3 graphs attend to the whole context
        logger.warning(
            "%s uses a sliding window of %d tokens, which llama.cpp's %s architecture does not apply: "
            "outputs agree for contexts up to %d tokens",
            family.model_type,
            window,
            family.arch,
            window,
        )


def _check_gemma_attention_scale(config, family: Family) -> None:
    # llama.cpp scales Gemma 2/3 queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B
    # models, which it tells by their layer count (src/models/gemma2.cpp, gemma3.cpp);
    # transformers by query_pre_attn_scalar**-0.5.
    is_27b = config.num_hidden_layers == (46 if family.arch == "gemma2" else 62)
    llama_cpp = config.hidden_size // config.num_attention_heads if is_27b else _head_dim(config)
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and not math.isclose(float(scalar), float(llama_cpp)):
        raise ExportError(
            f"{family.model_type}: query_pre_attn_scalar={scalar}, but llama.cpp scales attention by "
            f"1/sqrt({llama_cpp}) for a model of this shape; the GGUF would compute a different model"
        )


def convert_tensors(state: dict, config, family: Family) -> Iterator[tuple[str, object]]:
    """(llama.cpp name, float32 ndarray) for each tensor of a Hugging Face state dict, plus the extra
    tensors some rope kinds need. Raises ExportError naming a parameter the map does not know."""
    import gguf
    import numpy as np

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[_arch_enum_name(family.arch)], config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = family.always_tied or getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp (as transformers) reuses token_embd
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the rope keys
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"parameter {hf_name!r} has no GGUF name for the {family.arch} architecture")
        data = tensor.detach().float().cpu().numpy()
        if family.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_for_gguf(data, n_head)
        elif family.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_for_gguf(data, n_kv)
        if family.norm_shift and hf_name.endswith("norm.weight"):
            data = data + np.float32(family.norm_shift)
        yield name, data
    yield from _extra_tensors(config, family)


def _arch_enum_name(arch: str) -> str:
    import gguf

    for enum, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return enum.name
    raise ExportError(f"the gguf package knows no architecture {arch!r}; upgrade it (pip install -U gguf)")


def _extra_tensors(config, family: Family) -> Iterator[tuple[str, object]]:
    import numpy as np

    rope, _ = _rope(config)
    kind = rope.get("rope_type", "default")
    head_dim = _head_dim(config)
    if kind == "llama3":
        # Llama 3.1+: per-frequency factors, stored as `rope_freqs` (convert_hf_to_gguf's LlamaModel)
        base = float(rope.get("rope_theta", 10000.0))
        freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        factor = float(rope.get("factor", 8.0))
        low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
        old_ctx = float(rope.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / freqs
        smooth = (old_ctx / wavelen - low) / (high - low)
        factors = np.where(
            wavelen < old_ctx / high,
            1.0,
            np.where(wavelen > old_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth)),
        )
        yield "rope_freqs.weight", factors.astype(np.float32)
    elif kind == "longrope":
        yield "rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32)
        yield "rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32)
