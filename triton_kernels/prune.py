"""Multi-stage hierarchical pruning (InfiniteHiP §2): launchers.

One *stage* scores candidate chunks of the region ``[sink, W0)`` of every query block and keeps
the best ones::

    candidates  |sink| c0 | c1 | c2 | ... | c(C-1) |W0 ... window ... queries
    per chunk:  binary search for a representative token (log2(chunk) halvings, one sampled
                key per half, score = max over pooled queries and the kv head's G query heads
                of q.k), chunk score = best score met, then max over kv heads
    keep:       top ``keep_chunks`` chunks, sorted by position, -1 padded

:func:`select_blocks` chains stages (e.g. 256 → 32 → 8), splitting each survivor into the next
stage's chunks (:func:`split_chunks`); the last stage's chunk starts are the selected key blocks.
Nothing here syncs with the host (CUDA-graph safe): grids are sized from host ints
(``QueryBlocks.max_*`` and tensor shapes). A stage is three launches: query pooling, chunk
scoring (grid: chunk tiles x kv heads x query blocks, per-head scores [NB, Hkv, C]) and a fused
head-max + top-k + sort (one program per block; ties keep the earliest candidates). Measured on
an H100, graph-replayed: stage 1 over 1M tokens for a decode block (4096 chunks of 256, Hkv 8,
D 128, bf16) takes ~78 us (62 us of it scoring, ~2.2 TB/s of sampled keys), the 3-stage
256 -> 32 -> 8 selection ~142 us.

Mask-estimation RoPE (``mask_rope``), with UNROTATED ``q`` and keys and fp32 ``cos``/``sin``
tables [max_positions, D/2]:

- ``None``: no rotation (keys in the cache already carry the model's rotation);
- ``"relative"``: queries rotated at ``rope_distance``, keys at 0 (used as they are): chunks are
  ranked by content, not by distance;
- ``"chunk_indexed"``: a key sampled from candidate ``j`` (its index in this stage's candidate
  list) is rotated at position ``j``; the block's queries sit at ``C_b`` = its number of
  candidates.

With ``keys_rotated`` the queries and keys arrive rotated at their true positions (the model's
RoPE, as vLLM caches keys for every backend) and turn by the difference instead: query ``i`` by
its scoring position minus ``pos + i`` before the mean pool, each sampled key by its scoring
position minus its token index (one cos/sin row per sampled key, read with it).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import triton

from .cached_pages import CachedPages, cache_offsets, check_slot_table
from .prune_kernels import (
    _keep_top_kernel,
    _pool_queries_kernel,
    _score_chunks_kernel,
    _split_chunks_kernel,
)
from .query_blocks import QueryBlocks

__all__ = ["score_chunks", "run_stage", "split_chunks", "select_blocks", "MASK_ROPE_MODES"]

MASK_ROPE_MODES = (None, "relative", "chunk_indexed")
_SUPPORTED_KEY_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
_INT32_MAX = 2**31 - 1


def _num_iters(chunk_size: int) -> int:
    # ceil(log2(chunk)) halvings take a full chunk down to one token; at least one step so a
    # one-token chunk is still scored.
    return max(1, math.ceil(math.log2(chunk_size))) if chunk_size > 1 else 1


def _first_stage_count(qblocks: QueryBlocks, chunk_size: int, sink_tokens: int) -> int:
    return max(0, -(-(qblocks.max_window_start - sink_tokens) // chunk_size))


#: Benchmarks only: entries of the launch config (block_r, block_c, use_dot, num_warps,
#: bt_prefetch) forced over the heuristic. Never set when serving.
_TILE_OVERRIDE: dict | None = None

#: Largest candidate count (padded to a power of two) the fused top-k kernel holds in registers;
#: stages with more candidates (contexts beyond ~4M tokens at chunk 256) use a torch sort.
_MAX_FUSED_TOPK = 16384


def _launch_config(rows: int, num_cand: int | None, chunk_size: int, page_size: int) -> dict:
    """Tile sizes for the scoring kernel: a fixed heuristic, no autotuning when serving.

    Measured on an H100 (stage 1, 1M tokens, Hkv 8, D 128, bf16; pool + score kernels):
    decode 62 us with these choices, vs 82 us prefetching the block table per chunk, 73-101 us
    with 32 or 128 chunk tiles, and 330 us with a broadcast multiply-sum in place of a 16-row
    padded tl.dot; a 64-query prefill block 98 us vs 109-118 us for the alternatives.
    ``num_cand=None``: chunk tiles that do not follow the batch's candidate count
    (batch-invariant launches).
    """
    block_c = 64 if rows <= 16 else 32
    if num_cand is not None:
        block_c = min(block_c, max(16, triton.next_power_of_2(num_cand)))
    cfg = {
        "block_r": min(64, max(16, triton.next_power_of_2(rows))),
        "block_c": block_c,
        "use_dot": True,
        "num_warps": 4,
        "bt_prefetch": False,
    }
    if _TILE_OVERRIDE:
        cfg.update(_TILE_OVERRIDE)
    return cfg


def _check_inputs(q, key_cache, block_table, seq_lens, qblocks, mask_rope, cos, sin):
    if q.dim() != 3:
        raise ValueError(f"q must be [total_q, Hq, D], got shape {tuple(q.shape)}")
    if key_cache.dim() != 4:
        raise ValueError(
            f"key_cache must be [num_pages, page_size, Hkv, D], got shape {tuple(key_cache.shape)}"
        )
    _, num_q_heads, head_dim = q.shape
    _, _, num_kv_heads, kd = key_cache.shape
    if kd != head_dim:
        raise ValueError(f"q head_dim {head_dim} != key_cache head_dim {kd}")
    if head_dim < 32 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 32, got {head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"Hq={num_q_heads} is not a multiple of Hkv={num_kv_heads}")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q dtype must be bf16, fp16 or fp32, got {q.dtype}")
    if key_cache.dtype not in _SUPPORTED_KEY_DTYPES:
        raise ValueError(f"key_cache dtype {key_cache.dtype} is not supported")
    if block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise ValueError("block_table must be int32 [num_seqs, max_pages_per_seq]")
    if block_table.stride(1) != 1:
        raise ValueError("block_table rows must be contiguous")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != block_table.shape[0]:
        raise ValueError("seq_lens must be [num_seqs], one per block_table row")
    dev = q.device
    for name, t in (("key_cache", key_cache), ("block_table", block_table),
                    ("qblocks.seq", qblocks.seq), ("qblocks.window_start", qblocks.window_start)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, q on {dev}")
    if mask_rope not in MASK_ROPE_MODES:
        raise ValueError(f"mask_rope={mask_rope!r}: must be one of {MASK_ROPE_MODES}")
    if mask_rope is not None:
        if cos is None or sin is None:
            raise ValueError(f"mask_rope={mask_rope!r} needs cos and sin tables")
        for name, t in (("cos", cos), ("sin", sin)):
            if t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != head_dim // 2:
                raise ValueError(f"{name} must be fp32 [max_positions, D/2={head_dim // 2}]")
            if t.stride(1) != 1 or t.device != dev:
                raise ValueError(f"{name} must have a contiguous last dim and live on {dev}")
        if cos.shape != sin.shape or cos.stride() != sin.stride():
            raise ValueError("cos and sin must have the same shape and strides")


def _head_scores(
    q, key_cache, block_table, seq_lens, qblocks, cand_starts, cand_count, *, chunk_size,
    query_pool, sink_tokens, k_scale, mask_rope, cos, sin, rope_distance, page_cache=None,
    tile_q_len=None, keys_rotated=False,
):
    """Per-kv-head chunk scores [NB, Hkv, C] (pool + score kernels), or None when C or NB is 0.

    Returns (scores, num_cand, cand_starts or None)."""
    _check_inputs(q, key_cache, block_table, seq_lens, qblocks, mask_rope, cos, sin)
    if chunk_size < 1 or query_pool < 1:
        raise ValueError("chunk_size and query_pool must be >= 1")
    dev = q.device
    nb = qblocks.num_blocks
    _, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = key_cache.shape
    group = num_q_heads // num_kv_heads

    first = cand_starts is None
    if first:
        num_cand = _first_stage_count(qblocks, chunk_size, sink_tokens)
    else:
        if cand_count is None:
            raise ValueError("cand_count is required with cand_starts")
        if cand_starts.dim() != 2 or cand_starts.shape[0] != nb or cand_starts.dtype != torch.int32:
            raise ValueError(f"cand_starts must be int32 [NB={nb}, C]")
        if cand_count.shape != (nb,) or cand_count.dtype != torch.int32:
            raise ValueError(f"cand_count must be int32 [NB={nb}]")
        if cand_starts.stride(1) != 1:
            cand_starts = cand_starts.contiguous()
        num_cand = cand_starts.shape[1]
    if mask_rope == "relative" and cos.shape[0] <= rope_distance:
        raise ValueError(f"cos/sin have {cos.shape[0]} positions, rope_distance={rope_distance}")
    if mask_rope == "chunk_indexed" and cos.shape[0] <= num_cand:
        raise ValueError(f"cos/sin have {cos.shape[0]} positions, need > {num_cand} candidates")
    rotated = keys_rotated and mask_rope is not None
    if rotated and cos.shape[0] < qblocks.max_seq_len:
        raise ValueError(f"cos/sin have {cos.shape[0]} positions < max_seq_len {qblocks.max_seq_len}")
    if nb == 0 or num_cand == 0:
        return None, num_cand, cand_starts

    if tile_q_len is not None and tile_q_len < qblocks.max_q_len:
        raise ValueError(f"tile_q_len={tile_q_len} < the longest query block ({qblocks.max_q_len})")
    rows = -(-(tile_q_len or qblocks.max_q_len) // query_pool) * group
    cfg = _launch_config(rows, None if tile_q_len else num_cand, chunk_size, page_size)
    block_r, block_c = cfg["block_r"], cfg["block_c"]
    rows_pad = -(-rows // block_r) * block_r
    npg = triton.next_power_of_2(-(-chunk_size // page_size) + 1) if cfg["bt_prefetch"] else 0
    qp = torch.empty((nb, num_kv_heads, rows_pad, head_dim), device=dev, dtype=q.dtype)
    scores = torch.empty((nb, num_kv_heads, num_cand), device=dev, dtype=torch.float32)
    rope = mask_rope is not None
    # unused pointer arguments (their constexpr branch is off) get any int32 tensor
    dummy = qblocks.q_len
    cos_t = cos if rope else dummy
    sin_t = sin if rope else dummy
    stride_cos = cos.stride(0) if rope else 0
    cs_t = dummy if first else cand_starts
    cc_t = dummy if first else cand_count
    stride_cs = 0 if first else cand_starts.stride(0)
    if page_cache is not None:
        check_slot_table(page_cache, key_cache.shape[0])
        delta_k, stride_ck = cache_offsets("key_cache", page_cache.key_cache, key_cache)
        cache_t = (page_cache.slot_of_page, page_cache.counters, delta_k, stride_ck)
    else:
        cache_t = (dummy, dummy, 0, 0)

    _pool_queries_kernel[(rows_pad // block_r, num_kv_heads, nb)](
        q, q.stride(0), q.stride(1), q.stride(2),
        qblocks.q_start, qblocks.q_len, cc_t, qblocks.window_start, qblocks.pos,
        rope_distance, sink_tokens, chunk_size,
        cos_t, sin_t, stride_cos,
        qp, rows_pad, num_kv_heads, group,
        POOL=query_pool, HALF_D=head_dim // 2, BLOCK_R=block_r,
        ROPE_Q=rope, Q_POS_MODE=0 if mask_rope != "chunk_indexed" else (2 if first else 1),
        Q_ROTATED=rotated,
        num_warps=4,
    )
    _score_chunks_kernel[(triton.cdiv(num_cand, block_c), num_kv_heads, nb)](
        qp, rows_pad,
        key_cache, key_cache.stride(0), key_cache.stride(1),
        key_cache.stride(2), key_cache.stride(3),
        block_table, block_table.stride(0), block_table.shape[1],
        qblocks.seq, qblocks.q_len, qblocks.window_start,
        cs_t, stride_cs, cc_t,
        cos_t, sin_t, stride_cos,
        *cache_t,
        scores, num_cand, num_kv_heads, group, sink_tokens, chunk_size, float(k_scale),
        PAGE_SIZE=page_size, HALF_D=head_dim // 2, POOL=query_pool,
        BLOCK_C=block_c, BLOCK_R=block_r, N_ITERS=_num_iters(chunk_size),
        FIRST_STAGE=first, ROPE_K=mask_rope == "chunk_indexed", KEYS_ROTATED=rotated,
        ROUND_K=key_cache.dtype.itemsize > q.dtype.itemsize, USE_DOT=cfg["use_dot"],
        IEEE=q.dtype == torch.float32 or not q.is_cuda, ONE_ROW_TILE=rows_pad == block_r,
        NPG=npg, CACHED=page_cache is not None,
        num_warps=cfg["num_warps"],
    )
    return scores, num_cand, cand_starts


def _stage_starts_counts(qblocks, cand_starts, cand_count, num_cand, chunk_size, sink_tokens):
    if cand_starts is not None:
        return cand_starts, cand_count
    dev = qblocks.window_start.device
    starts = sink_tokens + chunk_size * torch.arange(num_cand, device=dev, dtype=torch.int32)
    n_cand = torch.clamp(
        (qblocks.window_start - sink_tokens + chunk_size - 1) // chunk_size, min=0
    ).to(torch.int32)
    return starts.expand(qblocks.num_blocks, num_cand), n_cand


def score_chunks(
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
    page_cache: CachedPages | None = None,
    keys_rotated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score every candidate chunk of every query block (inspection and tests; :func:`run_stage`
    fuses the head max and the top-k instead).

    Parameters are those of :func:`run_stage` (``keep_chunks`` aside).

    Returns
    -------
    scores : torch.Tensor
        [NB, C] fp32, max over kv heads of the per-head binary-search score; ``-inf`` for
        invalid candidates (padding, start >= W0).
    starts : torch.Tensor
        [NB, C] int32 candidate chunk starts (first stage: ``sink + j * chunk_size``).
    n_cand : torch.Tensor
        [NB] int32 number of candidates per block (``C_b``).
    """
    head_scores, num_cand, cand_starts = _head_scores(
        q, key_cache, block_table, seq_lens, qblocks, cand_starts, cand_count,
        chunk_size=chunk_size, query_pool=query_pool, sink_tokens=sink_tokens, k_scale=k_scale,
        mask_rope=mask_rope, cos=cos, sin=sin, rope_distance=rope_distance, page_cache=page_cache,
        keys_rotated=keys_rotated,
    )
    starts, n_cand = _stage_starts_counts(
        qblocks, cand_starts, cand_count, num_cand, chunk_size, sink_tokens
    )
    if head_scores is None:
        nb = qblocks.num_blocks
        scores = torch.full((nb, num_cand), float("-inf"), device=q.device, dtype=torch.float32)
    else:
        scores = normalize_head_scores(head_scores, score_norm).amax(1)
    return scores, starts, n_cand


