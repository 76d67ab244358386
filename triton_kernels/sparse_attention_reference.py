"""Pure-PyTorch references of block-sparse attention (fp32 by default; slow, for tests only).

``sparse_attention_reference`` spells out the key set of each query block explicitly (sink,
selected tokens, window) and the streaming RoPE positions by enumeration, independently of the
kernel's tile arithmetic. ``dense_causal_attention_reference`` is exact causal attention over the
paged cache: sparse must equal it when every block of [sink, W0) is selected.
"""

from __future__ import annotations

import torch

from vllm_hip_kernels.query_blocks import QueryBlocks

__all__ = ["apply_rope_reference", "dense_causal_attention_reference", "sparse_attention_reference"]


def apply_rope_reference(
    x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Neox RoPE in fp32: x [n, H, D], pos [n] int; rot([x1, x2]) = [x1 c - x2 s, x2 c + x1 s]."""
    half = x.shape[-1] // 2
    c = cos[pos.long()].float()[:, None, :]
    s = sin[pos.long()].float()[:, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _gather(
    cache: torch.Tensor, pages: torch.Tensor, tokens: torch.Tensor, page_size: int
) -> torch.Tensor:
    """[L, Hkv, D] fp32 values of ``tokens`` of one sequence (``pages``: its block_table row)."""
    tokens = tokens.long()
    index = (pages[tokens // page_size].long(), tokens % page_size)
    if cache.dtype == torch.float8_e4m3fn:  # index the bytes: fp8 indexing is not on every backend
        return cache.view(torch.uint8)[index].view(cache.dtype).float()
    return cache[index].float()


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    sm_scale: float,
    softcap: float,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, Hq, D], k/v [L, Hkv, D] (fp32), allowed [n, L] -> out [n, Hq, D] fp32, lse [n, Hq]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).to(compute_dtype)
    v = v.repeat_interleave(group, dim=1).to(compute_dtype)
    s = torch.einsum("nhd,lhd->hnl", q.to(compute_dtype), k) * sm_scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed[None], float("-inf"))
    lse = torch.logsumexp(s.float(), dim=-1)  # [Hq, n]
    has = torch.isfinite(lse)
    if compute_dtype == torch.float32:
        p = torch.exp(s - torch.where(has, lse, 0.0)[..., None])
    else:
        p = torch.softmax(s, dim=-1)
    p = torch.where(has[..., None], p, 0.0).to(compute_dtype)
    out = torch.einsum("hnl,lhd->nhd", p, v).float()
    return out, lse.transpose(0, 1)


def sparse_attention_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    qblocks: QueryBlocks,
    sel_blocks: torch.Tensor,
    sel_count: torch.Tensor,
    *,
    sink_tokens: int,
    block_size_k: int = 8,
    sm_scale: float,
    softcap: float = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    num_splits: int = 0,
    window_tokens: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    keys_rotated: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`vllm_hip_kernels.sparse_attention.sparse_attention` (same arguments).

    ``num_splits`` and ``window_tokens`` are accepted and ignored. ``compute_dtype`` (default fp32)
    sets the dtype of the matmuls and softmax: tests run it in bf16 to measure PyTorch's own error.
    Rotation and dequantization are always fp32.

    Returns
    -------
    torch.Tensor or tuple
        ``out`` [total_q, Hq, D] fp32 (copied into ``out`` if given, which is then returned), and
        with ``return_lse`` the natural-log ``lse`` [total_q, Hq] fp32 (-inf where no key).
    """
    total_q, num_q_heads, head_dim = q.shape
    page_size = key_cache.shape[1]
    rope = cos is not None
    res = torch.zeros((total_q, num_q_heads, head_dim), dtype=torch.float32, device=q.device)
    lse_all = torch.full(
        (total_q, num_q_heads), float("-inf"), dtype=torch.float32, device=q.device
    )
    blk = [
        t.tolist()
        for t in (qblocks.seq, qblocks.q_start, qblocks.q_len, qblocks.pos, qblocks.window_start)
    ]
    lens = seq_lens.tolist()
    counts = sel_count.tolist()
    dev = q.device
    for b, (seq, q_start, q_len, pos, w0) in enumerate(zip(*blk)):
        if q_len == 0:
            continue
        seq_len = lens[seq]
        pages = block_table[seq]
        p = torch.arange(pos, pos + q_len, device=dev)
        sink = torch.arange(min(sink_tokens, seq_len), device=dev)
        starts = sel_blocks[b, : counts[b]].long()
        sel = (starts[:, None] + torch.arange(block_size_k, device=dev)[None, :]).flatten()
        sel = sel[(sel < w0) & (sel < seq_len)]
        win = torch.arange(w0, max(w0, pos + q_len), device=dev)
        keys = torch.cat([sink, sel, win])
        n_sel = sel.numel()
        k = _gather(key_cache, pages, keys, page_size) * k_scale
        v = _gather(value_cache, pages, keys, page_size) * v_scale
        qb = q[q_start : q_start + q_len].float()
        if rope:
            kpos = torch.cat(
                [
                    w0 - n_sel - sink_tokens + sink,
                    w0 - n_sel + torch.arange(n_sel, device=dev),
                    win,
                ]
            )
            if keys_rotated:  # rotated at their true positions: turn by the difference
                k = apply_rope_reference(k, kpos - keys, cos, sin)
            else:
                k = apply_rope_reference(k, kpos, cos, sin)
                qb = apply_rope_reference(qb, p, cos, sin)
        allowed = keys[None, :] <= p[:, None]
        o, lse = _attend(qb, k, v, allowed, sm_scale, float(softcap or 0.0), compute_dtype)
        res[q_start : q_start + q_len] = o
        lse_all[q_start : q_start + q_len] = lse
    if out is not None:
        out.copy_(res)
        res = out
    return (res, lse_all) if return_lse else res


def dense_causal_attention_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    sm_scale: float,
    softcap: float = 0.0,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact causal attention over the paged cache, fp32.

    Parameters
    ----------
    q : torch.Tensor
        [total_q, Hq, D]; the queries of sequence s are rows ``query_start_loc[s]:[s + 1]`` and sit
        at the last ``q_len`` positions of the sequence.
    key_cache, value_cache, block_table, seq_lens
        As in :func:`sparse_attention_reference`.
    query_start_loc : torch.Tensor
        [num_seqs + 1] cumulative query counts.
    sm_scale, softcap, k_scale, v_scale
        As in :func:`sparse_attention_reference`.
    cos, sin : torch.Tensor, optional
        If given, q and keys are unrotated and get RoPE at their true positions.

    Returns
    -------
    torch.Tensor or tuple
        out [total_q, Hq, D] fp32 (and lse [total_q, Hq] with ``return_lse``).
    """
    total_q, num_q_heads, head_dim = q.shape
    page_size = key_cache.shape[1]
    res = torch.zeros((total_q, num_q_heads, head_dim), dtype=torch.float32, device=q.device)
    lse_all = torch.full(
        (total_q, num_q_heads), float("-inf"), dtype=torch.float32, device=q.device
    )
    qsl = query_start_loc.tolist()
    for seq, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = qsl[seq], qsl[seq + 1]
        if q1 == q0:
            continue
        keys = torch.arange(seq_len, device=q.device)
        p = torch.arange(seq_len - (q1 - q0), seq_len, device=q.device)
        k = _gather(key_cache, block_table[seq], keys, page_size) * k_scale
        v = _gather(value_cache, block_table[seq], keys, page_size) * v_scale
        qb = q[q0:q1].float()
        if cos is not None:
            k = apply_rope_reference(k, keys, cos, sin)
            qb = apply_rope_reference(qb, p, cos, sin)
        o, lse = _attend(
            qb, k, v, keys[None, :] <= p[:, None], sm_scale, float(softcap or 0.0), torch.float32
        )
        res[q0:q1] = o
        lse_all[q0:q1] = lse
    return (res, lse_all) if return_lse else res
