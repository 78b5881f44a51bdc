"""A model folder (or adapter folder, merged first) -> a GGUF file llama.cpp runs.

Types written here, block layout by the `gguf` package's `gguf.quants` (the Python port of ggml's
reference quantizers): f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1. The K-quants (q4_k_m,
q5_k_m, q6_k) are llama.cpp's own mixtures (which tensors get which type, importance rules):
tunesmith writes an unquantized file and hands it to llama.cpp's quantizer
(`llama_cpp.llama_model_quantize`, from the `gguf` extra: `pip install 'tunesmith[gguf]'`).

Files are written under a temporary name beside the target and renamed when complete, so an
interrupted export never leaves a truncated .gguf behind. `max_shard_size` splits the file into
`NAME-00001-of-0000N.gguf` shards llama.cpp loads from the first one.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from tunesmith.export.errors import ExportError
from tunesmith.export.gguf_arch import convert_tensors, family_of, write_hparams
from tunesmith.export.merge import _load_tokenizer, is_adapter_dir, merge_adapter, refuse_vision

logger = logging.getLogger(__name__)

# written by tunesmith: (ggml type name, llama.cpp file type name)
DIRECT_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
}
# through llama.cpp's quantizer: type -> llama_ftype name in llama.h
LLAMA_CPP_TYPES = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
GGUF_TYPES = (*DIRECT_TYPES, *LLAMA_CPP_TYPES)
_LOW_BIT = ("q4_0", "q4_1", "q5_0", "q5_1")


def parse_size(size: str | int | None) -> int:
    """'2GB', '500M', '1.5GiB' or a byte count -> bytes (0 for None: no split).

    >>> parse_size("2GB"), parse_size("500M"), parse_size("1GiB"), parse_size(None)
    (2000000000, 500000000, 1073741824, 0)
    """
    if size is None:
        return 0
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, re.IGNORECASE)
    if not match:
        raise ExportError(f"max_shard_size {size!r}: write a size such as 2GB, 500M or 1GiB")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


def encode_tensor(name: str, data, type: str):
    """float32 ndarray -> (array to write, GGML type) as llama.cpp's converter stores it.

    1-D tensors (norms, biases, rope factors) stay float32. Block types need rows that are a
    multiple of the block size; other rows fall back to f16 (as convert_hf_to_gguf does). In the
    4- and 5-bit files the output projection (or the embedding, when it is also the output) is
    q8_0: llama.cpp's quantizer gives that tensor more bits too (q6_k), since every logit goes
    through it.
    """
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    if data.ndim == 1 or type == "f32":
        return data.astype(np.float32), GGMLQuantizationType.F32
    if type in _LOW_BIT and name in ("output.weight", "token_embd.weight"):
        type = "q8_0"
    qtype = GGMLQuantizationType[DIRECT_TYPES[type][0]]
    if qtype == GGMLQuantizationType.F16:
        return data.astype(np.float16), qtype
    block = GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        logger.info("%s: rows of %d values are not blocks of %d; stored as f16", name, data.shape[-1], block)
        return data.astype(np.float16), GGMLQuantizationType.F16
    return quants.quantize(data.astype(np.float32), qtype), qtype


def export_gguf(
    model_dir: str | Path,
    out_file: str | Path,
    *,
    type: str = "f16",
    pre_tokenizer: str | None = None,
    max_shard_size: str | int | None = None,
) -> Path:
    """Write a model folder (or adapter folder, merged in float32 first) as GGUF; returns the path
    of the file (the first shard when split).

    `type`: one of GGUF_TYPES. `pre_tokenizer`: llama.cpp's name, to override the one read from the
    tokenizer. `max_shard_size`: split into shards of at most this size ("2GB").
    """
    if type not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {type!r}; choose one of {', '.join(GGUF_TYPES)}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    refuse_vision(model_dir)
    if is_adapter_dir(model_dir):
        with tempfile.TemporaryDirectory(prefix="tunesmith-merge-") as merged:
            # merge in float32 so the only rounding is the GGUF type's own
            merge_adapter(model_dir, merged, dtype="float32")
            return export_gguf(
                merged, out_file, type=type, pre_tokenizer=pre_tokenizer, max_shard_size=max_shard_size
            )
    split = parse_size(max_shard_size)
    if type in LLAMA_CPP_TYPES:
        return _export_with_llama_cpp(model_dir, out_file, type, pre_tokenizer, split)
    return _atomic(out_file, split, lambda tmp: _write(model_dir, tmp, type, pre_tokenizer, split))


def _atomic(out_file: Path, split: int, write) -> Path:
    """Run write(tmp_path) in a temporary folder beside `out_file`, then move its files into place."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_file.name}.", suffix=".tmp", dir=out_file.parent))
    try:
        write(tmp_dir / out_file.name)
        written = sorted(tmp_dir.iterdir())
        for path in written:
            os.replace(path, out_file.parent / path.name)
    except Exception as err:
        from tunesmith.checkpoint import is_disk_full, space_error

        if is_disk_full(err, out_file.parent):
            raise space_error(out_file.parent, out_file.name, None, err) from None
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_file.parent / written[0].name


