"""Block-sparse attention over vLLM's paged KV cache (InfiniteHiP §4, streaming RoPE of §5).

Each query at position ``p`` of a query block (window start ``W0``) attends to::

    sink [0, min(sink, p + 1))  +  selected tokens (< W0)  +  window [W0, p]

with one FlashAttention-style kernel for decode, prefill and mixed batches (see
``sparse_attention_kernels``). Decode batches are split along the key list (split-K) so that a
handful of (block, kv head) pairs still fill the GPU; the split count comes from host integers only,
so launches never synchronize with the device and can be captured in CUDA graphs.
"""

from __future__ import annotations

import functools
import os

import torch

from vllm_hip_kernels.cached_pages import CachedPages, cache_offsets, check_slot_table
from vllm_hip_kernels.query_blocks import QueryBlocks
from vllm_hip_kernels.sparse_attention_kernels import (
    _combine_splits_kernel,
    _sparse_attention_fwd_kernel,
)

__all__ = ["CachedPages", "choose_num_splits", "sparse_attention"]

_Q_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_KV_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
_HEAD_DIMS = (32, 64, 128, 256)

#: H100 SXM: the default of :func:`choose_num_splits`.
_DEFAULT_SM_COUNT = 132
#: Upper bound of decode splits (the combine kernel holds all of a row's splits in registers).
MAX_SPLITS = 64
#: A split should walk at least this many key tiles, or the combine costs more than it saves.
_MIN_TILES_PER_SPLIT = 2
#: Aim for this many waves of programs over the SMs.
_TARGET_WAVES = 2


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _tile_config(
    head_dim: int, group: int, max_q_len: int, fp32: bool = False
) -> tuple[int, int, int, int, int]:
    """(BLOCK_Q, H_TILE, BLOCK_N, num_warps, num_stages): fixed per shape, never autotuned.

    From an H100 sweep at Llama-3.1-8B shapes (bf16, D 128, rope, 1M context): decode with 128-key
    tiles took 17.0 us vs 20.7 us with 64; a 4096-query chunk with 128 rows x 64 keys took 2.1 ms
    vs 4.4 ms with 64 x 32. Every 16-bit config here compiles for sm_90 with at most 16 bytes of
    register spills (ptxas -v) and <= 139 KB of shared memory; fp32 inputs (exactness tests only)
    get small tiles so that their shared memory fits.
    """
    g2 = _next_pow2(group)
    if max_q_len <= 1:
        # Decode: all query heads of a kv head are the rows, padded to the 16 rows tl.dot needs.
        h_tile = min(max(16, g2), 64)
        if fp32 or head_dim > 128:
            return 1, h_tile, 32, 4, (1 if fp32 else 2)
        return 1, h_tile, 128, 4, 2
    # Prefill: rows = queries x heads of one kv head (GQA rows share each K/V tile).
    if fp32 or head_dim > 128:
        block_m, block_n, stages = 64, 32, (1 if fp32 else 2)
    else:
        block_m, block_n, stages = 128, 64, 2
    h_tile = min(g2, block_m)
    block_q = min(block_m // h_tile, _next_pow2(max_q_len))
    h_tile = max(h_tile, 16 // block_q)
    return block_q, h_tile, block_n, 8, stages


def choose_num_splits(programs: int, max_key_tiles: int, sm_count: int = _DEFAULT_SM_COUNT) -> int:
    """Deterministic split-K count: enough programs for ~2 waves, >= 2 key tiles per split.

    Parameters
    ----------
    programs : int
        Programs of the grid without splitting (query tiles x kv-head tiles).
    max_key_tiles : int
        Upper bound of key tiles (``BLOCK_N`` keys) in one query block's key list.
    sm_count : int
        Streaming multiprocessors of the device.
    """
    if programs <= 0 or programs >= sm_count:
        return 1
    want = _cdiv(_TARGET_WAVES * sm_count, programs)
    cap = max(1, _cdiv(max_key_tiles, _MIN_TILES_PER_SPLIT))
    return max(1, min(want, cap, MAX_SPLITS))


def _cache_args(
    cached: CachedPages | None, key_cache: torch.Tensor, value_cache: torch.Tensor
) -> tuple:
    """(PageSlot, Counters, delta_k, delta_v, stride_ckp, stride_cvp) for the kernel."""
    if cached is None:
        return key_cache, key_cache, 0, 0, 0, 0  # unused pointers when CACHED is False
    check_slot_table(cached, key_cache.shape[0])
    delta_k, stride_ck = cache_offsets("key_cache", cached.key_cache, key_cache)
    delta_v, stride_cv = cache_offsets("value_cache", cached.value_cache, value_cache)
    return cached.slot_of_page, cached.counters, delta_k, delta_v, stride_ck, stride_cv


def _check_int_tensor(name: str, t: torch.Tensor, dims: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != dims:
        got = f"{t.dtype} with {t.dim()} dims" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be an int32 tensor with {dims} dims, got {got}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of q)")


def sparse_attention(
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
    softcap: float | None = 0.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    num_splits: int = 0,
    window_tokens: int | None = None,
    page_cache: CachedPages | None = None,
    tile_q_len: int | None = None,
    keys_rotated: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sink + selected blocks + sliding window attention of every query block.

    Parameters
    ----------
    q : torch.Tensor
        [total_q, Hq, D] packed queries (bf16, fp16 or fp32); D a power of two in 32..256.
        Unrotated when ``cos``/``sin`` are given (rotated at its true positions with
        ``keys_rotated``).
    key_cache, value_cache : torch.Tensor
        [num_pages, page_size, Hkv, D], any strides (views of vLLM's [num_pages, 2, ...] cache);
        bf16, fp16, fp32 or ``torch.float8_e4m3fn`` (dequantized with ``k_scale`` / ``v_scale``).
        ``page_size`` must be a multiple of ``block_size_k``; Hq must be a multiple of Hkv.
    block_table : torch.Tensor
        int32 [num_seqs, max_pages_per_seq]: page of token t of sequence s is
        ``block_table[s, t // page_size]``.
    seq_lens : torch.Tensor
        int32 [num_seqs], tokens in the cache per sequence, including the current queries.
    qblocks : QueryBlocks
        Query blocks (on q's device); its host ints size the grid.
    sel_blocks : torch.Tensor
        int32 [NB, max_sel_blocks]: selected block starts per query block (multiples of
        ``block_size_k`` in [sink, W0), ascending and distinct, valid entries first, padding -1).
    sel_count : torch.Tensor
        int32 [NB], valid entries of ``sel_blocks``.
    sink_tokens : int
        Sink length (the first tokens every query sees).
    block_size_k : int
        Tokens per selected block (power of two).
    sm_scale : float
        Softmax scale applied to q.k (runtime argument, not specialized).
    softcap : float or None
        If > 0, scores become ``softcap * tanh(score / softcap)`` (after ``sm_scale``).
    k_scale, v_scale : float
        Dequantization scales of an fp8 cache (keys/values are multiplied by them).
    cos, sin : torch.Tensor, optional
        fp32 [max_positions, D / 2] neox RoPE tables. When given, q and the cached keys are
        unrotated and rotated here at streaming positions: the query and window keys at their true
        positions, the ``n_sel`` valid selected tokens at ``W0 - n_sel + j``, sink token s at
        ``W0 - n_sel - sink_tokens + s``. ``max_positions`` must cover ``qblocks.max_seq_len``.
    out : torch.Tensor, optional
        [total_q, Hq, D] output buffer of q's dtype. Rows of no query block are not written.
    return_lse : bool
        Also return the natural-log log-sum-exp of every row's scores.
    num_splits : int
        Split-K partitions of each block's key list; 0 picks them with :func:`choose_num_splits`.
    window_tokens : int, optional
        Window length of the config; only tightens the key-list bound of the split heuristic
        (without it the bound is ``qblocks.max_seq_len``).
    page_cache : CachedPages, optional
        A GPU cache of hot pages: cached pages are read from it, the others from ``key_cache`` /
        ``value_cache`` (which may live in host memory), and the reads are counted.
    tile_q_len : int, optional
        Size the tiles as if the longest query block had this many queries (at least
        ``qblocks.max_q_len``) instead of the batch's longest. With a constant here and a fixed
        ``num_splits``, a query's output no longer depends on the other blocks of the launch
        (batch-invariant serving).
    keys_rotated : bool
        With ``cos``/``sin``: q and the cached keys carry the model's RoPE at their true positions
        (as every vLLM backend caches them). Same streaming positions as above: the query and
        window keys stay as they are, a sink or selected key turns by its assigned minus its true
        position (>= 0).

    Returns
    -------
    torch.Tensor or tuple
        ``out`` [total_q, Hq, D] in q's dtype, and with ``return_lse`` also ``lse`` fp32
        [total_q, Hq] (``-inf`` for a row that attends to nothing).
    """
    softcap = float(softcap or 0.0)  # vLLM passes None for "no soft-capping"
    if q.dim() != 3 or key_cache.dim() != 4 or value_cache.dim() != 4:
        raise ValueError("q must be [total_q, Hq, D] and the caches [num_pages, page_size, Hkv, D]")
    total_q, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, kd = key_cache.shape
    if value_cache.shape != key_cache.shape:
        raise ValueError(
            f"value_cache {tuple(value_cache.shape)} != key_cache {tuple(key_cache.shape)}"
        )
    if kd != head_dim or head_dim not in _HEAD_DIMS:
        raise ValueError(
            f"head_dim must match q ({head_dim}) and the cache ({kd}) and be in {_HEAD_DIMS}"
        )
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"Hq={num_q_heads} must be a multiple of Hkv={num_kv_heads}")
    if q.dtype not in _Q_DTYPES:
        raise ValueError(f"q dtype {q.dtype} not supported; use one of {_Q_DTYPES}")
    if key_cache.dtype not in _KV_DTYPES or value_cache.dtype != key_cache.dtype:
        raise ValueError(
            f"cache dtypes {key_cache.dtype}/{value_cache.dtype} not supported; "
            f"use one of {_KV_DTYPES}"
        )
    if block_size_k <= 0 or block_size_k & (block_size_k - 1) or page_size % block_size_k:
        raise ValueError(
            f"block_size_k={block_size_k} must be a power of two dividing page_size={page_size}"
        )
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens={sink_tokens} must be >= 0")
    device = q.device
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cpu" and not interpret:
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device}")
    _check_int_tensor("block_table", block_table, 2, device)
    _check_int_tensor("seq_lens", seq_lens, 1, device)
    _check_int_tensor("sel_blocks", sel_blocks, 2, device)
    _check_int_tensor("sel_count", sel_count, 1, device)
    for name in ("seq", "q_start", "q_len", "pos", "window_start"):
        _check_int_tensor(f"qblocks.{name}", getattr(qblocks, name), 1, device)
    nb = qblocks.num_blocks
    if sel_blocks.shape[0] != nb or sel_count.shape[0] != nb:
        raise ValueError(
            f"sel_blocks/sel_count have {sel_blocks.shape[0]}/{sel_count.shape[0]} rows, "
            f"expected NB={nb}"
        )
    rope = cos is not None or sin is not None
    if rope:
        if cos is None or sin is None:
            raise ValueError("cos and sin must be given together")
        for name, t in (("cos", cos), ("sin", sin)):
            if (
                t.dtype != torch.float32
                or t.dim() != 2
                or t.shape[1] != head_dim // 2
                or t.device != device
            ):
                raise ValueError(
                    f"{name} must be fp32 [max_positions, {head_dim // 2}] on {device}"
                )
            if t.shape[0] < qblocks.max_seq_len:
                raise ValueError(
                    f"{name} covers {t.shape[0]} positions < max_seq_len {qblocks.max_seq_len}"
                )
        cos = cos if cos.stride(1) == 1 else cos.contiguous()
        sin = sin if sin.stride(1) == 1 else sin.contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != device:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {device}")
    lse = (
        torch.empty((total_q, num_q_heads), dtype=torch.float32, device=device)
        if return_lse
        else None
    )
    if nb == 0 or total_q == 0:
        return (out, lse) if return_lse else out

    group = num_q_heads // num_kv_heads
    max_q_len = qblocks.max_q_len
    if tile_q_len is not None:
        if tile_q_len < max_q_len:
            raise ValueError(f"tile_q_len={tile_q_len} < the longest query block ({max_q_len})")
        max_q_len = tile_q_len
    block_q, h_tile, block_n, num_warps, num_stages = _tile_config(
        head_dim, group, max_q_len, q.dtype == torch.float32
    )
    n_q_tiles = _cdiv(max(max_q_len, 1), block_q)
    n_h_tiles = _cdiv(group, h_tile)
    if num_splits <= 0:
        max_len = qblocks.max_seq_len
        win = (
            max_len
            if window_tokens is None
            else min(max_len, window_tokens + max_q_len - 1)
        )
        max_tiles = (
            _cdiv(min(sink_tokens, max_len), block_n)
            + _cdiv(sel_blocks.shape[1] * block_size_k, block_n)
            + _cdiv(win, block_n)
        )
        if device.type == "cuda":
            sms = _sm_count(
                device.index if device.index is not None else torch.cuda.current_device()
            )
        else:
            sms = 1  # the interpreter runs programs one by one: splitting only adds work
        num_splits = choose_num_splits(nb * n_q_tiles * num_kv_heads * n_h_tiles, max_tiles, sms)
    num_splits = min(int(num_splits), MAX_SPLITS)

    if sel_blocks.shape[1] == 0:
        # Keep a valid pointer for the (fully masked) selection loads.
        sel_blocks = torch.full((nb, 1), -1, dtype=torch.int32, device=device)
    if num_splits > 1:
        part_o = torch.empty(
            (total_q, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=device
        )
        part_lse = torch.empty(
            (total_q, num_q_heads, num_splits), dtype=torch.float32, device=device
        )
    else:
        part_o = part_lse = out  # unused
    cache_args = _cache_args(page_cache, key_cache, value_cache)
    lse_arg = lse if lse is not None else out  # unused when STORE_LSE is False
    tables = (cos, sin) if rope else (q, q)  # unused when ROPE is False
    cs_strides = (cos.stride(0), sin.stride(0)) if rope else (0, 0)
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)

    grid = (nb * n_q_tiles, num_kv_heads * n_h_tiles, num_splits)
    _sparse_attention_fwd_kernel[grid](
        q,
        key_cache,
        value_cache,
        out,
        lse_arg,
        part_o,
        part_lse,
        block_table,
        seq_lens,
        qblocks.seq,
        qblocks.q_start,
        qblocks.q_len,
        qblocks.pos,
        qblocks.window_start,
        sel_blocks,
        sel_count,
        tables[0],
        tables[1],
        *cache_args[:4],
        float(sm_scale),
        float(softcap),
        float(k_scale),
        float(v_scale),
        int(sink_tokens),
        group,
        n_q_tiles,
        n_h_tiles,
        num_splits,
        num_q_heads,
        *q.stride(),
        *key_cache.stride(),
        *value_cache.stride(),
        *out.stride(),
        *lse_strides,
        block_table.stride(0),
        sel_blocks.stride(0),
        *cs_strides,
        *cache_args[4:],
        PAGE_SIZE=page_size,
        HEAD_DIM=head_dim,
        BLOCK_SIZE_K=block_size_k,
        BLOCK_Q=block_q,
        H_TILE=h_tile,
        BLOCK_N=block_n,
        SPLIT=num_splits > 1,
        ROPE=rope,
        KEYS_ROTATED=rope and keys_rotated,
        SOFTCAP=softcap > 0,
        STORE_LSE=return_lse,
        IEEE=q.dtype == torch.float32 or interpret,
        CACHED=page_cache is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _combine_splits_kernel[(nb, num_q_heads)](
            part_o,
            part_lse,
            out,
            lse_arg,
            qblocks.q_start,
            qblocks.q_len,
            num_q_heads,
            num_splits,
            *out.stride(),
            *lse_strides,
            HEAD_DIM=head_dim,
            SPLITS_PAD=_next_pow2(num_splits),
            STORE_LSE=return_lse,
            num_warps=4,
        )
    return (out, lse) if return_lse else out