SCORE_NORMS = ("none", "head_max")


def normalize_head_scores(head_scores: torch.Tensor, score_norm: str) -> torch.Tensor:
    """Per-kv-head chunk scores [NB, Hkv, C] as they enter the max over heads.

    ``"none"``: raw scores. ``"head_max"``: each head's scores minus that head's best over the
    block's candidates, so a head with large logits everywhere cannot crowd out another head's
    peak (measured on SmolLM2: the passkey block was rank 0 for a retrieval head and rank 272 of
    800 after the raw max over heads). Invalid candidates stay -inf.
    """
    if score_norm == "none":
        return head_scores
    if score_norm != "head_max":
        raise ValueError(f"score_norm={score_norm!r} must be one of {SCORE_NORMS}")
    ref = head_scores.amax(-1, keepdim=True)
    return head_scores - torch.where(torch.isfinite(ref), ref, torch.zeros_like(ref))


def _keep_top_torch(scores: torch.Tensor, starts: torch.Tensor, keep_chunks: int):
    """Fallback of the fused top-k for very many candidates. Ties go to the earliest candidates,
    as in the fused kernel (a stable sort, where torch.topk's choice among ties is unspecified)."""
    nb, num_cand = scores.shape
    dev = scores.device
    out = torch.full((nb, keep_chunks), -1, device=dev, dtype=torch.int32)
    kk = min(keep_chunks, num_cand)
    if kk == 0 or nb == 0:
        return out, torch.zeros(nb, device=dev, dtype=torch.int32)
    vals, idx = torch.sort(scores, dim=1, descending=True, stable=True)
    vals, idx = vals[:, :kk], idx[:, :kk]
    picked = torch.gather(starts.expand(nb, num_cand), 1, idx)
    ok = vals > float("-inf")
    key = torch.where(ok, picked, torch.full_like(picked, _INT32_MAX))
    key = torch.sort(key, dim=1).values
    out[:, :kk] = torch.where(key == _INT32_MAX, torch.full_like(key, -1), key)
    return out, ok.sum(1, dtype=torch.int32)