def _write(model_dir: Path, out_file: Path, type: str, pre_tokenizer: str | None, split: int) -> None:
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.export.gguf_vocab import add_tokenizer

    config = AutoConfig.from_pretrained(model_dir)
    family = family_of(config.model_type)
    # safetensors only, no remote code: the same rules as training. In the saved dtype (a bf16 model
    # is not held twice as large in float32); each tensor becomes float32 only when it is encoded.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", use_safetensors=True)
    state = model.state_dict()

    writer = gguf.GGUFWriter(str(out_file), family.arch, split_max_size=split)
    writer.add_name(model_dir.name)
    write_hparams(writer, config, family)
    writer.add_file_type(gguf.LlamaFileType[DIRECT_TYPES[type][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    pre = add_tokenizer(writer, _load_tokenizer(model_dir), config.vocab_size, pre_tokenizer=pre_tokenizer)

    count = 0
    for name, data in convert_tensors(state, config, family):
        encoded, ggml_type = encode_tensor(name, data, type)
        writer.add_tensor(name, encoded, raw_dtype=ggml_type)
        count += 1
    del model, state

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    logger.info(
        "wrote %s (%s, %s, pre-tokenizer %s, %d tensors)", out_file.name, family.arch, type, pre, count
    )


def _export_with_llama_cpp(
    model_dir: Path, out_file: Path, type: str, pre_tokenizer: str | None, split: int
) -> Path:
    """A K-quant file: an unquantized GGUF written by us, then llama.cpp's quantizer."""
    try:
        import llama_cpp
    except ImportError as error:
        raise ExportError(
            f"GGUF type {type} is made by llama.cpp's quantizer, which comes with llama-cpp-python: "
            "pip install 'tunesmith[gguf]' (it compiles llama.cpp, a few minutes), or write one of "
            f"{', '.join(DIRECT_TYPES)} without it"
        ) from error
    import json

    saved = json.loads((model_dir / "config.json").read_text())
    dtype = saved.get("dtype") or saved.get("torch_dtype") or "float32"  # the key before transformers 5
    # the source of the quantizer keeps the model's own precision (a float32 merge stays float32)
    source_type = {"bfloat16": "bf16", "float16": "f16"}.get(str(dtype).replace("torch.", ""), "f32")

    # shards: the source is split so that each quantized shard stays under `split` (no tensor of
    # a K-quant file takes more than q8_0's 8.5 bits per value) and llama.cpp keeps that split
    source_split = int(split * {"f32": 4, "bf16": 2, "f16": 2}[source_type] / (8.5 / 8)) if split else 0

    def write(tmp: Path) -> None:
        source = tmp.with_name(f"source-{source_type}.gguf")
        _write(model_dir, source, source_type, pre_tokenizer, source_split)
        sources = sorted(tmp.parent.glob("source-*.gguf"))
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[type])
        params.nthread = os.cpu_count() or 1
        params.keep_split = len(sources) > 1
        # with keep_split llama.cpp names the shards PREFIX-00001-of-0000N.gguf itself
        target = str(tmp.with_suffix("")) if params.keep_split else str(tmp)
        status = llama_cpp.llama_model_quantize(str(sources[0]).encode(), target.encode(), params)
        for path in sources:
            path.unlink()
        if status != 0:
            raise ExportError(f"llama.cpp's quantizer failed on {model_dir} ({type}, status {status})")

    return _atomic(out_file, split, write)
