"""Attention over padding-free packed rows that stays per document.

A padding-free batch is one row of several documents, e.g. three documents of 3, 2 and 3 tokens:

    input_ids     a0 a1 a2 b0 b1 c0 c1 c2
    position_ids   0  1  2  0  1  0  1  2
    cu_seq_lens    [0, 3, 5, 8]

Each document must attend only to itself, causally. transformers' sdpa path gets this right by
building a dense (T × T) block-diagonal mask, so attention costs T² for the whole row (16 ×
256-token documents → 4,096² instead of 16 × 256²) and sdpa cannot use its causal fast path.

`use_varlen_attention(model)` registers, by an explicit call and in transformers' public
registries, an attention function `"tunesmith_varlen"` and a mask function that builds no dense
mask for packed rows. The attention function cuts the row at document starts (from
`cu_seq_lens_q` when the collator passes it, else from where `position_ids` restart), batches
documents of about the same length together (padded to a multiple of 64 tokens, see `_bucket`) and
runs causal sdpa on each group: cost Σ(length²).
On CUDA it uses `torch.nn.attention.varlen.varlen_attn` (FlashAttention varlen) when it can.
Padded batches (an `attention_mask`) and decoding with a cache behave exactly like "sdpa".
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from tunesmith.models.introspect import unwrap

__all__ = ["ATTENTION_NAME", "use_varlen_attention", "restore_attention", "varlen_attention_forward"]

logger = logging.getLogger(__name__)

ATTENTION_NAME = "tunesmith_varlen"


def use_varlen_attention(model) -> str:
    """Switch `model` (a PreTrainedModel or a PeftModel around one) to "tunesmith_varlen".

    Registers the attention and mask functions (idempotent) and returns the implementation the
    model used before, to give back to `restore_attention`.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, varlen_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, varlen_mask)
    base = _base_model(model)
    previous = base.config._attn_implementation
    base.set_attn_implementation(ATTENTION_NAME)
    logger.info("attention: %s -> %s (packed documents attend per document)", previous, ATTENTION_NAME)
    return previous


def restore_attention(model, previous: str) -> None:
    """Undo `use_varlen_attention`: set the implementation it returned."""
    _base_model(model).set_attn_implementation(previous)


def _base_model(model):
    # PeftModel / LoraModel wrap the PreTrainedModel; set_attn_implementation lives on the latter.
    base = unwrap(model)
    if not hasattr(base, "set_attn_implementation"):
        raise TypeError(
            f"use_varlen_attention: {type(model).__name__} is not a transformers PreTrainedModel (or a PEFT "
            "model around one), so its attention implementation cannot be switched"
        )
    return base


def varlen_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """Mask function for "tunesmith_varlen" in transformers' AttentionMaskInterface.

    Without a padding mask and without a cache offset (training on packed or unpadded rows) it
    returns None: the attention function finds document boundaries itself, so no (T × T) mask is
    ever built. Otherwise (padded batches, generation) it returns exactly what "sdpa" would.
    """
    if attention_mask is None and q_length == kv_length and _is_zero(q_offset) and _is_zero(kv_offset):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


