"""Packed documents never see each other (issue 3's acceptance test) and tunesmith_varlen keeps
attention per document.

Each test builds a tiny model from a config (2 layers, hidden 64, random weights), packs a few
documents into one padding-free row, and checks that the logits of every document equal the
logits of that document run alone, to fp32 rounding (atol 1e-5: the only difference is the
order of floating-point sums inside the attention kernels).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny import tiny_config
from tunesmith.ops.attention import ATTENTION_NAME, restore_attention, use_varlen_attention, varlen_mask

ATOL = 1e-5
LENGTHS = [5, 7, 5, 3, 7]  # two pairs of equal lengths: exercises the grouping by length
# tests/tiny.py's sizes (hidden 64, 2 layers, 4 query heads of 16 on 2 kv heads: GQA), with a
# smaller vocabulary and context
COMMON = dict(vocab_size=128, max_position_embeddings=256)
ARCHS = ("gemma", "llama", "mistral", "phi3", "qwen2")


@pytest.fixture(autouse=True, params=["sdpa", "math"])
def attention_path(request, monkeypatch):
    """Every test runs twice: documents attended by sdpa, and by the written-out attention that
    short documents take on the CPU (`_MATH_ATTENTION_MAX_LENGTH`)."""
    import tunesmith.ops.attention as attention

    monkeypatch.setattr(attention, "_MATH_ATTENTION_MAX_LENGTH", 0 if request.param == "sdpa" else 10**6)
    return request.param


def build(config, attn_implementation: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def packed_batch(lengths=LENGTHS, vocab=128, seed=1):
    """One padding-free row, as data/collate.py emits it."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    batch = {
        "input_ids": torch.cat(docs)[None],
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }
    return docs, batch


@torch.no_grad()
def packed_vs_alone(model, docs, batch, **forward_kwargs):
    packed = model(**batch, **forward_kwargs).logits[0]  # (T, V)
    alone = torch.cat([model(input_ids=d[None], use_cache=False).logits[0] for d in docs])
    return (packed - alone).abs().max().item()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_transformers_isolates_packed_documents_from_position_ids_without_cache(arch, impl):
    # eager/sdpa get no cu_seq_lens (they build a block-diagonal mask from position_ids restarts);
    # this holds only with use_cache=False, see the next test.
    docs, batch = packed_batch()
    model = build(tiny_config(arch, **COMMON), impl)
    batch = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    assert packed_vs_alone(model, docs, batch, use_cache=False) < ATOL


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_transformers_leaks_across_documents_when_a_cache_is_built(impl):
    # transformers 5.23 (masking_utils._preprocess_mask_arguments) looks for position_ids restarts
    # only when past_key_values is None; with config.use_cache=True (the default, in train mode
    # too) the model makes a DynamicCache and packed documents attend to each other. The trainer
    # must therefore run with use_cache=False. If this starts failing, transformers fixed it.
    docs, batch = packed_batch()
    model = build(tiny_config("llama", **COMMON), impl)
    batch = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    assert packed_vs_alone(model, docs, batch) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("use_cache", [False, True])
def test_varlen_isolates_packed_documents(arch, use_cache):
    docs, batch = packed_batch()
    model = build(tiny_config(arch, **COMMON), "sdpa")
    assert use_varlen_attention(model) == "sdpa"
    assert model.config._attn_implementation == ATTENTION_NAME
    assert packed_vs_alone(model, docs, batch, use_cache=use_cache) < ATOL


def test_varlen_finds_documents_from_position_ids_when_cu_seq_lens_are_absent():
    docs, batch = packed_batch()
    model = build(tiny_config("llama", **COMMON), "sdpa")
    use_varlen_attention(model)
    batch = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    assert packed_vs_alone(model, docs, batch) < ATOL


def test_varlen_applies_a_sliding_window_shorter_than_a_document():
    # Mistral with a 4-token window and documents of up to 7 tokens: inside a document the window
    # bites, so "alone" (eager, dense windowed mask) differs from plain causal attention.
    config = tiny_config("mistral", **COMMON, sliding_window=4)
    docs, batch = packed_batch()
    model = build(config, "eager")
    use_varlen_attention(model)
    assert packed_vs_alone(model, docs, batch) < ATOL
    model_no_window = build(tiny_config("mistral", **COMMON), "eager")
    with torch.no_grad():
        d = docs[1][None]
        assert (model(input_ids=d).logits - model_no_window(input_ids=d).logits).abs().max() > 1e-3


