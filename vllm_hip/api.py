"""InfiniteHiP attention on plain tensors: ``infinitehip_attention(q, k, v)``.

The same algorithm as the vLLM backend (hierarchical pruning, then sink + selected blocks + window
attention, optionally with streaming RoPE) on ordinary ``[batch, seq, heads, dim]`` tensors, for
notebooks, tests and the Hugging Face integration (:mod:`vllm_hip.hf`). Four implementations:

- ``"triton"``: the Triton kernels (``vllm_hip_kernels.prune`` / ``.sparse_attention``) over a paged
  view of k/v; on CPU tensors they need ``TRITON_INTERPRET=1``;
- ``"reference"``: their pure-PyTorch references, block by block (slow; the definition);
- ``"torch"``: a vectorized PyTorch path (all query blocks at once), the default on CPU; tests
  check that it reproduces ``"reference"``;
- ``"auto"``: ``"triton"`` on CUDA, ``"torch"`` elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

# SCORE_NORMS / normalize_head_scores: how per-kv-head chunk scores combine into one ranking;
# the kernels, the references and the CPU path below share that one definition.
from vllm_hip_kernels.prune import SCORE_NORMS, normalize_head_scores
from vllm_hip_kernels.query_blocks import QueryBlocks, build_query_blocks
from vllm_hip.config import InfiniteHipConfig

__all__ = [
    "infinitehip_attention",
    "Selection",
    "IMPLEMENTATIONS",
    "SCORE_NORMS",
    "mask_rope_for_layer",
    "required_rope_positions",
]

IMPLEMENTATIONS = ("auto", "triton", "reference", "torch")
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: Bytes of temporaries the vectorized path allows itself per slice of query blocks.
_SLICE_BYTES = 96 << 20


@dataclass
class Selection:
    """Which key blocks each query block attended to (``return_selection=True``).

    Query block ``i`` covers queries ``qblocks.q_start[i] .. + q_len[i]`` of the packed
    ``[batch * q_len]`` rows (batch row ``qblocks.seq[i]``).
    """

    sel_blocks: torch.Tensor
    """int32 [NB, max_sel]: first token of each selected ``block_size_k`` block, ascending, -1 pad."""
    sel_count: torch.Tensor
    """int32 [NB]: valid entries of ``sel_blocks``."""
    qblocks: QueryBlocks
    """The query blocks (window start ``W0`` per block, etc.)."""
    mask_rope: str | None
    """RoPE mode of the mask estimation in this layer (None, "relative", "chunk_indexed")."""
    exact: bool
    """True when the candidate region fitted in k and every block was selected without pruning."""


@dataclass(frozen=True)
class _Stage:
    chunk_size: int
    keep_tokens: int
    query_pool: int


def mask_rope_for_layer(config: InfiniteHipConfig, layer_idx: int, streaming: bool) -> str | None:
    """Mask-estimation RoPE of a layer: chunk-indexed in early layers, relative after (streaming)."""
    if not streaming:
        return None
    return "chunk_indexed" if layer_idx < config.early_layers else "relative"


def _layer_stages(config: InfiniteHipConfig, layer_idx: int) -> list[_Stage]:
    return [
        _Stage(s.chunk_size, config.stage_keep_tokens(i, layer_idx), s.query_pool)
        for i, s in enumerate(config.stages)
    ]


def required_rope_positions(config: InfiniteHipConfig, seq_len: int) -> int:
    """Rows the cos/sin tables need for a context of ``seq_len`` tokens.

    Positions go up to ``seq_len - 1`` (queries and window keys keep their true positions); mask
    estimation also rotates queries at ``window_tokens`` ("relative") or at a block's candidate
    count ("chunk_indexed", at most the widest stage's candidate list).
    """
    need = max(seq_len, config.window_tokens + 1)
    prev = None
    for s in config.stages:
        width = -(-seq_len // s.chunk_size) if prev is None else (prev.keep_tokens // s.chunk_size)
        need = max(need, width + 1)
        prev = s
    return need


def _check_inputs(q, k, v, rope, positions, impl):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; expected one of bf16, fp16, fp32")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; put all inputs on one device")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, q_len, hq, d = q.shape
    kb, t_len, hkv, kd = k.shape
    if kb != b:
        raise ValueError(f"k has batch {kb} but q has batch {b}")
    if kd != d:
        raise ValueError(f"k head_dim {kd} != q head_dim {d}")
    if d not in (32, 64, 128, 256):
        raise ValueError(f"head_dim must be 32, 64, 128 or 256, got {d}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv}) (GQA)")
    if q_len == 0 or q_len > t_len:
        raise ValueError(
            f"q has {q_len} positions and k has {t_len}: q must hold 1..k_len queries (the last "
            "q_len positions of k)"
        )
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r} is invalid: must be one of {IMPLEMENTATIONS}")
    if rope is not None:
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise TypeError("rope must be a (cos, sin) pair of tensors from vllm_hip.rope.rope_tables")
        cos, sin = rope
        for name, t in (("cos", cos), ("sin", sin)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 2:
                raise ValueError(f"rope {name} must be an fp32 [max_positions, head_dim/2] tensor")
            if t.shape[1] != d // 2:
                raise ValueError(
                    f"rope {name} has {t.shape[1]} columns; expected head_dim/2 = {d // 2} (partial "
                    "rotary is not supported by the kernels)"
                )
            if t.device != q.device:
                raise ValueError(f"rope {name} is on {t.device} but q is on {q.device}")
        if cos.shape != sin.shape:
            raise ValueError(f"rope cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    if positions is not None:
        pos = torch.as_tensor(positions, device=q.device)
        expect = torch.arange(t_len - q_len, t_len, device=q.device)
        if pos.shape[-1:] != (q_len,) or pos.dim() > 2 or not bool((pos == expect).all()):
            raise ValueError(
                f"positions must be the last q_len={q_len} positions of k ({t_len - q_len}..{t_len - 1}) "
                "for every batch row; other layouts (padding, gaps) are not supported"
            )


def infinitehip_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: InfiniteHipConfig | Mapping[str, Any] | None = None,
    positions: torch.Tensor | None = None,
    *,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    layer_idx: int = 0,
    sm_scale: float | None = None,
    softcap: float = 0.0,
    impl: str = "auto",
    page_size: int = 64,
    score_norm: str | None = None,
    return_selection: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, Selection]:
    """InfiniteHiP sparse attention of ``q`` over ``k``/``v`` (causal, queries at the end).

    Every query attends to the first ``sink_tokens`` keys, the last ``window_tokens`` keys before
    it, and ``k`` tokens chosen by hierarchical pruning from the region between
    (``docs/infinitehip.md`` §1-2, §4). Contexts up to ``sink + window + k`` tokens are attended
    exactly.

    Parameters
    ----------
    q : torch.Tensor
        [batch, q_len, Hq, D] queries: the LAST ``q_len`` positions of the sequence (prefill:
        ``q_len == k_len``; decode: ``q_len == 1``). bf16, fp16 or fp32; any strides.
    k, v : torch.Tensor
        [batch, k_len, Hkv, D], the whole context including the queries' own keys; Hq a multiple
        of Hkv (GQA: query head h reads kv head ``h // (Hq // Hkv)``). Same dtype and device as q.
    config : InfiniteHipConfig or dict, optional
        Sink/window/k, pruning stages, block sizes (default: the paper's "3k" preset). A dict goes
        through :meth:`InfiniteHipConfig.from_dict`.
    positions : torch.Tensor, optional
        [q_len] or [batch, q_len] positions of the queries, only checked: they must be
        ``k_len - q_len .. k_len - 1`` (padded or gapped batches are not supported).
    rope : (cos, sin), optional
        fp32 [max_positions, D/2] tables (:func:`vllm_hip.rope.rope_tables_from_config`). Given:
        q and k are UNROTATED and positions are assigned here ("streaming" RoPE: query and window
        keys at true positions, selected tokens renumbered just before the window, sink before
        them; mask estimation chunk-indexed in early layers, relative after), which extends the
        context beyond the model's trained length. ``max_positions`` must be at least
        :func:`required_rope_positions`. None: q and k already carry the model's rotation and
        nothing is re-rotated (``rope_mode="model"``).
    layer_idx : int
        Layer index: layers ``< config.early_layers`` use ``early_selected_tokens``.
    sm_scale : float, optional
        Softmax scale (default ``D ** -0.5``).
    softcap : float
        If > 0, logits become ``softcap * tanh(logit / softcap)``.
    impl : {"auto", "triton", "reference", "torch"}
        Implementation (see the module docstring).
    page_size : int
        Page size of the paged view built for ``"triton"``/``"reference"`` (multiple of
        ``block_size_k``).
    score_norm : {"none", "head_max"}
        How kv heads' chunk scores combine into one ranking (:data:`SCORE_NORMS`). ``"none"``
        is the algorithm as the kernels implement it; ``"head_max"`` (torch path only) is an
        experimental per-head normalization that makes SmolLM2 retrieve passkeys.
    return_selection : bool
        Also return the :class:`Selection`.

    Returns
    -------
    torch.Tensor or (torch.Tensor, Selection)
        ``out`` [batch, q_len, Hq, D] in q's dtype.

    Raises
    ------
    ValueError, TypeError
        Bad shapes, dtypes, devices, tables or options; the message names the argument.

    Examples
    --------
    >>> import torch
    >>> from vllm_hip.rope import rope_tables_from_config
    >>> q = torch.randn(1, 4096, 9, 64); k = torch.randn(1, 4096, 3, 64); v = torch.randn_like(k)
    >>> cos, sin = rope_tables_from_config({"head_dim": 64, "rope_theta": 1e5}, 8192)
    >>> out = infinitehip_attention(q, k, v, {"selected_tokens": 512, "early_layers": 0},
    ...                             rope=(cos, sin), layer_idx=5)
    >>> out.shape
    torch.Size([1, 4096, 9, 64])
    """
    if config is None:
        config = InfiniteHipConfig()
    elif isinstance(config, Mapping):
        config = InfiniteHipConfig.from_dict(config)
    elif not isinstance(config, InfiniteHipConfig):
        raise TypeError(f"config must be an InfiniteHipConfig, a dict or None, got {type(config).__name__}")
    _check_inputs(q, k, v, rope, positions, impl)
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
        raise ValueError(f"layer_idx={layer_idx!r} must be a non-negative int")
    if rope is not None and config.rope_mode == "model":
        raise ValueError(
            "rope tables were given but config.rope_mode='model' says q/k carry the model's "
            "rotation; pass rope=None, or use rope_mode='streaming'"
        )
    if score_norm is None:
        score_norm = config.score_norm
    if score_norm not in SCORE_NORMS:
        raise ValueError(f"score_norm={score_norm!r} is invalid: must be one of {SCORE_NORMS}")
    if page_size <= 0 or page_size % config.block_size_k:
        raise ValueError(f"page_size={page_size} must be a positive multiple of block_size_k={config.block_size_k}")
    b, q_len, hq, d = q.shape
    t_len = k.shape[1]
    if rope is not None:
        need = required_rope_positions(config, t_len)
        if rope[0].shape[0] < need:
            raise ValueError(
                f"rope tables have {rope[0].shape[0]} positions; a {t_len}-token context needs at "
                f"least {need} (see required_rope_positions)"
            )
    if sm_scale is None:
        sm_scale = d ** -0.5
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"

    dev = q.device
    seq_lens_cpu = torch.full((b,), t_len, dtype=torch.int32)
    qsl = torch.arange(b + 1, dtype=torch.int32) * q_len
    qb_cpu = build_query_blocks(
        qsl, seq_lens_cpu, block_size_q=config.block_size_q, sink_tokens=config.sink_tokens,
        window_tokens=config.window_tokens, split_last=config.split_last_query,
    )  # fmt: skip
    qb = qb_cpu.to(dev)
    mask_rope = mask_rope_for_layer(config, layer_idx, rope is not None)
    cos, sin = rope if rope is not None else (None, None)
    k_layer = config.selected_tokens_for_layer(layer_idx)
    q_packed = q.reshape(b * q_len, hq, d)
    if not q_packed.is_contiguous():
        q_packed = q_packed.contiguous()

    exact = config.attends_exactly(qb_cpu.max_window_start, k_layer)
    paged = None
    if impl in ("triton", "reference"):
        paged = _paged_view(k, v, page_size)
    if k_layer == 0 or qb_cpu.num_blocks == 0:
        sel = torch.full((qb_cpu.num_blocks, 0), -1, dtype=torch.int32, device=dev)
        cnt = torch.zeros(qb_cpu.num_blocks, dtype=torch.int32, device=dev)
        exact = qb_cpu.max_window_start <= config.sink_tokens
    elif exact:
        sel, cnt = _all_blocks(qb, qb_cpu, config.sink_tokens, config.block_size_k)
    else:
        prune_kwargs = dict(
            sink_tokens=config.sink_tokens, mask_rope=mask_rope, cos=cos, sin=sin,
            rope_distance=config.window_tokens,
        )  # fmt: skip
        stages = _layer_stages(config, layer_idx)
        if impl == "torch":
            sel, cnt = _torch_select(q_packed, k, qb, qb_cpu, stages, score_norm=score_norm, **prune_kwargs)
        else:
            key_cache, _, block_table, seq_lens = paged
            if impl == "triton":
                from vllm_hip_kernels.prune import select_blocks
            else:
                from vllm_hip_kernels.prune_reference import select_blocks_reference as select_blocks
            sel, cnt, _ = select_blocks(
                q_packed, key_cache, block_table, seq_lens.to(dev), qb, stages,
                score_norm=score_norm, **prune_kwargs,
            )

    attn_kwargs = dict(
        sink_tokens=config.sink_tokens, block_size_k=config.block_size_k, sm_scale=float(sm_scale),
        softcap=float(softcap), cos=cos, sin=sin,
    )  # fmt: skip
    if impl == "torch":
        out = _torch_sparse_attention(q_packed, k, v, qb, qb_cpu, sel, cnt, **attn_kwargs)
    else:
        key_cache, value_cache, block_table, seq_lens = paged
        if impl == "triton":
            from vllm_hip_kernels.sparse_attention import sparse_attention

            out = sparse_attention(
                q_packed, key_cache, value_cache, block_table, seq_lens.to(dev), qb, sel, cnt,
                window_tokens=config.window_tokens, **attn_kwargs,
            )  # fmt: skip
        else:
            from vllm_hip_kernels.sparse_attention_reference import sparse_attention_reference

            out = sparse_attention_reference(
                q_packed, key_cache, value_cache, block_table, seq_lens.to(dev), qb, sel, cnt,
                **attn_kwargs,
            ).to(q.dtype)  # fmt: skip
    out = out.reshape(b, q_len, hq, d)
    if return_selection:
        return out, Selection(sel, cnt, qb, mask_rope, bool(exact))
    return out


# ---------------------------------------------------------------------------- shared helpers
def _paged_view(k: torch.Tensor, v: torch.Tensor, page_size: int):
    """(key_cache, value_cache, block_table, seq_lens): k/v [B, T, H, D] cut into pages."""
    b, t_len, h, d = k.shape
    pages = -(-t_len // page_size)
    padded = pages * page_size

    def pack(x: torch.Tensor) -> torch.Tensor:
        if padded == t_len and b == 1:
            try:
                return x.view(pages, page_size, h, d)
            except RuntimeError:
                pass
        buf = x.new_zeros((b, padded, h, d))
        buf[:, :t_len] = x
        return buf.view(b * pages, page_size, h, d)

    block_table = torch.arange(b * pages, dtype=torch.int32, device=k.device).view(b, pages)
    seq_lens = torch.full((b,), t_len, dtype=torch.int32, device=k.device)
    return pack(k), pack(v), block_table, seq_lens


def _all_blocks(qb: QueryBlocks, qb_cpu: QueryBlocks, sink: int, bk: int):
    """Every ``bk`` block of [sink, W0) for every query block (exact attention)."""
    width = max(0, -(-(qb_cpu.max_window_start - sink) // bk))
    dev = qb.seq.device
    starts = sink + bk * torch.arange(width, device=dev, dtype=torch.int32)
    count = torch.clamp((qb.window_start - sink + bk - 1) // bk, min=0).to(torch.int32)
    sel = starts.unsqueeze(0).expand(qb_cpu.num_blocks, width).clone()
    sel[torch.arange(width, device=dev)[None, :] >= count[:, None]] = -1
    return sel, count


def _rot(x: torch.Tensor, cos_rows: torch.Tensor, sin_rows: torch.Tensor) -> torch.Tensor:
    """Neox rotation of fp32 ``x`` [..., D] by fp32 rows broadcastable to [..., D/2]."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos_rows - x2 * sin_rows, x2 * cos_rows + x1 * sin_rows], dim=-1)


def _rot_to(x: torch.Tensor, cos_rows: torch.Tensor, sin_rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``_rot(x.float(), ...).to(dtype)`` with fewer passes over memory (same fp32 arithmetic:
    a low-precision ``x`` times an fp32 table promotes to fp32 exactly)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    shape = torch.broadcast_shapes(x1.shape, cos_rows.shape)
    out = torch.empty(shape[:-1] + (2 * h,), dtype=torch.float32, device=x.device)
    o1, o2 = out[..., :h], out[..., h:]
    torch.mul(x1, cos_rows, out=o1)
    o1.sub_(x2 * sin_rows)
    torch.mul(x2, cos_rows, out=o2)
    o2.add_(x1 * sin_rows)
    return out if dtype == torch.float32 else out.to(dtype)


def _slices(n: int, per_item_bytes: int):
    step = max(1, _SLICE_BYTES // max(1, per_item_bytes))
    for s in range(0, n, step):
        yield s, min(n, s + step)


# ---------------------------------------------------------------------------- vectorized pruning
def _pooled_queries(q: torch.Tensor, qb: QueryBlocks, max_q_len: int, pool: int) -> torch.Tensor:
    """[NB, NG, Hq, D] fp32 means of ``pool`` consecutive queries per group.

    Summed in query order like the reference; groups past a block's end repeat group 0, which
    leaves every max over groups unchanged.
    """
    dev = q.device
    ng = -(-max_q_len // pool)
    g = torch.arange(ng, device=dev)
    q_start = qb.q_start.long()[:, None]
    q_len = qb.q_len.long()[:, None]
    acc = None
    cnt = torch.zeros((qb.q_len.shape[0], ng), device=dev, dtype=torch.float32)
    for i in range(pool):
        local = g[None, :] * pool + i
        ok = local < q_len
        rows = q[torch.where(ok, q_start + local, q_start)].float() * ok[..., None, None]
        acc = rows if acc is None else acc + rows
        cnt += ok
    pooled = acc / cnt.clamp(min=1)[..., None, None]
    empty = cnt == 0
    if bool(empty.any()):
        pooled = torch.where(empty[..., None, None], pooled[:, :1], pooled)
    return pooled


def _torch_score_chunks(q, k, qb, qb_cpu, starts, n_cand, valid, stage, *, mask_rope, cos, sin,
                        rope_distance, score_dtype, score_norm="none"):
    """Chunk scores [NB, C] fp32 (-inf where invalid): the binary search of every candidate.

    Layout [block, kv head, candidate]; the left and right samples of an iteration go through one
    gather and one matmul.
    """
    nb, num_cand = starts.shape
    hkv, d = k.shape[2], k.shape[3]
    group = q.shape[1] // hkv
    dev = q.device
    pooled = _pooled_queries(q, qb, qb_cpu.max_q_len, stage.query_pool)  # [NB, NG, Hq, D]
    if mask_rope == "relative":
        pooled = _rot(pooled, cos[rope_distance], sin[rope_distance])
    elif mask_rope == "chunk_indexed":
        p = n_cand.long()
        pooled = _rot(pooled, cos[p][:, None, None, :], sin[p][:, None, None, :])
    ng = pooled.shape[1]
    qh = pooled.to(q.dtype).to(score_dtype).view(nb, ng, hkv, group, d)
    qh = qh.permute(0, 2, 4, 1, 3).reshape(nb, hkv, d, ng * group)  # [NB, Hkv, D, R]
    w0 = qb.window_start.long()
    seq = qb.seq.long()
    heads = torch.arange(hkv, device=dev)[None, :, None]
    rot = None
    if mask_rope == "chunk_indexed":
        j_pos = torch.arange(num_cand, device=dev).repeat(2)
        rot = (cos[j_pos][None, None, :, :], sin[j_pos][None, None, :, :])
    n_iter = max(1, math.ceil(math.log2(stage.chunk_size))) if stage.chunk_size > 1 else 1
    out_dtype = torch.float64 if score_dtype == torch.float64 else torch.float32
    scores = torch.full((nb, num_cand), float("-inf"), dtype=torch.float32, device=dev)
    rows = ng * group
    elem = torch.finfo(score_dtype).bits // 8
    per_block = 2 * num_cand * hkv * (rows * elem + d * (elem + 8) + 64)
    for s0, s1 in _slices(nb, per_block):
        ok = valid[s0:s1]
        st = torch.where(ok, starts[s0:s1].long(), torch.zeros((), dtype=torch.long, device=dev))
        wb = w0[s0:s1, None]
        lo = st[:, None, :].expand(-1, hkv, -1)
        hi = torch.where(ok, torch.minimum(st + stage.chunk_size, wb), st + 1)[:, None, :].expand(-1, hkv, -1)
        sq = seq[s0:s1, None, None]
        qs = qh[s0:s1]
        best = None
        for _ in range(n_iter):
            length = hi - lo
            half = (length + 1) // 2
            mid = lo + half
            has_r = length > half
            tok = torch.cat([lo + half // 2, torch.where(has_r, mid + (length - half) // 2, lo)], -1)
            kk = k[sq, tok, heads]  # [n, Hkv, 2C, D]
            if rot is not None:
                kk = _rot(kk.float(), *rot).to(q.dtype)
            sc = torch.matmul(kk.to(score_dtype), qs).amax(-1).to(out_dtype)  # [n, Hkv, 2C]
            s_l, s_r = sc[..., :num_cand], sc[..., num_cand:]
            s_r = s_r.masked_fill(~has_r, float("-inf"))
            go_r = s_r > s_l
            m = torch.maximum(s_l, s_r)
            best = m if best is None else torch.maximum(best, m)
            lo = torch.where(go_r, mid, lo)
            hi = torch.where(go_r, hi, mid)
        if score_norm != "none":
            best = normalize_head_scores(best.masked_fill(~ok[:, None, :], float("-inf")), score_norm)
        sc = best.amax(1).float()
        scores[s0:s1] = sc.masked_fill(~ok, float("-inf"))
    return scores


def _top_chunks(scores, starts, keep):
    """Top ``keep`` chunks by score (stable on ties), re-sorted by position; -1 padded."""
    nb, num_cand = scores.shape
    if num_cand < keep:
        pad = keep - num_cand
        scores = torch.cat([scores, scores.new_full((nb, pad), float("-inf"))], 1)
        starts = torch.cat([starts, starts.new_full((nb, pad), -1)], 1)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
    ok = torch.gather(scores, 1, order) > float("-inf")
    st = torch.gather(starts.long(), 1, order)
    big = torch.iinfo(torch.int64).max
    st = torch.sort(torch.where(ok, st, torch.full_like(st, big)), dim=1).values
    count = ok.sum(1).to(torch.int32)
    st = torch.where(st == big, torch.full_like(st, -1), st)
    return st.to(torch.int32), count


def _split_chunks(starts, count, chunk, next_chunk, w0):
    """Each kept chunk -> its ``chunk // next_chunk`` sub-chunks below W0, packed valid-first."""
    nb, kept = starts.shape
    ratio = chunk // next_chunk
    dev = starts.device
    st = starts.long()
    sub = st[..., None] + next_chunk * torch.arange(ratio, device=dev)
    ok = (st[..., None] >= 0) & (torch.arange(kept, device=dev)[None, :, None] < count[:, None, None].long())
    ok = ok & (sub < w0.long()[:, None, None])
    sub, ok = sub.reshape(nb, kept * ratio), ok.reshape(nb, kept * ratio)
    order = torch.sort((~ok).to(torch.int8), dim=1, stable=True).indices
    sub, ok = torch.gather(sub, 1, order), torch.gather(ok, 1, order)
    sub = torch.where(ok, sub, torch.full_like(sub, -1))
    return sub.to(torch.int32), ok.sum(1).to(torch.int32)


def _torch_select(q, k, qb, qb_cpu, stages: Sequence[_Stage], *, sink_tokens, mask_rope, cos,
                  sin, rope_distance, score_dtype=torch.float32, score_norm="none"):
    """Vectorized twin of ``select_blocks_reference``: (sel_blocks, sel_count)."""
    dev = q.device
    w0 = qb.window_start.long()
    cand = None
    for i, st in enumerate(stages):
        if cand is None:
            num_cand = max(0, -(-(qb_cpu.max_window_start - sink_tokens) // st.chunk_size))
            starts = (sink_tokens + st.chunk_size * torch.arange(num_cand, device=dev)).expand(w0.shape[0], num_cand)
            n_cand = torch.clamp((w0 - sink_tokens + st.chunk_size - 1) // st.chunk_size, min=0)
        else:
            starts, n_cand = cand
            n_cand = n_cand.long()
            num_cand = starts.shape[1]
        j = torch.arange(num_cand, device=dev)[None, :]
        valid = (j < n_cand[:, None]) & (starts >= 0) & (starts < w0[:, None])
        # Trim padding columns no block uses (one host sync; this path runs on the host anyway).
        cols = valid.any(0).nonzero()
        used = int(cols.max()) + 1 if cols.numel() else 0
        if used < num_cand:
            starts, valid = starts[:, :used], valid[:, :used]
        scores = _torch_score_chunks(
            q, k, qb, qb_cpu, starts, n_cand, valid, st, mask_rope=mask_rope, cos=cos, sin=sin,
            rope_distance=rope_distance, score_dtype=score_dtype, score_norm=score_norm,
        )  # fmt: skip
        kept, count = _top_chunks(scores, starts, st.keep_tokens // st.chunk_size)
        if i + 1 < len(stages):
            cand = _split_chunks(kept, count, st.chunk_size, stages[i + 1].chunk_size, w0)
    return kept, count


# ---------------------------------------------------------------------------- vectorized attention
def _torch_sparse_attention(q, k, v, qb, qb_cpu, sel, cnt, *, sink_tokens, block_size_k,
                            sm_scale, softcap, cos, sin):
    """Vectorized twin of ``sparse_attention_reference``: out [total_q, Hq, D] in q's dtype.

    Each query block gathers its key list (sink, selected tokens, window) and runs SDPA with a
    boolean mask; SDPA's CPU kernel accumulates in fp32 whatever the input dtype.
    """
    dev = q.device
    total_q, hq, d = q.shape
    t_len, hkv = k.shape[1], k.shape[2]
    nb = qb_cpu.num_blocks
    out = torch.zeros((total_q, hq, d), dtype=q.dtype, device=dev)
    if nb == 0:
        return out
    seq = qb.seq.long()
    pos = qb.pos.long()
    q_len = qb.q_len.long()
    w0 = qb.window_start.long()
    q_start = qb.q_start.long()
    n_sink = min(sink_tokens, t_len)
    # Selected tokens: [NB, S * bk], valid when inside the block's count and below W0.
    width = sel.shape[1]
    ar_k = torch.arange(block_size_k, device=dev)
    sel_tok = (sel.long()[:, :, None] + ar_k).reshape(nb, width * block_size_k)
    sel_ok = (torch.arange(width, device=dev)[None, :] < cnt.long()[:, None]) & (sel.long() >= 0)
    sel_ok = sel_ok[:, :, None].expand(-1, -1, block_size_k).reshape(nb, -1) & (sel_tok < w0[:, None])
    n_sel = sel_ok.sum(1)
    max_win = int(qb_cpu.max_q_len + (qb_cpu.pos - qb_cpu.window_start).clamp(min=0).max()) if nb else 0
    win_tok = w0[:, None] + torch.arange(max_win, device=dev)[None, :]
    win_ok = win_tok < (pos + q_len)[:, None]
    sink_tok = torch.arange(n_sink, device=dev)[None, :].expand(nb, -1)
    toks = torch.cat([sink_tok, sel_tok, win_tok], 1)
    ok = torch.cat([torch.ones_like(sink_tok, dtype=torch.bool), sel_ok, win_ok], 1)
    toks = torch.where(ok, toks, torch.zeros_like(toks))
    rope = cos is not None
    if rope:
        sel_rank = torch.cumsum(sel_ok, 1) - 1
        kpos = torch.cat([
            (w0 - n_sel - sink_tokens)[:, None] + sink_tok,
            (w0 - n_sel)[:, None] + sel_rank,
            win_tok,
        ], 1)  # fmt: skip
        kpos = torch.where(ok, kpos, torch.zeros_like(kpos))
    max_q = qb_cpu.max_q_len
    qi = torch.arange(max_q, device=dev)
    q_ok = qi[None, :] < q_len[:, None]
    q_rows = torch.where(q_ok, q_start[:, None] + qi, q_start[:, None])
    q_pos = pos[:, None] + qi
    # Padding rows (past a block's end) are computed and dropped; keep their positions in range.
    q_pos_rot = torch.where(q_ok, q_pos, pos[:, None])
    n_keys = toks.shape[1]
    group = hq // hkv
    heads = torch.arange(hkv, device=dev)[None, :, None]
    per_block = n_keys * hkv * d * 16 + max_q * (hq * n_keys * 6 + hq * d * 12)
    for s0, s1 in _slices(nb, per_block):
        sq = seq[s0:s1, None, None]
        tk = toks[s0:s1]
        kk, vv = k[sq, tk[:, None, :], heads], v[sq, tk[:, None, :], heads]  # [n, Hkv, L, D]
        qq = q[q_rows[s0:s1]].transpose(1, 2)  # [n, Hq, Qm, D]
        if rope:
            kp = kpos[s0:s1]
            kk = _rot_to(kk, cos[kp][:, None], sin[kp][:, None], q.dtype)
            qp = q_pos_rot[s0:s1]
            qq = _rot_to(qq, cos[qp][:, None], sin[qp][:, None], q.dtype)
        allowed = ok[s0:s1, None, :] & (tk[:, None, :] <= q_pos[s0:s1, :, None])  # [n, Qm, L]
        if softcap > 0:
            o = _softcap_attention(qq, kk, vv, allowed, sm_scale, softcap, group)
        else:
            o = F.scaled_dot_product_attention(
                qq, kk, vv, attn_mask=allowed[:, None], scale=sm_scale, enable_gqa=group > 1
            )
        o = o.transpose(1, 2)  # [n, Qm, Hq, D]
        keep = q_ok[s0:s1]
        out[q_rows[s0:s1][keep]] = o[keep].to(q.dtype)
    return out


def _softcap_attention(q, k, v, allowed, sm_scale, softcap, group):
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    s = torch.matmul(q.float(), k.transpose(-1, -2)) * sm_scale
    s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return torch.matmul(torch.softmax(s, -1), v).to(q.dtype)
