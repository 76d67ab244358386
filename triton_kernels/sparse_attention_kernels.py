"""Triton kernels of block-sparse attention over the paged KV cache (launcher: sparse_attention).

One forward kernel serves decode, prefill and mixed batches. A program owns ``BLOCK_M`` rows =
``BLOCK_Q`` consecutive queries of one query block x ``H_TILE`` query heads of one kv head (GQA
rows share every K/V tile they load), and walks the block's *key list* in tiles of ``BLOCK_N``
keys::

    key list of query block b:  [ sink tiles | selected tiles | window tiles ]
                                  [0, min(sink, p_last + 1))   tokens < W0   [W0, p_last]
    split s of num_splits takes the contiguous tile range [s * per, (s + 1) * per)

Selected tiles gather ``BLOCK_N / BLOCK_SIZE_K`` selected blocks each (every key does its own page
lookup, so a tile may mix pages). Scores are causal-masked per row (``key <= p``), so prefill rows
and the sink/window parts need no other special case. With ``num_splits > 1`` each program writes a
normalized partial output and its base-2 log-sum-exp to fp32 scratch and ``_combine_splits_kernel``
merges them; with one split the forward kernel writes ``Out`` directly.

Streaming RoPE (``ROPE``): q and cached keys are unrotated (``KEYS_ROTATED``: both carry the
model's rotation at their true positions, the query needs none and a key turns by its assigned
minus its true position, 0 in the window); the query is rotated at its true
position, window keys at theirs, the ``n_sel`` valid selected tokens get ``W0 - n_sel + j`` (the
j-th valid one is selected slot j, since blocks are sorted, distinct and only the last can straddle
W0) and sink token ``s`` gets ``W0 - n_sel - sink_tokens + s``. The sink is anchored with its full
length ``sink_tokens`` even when the sequence is shorter: then W0 = sink and n_sel = 0, so every
key keeps its true position (anchoring with ``min(sink, seq_len)`` would put a short sequence's
sink keys after its queries).
"""

import triton
import triton.language as tl