def test_varlen_supports_attention_softcapping_on_packed_rows():
    # Gemma-2: attention logits soft-capped at 5.0 (small, so the cap matters for random weights).
    config = tiny_config(
        "gemma2", **COMMON, attn_logit_softcapping=5.0, sliding_window=4, query_pre_attn_scalar=16
    )
    docs, batch = packed_batch()
    model = build(config, "eager")
    use_varlen_attention(model)
    assert packed_vs_alone(model, docs, batch) < ATOL


def test_padded_batch_through_varlen_equals_sdpa():
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    sdpa = build(tiny_config("qwen2", **COMMON), "sdpa")
    varlen = build(tiny_config("qwen2", **COMMON), "sdpa")
    use_varlen_attention(varlen)
    with torch.no_grad():
        expected = sdpa(input_ids=ids, attention_mask=mask).logits
        got = varlen(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (expected[real] - got[real]).abs().max().item() == 0.0  # same code path: bitwise equal


def test_gradients_match_per_document_runs():
    # Training needs the backward too: d(sum of packed logits)/d(weights) equals the sum over
    # documents of the same gradient from each document alone.
    docs, batch = packed_batch(lengths=[4, 6, 4])
    model = build(tiny_config("llama", **COMMON), "sdpa").train()
    use_varlen_attention(model)
    model(**batch).logits.sum().backward()
    packed = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    for d in docs:
        model(input_ids=d[None]).logits.sum().backward()
    alone = model.model.layers[0].self_attn.q_proj.weight.grad
    assert torch.allclose(packed, alone, atol=1e-4, rtol=1e-4)


def test_mask_function_builds_no_dense_mask_for_packed_rows():
    # The point of the mask function: no (T × T) tensor for a packed row, sdpa's mask otherwise.
    assert varlen_mask(batch_size=1, q_length=4096, kv_length=4096) is None
    padding = torch.tensor([[True, True, False]])
    dense = varlen_mask(batch_size=1, q_length=3, kv_length=3, attention_mask=padding)
    assert dense.shape == (1, 1, 3, 3)
    assert dense[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, False]]


def test_restore_attention_and_peft_models():
    from peft import LoraConfig, get_peft_model

    model = build(tiny_config("llama", **COMMON), "sdpa")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    previous = use_varlen_attention(peft_model)
    assert (previous, model.config._attn_implementation) == ("sdpa", ATTENTION_NAME)
    docs, batch = packed_batch()
    assert packed_vs_alone(peft_model, docs, batch) < ATOL
    restore_attention(peft_model, previous)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ARCHS)
def test_cu_seq_lens_reach_the_attention_function_and_must_cover_the_row(arch):
    # The error can only come from inside tunesmith_varlen, so this also shows that transformers
    # 5.23 forwards the collator's cu_seq_lens_q from model(**batch) to the attention function.
    docs, batch = packed_batch()
    model = build(tiny_config(arch, **COMMON), "sdpa")
    use_varlen_attention(model)
    bad = {**batch, "cu_seq_lens_q": torch.tensor([0, 5, 12], dtype=torch.int32)}  # sums to 12, row has 27
    with pytest.raises(ValueError, match="does not describe one row of 27 tokens"):
        model(**bad)


@pytest.mark.parametrize(
    "bucket, per_layer",
    [
        # exact lengths: groups of equal-length documents, (2 docs × 5), (2 × 7), (1 × 3)
        (1, [((2, 4, 5, 16), True, None), ((2, 4, 7, 16), True, None), ((1, 4, 3, 16), True, None)]),
        # lengths padded to a multiple of 4: 5 and 7 -> 8, 3 -> 4
        (4, [((4, 4, 8, 16), True, None), ((1, 4, 4, 16), True, None)]),
    ],
)
def test_attention_cost_is_per_document_not_per_row(monkeypatch, bucket, per_layer):
    # Record every sdpa call: the packed row of documents [5, 7, 5, 3, 7] must be attended in
    # groups of documents of the same (padded) length, never as one 27-token sequence: cost
    # Σ length² = 157 per head (exact) or 4 × 8² + 4² = 272 (padded to 4s) instead of 27² = 729.
    import tunesmith.ops.attention as attention

    shapes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        shapes.append((tuple(q.shape), kwargs.get("is_causal"), kwargs.get("attn_mask")))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording_sdpa)
    monkeypatch.setattr(attention, "_ATTENTION_BUCKET", bucket)
    monkeypatch.setattr(attention, "_MATH_ATTENTION_MAX_LENGTH", 0)  # every group through sdpa
    docs, batch = packed_batch()
    model = build(tiny_config("llama", **COMMON), "sdpa")
    use_varlen_attention(model)
    with torch.no_grad():
        model(**batch)
    assert shapes == per_layer * 2  # 2 layers, 4 heads of 64 / 4 = 16