def _is_zero(offset) -> bool:
    return bool(offset == 0)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function. query (B, Hq, T, D), key/value (B, Hkv, S, D) ->
    (B, T, Hq, D), None."""
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise ValueError(
            "tunesmith_varlen attention is causal only; this module asked for bidirectional attention. "
            "Use attn_implementation='sdpa' for it."
        )
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None or q_len != kv_len:
        # Padded batch or generation with a cache: the dense mask from `varlen_mask` is sdpa's.
        if softcap is not None:
            raise ValueError(
                "tunesmith_varlen: attention logit soft-capping (e.g. Gemma-2) is supported on packed rows "
                "only, not with a padding mask or a KV cache; use attn_implementation='eager' there"
            )
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    starts_lengths = _documents(kwargs, query.shape[0], q_len)
    out = torch.empty(
        (query.shape[0], q_len, query.shape[1], value.shape[-1]), dtype=query.dtype, device=query.device
    )  # (B, T, Hq, D)
    n_rep = query.shape[1] // key.shape[1]
    for b, (starts, lengths) in enumerate(starts_lengths):
        out[b] = _attend_row(
            query[b], key[b], value[b], starts, lengths, n_rep, dropout, scaling, sliding_window, softcap
        )
    return out, None


def _documents(kwargs: dict, batch_size: int, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(starts, lengths) of the documents of each row, from cu_seq_lens_q or position_ids restarts.

    position_ids [[0, 1, 2, 0, 1, 0, 1, 2]] -> [([0, 3, 5], [3, 2, 3])]
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu = [int(x) for x in cu.tolist()]
        if batch_size != 1 or cu[0] != 0 or cu[-1] != seq_len:
            raise ValueError(
                f"tunesmith_varlen: cu_seq_lens_q {cu[:4]}...{cu[-1]} does not describe one row of {seq_len} "
                f"tokens (batch size {batch_size}); padding-free batches are a single row whose documents sum "
                "to its length (see data/collate.py)"
            )
        return [(cu[:-1], [b - a for a, b in zip(cu[:-1], cu[1:])])]
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return [([0], [seq_len])] * batch_size
    position_ids = position_ids.expand(batch_size, -1)
    # A document starts wherever the position does not continue the previous one.
    restart = torch.ones_like(position_ids, dtype=torch.bool)
    restart[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    rows = []
    for row in restart:
        starts = row.nonzero().squeeze(1).tolist()
        rows.append((starts, [b - a for a, b in zip(starts, starts[1:] + [seq_len])]))
    return rows


def _attend_row(q, k, v, starts, lengths, n_rep, dropout, scaling, sliding_window, softcap):
    """One packed row: q (Hq, T, D), k/v (Hkv, T, D) -> (T, Hq, D)."""
    max_len = max(lengths)
    window = sliding_window if sliding_window is not None and sliding_window < max_len else None
    if q.is_cuda and softcap is None and dropout == 0.0 and len(starts) > 1:
        out = _flash_varlen(q, k, v, starts, lengths, scaling, window)
        if out is not None:
            return out
    if len(starts) == 1 and _bucket(lengths[0]) == lengths[0]:
        return _attend_group(q[None], k[None], v[None], n_rep, dropout, scaling, window, softcap)[
            0
        ].transpose(0, 1)
    # Documents grouped by padded length (see _bucket). Every group's tokens are gathered by one
    # index_select per q/k/v and the outputs put back by one more, so the backward is four
    # index_adds whatever the number of groups.
    gather, inverse, groups = _padded_layout(starts, lengths, q.shape[1], q.device)
    qt = q.transpose(0, 1).index_select(0, gather)  # (P, Hq, D), P = Σ documents × their bucket
    kt = k.transpose(0, 1).index_select(0, gather)  # (P, Hkv, D)
    vt = v.transpose(0, 1).index_select(0, gather)
    outs, offset = [], 0
    for bucket, n_docs in groups:
        rows = slice(offset, offset + n_docs * bucket)
        qg, kg, vg = (x[rows].unflatten(0, (n_docs, bucket)).transpose(1, 2) for x in (qt, kt, vt))
        og = _attend_group(qg, kg, vg, n_rep, dropout, scaling, window, softcap)  # (n_docs, Hq, L, D)
        outs.append(og.transpose(1, 2).reshape(n_docs * bucket, og.shape[1], og.shape[3]))
        offset += n_docs * bucket
    return (torch.cat(outs) if len(outs) > 1 else outs[0]).index_select(0, inverse)  # (T, Hq, D)


def _padded_layout(starts, lengths, total: int, device):
    """Where each token goes when the documents are grouped by bucket and padded to it.

    Returns (gather (P,): the row's token at each padded slot; a document shorter than its bucket
    repeats its last token, which no real position attends to (causal: every padding key comes
    after them), inverse (T,): the padded slot of each real token, groups: (bucket, n_docs) in
    slot order). Documents [a b c] [d e] with 4-token buckets:

        gather  = [0 1 2 2 3 4 4 4]    (a b c c d e e e)
        inverse = [0 1 2 4 5]          groups = [(4, 2)]
    """
    by_bucket: dict[int, list[tuple[int, int]]] = {}
    for start, length in zip(starts, lengths):
        by_bucket.setdefault(_bucket(length), []).append((start, length))
    gathers, inverse, groups, offset = [], torch.empty(total, dtype=torch.long), [], 0
    for bucket, docs in by_bucket.items():
        group_starts = torch.tensor([start for start, _ in docs])
        group_lengths = torch.tensor([length for _, length in docs])
        t = torch.arange(bucket)
        gathers.append((group_starts[:, None] + torch.minimum(t, group_lengths[:, None] - 1)).flatten())
        real = (t < group_lengths[:, None]).flatten()  # (n_docs * bucket,)
        inverse[gathers[-1][real]] = torch.arange(offset, offset + len(docs) * bucket)[real]
        groups.append((bucket, len(docs)))
        offset += len(docs) * bucket
    return torch.cat(gathers).to(device), inverse.to(device), groups


# Documents are attended in groups padded to a multiple of this many tokens. On the CPU every new
# (length) gives oneDNN new matrix shapes inside sdpa's backward, and each new shape costs a
# primitive (slow to create, ~250 KB kept in a cache of 1,024): with exact lengths a LoRA run on
# SmolLM2 grew by ~30 MB a step and spent its time creating them. A few dozen lengths are reused.
_ATTENTION_BUCKET = 64


def _bucket(length: int) -> int:
    """The padded length a document of `length` tokens is attended at.

    >>> _bucket(1), _bucket(64), _bucket(65)
    (64, 64, 128)
    """
    return -(-length // _ATTENTION_BUCKET) * _ATTENTION_BUCKET


def _attend_group(q, k, v, n_rep, dropout, scaling, window, softcap):
    """Causal attention within each of a group of equal-length documents. q (G, Hq, L, D),
    k/v (G, Hkv, L, D) -> (G, Hq, L, D)."""
    length = q.shape[2]
    short = not q.is_cuda and length <= _MATH_ATTENTION_MAX_LENGTH
    if softcap is not None or (short and dropout > 0):
        # Soft-capped scores (Gemma-2) are not expressible in sdpa; _ShortCausalAttention has no dropout
        return _attend_math(q, k, v, dropout, scaling, window, softcap, torch.float32 if short else q.dtype)
    if short:  # faster on the CPU than sdpa (below)
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        return _ShortCausalAttention.apply(q, k, v, scale, _allowed(length, window, q.device))
    if n_rep > 1:
        # repeat_interleave matches transformers' repeat_kv: query head h reads kv head h // n_rep.
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=_allowed(length, window, q.device), dropout_p=dropout, scale=scaling
    )


# Documents (padded) up to this length attend on the CPU through `_ShortCausalAttention` (plain
# matmuls in the activations' dtype), not sdpa, whose CPU backward costs ~0.7 ms per document
# whatever its length (SmolLM2 shapes, 9 heads of 64 on 3 kv heads, bf16, forward + backward, 2
# cores: 4 × 64 tokens 1.0-1.6 ms vs 3.0 with sdpa). Above ~256 tokens the two are within a few
# percent of each other, and sdpa pulls ahead from ~640. A SmolLM2 LoRA step (bench/ab_step.py)
# ran 3% faster with 384 than with 128, and within 1% with 256 or 512. The bf16 (L × L)
# probabilities kept for the backward (2.6 MB per 384-token document and layer) bound it.
_MATH_ATTENTION_MAX_LENGTH = 384


class _ShortCausalAttention(torch.autograd.Function):
    """softmax(q k^T · scale, masked to `allowed`) v for q (G, Hq, L, D), k/v (G, Hkv, L, D) ->
    (G, Hq, L, D), in q's dtype: the scale is applied to q (a (L, D) pass instead of (L, L)), the
    softmax reads and writes q's dtype and accumulates in fp32 (torch's CPU softmax), the
    softmax backward is fp32. Saves the probabilities in q's dtype only (autograd through the
    same ops would also keep an fp32 copy). Query head h reads kv head h // (Hq / Hkv) without
    copying k and v: the query heads of one kv head are one (rep·L, D) matrix."""

    @staticmethod
    def forward(ctx, q, k, v, scale, allowed):
        groups, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        rep = heads // kv_heads
        q_scaled = (q * scale).reshape(groups, kv_heads, rep * length, dim)
        scores = torch.matmul(q_scaled, k.transpose(-1, -2)).view(groups, kv_heads, rep, length, length)
        scores.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(groups, kv_heads, rep * length, length)
        out = torch.matmul(probs, v)  # (G, Hkv, rep·L, D)
        ctx.save_for_backward(q_scaled, k, v, probs, out)
        ctx.scale, ctx.q_shape = scale, q.shape
        return out.view(groups, heads, length, dim)

    @staticmethod
    def backward(ctx, grad_out):
        q_scaled, k, v, probs, out = ctx.saved_tensors
        grad_out = grad_out.reshape(out.shape)  # (G, Hkv, rep·L, D)
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)  # sums over the rep query heads
        # softmax backward: dS = P (dP - Σ_j P dP), and Σ_j P dP = Σ_d dO · O per query
        delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
        grad_probs = torch.matmul(grad_out, v.transpose(-1, -2)).float()
        grad_scores = grad_probs.sub_(delta).mul_(probs).to(q_scaled.dtype)  # d(scaled scores)
        grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q_scaled)
        return grad_q.view(ctx.q_shape), grad_k, grad_v, None, None


def _allowed(length: int, window: int | None, device) -> torch.Tensor:
    """(L, L) bool: query i may read key j (causal, and within the sliding window if any)."""
    i = torch.arange(length, device=device)
    allowed = i[:, None] >= i[None, :]
    if window is not None:
        allowed &= (i[:, None] - i[None, :]) < window  # transformers: kv_idx > q_idx - sliding_window
    return allowed


def _attend_math(q, k, v, dropout, scaling, window, softcap, dtype):
    """The attention written out, computed in `dtype`: q (G, Hq, L, D), k/v (G, Hkv, L, D) ->
    (G, Hq, L, D) in q's dtype. Query head h reads kv head h // (Hq / Hkv) without copying k and v:
    the query heads of one kv head are stacked into one (rep·L, D) matrix."""
    groups, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    rep = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    qg = q.to(dtype, memory_format=torch.contiguous_format) if q.dtype != dtype else q  # one copy
    qg = qg.reshape(groups, kv_heads, rep * length, dim)
    scores = (
        torch.matmul(qg, k.to(dtype).transpose(-1, -2)).view(groups, kv_heads, rep, length, length) * scale
    )
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~_allowed(length, window, q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    out = torch.matmul(probs.view(groups, kv_heads, rep * length, length), v.to(dtype))
    return out.view(groups, heads, length, dim).to(q.dtype)


def _flash_varlen(q, k, v, starts, lengths, scaling, window):
    """FlashAttention varlen through torch (CUDA only). q (Hq, T, D) -> (T, Hq, D), or None when
    this device/dtype cannot run it (then the per-group sdpa path runs)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    cu = torch.tensor([*starts, starts[-1] + lengths[-1]], dtype=torch.int32, device=q.device)
    window_size = (-1, 0) if window is None else (window - 1, 0)
    try:
        return varlen_attn(
            q.transpose(0, 1),  # (T, Hq, D)
            k.transpose(0, 1),
            v.transpose(0, 1),
            cu,
            cu,
            max(lengths),
            max(lengths),
            scale=scaling,
            window_size=window_size,
            enable_gqa=q.shape[0] != k.shape[0],
        )
    except (RuntimeError, NotImplementedError) as err:  # e.g. an unsupported head size or GPU
        logger.warning(
            "tunesmith_varlen: FlashAttention varlen unavailable (%s); using per-document sdpa", err
        )
        return None