@triton.jit
def _sparse_attention_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    PartO,
    PartLse,
    BlockTable,
    SeqLens,
    BlkSeq,
    BlkQStart,
    BlkQLen,
    BlkPos,
    BlkW0,
    SelBlocks,
    SelCount,
    Cos,
    Sin,
    PageSlot,
    Counters,
    cache_delta_k,
    cache_delta_v,
    sm_scale,
    softcap,
    k_scale,
    v_scale,
    sink_tokens,
    group,
    n_q_tiles,
    n_h_tiles,
    num_splits,
    num_q_heads,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_lt,
    stride_lh,
    stride_bt,
    stride_sel,
    stride_cos,
    stride_sin,
    stride_ckp,
    stride_cvp,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    H_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    ROPE: tl.constexpr,
    KEYS_ROTATED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    STORE_LSE: tl.constexpr,
    IEEE: tl.constexpr,
    CACHED: tl.constexpr,
):
    """Grid ``(NB * n_q_tiles, Hkv * n_h_tiles, num_splits)``; ``SPLIT`` iff ``num_splits > 1``.

    Layouts: ``Q``/``Out`` [total_q, Hq, D]; ``K``/``V`` [num_pages, page_size, Hkv, D] (any
    strides);
    ``Lse`` [total_q, Hq] fp32 (natural log); ``PartO`` [total_q, Hq, num_splits, D] and ``PartLse``
    [total_q, Hq, num_splits] fp32 contiguous scratch (base-2 lse), used when ``SPLIT``.

    ``CACHED`` (offload): ``PageSlot`` [num_pages] int32 maps a page to its slot in the GPU page
    cache (-1: not cached). A cached page is read at ``K + cache_delta_k + slot * stride_ckp``
    (the cache is another allocation with the same in-page strides; the deltas are element
    offsets between the two base pointers), any other page where ``K`` says (host memory, over
    PCIe). The first kv-head tile of each program adds its key rows read to ``Counters`` [0]
    (all), [1] (from the GPU cache) and the bytes read from the host to [2] (int64, atomics).
    """
    BLOCK_M: tl.constexpr = BLOCK_Q * H_TILE
    HALF: tl.constexpr = HEAD_DIM // 2
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    split = tl.program_id(2)
    b = pid0 // n_q_tiles
    q_tile = pid0 % n_q_tiles
    kvh = pid1 // n_h_tiles
    h_tile = pid1 % n_h_tiles

    q_len = tl.load(BlkQLen + b)
    q_lo = q_tile * BLOCK_Q
    if q_lo >= q_len:
        return
    seq = tl.load(BlkSeq + b).to(tl.int64)
    q_start = tl.load(BlkQStart + b)
    pos = tl.load(BlkPos + b)
    w0 = tl.load(BlkW0 + b)
    seq_len = tl.load(SeqLens + seq)
    n_blk = tl.load(SelCount + b)

    r = tl.arange(0, BLOCK_M)
    qi = q_lo + r // H_TILE
    hl = h_tile * H_TILE + r % H_TILE
    row_ok = (qi < q_len) & (hl < group)
    q_row = (q_start + qi).to(tl.int64)
    head = kvh * group + hl
    p_row = pos + qi
    dh = tl.arange(0, HALF)
    kvh64 = kvh.to(tl.int64)
    # Dot input dtype. IEEE runs every dot in fp32: fp32 caches (tf32 otherwise) and Triton 3.6's
    # interpreter, whose bf16 tl.dot returns garbage and whose fp32->bf16 cast truncates.
    if IEEE:
        DT = tl.float32
    else:
        DT = Q.dtype.element_ty

    q_off = q_row * stride_qt + head.to(tl.int64) * stride_qh
    q1 = tl.load(Q + q_off[:, None] + dh[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    q2 = tl.load(
        Q + q_off[:, None] + (dh + HALF)[None, :] * stride_qd, mask=row_ok[:, None], other=0.0
    )
    if ROPE and not KEYS_ROTATED:
        pq = p_row.to(tl.int64)
        cq = tl.load(Cos + pq[:, None] * stride_cos + dh[None, :], mask=row_ok[:, None], other=0.0)
        sq = tl.load(Sin + pq[:, None] * stride_sin + dh[None, :], mask=row_ok[:, None], other=0.0)
        q1f = q1.to(tl.float32)
        q2f = q2.to(tl.float32)
        q1 = (q1f * cq - q2f * sq).to(DT)
        q2 = (q2f * cq + q1f * sq).to(DT)
    else:
        q1 = q1.to(DT)
        q2 = q2.to(DT)

    # Key list of this program's queries (the last query p_last bounds sink and window).
    p_last = pos + tl.minimum(q_len, q_lo + BLOCK_Q) - 1
    sink_end = tl.minimum(sink_tokens, p_last + 1)
    n_sink_t = (sink_end + BLOCK_N - 1) // BLOCK_N
    n_sel_t = (n_blk * BLOCK_SIZE_K + BLOCK_N - 1) // BLOCK_N
    win_len = tl.maximum(p_last - w0 + 1, 0)
    n_win_t = (win_len + BLOCK_N - 1) // BLOCK_N
    n_tiles = n_sink_t + n_sel_t + n_win_t
    per = (n_tiles + num_splits - 1) // num_splits
    t0 = split * per
    t1 = tl.minimum(t0 + per, n_tiles)

    # Valid selected tokens: all slots of the blocks before the last, plus the last block's
    # part < W0.
    last_blk = tl.load(
        SelBlocks + b * stride_sel + tl.maximum(n_blk - 1, 0), mask=n_blk > 0, other=0
    )
    n_sel = tl.where(
        n_blk > 0,
        (n_blk - 1) * BLOCK_SIZE_K + tl.minimum(tl.maximum(w0 - last_blk, 0), BLOCK_SIZE_K),
        0,
    )
    sink_pos0 = w0 - n_sel - sink_tokens  # see the module docstring: full-length sink anchor

    n_off = tl.arange(0, BLOCK_N)
    dv = tl.arange(0, HEAD_DIM)
    score_scale = sm_scale * k_scale
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_rows = tl.zeros([], tl.int64)
    n_hits = tl.zeros([], tl.int64)
    # One loop over the three parts (not three loops): one software pipeline, and no nested jit
    # calls, which cost the interpreter more than the tile itself.
    for t in range(t0, t1):
        in_sink = t < n_sink_t
        in_sel = (t >= n_sink_t) & (t < n_sink_t + n_sel_t)
        sink_tok = t * BLOCK_N + n_off
        g = (t - n_sink_t) * BLOCK_N + n_off  # slot in the selected part
        blk = g // BLOCK_SIZE_K
        blk_ok = in_sel & (blk < n_blk)
        start = tl.load(SelBlocks + b * stride_sel + blk, mask=blk_ok, other=0)
        sel_tok = start + g % BLOCK_SIZE_K
        sel_ok = blk_ok & (start >= 0) & (sel_tok < w0) & (sel_tok < seq_len)
        win_tok = w0 + (t - n_sink_t - n_sel_t) * BLOCK_N + n_off
        win_ok = (win_tok <= p_last) & (win_tok < seq_len)
        tok = tl.where(in_sink, sink_tok, tl.where(in_sel, sel_tok, win_tok))
        kv_ok = tl.where(in_sink, sink_tok < sink_end, tl.where(in_sel, sel_ok, win_ok))

        page = tl.load(BlockTable + seq * stride_bt + tok // PAGE_SIZE, mask=kv_ok, other=0).to(
            tl.int64
        )
        slot = (tok % PAGE_SIZE).to(tl.int64)
        if CACHED:
            cslot = tl.load(PageSlot + page, mask=kv_ok, other=-1).to(tl.int64)
            hit = cslot >= 0
            k_page = tl.where(hit, cache_delta_k + cslot * stride_ckp, page * stride_kp)
            v_page = tl.where(hit, cache_delta_v + cslot * stride_cvp, page * stride_vp)
            n_rows += tl.sum(kv_ok.to(tl.int64))
            n_hits += tl.sum((kv_ok & hit).to(tl.int64))
        else:
            k_page = page * stride_kp
            v_page = page * stride_vp
        k_row = k_page + slot * stride_ks + kvh64 * stride_kh
        v_row = v_page + slot * stride_vs + kvh64 * stride_vh
        k1 = tl.load(K + k_row[:, None] + dh[None, :] * stride_kd, mask=kv_ok[:, None], other=0.0)
        k2 = tl.load(
            K + k_row[:, None] + (dh + HALF)[None, :] * stride_kd, mask=kv_ok[:, None], other=0.0
        )
        if ROPE:
            kpos = tl.where(
                in_sink, sink_pos0 + sink_tok, tl.where(in_sel, w0 - n_sel + g, win_tok)
            )
            if KEYS_ROTATED:
                # Rotated at tok already: turn by the rest (>= 0: sink and selected tokens move
                # towards W0, window keys not at all).
                kpos = kpos - tok
            pk = tl.maximum(kpos, 0).to(tl.int64)
            c = tl.load(
                Cos + pk[:, None] * stride_cos + dh[None, :], mask=kv_ok[:, None], other=0.0
            )
            sn = tl.load(
                Sin + pk[:, None] * stride_sin + dh[None, :], mask=kv_ok[:, None], other=0.0
            )
            k1f = k1.to(tl.float32)
            k2f = k2.to(tl.float32)
            k1 = (k1f * c - k2f * sn).to(DT)
            k2 = (k2f * c + k1f * sn).to(DT)
        else:
            k1 = k1.to(DT)
            k2 = k2.to(DT)
        if IEEE:
            qk = tl.dot(q1, tl.trans(k1), input_precision="ieee")
            qk = tl.dot(q2, tl.trans(k2), qk, input_precision="ieee")
        else:
            qk = tl.dot(q1, tl.trans(k1))
            qk = tl.dot(q2, tl.trans(k2), qk)
        qk = qk * score_scale
        if SOFTCAP:
            # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits +-1 when exp overflows or underflows.
            qk = softcap * (1.0 - 2.0 / (tl.exp(2.0 * (qk / softcap)) + 1.0))
        qk = qk * 1.4426950408889634  # log2(e): the softmax runs in base 2
        ok = kv_ok[None, :] & (tok[None, :] <= p_row[:, None])
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # Rows that have seen no key yet keep m = -inf; subtracting 0 instead avoids
        # inf - inf = NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + v_row[:, None] + dv[None, :] * stride_vd, mask=kv_ok[:, None], other=0.0
        ).to(DT)
        if IEEE:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(DT), v, acc * alpha[:, None])
        m_i = m_new

    if CACHED:
        if h_tile == 0:
            # Rows x (key + value) x head_dim elements came over PCIe for each miss.
            row_bytes = 2 * HEAD_DIM * (K.dtype.element_ty.primitive_bitwidth // 8)
            tl.atomic_add(Counters, n_rows)
            tl.atomic_add(Counters + 1, n_hits)
            tl.atomic_add(Counters + 2, (n_rows - n_hits) * row_bytes)
    has = l_i > 0.0
    o = acc * (v_scale / tl.where(has, l_i, 1.0))[:, None]
    if not SPLIT:
        o_off = q_row * stride_ot + head.to(tl.int64) * stride_oh
        tl.store(
            Out + o_off[:, None] + dv[None, :] * stride_od,
            o.to(Out.dtype.element_ty),
            mask=row_ok[:, None],
        )
        if STORE_LSE:
            lse = tl.where(
                has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf")
            )
            tl.store(Lse + q_row * stride_lt + head.to(tl.int64) * stride_lh, lse, mask=row_ok)
    else:
        lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        part = (q_row * num_q_heads + head.to(tl.int64)) * num_splits + split
        tl.store(PartLse + part, lse2, mask=row_ok)
        tl.store(PartO + part[:, None] * HEAD_DIM + dv[None, :], o, mask=row_ok[:, None])


@triton.jit
def _combine_splits_kernel(
    PartO,
    PartLse,
    Out,
    Lse,
    BlkQStart,
    BlkQLen,
    num_q_heads,
    num_splits,
    stride_ot,
    stride_oh,
    stride_od,
    stride_lt,
    stride_lh,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    """Grid ``(NB, Hq)``: merge the ``num_splits`` (<= ``SPLITS_PAD``) partial results of every
    query of block b, head h.

    Partials are normalized outputs with base-2 lse (``-inf`` for a split that saw no key); the
    merge weights are ``2 ** (lse_s - max lse)``. Rows with no key at all get 0 and lse ``-inf``.
    """
    b = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    q_start = tl.load(BlkQStart + b)
    q_len = tl.load(BlkQLen + b)
    sp = tl.arange(0, SPLITS_PAD)
    dv = tl.arange(0, HEAD_DIM)
    for i in range(q_len):
        row = (q_start + i).to(tl.int64)
        base = (row * num_q_heads + head) * num_splits
        lse = tl.load(PartLse + base + sp, mask=sp < num_splits, other=float("-inf"))
        m = tl.max(lse, 0)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m_use)
        w_sum = tl.sum(w, 0)
        o = tl.load(
            PartO + (base + sp)[:, None] * HEAD_DIM + dv[None, :],
            mask=(sp < num_splits)[:, None],
            other=0.0,
        )
        has = w_sum > 0.0
        o = tl.sum(o * w[:, None], 0) / tl.where(has, w_sum, 1.0)
        tl.store(
            Out + row * stride_ot + head * stride_oh + dv * stride_od, o.to(Out.dtype.element_ty)
        )
        if STORE_LSE:
            lse_out = tl.where(
                has,
                (m_use + tl.log2(tl.where(has, w_sum, 1.0))) * 0.6931471805599453,
                float("-inf"),
            )
            tl.store(Lse + row * stride_lt + head * stride_lh, lse_out)
