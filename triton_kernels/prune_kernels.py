"""Triton kernels of the hierarchical pruning (InfiniteHiP multi-stage chunk scoring).

Only ``@triton.jit`` code lives here; :mod:`vllm_hip_kernels.prune` checks inputs, allocates and
launches. Layouts (see ``prune.py`` for the full contract):

- pooled queries ``Qp``: [NB, Hkv, ROWS_PAD, D], contiguous, dtype = the dot's input dtype (the
  dtype of ``q``). Row ``r`` of kv head ``h`` is pooled query group ``r // G`` of query head
  ``h * G + r % G``; rows past ``ceil(q_len / POOL) * G`` are zero and masked.
- per-head chunk scores ``Scores``: [NB, Hkv, C] fp32, ``-inf`` for invalid candidates.
"""

import triton
import triton.language as tl


@triton.jit
def _round_to(x, DT: tl.constexpr):
    """fp32 -> DT rounding to nearest even on every backend.

    The CPU interpreter truncates fp32 -> bf16, so bf16 is rounded by hand on the bits (finite
    inputs); the cast of the rounded value is then exact everywhere.
    """
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = (bits >> 16) << 16
        return bits.to(tl.float32, bitcast=True).to(DT)
    else:
        return x.to(DT)


@triton.jit
def _pool_queries_kernel(
    Q,
    stride_qt,
    stride_qh,
    stride_qd,
    QStart,
    QLen,
    QPos,
    WStart,
    BlkPos,
    q_pos_scalar,
    sink,
    chunk_size,
    Cos,
    Sin,
    stride_cos,
    Out,
    rows_pad,
    num_kv_heads,
    G,
    POOL: tl.constexpr,
    HALF_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ROPE_Q: tl.constexpr,
    Q_POS_MODE: tl.constexpr,
    Q_ROTATED: tl.constexpr,
):
    """Mean-pool groups of ``POOL`` consecutive queries, optionally rotate, store in dot dtype.

    Grid: (ROWS_PAD // BLOCK_R, Hkv, NB). The sum runs in fp32 in query order and is divided with
    round-to-nearest, so the reference can reproduce it bit for bit before the cast.
    Q_POS_MODE (with ROPE_Q): 0 = ``q_pos_scalar``; 1 = ``QPos[b]`` (candidate count of a later
    stage); 2 = the first stage's candidate count ceil((W0 - sink) / chunk_size).
    Q_ROTATED (with ROPE_Q): the queries carry the model's rotation at their true positions
    (``BlkPos[b]`` + index): each turns by the target minus its own position before the mean.
    """
    pid_r = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)

    q_start = tl.load(QStart + b).to(tl.int64)
    q_len = tl.load(QLen + b)
    n_groups = (q_len + POOL - 1) // POOL

    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    grp = r // G
    qhead = (kvh * G + r % G).to(tl.int64)
    row_ok = grp < n_groups
    d = tl.arange(0, HALF_D)

    if ROPE_Q:  # the position the pooled queries are scored at
        if Q_POS_MODE == 1:
            p = tl.load(QPos + b).to(tl.int64)
        elif Q_POS_MODE == 2:
            w0 = tl.load(WStart + b)
            p = tl.maximum((w0 - sink + chunk_size - 1) // chunk_size, 0).to(tl.int64)
        else:
            p = tl.cast(q_pos_scalar, tl.int64)
    if Q_ROTATED:
        pos0 = tl.load(BlkPos + b).to(tl.int64)

    acc1 = tl.zeros([BLOCK_R, HALF_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_R, HALF_D], dtype=tl.float32)
    for i in range(POOL):
        qi = grp * POOL + i
        ok = row_ok & (qi < q_len)
        base = Q + (q_start + qi.to(tl.int64)) * stride_qt + qhead * stride_qh
        x1 = tl.load(base[:, None] + d[None, :] * stride_qd, mask=ok[:, None], other=0.0)
        x2 = tl.load(base[:, None] + (d[None, :] + HALF_D) * stride_qd, mask=ok[:, None], other=0.0)
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        if ROPE_Q and Q_ROTATED:
            # turn by p - (pos0 + qi); the tables hold angles >= 0, sin is odd
            delta = p - (pos0 + qi.to(tl.int64))
            a = tl.where(ok, tl.where(delta < 0, -delta, delta), 0)
            ci = tl.load(Cos + a[:, None] * stride_cos + d[None, :])
            si = tl.load(Sin + a[:, None] * stride_cos + d[None, :])
            si = tl.where((delta < 0)[:, None], -si, si)
            x1, x2 = x1 * ci - x2 * si, x2 * ci + x1 * si
        acc1 += x1
        acc2 += x2
    cnt = tl.minimum(q_len - grp * POOL, POOL)
    cnt = tl.maximum(cnt, 1).to(tl.float32)
    m1 = tl.math.div_rn(acc1, cnt[:, None])
    m2 = tl.math.div_rn(acc2, cnt[:, None])

    if ROPE_Q and not Q_ROTATED:
        c = tl.load(Cos + p * stride_cos + d)[None, :]
        s = tl.load(Sin + p * stride_cos + d)[None, :]
        y1 = m1 * c - m2 * s
        y2 = m2 * c + m1 * s
    else:
        y1 = m1
        y2 = m2
    y1 = tl.where(row_ok[:, None], y1, 0.0)
    y2 = tl.where(row_ok[:, None], y2, 0.0)

    out = Out + ((b.to(tl.int64) * num_kv_heads + kvh) * rows_pad + r.to(tl.int64))[:, None] * (
        2 * HALF_D
    )
    tl.store(out + d[None, :], _round_to(y1, Out.dtype.element_ty))
    tl.store(out + HALF_D + d[None, :], _round_to(y2, Out.dtype.element_ty))


@triton.jit
def _page_offset(page, valid, stride_kp, PageSlot, cache_delta_k, stride_ckp, CACHED: tl.constexpr):
    """Element offset from ``K`` of each token's page [BLOCK_C] (int64), and whether it is a
    hit in the GPU page cache (CACHED: ``PageSlot[page] >= 0``, read at ``cache_delta_k +
    slot * stride_ckp``; otherwise the main cache, which may be host memory)."""
    page = page.to(tl.int64)
    if CACHED:
        cslot = tl.load(PageSlot + page, mask=valid, other=-1).to(tl.int64)
        hit = cslot >= 0
        off = tl.where(hit, cache_delta_k + cslot * stride_ckp, page * stride_kp)
    else:
        hit = valid  # unused without CACHED
        off = page * stride_kp
    return off, hit


@triton.jit
def _load_key_halves(
    K,
    page_off,
    stride_ks,
    stride_kd,
    head_off,
    tok,
    valid,
    ck,
    sk,
    DOT_DTYPE: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HALF_D: tl.constexpr,
    ROPE_K: tl.constexpr,
    ROUND_K: tl.constexpr,
):
    """Gather the keys of tokens ``tok`` [BLOCK_C] (pages at element offsets ``page_off``) as
    two [BLOCK_C, HALF_D] halves in DOT_DTYPE."""
    slot = (tok % PAGE_SIZE).to(tl.int64)
    base = K + page_off + slot * stride_ks + head_off
    d = tl.arange(0, HALF_D)
    k1 = tl.load(base[:, None] + d[None, :] * stride_kd, mask=valid[:, None], other=0.0)
    k2 = tl.load(base[:, None] + (d[None, :] + HALF_D) * stride_kd, mask=valid[:, None], other=0.0)
    if ROPE_K:
        k1 = k1.to(tl.float32)
        k2 = k2.to(tl.float32)
        o1 = _round_to(k1 * ck - k2 * sk, DOT_DTYPE)
        o2 = _round_to(k2 * ck + k1 * sk, DOT_DTYPE)
    elif ROUND_K:
        # keys wider than the dot dtype (fp32 cache, 16-bit queries)
        o1 = _round_to(k1.to(tl.float32), DOT_DTYPE)
        o2 = _round_to(k2.to(tl.float32), DOT_DTYPE)
    else:
        # same dtype, or fp8 whose values 16-bit floats hold exactly
        o1 = k1.to(tl.float32).to(DOT_DTYPE)
        o2 = k2.to(tl.float32).to(DOT_DTYPE)
    return o1, o2


@triton.jit
def _page_of(bt_row, tbl, p0, tok, valid, PAGE_SIZE: tl.constexpr, NPG: tl.constexpr):
    """Physical page of each token: from the chunk's prefetched block-table entries ``tbl``
    [BLOCK_C, NPG] (pages p0 ..) when NPG > 0, else a load from the block table."""
    if NPG > 0:
        rel = tok // PAGE_SIZE - p0
        pg = tl.arange(0, NPG)
        page = tl.sum(tl.where(pg[None, :] == rel[:, None], tbl, 0), axis=1)
    else:
        page = tl.load(bt_row + tok // PAGE_SIZE, mask=valid, other=0)
    return page


@triton.jit
def _max_score(
    q1,
    q2,
    k1,
    k2,
    row_ok,
    USE_DOT: tl.constexpr,
    IEEE: tl.constexpr,
):
    """max over the valid rows of q . k for each of the BLOCK_C keys: [BLOCK_C] fp32.

    IEEE: exact fp32 dot (fp32 inputs, or CPU interpretation, whose dot mishandles bf16).
    """
    if USE_DOT:
        if IEEE:
            q1 = q1.to(tl.float32)
            q2 = q2.to(tl.float32)
            k1 = k1.to(tl.float32)
            k2 = k2.to(tl.float32)
            s = tl.dot(q1, tl.trans(k1), input_precision="ieee")
            s = tl.dot(q2, tl.trans(k2), s, input_precision="ieee")
        else:
            s = tl.dot(q1, tl.trans(k1))
            s = tl.dot(q2, tl.trans(k2), s)
    else:
        s = tl.sum(q1.to(tl.float32)[:, None, :] * k1.to(tl.float32)[None, :, :], axis=2)
        s += tl.sum(q2.to(tl.float32)[:, None, :] * k2.to(tl.float32)[None, :, :], axis=2)
    s = tl.where(row_ok[:, None], s, float("-inf"))
    return tl.max(s, axis=0)


@triton.jit
def _score_chunks_kernel(
    Qp,
    rows_pad,
    K,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_kd,
    BlockTable,
    stride_bt,
    bt_width,
    Seq,
    QLen,
    WStart,
    CandStarts,
    stride_cs,
    CandCount,
    Cos,
    Sin,
    stride_cos,
    PageSlot,
    Counters,
    cache_delta_k,
    stride_ckp,
    Scores,
    num_cand,
    num_kv_heads,
    G,
    sink,
    chunk_size,
    k_scale,
    PAGE_SIZE: tl.constexpr,
    HALF_D: tl.constexpr,
    POOL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    N_ITERS: tl.constexpr,
    FIRST_STAGE: tl.constexpr,
    ROPE_K: tl.constexpr,
    KEYS_ROTATED: tl.constexpr,
    ROUND_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    IEEE: tl.constexpr,
    ONE_ROW_TILE: tl.constexpr,
    NPG: tl.constexpr,
    CACHED: tl.constexpr,
):
    """Binary-search score of BLOCK_C candidate chunks of one query block for one kv head.

    Grid: (cdiv(C, BLOCK_C), Hkv, NB). Each chunk [lo, hi) (clipped at W0) is halved N_ITERS
    times; each step scores the middle token of both halves against all pooled query rows of the
    kv head's G query heads, keeps the better half (the left one on ties) and tracks the best
    score met. Invalid candidates (index >= count, start -1 or >= W0) get -inf.
    NPG > 0: the block-table entries of each chunk's NPG pages are loaded once up front, taking
    a dependent load out of every halving step (a benchmark option: measured ~25% slower on an
    H100 than reloading the L2-resident entries).
    CACHED (offload): keys are read through the GPU page cache (``PageSlot``, see
    ``vllm_hip_kernels.cached_pages``); each program adds the key rows it read, those that hit,
    and the bytes of the misses to ``Counters`` [4], [5] and [2] (int64 atomics).
    KEYS_ROTATED: the cached keys carry the model's rotation at their true positions; every
    sampled key turns back to its scoring position (j with ROPE_K, chunk-indexed; else 0).
    """
    pid_c = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)

    seq = tl.load(Seq + b).to(tl.int64)
    q_len = tl.load(QLen + b)
    w0 = tl.load(WStart + b)
    if FIRST_STAGE:
        n_valid = tl.maximum((w0 - sink + chunk_size - 1) // chunk_size, 0)
    else:
        n_valid = tl.load(CandCount + b)
    n_rows = ((q_len + POOL - 1) // POOL) * G

    j = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_list = (j < n_valid) & (j < num_cand)
    if FIRST_STAGE:
        start = sink + j * chunk_size
    else:
        start = tl.load(CandStarts + b.to(tl.int64) * stride_cs + j, mask=in_list, other=-1)
    valid = in_list & (start >= 0) & (start < w0)
    # Dummy one-token range for invalid lanes keeps the index math in bounds; loads are masked.
    lo = tl.where(valid, start, 0)
    hi = tl.where(valid, tl.minimum(start + chunk_size, w0), 1)

    d = tl.arange(0, HALF_D)
    if KEYS_ROTATED:
        # the scoring position of every key sampled from candidate j (the angle is per token)
        if ROPE_K:
            target = tl.where(valid, j, 0)
        else:
            target = tl.zeros_like(j)
    elif ROPE_K:
        # chunk-indexed RoPE: every key sampled from candidate j sits at position j
        jj = tl.where(valid, j, 0).to(tl.int64)
        ck = tl.load(Cos + jj[:, None] * stride_cos + d[None, :], mask=valid[:, None], other=1.0)
        sk = tl.load(Sin + jj[:, None] * stride_cos + d[None, :], mask=valid[:, None], other=0.0)
    else:
        ck = 1.0
        sk = 0.0

    bt_row = BlockTable + seq * stride_bt
    if NPG > 0:
        p0 = lo // PAGE_SIZE
        pidx = p0[:, None] + tl.arange(0, NPG)[None, :]
        tbl = tl.load(bt_row + pidx, mask=valid[:, None] & (pidx < bt_width), other=0)
    else:
        p0 = lo
        tbl = lo
    head_off = kvh.to(tl.int64) * stride_kh
    q_base = Qp + (b.to(tl.int64) * num_kv_heads + kvh) * rows_pad * (2 * HALF_D)
    r = tl.arange(0, BLOCK_R)
    if ONE_ROW_TILE:
        # all pooled rows fit one tile: load them once for the whole search
        qp = q_base + r[:, None].to(tl.int64) * (2 * HALF_D) + d[None, :]
        q1 = tl.load(qp)
        q2 = tl.load(qp + HALF_D)
        row_ok = r < n_rows

    best = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
    n_read = tl.zeros([], tl.int64)  # key rows read (offload counters; n_rows is the queries')
    n_hit = tl.zeros([], tl.int64)
    for _ in range(N_ITERS):
        length = hi - lo
        half = (length + 1) // 2
        mid = lo + half
        has_r = length > half
        tok_l = lo + half // 2
        tok_r = tl.where(has_r, mid + (length - half) // 2, tok_l)
        valid_r = valid & has_r
        page_l = _page_of(bt_row, tbl, p0, tok_l, valid, PAGE_SIZE, NPG)
        page_r = _page_of(bt_row, tbl, p0, tok_r, valid_r, PAGE_SIZE, NPG)
        off_l, hit_l = _page_offset(page_l, valid, stride_kp, PageSlot, cache_delta_k, stride_ckp, CACHED)
        off_r, hit_r = _page_offset(page_r, valid_r, stride_kp, PageSlot, cache_delta_k, stride_ckp, CACHED)
        if CACHED:
            n_read += tl.sum(valid.to(tl.int64)) + tl.sum(valid_r.to(tl.int64))
            n_hit += tl.sum((valid & hit_l).to(tl.int64)) + tl.sum((valid_r & hit_r).to(tl.int64))
        if KEYS_ROTATED:
            # turn back by tok - target >= 0: cos is even, sin odd
            a_l = tl.where(valid, tok_l - target, 0).to(tl.int64)
            a_r = tl.where(valid_r, tok_r - target, 0).to(tl.int64)
            ck_l = tl.load(Cos + a_l[:, None] * stride_cos + d[None, :])
            sk_l = -tl.load(Sin + a_l[:, None] * stride_cos + d[None, :])
            ck_r = tl.load(Cos + a_r[:, None] * stride_cos + d[None, :])
            sk_r = -tl.load(Sin + a_r[:, None] * stride_cos + d[None, :])
        else:
            ck_l, sk_l, ck_r, sk_r = ck, sk, ck, sk
        kl1, kl2 = _load_key_halves(
            K, off_l, stride_ks, stride_kd, head_off, tok_l, valid, ck_l, sk_l,
            Qp.dtype.element_ty, PAGE_SIZE, HALF_D, ROPE_K or KEYS_ROTATED, ROUND_K,
        )
        kr1, kr2 = _load_key_halves(
            K, off_r, stride_ks, stride_kd, head_off, tok_r, valid_r, ck_r, sk_r,
            Qp.dtype.element_ty, PAGE_SIZE, HALF_D, ROPE_K or KEYS_ROTATED, ROUND_K,
        )
        if ONE_ROW_TILE:
            s_l = _max_score(q1, q2, kl1, kl2, row_ok, USE_DOT, IEEE)
            s_r = _max_score(q1, q2, kr1, kr2, row_ok, USE_DOT, IEEE)
        else:
            s_l = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
            s_r = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
            for r0 in range(0, n_rows, BLOCK_R):
                rr = r0 + r
                qp = q_base + rr[:, None].to(tl.int64) * (2 * HALF_D) + d[None, :]
                q1 = tl.load(qp)
                q2 = tl.load(qp + HALF_D)
                row_ok = rr < n_rows
                s_l = tl.maximum(s_l, _max_score(q1, q2, kl1, kl2, row_ok, USE_DOT, IEEE))
                s_r = tl.maximum(s_r, _max_score(q1, q2, kr1, kr2, row_ok, USE_DOT, IEEE))
        s_l = s_l * k_scale
        s_r = tl.where(has_r, s_r * k_scale, float("-inf"))
        go_r = s_r > s_l
        best = tl.maximum(best, tl.maximum(s_l, s_r))
        lo = tl.where(go_r, mid, lo)
        hi = tl.where(go_r, hi, mid)

    if CACHED:
        # Each miss brought one key head row (2 * HALF_D elements) over PCIe.
        row_bytes = 2 * HALF_D * (K.dtype.element_ty.primitive_bitwidth // 8)
        tl.atomic_add(Counters + 4, n_read)
        tl.atomic_add(Counters + 5, n_hit)
        tl.atomic_add(Counters + 2, (n_read - n_hit) * row_bytes)
    best = tl.where(valid, best, float("-inf"))
    out = Scores + (b.to(tl.int64) * num_kv_heads + kvh) * num_cand + j
    tl.store(out, best.to(Scores.dtype.element_ty), mask=j < num_cand)


@triton.jit
def _order_key(x):
    """int64 keys ordered like the fp32 values ``x`` (finite or -inf)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _head_row(base, h, num_cand, j, in_row, HEAD_MAX: tl.constexpr):
    """One kv head's candidate scores (-inf outside the row), less the head's best if HEAD_MAX
    (a head without a finite score is left as it is)."""
    r = tl.load(base + h * num_cand + j, mask=in_row, other=float("-inf"))
    if HEAD_MAX:
        m = tl.max(r, axis=0)
        r = r - tl.where((m > float("-inf")) & (m < float("inf")), m, 0.0)
    return r


@triton.jit
def _keep_top_kernel(
    Scores,
    num_cand,
    num_kv_heads,
    CandStarts,
    stride_cs,
    sink,
    chunk_size,
    Out,
    stride_out,
    Count,
    keep,
    FIRST_STAGE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HEAD_MAX: tl.constexpr = False,
):
    """Max over kv heads, then keep the ``keep`` best candidates, in candidate (= position) order.

    With ``HEAD_MAX`` each head's scores first lose that head's best over the block's candidates
    (``score_norm="head_max"``, as ``prune.normalize_head_scores`` does in torch: fused here, it
    saves five launches per stage; the result is bitwise the same, a subtraction and maxima).

    Grid: (NB,). All C <= BLOCK_T candidates of a block sit in registers. The keep-th largest
    score is found by bisection on order-preserving integer keys (32 counting passes, no sort);
    ties at the threshold go to the lowest candidate indices. Candidates come ascending, so a
    prefix-sum compaction writes the kept starts already sorted; the rest of the row gets -1.
    """
    b = tl.program_id(0)
    j = tl.arange(0, BLOCK_T)
    in_row = j < num_cand
    base = Scores + b.to(tl.int64) * num_kv_heads * num_cand
    s = _head_row(base, 0, num_cand, j, in_row, HEAD_MAX)
    for h in range(1, num_kv_heads):
        s = tl.maximum(s, _head_row(base, h, num_cand, j, in_row, HEAD_MAX))
    valid = s > float("-inf")
    key = tl.where(valid, _order_key(s), -(2**32))
    n_keep = tl.minimum(tl.sum(valid.to(tl.int32), axis=0), keep)

    # largest t with count(key >= t) >= n_keep
    lo = tl.full([], -(2**31), tl.int64)
    hi = tl.full([], 2**31 - 1, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        ok = tl.sum((key >= mid).to(tl.int32), axis=0) >= n_keep
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    above = valid & (key > lo)
    at = valid & (key == lo)
    room = n_keep - tl.sum(above.to(tl.int32), axis=0)
    sel = above | (at & (tl.cumsum(at.to(tl.int32), axis=0) <= room))
    sel = sel & (n_keep > 0)

    if FIRST_STAGE:
        start = sink + j * chunk_size
    else:
        start = tl.load(CandStarts + b.to(tl.int64) * stride_cs + j, mask=in_row, other=-1)
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    out = Out + b.to(tl.int64) * stride_out
    tl.store(out + pos, start, mask=sel)
    for i0 in range(0, keep, BLOCK_T):
        i = i0 + j
        tl.store(out + i, tl.full([BLOCK_T], -1, tl.int32), mask=(i >= n_keep) & (i < keep))
    tl.store(Count + b, n_keep)


@triton.jit
def _split_chunks_kernel(
    Starts,
    stride_s,
    Count,
    WStart,
    num_in,
    Out,
    stride_out,
    OutCount,
    next_chunk,
    RATIO: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Split each kept chunk into RATIO sub-chunks, dropping those at or past W0, compacted.

    Grid: (NB,). Output row: num_in * RATIO entries, valid ones first in input order, then -1.
    """
    b = tl.program_id(0)
    cnt = tl.load(Count + b)
    w0 = tl.load(WStart + b)
    row = Starts + b.to(tl.int64) * stride_s
    out = Out + b.to(tl.int64) * stride_out
    total = num_in * RATIO
    e0 = tl.arange(0, BLOCK)
    n_out = tl.zeros([], tl.int32)
    for t0 in range(0, total, BLOCK):
        e = t0 + e0
        p = e // RATIO
        in_list = (p < cnt) & (p < num_in)
        st = tl.load(row + p, mask=in_list, other=-1)
        sub = st + (e % RATIO) * next_chunk
        ok = in_list & (st >= 0) & (sub < w0)
        pos = n_out + tl.cumsum(ok.to(tl.int32), axis=0) - 1
        tl.store(out + pos, sub, mask=ok)
        n_out += tl.sum(ok.to(tl.int32), axis=0)
    for t0 in range(0, total, BLOCK):
        e = t0 + e0
        tl.store(out + e, tl.full([BLOCK], -1, tl.int32), mask=(e >= n_out) & (e < total))
    tl.store(OutCount + b, n_out)