@pytest.mark.parametrize("bucket", [1, 4, 64])
def test_padding_documents_to_a_bucket_changes_nothing(monkeypatch, bucket):
    # Padding a document at its end cannot change its real positions under a causal mask (every
    # padding key comes after them) nor, since padded outputs are dropped, any gradient: outputs
    # and weight gradients equal the exact-length run to fp32 rounding (sdpa's blocks differ).
    import tunesmith.ops.attention as attention

    docs, batch = packed_batch(lengths=[5, 7, 5, 3, 7, 1])
    model = build(tiny_config("llama", **COMMON), "sdpa").train()
    use_varlen_attention(model)

    def run(b):
        monkeypatch.setattr(attention, "_ATTENTION_BUCKET", b)
        model.zero_grad()
        logits = model(**batch).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        return logits.detach(), model.model.layers[0].self_attn.k_proj.weight.grad.clone()

    exact_logits, exact_grad = run(1)
    logits, grad = run(bucket)
    assert torch.allclose(logits, exact_logits, atol=1e-5, rtol=1e-5)
    assert torch.allclose(grad, exact_grad, atol=1e-5, rtol=1e-4)


def test_short_documents_on_the_cpu_skip_sdpa():
    # The default: 64-token buckets, written-out attention up to 128 tokens. Documents of 5-7
    # tokens (one 64-token group) never reach sdpa; the result is the sdpa path's (tests above).
    import tunesmith.ops.attention as attention

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    docs, batch = packed_batch()
    model = build(tiny_config("llama", **COMMON), "sdpa")
    use_varlen_attention(model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "_MATH_ATTENTION_MAX_LENGTH", 128)
        mp.setattr(attention.F, "scaled_dot_product_attention", recording_sdpa)
        with torch.no_grad():
            model(**batch)
    assert calls == []


def test_padded_layout_of_two_documents_in_one_bucket(monkeypatch):
    # [a b c] [d e] with 4-token buckets: each padded by repeating its last token, both in one group
    import tunesmith.ops.attention as attention

    monkeypatch.setattr(attention, "_ATTENTION_BUCKET", 4)
    gather, inverse, groups = attention._padded_layout([0, 3], [3, 2], 5, "cpu")
    assert gather.tolist() == [0, 1, 2, 2, 3, 4, 4, 4]
    assert inverse.tolist() == [0, 1, 2, 4, 5]
    assert groups == [(4, 2)]
    gather, inverse, groups = attention._padded_layout([0, 3, 5], [3, 2, 6], 11, "cpu")
    assert groups == [(4, 2), (8, 1)] and inverse.tolist() == [0, 1, 2, 4, 5, 8, 9, 10, 11, 12, 13]


def _causal_attention_reference(q, k, v, scale, window):
    # plain attention in float64: kv heads repeated for GQA (query head h reads kv head h // rep)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    import tunesmith.ops.attention as attention

    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~attention._allowed(q.shape[2], window, q.device), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
def test_short_causal_attention_forward_and_backward_match_a_float64_reference(dtype, window):
    import tunesmith.ops.attention as attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 24, 16, generator=g)  # 2 documents, 6 query heads on 3 kv heads
    k, v = torch.randn(2, 3, 24, 16, generator=g), torch.randn(2, 3, 24, 16, generator=g)
    grad = torch.randn(2, 6, 24, 16, generator=g)
    allowed = attention._allowed(24, window, "cpu")
    results = []
    for fn in ("reference", "ours"):
        inputs = [t.to(dtype if fn == "ours" else torch.float64).requires_grad_() for t in (q, k, v)]
        if fn == "ours":
            out = attention._ShortCausalAttention.apply(*inputs, 0.25, allowed)
        else:
            out = _causal_attention_reference(*inputs, 0.25, window)
        out.backward(grad.to(out.dtype))
        results.append([out, *(t.grad for t in inputs)])
    # fp32: rounding only; bf16: 8-bit mantissas in the matmul inputs and outputs, softmax in fp32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(results[1], results[0]):
        assert got.dtype == dtype
        scale = want.abs().max()
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=tol, atol=tol)
