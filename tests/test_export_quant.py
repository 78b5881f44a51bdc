"""K-quants through llama.cpp's quantizer, shards, and atomic writes, on a tiny Llama whose rows are
whole K-quant blocks (256 values)."""

import numpy as np
import pytest

from tests.llama_cpp_check import llama_cpp_logits, load, need_llama_cpp
from tests.test_export_families import TEXT, build
from tunesmith.export import ExportError, export_gguf


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wide") / "model"
    model, tokenizer = build(folder, "llama", hidden_size=256, intermediate_size=512, head_dim=64)
    return folder, model, tokenizer


def tensor_types(path):
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def dequantized_tensors(path):
    from gguf import GGUFReader, quants

    return {
        t.name: quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        for t in GGUFReader(str(path)).tensors
    }


@pytest.mark.parametrize(
    ("gguf_type", "ggml_type", "max_error"),
    [("q4_k_m", "Q4_K", 0.12), ("q5_k_m", "Q5_K", 0.06), ("q6_k", "Q6_K", 0.03)],
)
def test_k_quants_come_from_llama_cpps_quantizer(tmp_path, wide_llama, gguf_type, ggml_type, max_error):
    """The file llama.cpp's quantizer made from ours: the same tensors as our f32 file, in K-quant
    types, each within its bits' rounding of the f32 values (relative RMS: q6_k 3%, q5_k 6%, q4_k 12%;
    4-bit blocks of Gaussian weights round by about 1/16 of their range), and it runs."""
    need_llama_cpp()
    folder, model, tokenizer = wide_llama
    out = export_gguf(folder, tmp_path / f"m-{gguf_type}.gguf", type=gguf_type)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # the f32 source is gone
    types = tensor_types(out)
    assert types["blk.0.attn_q.weight"] == ggml_type and types["blk.0.attn_norm.weight"] == "F32"
    reference = dequantized_tensors(export_gguf(folder, tmp_path / "ref" / "m.gguf", type="f32"))
    quantized = dequantized_tensors(out)
    assert quantized.keys() == reference.keys()
    for name, ref in reference.items():
        rms = np.sqrt(np.mean((quantized[name] - ref) ** 2) / np.mean(ref**2))
        assert rms < max_error, f"{name}: relative RMS error {rms:.3f}"
    ids = tokenizer(TEXT)["input_ids"]
    llm = load(out, n_ctx=64, logits_all=True)
    assert np.isfinite(llama_cpp_logits(llm, ids)).all()
    llm.close()


@pytest.mark.parametrize("gguf_type", ["f16", "q6_k"])
def test_shards_load_from_the_first_and_equal_the_whole_file(tmp_path, wide_llama, gguf_type):
    need_llama_cpp()
    folder, _, tokenizer = wide_llama
    whole = export_gguf(folder, tmp_path / "whole" / "m.gguf", type=gguf_type)
    first = export_gguf(folder, tmp_path / "split" / "m.gguf", type=gguf_type, max_shard_size="600KB")
    shards = sorted((tmp_path / "split").iterdir())
    assert first == shards[0] and first.name.startswith("m-00001-of-0000") and len(shards) >= 2
    assert all(p.stat().st_size <= 600_000 for p in shards[1:])  # (the first also holds the metadata)
    ids = tokenizer(TEXT)["input_ids"]
    logits = []
    for path in (whole, first):
        llm = load(path, n_ctx=64, logits_all=True)
        logits.append(llama_cpp_logits(llm, ids))
        llm.close()
    np.testing.assert_array_equal(logits[0], logits[1])


@pytest.mark.parametrize("fault", ["interrupt", "disk full"])
def test_an_interrupted_export_leaves_nothing(tmp_path, wide_llama, monkeypatch, fault):
    import tunesmith.export.gguf_file as gguf_file
    from tunesmith.checkpoint import CheckpointError

    folder, _, _ = wide_llama
    (tmp_path / "out").mkdir()

    def fail(name, data, type):
        raise KeyboardInterrupt if fault == "interrupt" else OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_file, "encode_tensor", fail)
    # an interruption goes through as it is; a full disk becomes the one-line error naming the folder
    expected = (
        (KeyboardInterrupt, "") if fault == "interrupt" else (CheckpointError, "not enough disk space in ")
    )
    with pytest.raises(expected[0], match=expected[1]):
        export_gguf(folder, tmp_path / "out" / "m.gguf", type="q8_0")
    assert list((tmp_path / "out").iterdir()) == []


def test_k_quant_without_llama_cpp_says_how_to_get_it(tmp_path, wide_llama, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    with pytest.raises(ExportError, match=r"pip install 'tunesmith\[gguf\]'"):
        export_gguf(wide_llama[0], tmp_path / "m.gguf", type="q4_k_m")
    with pytest.raises(ExportError, match="max_shard_size '2 apples'"):
        export_gguf(wide_llama[0], tmp_path / "m.gguf", max_shard_size="2 apples")