def run_stage(
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
    page_cache: CachedPages | None = None,
    tile_q_len: int | None = None,
    keys_rotated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one pruning stage: score candidate chunks, keep the top ``keep_chunks``.

    Parameters
    ----------
    q : torch.Tensor
        [total_q, Hq, D] packed queries (bf16, fp16 or fp32); the dot runs in this dtype with
        fp32 accumulation.
    key_cache : torch.Tensor
        [num_pages, page_size, Hkv, D], any strides; bf16, fp16, fp32 or float8_e4m3fn.
    block_table : torch.Tensor
        int32 [num_seqs, max_pages_per_seq].
    seq_lens : torch.Tensor
        int32 [num_seqs] (validated for shape only; ``qblocks.window_start`` bounds the reads).
    qblocks : QueryBlocks
        Query-block descriptors (``seq``, ``q_start``, ``q_len``, ``window_start`` W0).
    cand_starts : torch.Tensor or None
        int32 [NB, C] ascending chunk starts, -1 padded; ``None`` for the first stage: all chunks
        ``sink + j * chunk_size`` below W0, C = ceil((max_window_start - sink) / chunk_size).
    cand_count : torch.Tensor or None
        int32 [NB] valid entries of ``cand_starts`` (ignored when it is None).
    chunk_size : int
        Tokens per chunk; each chunk is clipped at W0.
    keep_chunks : int
        Chunks kept per block (all of them when a block has fewer candidates).
    query_pool : int
        Mean-pool groups of this many consecutive queries of a block (last group partial).
    sink_tokens : int
        Start of the candidate region.
    k_scale : float
        Multiplies keys (fp8 caches).
    mask_rope : {None, "relative", "chunk_indexed"}
        RoPE used for scoring (see the module docstring); needs ``cos``/``sin`` unless None.
    cos, sin : torch.Tensor, optional
        fp32 [max_positions, D/2].
    rope_distance : int
        Query position in ``"relative"`` mode.
    score_norm : {"none", "head_max"}
        How per-kv-head scores combine (:func:`normalize_head_scores`).
    page_cache : CachedPages, optional
        KV offload: read keys of cached pages from this GPU cache, the others from
        ``key_cache`` (host memory), counting both (``vllm_hip_kernels.cached_pages``).
    tile_q_len : int, optional
        Size the scoring tiles as if the longest query block had this many queries, and not by
        the batch's candidate count: a block's scores then do not depend on the other blocks of
        the launch (batch-invariant serving).
    keys_rotated : bool
        With ``mask_rope``: ``q`` and the cached keys carry the model's RoPE at their true
        positions (as every vLLM backend caches them); the kernels turn each query and each
        sampled key by its scoring position minus its true one, which scores as the un-rotated
        inputs would.

    Returns
    -------
    starts : torch.Tensor
        int32 [NB, keep_chunks] kept chunk starts, ascending, -1 padded. Equal scores at the
        cut go to the earliest candidates.
    count : torch.Tensor
        int32 [NB] kept chunks per block: min(keep_chunks, valid candidates).
    """
    nb = qblocks.num_blocks
    dev = q.device
    if keep_chunks < 0:
        raise ValueError(f"keep_chunks={keep_chunks} must be >= 0")
    head_scores, num_cand, cand_starts = _head_scores(
        q, key_cache, block_table, seq_lens, qblocks, cand_starts, cand_count,
        chunk_size=chunk_size, query_pool=query_pool, sink_tokens=sink_tokens, k_scale=k_scale,
        mask_rope=mask_rope, cos=cos, sin=sin, rope_distance=rope_distance, page_cache=page_cache,
        tile_q_len=tile_q_len, keys_rotated=keys_rotated,
    )
    if head_scores is None or keep_chunks == 0:
        return (
            torch.full((nb, keep_chunks), -1, device=dev, dtype=torch.int32),
            torch.zeros(nb, device=dev, dtype=torch.int32),
        )
    block_t = triton.next_power_of_2(num_cand)
    if block_t > _MAX_FUSED_TOPK:
        starts, _ = _stage_starts_counts(
            qblocks, cand_starts, cand_count, num_cand, chunk_size, sink_tokens
        )
        return _keep_top_torch(normalize_head_scores(head_scores, score_norm).amax(1), starts, keep_chunks)
    if score_norm not in SCORE_NORMS:
        raise ValueError(f"score_norm={score_norm!r} must be one of {SCORE_NORMS}")
    out = torch.empty((nb, keep_chunks), device=dev, dtype=torch.int32)
    count = torch.empty(nb, device=dev, dtype=torch.int32)
    first = cand_starts is None
    _keep_top_kernel[(nb,)](
        head_scores, num_cand, head_scores.shape[1],
        qblocks.q_len if first else cand_starts, 0 if first else cand_starts.stride(0),
        sink_tokens, chunk_size,
        out, out.stride(0), count, keep_chunks,
        FIRST_STAGE=first, BLOCK_T=block_t, HEAD_MAX=score_norm == "head_max",
        num_warps=4 if block_t <= 1024 else (8 if block_t <= 4096 else 16),
    )
    return out, count


def split_chunks(
    starts: torch.Tensor,
    count: torch.Tensor,
    chunk_size: int,
    next_chunk_size: int,
    window_start: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split kept chunks into the next stage's candidates.

    Parameters
    ----------
    starts : torch.Tensor
        int32 [NB, K] ascending chunk starts, -1 padded.
    count : torch.Tensor
        int32 [NB] valid entries of ``starts``.
    chunk_size, next_chunk_size : int
        ``next_chunk_size`` must divide ``chunk_size``.
    window_start : torch.Tensor
        int32 [NB] W0 of each block: sub-chunks starting at or after it are dropped.

    Returns
    -------
    cand_starts : torch.Tensor
        int32 [NB, K * chunk_size / next_chunk_size] sub-chunk starts in order, -1 padded.
    cand_count : torch.Tensor
        int32 [NB].
    """
    if chunk_size % next_chunk_size:
        raise ValueError(f"next_chunk_size={next_chunk_size} must divide chunk_size={chunk_size}")
    if starts.dtype != torch.int32 or count.dtype != torch.int32 or starts.stride(1) != 1:
        raise ValueError("starts and count must be int32, starts with contiguous rows")
    nb, k = starts.shape
    ratio = chunk_size // next_chunk_size
    out = torch.empty((nb, k * ratio), device=starts.device, dtype=torch.int32)
    out_count = torch.empty(nb, device=starts.device, dtype=torch.int32)
    if nb == 0:
        return out, out_count
    _split_chunks_kernel[(nb,)](
        starts, starts.stride(0), count, window_start, k,
        out, out.stride(0), out_count, next_chunk_size,
        RATIO=ratio, BLOCK=min(1024, max(16, triton.next_power_of_2(k * ratio))),
        num_warps=4,
    )
    return out, out_count


def select_blocks(
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
    page_cache: CachedPages | None = None,
    tile_q_len: int | None = None,
    keys_rotated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Run pruning stages ``first_stage ..`` and return the selected key blocks.

    Parameters
    ----------
    q, key_cache, block_table, seq_lens, qblocks, sink_tokens, k_scale, mask_rope, cos, sin,
    rope_distance, score_norm, page_cache, tile_q_len, keys_rotated :
        As in :func:`run_stage`.
    stages : sequence
        Objects with ``chunk_size``, ``keep_tokens`` and ``query_pool`` (coarse to fine); the last
        one's chunk size is the key block size and its ``keep_tokens`` is k. Empty: k = 0.
    cached_inputs : (cand_starts, cand_count), optional
        Input of ``first_stage`` saved from an earlier call (decode mask caching); required when
        ``first_stage > 0``. With ``first_stage == 0`` and None, stage 0 tiles [sink, W0).
    first_stage : int
        First stage to run.

    Returns
    -------
    sel_blocks : torch.Tensor
        int32 [NB, k / block] selected block starts, ascending, -1 padded.
    sel_count : torch.Tensor
        int32 [NB].
    stage_inputs : list
        ``len(stages)`` entries: the (cand_starts, cand_count) stage i consumed, None for an
        implicit first stage and for stages before ``first_stage``.
    """
    nb = qblocks.num_blocks
    dev = q.device
    if len(stages) == 0:
        return (
            torch.empty((nb, 0), device=dev, dtype=torch.int32),
            torch.zeros(nb, device=dev, dtype=torch.int32),
            [],
        )
    if not 0 <= first_stage < len(stages):
        raise ValueError(f"first_stage={first_stage} outside [0, {len(stages)})")
    if first_stage > 0 and cached_inputs is None:
        raise ValueError("cached_inputs is required to start at a stage after the first")
    for i, st in enumerate(stages):
        if st.keep_tokens % st.chunk_size:
            raise ValueError(f"stages[{i}].keep_tokens must be a multiple of its chunk_size")
        if i and stages[i - 1].chunk_size % st.chunk_size:
            raise ValueError(f"stages[{i}].chunk_size must divide the previous stage's")

    stage_inputs: list = [None] * len(stages)
    inp = cached_inputs
    starts = count = None
    for i in range(first_stage, len(stages)):
        st = stages[i]
        stage_inputs[i] = inp
        cs, cc = inp if inp is not None else (None, None)
        starts, count = run_stage(
            q, key_cache, block_table, seq_lens, qblocks, cs, cc,
            chunk_size=st.chunk_size, keep_chunks=st.keep_tokens // st.chunk_size,
            query_pool=st.query_pool, sink_tokens=sink_tokens, k_scale=k_scale,
            mask_rope=mask_rope, cos=cos, sin=sin, rope_distance=rope_distance,
            score_norm=score_norm, page_cache=page_cache, tile_q_len=tile_q_len,
            keys_rotated=keys_rotated,
        )
        if i + 1 < len(stages):
            inp = split_chunks(
                starts, count, st.chunk_size, stages[i + 1].chunk_size, qblocks.window_start
            )
    return starts, count, stage_inputs
