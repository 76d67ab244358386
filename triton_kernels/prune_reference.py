"""Pure-PyTorch reference of the hierarchical pruning (same contract as :mod:`.prune`).

Written for clarity, one query block at a time. It reproduces the kernels' rounding points so a
selection can be compared exactly: queries are pooled in fp32 (summed in query order, then
divided), rotated in fp32, cast to ``q.dtype``; sampled keys are read as fp32, rotated in fp32 when
RoPE applies, cast to ``q.dtype``; dots then run in float64 (the kernels accumulate in fp32).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from .query_blocks import QueryBlocks

__all__ = [
    "score_chunks_reference",
    "run_stage_reference",
    "split_chunks_reference",
    "select_blocks_reference",
    "rotate_reference",
]


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style RoPE in fp32: x [..., D], cos/sin broadcastable to [..., D/2]."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _num_iters(chunk_size: int) -> int:
    return max(1, math.ceil(math.log2(chunk_size))) if chunk_size > 1 else 1


def _signed_rotation(cos, sin, angle: torch.Tensor):
    """cos/sin rows of signed positions ``angle`` from tables of positions >= 0."""
    a = angle.abs().long()
    s = sin[a]
    return cos[a], torch.where((angle < 0)[..., None], -s, s)


def _pooled_queries(q, q_start, q_len, pool, turn=None):
    """[NG, Hq, D] fp32 means of groups of ``pool`` consecutive queries, summed in order;
    ``turn`` (cos, sin) [q_len, D/2] rotates each query first."""
    rows = q[q_start:q_start + q_len].float()
    if turn is not None:
        rows = rotate_reference(rows, turn[0][:, None, :], turn[1][:, None, :])
    n_groups = -(-q_len // pool)
    acc = torch.zeros((n_groups,) + rows.shape[1:], dtype=torch.float32, device=q.device)
    cnt = torch.zeros(n_groups, dtype=torch.float32, device=q.device)
    for i in range(pool):
        idx = torch.arange(n_groups, device=q.device) * pool + i
        ok = idx < q_len
        acc[ok] += rows[idx[ok]]
        cnt[ok] += 1
    return acc / cnt[:, None, None]


def score_chunks_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    qblocks: QueryBlocks,
    cand_starts: torch.Tensor | None,
    cand_count: torch.Tensor | None,
    *,
    chunk_size: int,
    query_pool: int,
    sink_tokens: int,
    k_scale: float = 1.0,
    mask_rope: str | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    rope_distance: int = 1024,
    score_norm: str = "none",
    keys_rotated: bool = False,
    on_read: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of :func:`vllm_hip_kernels.prune.score_chunks`: (scores [NB, C] fp32,
    starts [NB, C] int32, n_cand [NB] int32).

    ``on_read(seq, tok, read)``, if given, sees every key the search samples, as the kernel
    counts them: token positions ``tok`` [chunks, Hkv] of sequence ``seq`` and which of them
    were read (``read`` bool; a half that does not exist is not). Used to study which keys
    mask estimation reads (``benchmarks/mask_estimation_reads.py``)."""
    rotated = keys_rotated and mask_rope is not None
    dev = q.device
    nb = qblocks.num_blocks
    _, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = key_cache.shape
    group = num_q_heads // num_kv_heads
    dot_dtype = q.dtype

    seqs = qblocks.seq.tolist()
    q_starts = qblocks.q_start.tolist()
    q_lens = qblocks.q_len.tolist()
    q_pos = qblocks.pos.tolist()
    w0s = qblocks.window_start.tolist()
    if cand_starts is None:
        num_cand = max(0, -(-(qblocks.max_window_start - sink_tokens) // chunk_size))
        base = sink_tokens + chunk_size * torch.arange(num_cand, dtype=torch.int64)
        all_starts = base.expand(nb, num_cand).clone()
        counts = [max(0, -(-(w - sink_tokens) // chunk_size)) for w in w0s]
    else:
        num_cand = cand_starts.shape[1]
        all_starts = cand_starts.detach().to("cpu", torch.int64)
        counts = cand_count.tolist()

    scores = torch.full((nb, num_cand), float("-inf"), dtype=torch.float32)
    heads = torch.arange(num_kv_heads, device=dev)
    for b in range(nb):
        w0, seq = w0s[b], seqs[b]
        st = all_starts[b, : counts[b]]
        ok = (st >= 0) & (st < w0)
        j_idx = torch.nonzero(ok).flatten()
        if j_idx.numel() == 0:
            continue
        lo = st[j_idx][:, None].expand(-1, num_kv_heads).clone()
        hi = torch.clamp(lo + chunk_size, max=w0)

        # the position pooled queries are scored at
        target = rope_distance if mask_rope == "relative" else counts[b]
        if rotated:  # each query turns from its true position to the target, then the mean
            true = q_pos[b] + torch.arange(q_lens[b], device=dev)
            turn = _signed_rotation(cos, sin, target - true)
            pooled = _pooled_queries(q, q_starts[b], q_lens[b], query_pool, turn)
        else:
            pooled = _pooled_queries(q, q_starts[b], q_lens[b], query_pool)
            if mask_rope is not None:
                pooled = rotate_reference(pooled, cos[target], sin[target])
        n_groups = pooled.shape[0]
        # [Hkv, NG * G, D]: rows of kv head h are its G query heads for every pooled group
        qh = pooled.to(dot_dtype).double().reshape(n_groups, num_kv_heads, group, head_dim)
        qh = qh.permute(1, 0, 2, 3).reshape(num_kv_heads, n_groups * group, head_dim)

        def score(tok: torch.Tensor) -> torch.Tensor:
            page = block_table[seq, (tok // page_size).to(dev)].long()
            k = key_cache[page, (tok % page_size).to(dev), heads[None, :]].float()
            if rotated:  # from the token's position back to j (chunk-indexed) or 0
                back = (j_idx if mask_rope == "chunk_indexed" else torch.zeros_like(j_idx)).to(dev)
                c, s_ = _signed_rotation(cos, sin, back[:, None] - tok.to(dev))
                k = rotate_reference(k, c, s_)
            elif mask_rope == "chunk_indexed":
                pos = j_idx.to(dev)
                k = rotate_reference(k, cos[pos][:, None, :], sin[pos][:, None, :])
            k = k.to(dot_dtype).double()
            s = torch.einsum("chd,hrd->chr", k, qh).amax(-1) * k_scale
            return s.cpu()

        best = torch.full(lo.shape, float("-inf"), dtype=torch.float64)
        for _ in range(_num_iters(chunk_size)):
            length = hi - lo
            half = (length + 1) // 2
            mid = lo + half
            has_r = length > half
            tok_l = lo + half // 2
            tok_r = torch.where(has_r, mid + (length - half) // 2, lo)
            if on_read is not None:
                on_read(seq, tok_l, torch.ones_like(has_r))
                on_read(seq, tok_r, has_r)
            s_l = score(tok_l)
            s_r = score(tok_r)
            s_r = torch.where(has_r, s_r, torch.full_like(s_r, float("-inf")))
            go_r = s_r > s_l
            best = torch.maximum(best, torch.maximum(s_l, s_r))
            lo = torch.where(go_r, mid, lo)
            hi = torch.where(go_r, hi, mid)
        if score_norm == "head_max":
            # each head relative to its own best candidate (valid candidates only)
            best = best - best.amax(0, keepdim=True)
        scores[b, j_idx] = best.amax(1).float()
    n_cand = torch.tensor(counts, dtype=torch.int32, device=dev)
    return scores.to(dev), all_starts.to(dev, torch.int32), n_cand


def run_stage_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    qblocks: QueryBlocks,
    cand_starts: torch.Tensor | None,
    cand_count: torch.Tensor | None,
    *,
    chunk_size: int,
    keep_chunks: int,
    query_pool: int,
    sink_tokens: int,
    k_scale: float = 1.0,
    mask_rope: str | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    rope_distance: int = 1024,
    score_norm: str = "none",
    keys_rotated: bool = False,
    on_read: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`vllm_hip_kernels.prune.run_stage` (``on_read``: see
    :func:`score_chunks_reference`)."""
    scores, starts, _ = score_chunks_reference(
        q, key_cache, block_table, seq_lens, qblocks, cand_starts, cand_count,
        chunk_size=chunk_size, query_pool=query_pool, sink_tokens=sink_tokens, k_scale=k_scale,
        mask_rope=mask_rope, cos=cos, sin=sin, rope_distance=rope_distance, score_norm=score_norm,
        keys_rotated=keys_rotated, on_read=on_read,
    )
    nb = scores.shape[0]
    out = torch.full((nb, keep_chunks), -1, dtype=torch.int32)
    count = torch.zeros(nb, dtype=torch.int32)
    scores, starts = scores.cpu(), starts.cpu()
    for b in range(nb):
        ok = torch.nonzero(scores[b] > float("-inf")).flatten()
        order = ok[torch.argsort(scores[b, ok], descending=True, stable=True)][:keep_chunks]
        kept = torch.sort(starts[b, order]).values
        out[b, : kept.numel()] = kept
        count[b] = kept.numel()
    return out.to(q.device), count.to(q.device)


def split_chunks_reference(
    starts: torch.Tensor,
    count: torch.Tensor,
    chunk_size: int,
    next_chunk_size: int,
    window_start: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`vllm_hip_kernels.prune.split_chunks` (a loop per block)."""
    nb, k = starts.shape
    ratio = chunk_size // next_chunk_size
    out = torch.full((nb, k * ratio), -1, dtype=torch.int32)
    cnt = torch.zeros(nb, dtype=torch.int32)
    for b in range(nb):
        w0 = int(window_start[b])
        subs = [
            s + i * next_chunk_size
            for s in starts[b, : int(count[b])].tolist()
            if s >= 0
            for i in range(ratio)
            if s + i * next_chunk_size < w0
        ]
        out[b, : len(subs)] = torch.tensor(subs, dtype=torch.int32)
        cnt[b] = len(subs)
    return out.to(starts.device), cnt.to(starts.device)


def select_blocks_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    qblocks: QueryBlocks,
    stages: Sequence[Any],
    *,
    sink_tokens: int,
    k_scale: float = 1.0,
    mask_rope: str | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    rope_distance: int = 1024,
    score_norm: str = "none",
    cached_inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    first_stage: int = 0,
    keys_rotated: bool = False,
    on_read: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Reference of :func:`vllm_hip_kernels.prune.select_blocks`. ``on_read(stage, seq, tok,
    read)`` sees the keys each stage samples (see :func:`score_chunks_reference`)."""
    nb = qblocks.num_blocks
    if len(stages) == 0:
        return (
            torch.empty((nb, 0), dtype=torch.int32, device=q.device),
            torch.zeros(nb, dtype=torch.int32, device=q.device),
            [],
        )
    stage_inputs: list = [None] * len(stages)
    inp = cached_inputs
    starts = count = None
    for i in range(first_stage, len(stages)):
        st = stages[i]
        stage_inputs[i] = inp
        cs, cc = inp if inp is not None else (None, None)
        starts, count = run_stage_reference(
            q, key_cache, block_table, seq_lens, qblocks, cs, cc,
            chunk_size=st.chunk_size, keep_chunks=st.keep_tokens // st.chunk_size,
            query_pool=st.query_pool, sink_tokens=sink_tokens, k_scale=k_scale,
            mask_rope=mask_rope, cos=cos, sin=sin, rope_distance=rope_distance, score_norm=score_norm,
            keys_rotated=keys_rotated,
            on_read=None if on_read is None else (lambda seq, tok, read, i=i: on_read(i, seq, tok, read)),
        )
        if i + 1 < len(stages):
            inp = split_chunks_reference(
                starts, count, st.chunk_size, stages[i + 1].chunk_size, qblocks.window_start
            )
    return starts, count, stage_inputs
