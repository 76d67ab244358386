"""Hierarchical pruning kernels (vllm_hip_kernels.prune) against the PyTorch reference.

On a CPU machine the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported); on CUDA they run compiled. Shapes stay small so the module runs in about a minute on
two CPU cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

from vllm_hip_kernels.prune import (  # noqa: E402
    run_stage,
    score_chunks,
    select_blocks,
    split_chunks,
)
from vllm_hip_kernels.prune_reference import (  # noqa: E402
    rotate_reference,
    run_stage_reference,
    score_chunks_reference,
    select_blocks_reference,
    split_chunks_reference,
)
from vllm_hip_kernels.query_blocks import build_query_blocks  # noqa: E402

gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (q_len, seq_len): decode rows, prefill chunks over several query blocks, a context shorter
# than sink + window (no candidate) and one barely longer (a single clipped chunk).
RAGGED = [(1, 700), (5, 18), (21, 463), (1, 60), (2, 300)]


@dataclass
class Stage:
    chunk_size: int
    keep_tokens: int
    query_pool: int = 1


@dataclass
class Case:
    q: torch.Tensor
    key_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    qblocks: object
    cos: torch.Tensor
    sin: torch.Tensor
    k_scale: float
    sink: int

    def args(self):
        return self.q, self.key_cache, self.block_table, self.seq_lens, self.qblocks


def rope_tables(max_pos: int, head_dim: int, device=DEVICE):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return ang.cos().float().to(device), ang.sin().float().to(device)


def make_case(
    specs=RAGGED,
    *,
    heads=(8, 2),
    head_dim=64,
    page_size=16,
    kv_dtype=torch.bfloat16,
    q_dtype=None,
    sink=16,
    window=32,
    block_size_q=16,
    seed=0,
    device=DEVICE,
) -> Case:
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    q_dtype = q_dtype or (torch.bfloat16 if kv_dtype == torch.float8_e4m3fn else kv_dtype)
    pages = [-(-s // page_size) for _, s in specs]
    num_pages = sum(pages) + 3
    # vLLM layout [num_pages, 2, page, Hkv, D]: the key cache is a strided view of it
    kv = torch.randn(num_pages, 2, page_size, hkv, head_dim, generator=g)
    k_scale = 1.0
    if kv_dtype == torch.float8_e4m3fn:
        kv, k_scale = kv * 8.0, 0.125
    kv = kv.to(kv_dtype).to(device)
    perm = torch.randperm(num_pages, generator=g)
    table = torch.zeros(len(specs), max(pages), dtype=torch.int32)
    o = 0
    for i, n in enumerate(pages):
        table[i, :n] = perm[o:o + n].int()
        o += n
    q_lens = torch.tensor([a for a, _ in specs])
    seq_lens = torch.tensor([b for _, b in specs], dtype=torch.int32)
    qsl = torch.zeros(len(specs) + 1, dtype=torch.int64)
    qsl[1:] = q_lens.cumsum(0)
    qb = build_query_blocks(
        qsl, seq_lens, block_size_q=block_size_q, sink_tokens=sink, window_tokens=window,
        device=device,
    )
    q = torch.randn(int(qsl[-1]), hq, head_dim, generator=g).to(q_dtype).to(device)
    cos, sin = rope_tables(max(2048, max(b for _, b in specs) + 1), head_dim, device)
    return Case(q, kv[:, 0], table.to(device), seq_lens.to(device), qb, cos, sin, k_scale, sink)


def random_candidates(case: Case, parent: int, child: int, keep: int, seed: int = 1):
    """Explicit candidates the way split_chunks makes them: random kept parent chunks, split."""
    g = torch.Generator().manual_seed(seed)
    qb = case.qblocks
    nb = qb.num_blocks
    starts = torch.full((nb, keep), -1, dtype=torch.int32)
    count = torch.zeros(nb, dtype=torch.int32)
    for b, w0 in enumerate(qb.window_start.tolist()):
        n = max(0, -(-(w0 - case.sink) // parent))
        pick = torch.sort(torch.randperm(n, generator=g)[:keep]).values
        starts[b, : pick.numel()] = (case.sink + parent * pick).int()
        count[b] = pick.numel()
    return split_chunks_reference(
        starts.to(DEVICE), count.to(DEVICE), parent, child, qb.window_start
    )


def stage_kwargs(case: Case, mask_rope, **kw):
    rope = {} if mask_rope is None else {"cos": case.cos, "sin": case.sin}
    return dict(sink_tokens=case.sink, k_scale=case.k_scale, mask_rope=mask_rope, **rope, **kw)


def assert_scores_close(got, ref):
    # Same rounding points in both; only the fp32 (kernel) vs fp64 (reference) accumulation differs.
    assert not torch.isnan(got).any()
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got.cpu(), ref.cpu(), rtol=1e-5, atol=2e-4)


# ----------------------------------------------------------------------------- one stage
STAGE_CASES = [
    # heads, D, page, kv dtype, mask_rope, explicit candidates, chunk, pool, block_size_q
    ((8, 2), 64, 16, torch.bfloat16, None, False, 32, 1, 16),
    ((5, 1), 128, 32, torch.float32, None, True, 16, 4, 16),
    ((8, 2), 64, 32, torch.float8_e4m3fn, "relative", False, 32, 4, 16),
    ((5, 1), 64, 16, torch.bfloat16, "chunk_indexed", True, 16, 2, 16),
    ((8, 2), 32, 16, torch.float32, "chunk_indexed", False, 64, 1, 32),
    ((8, 2), 128, 32, torch.bfloat16, "relative", True, 8, 1, 32),
    ((5, 1), 128, 16, torch.float8_e4m3fn, None, True, 8, 1, 16),
    ((8, 2), 64, 16, torch.float16, "chunk_indexed", False, 16, 4, 16),
]


@pytest.mark.parametrize(
    "heads,head_dim,page,kv_dtype,mask_rope,explicit,chunk,pool,bq",
    STAGE_CASES,
    ids=[f"{h[0]}x{h[1]}-D{d}-p{p}-{str(t)[6:]}-{m}-{'cand' if e else 'first'}-c{c}-pool{po}-bq{b}"
         for h, d, p, t, m, e, c, po, b in STAGE_CASES],
)
def test_stage_matches_reference(heads, head_dim, page, kv_dtype, mask_rope, explicit, chunk,
                                 pool, bq):
    case = make_case(heads=heads, head_dim=head_dim, page_size=page, kv_dtype=kv_dtype,
                     block_size_q=bq, seed=hash((heads, head_dim, chunk)) % 1000)
    cs, cc = random_candidates(case, 4 * chunk, chunk, keep=4) if explicit else (None, None)
    kw = stage_kwargs(case, mask_rope, chunk_size=chunk, query_pool=pool, rope_distance=700)
    got, starts, n_cand = score_chunks(*case.args(), cs, cc, **kw)
    ref, ref_starts, ref_n = score_chunks_reference(*case.args(), cs, cc, **kw)
    assert_scores_close(got, ref)
    assert torch.equal(n_cand.cpu(), ref_n.cpu())
    assert torch.equal(starts.cpu().int(), ref_starts.cpu().int())
    # every block with a candidate region scores at least one chunk
    w0 = case.qblocks.window_start.cpu()
    assert torch.equal(torch.isfinite(got.cpu()).any(1), w0 > case.sink)

    s, c = run_stage(*case.args(), cs, cc, keep_chunks=3, **kw)
    rs, rc = run_stage_reference(*case.args(), cs, cc, keep_chunks=3, **kw)
    assert s.dtype == torch.int32 and c.dtype == torch.int32 and s.shape == (len(w0), 3)
    assert torch.equal(s.cpu(), rs.cpu()), (s, rs)
    assert torch.equal(c.cpu(), rc.cpu())
    assert torch.equal(c.cpu(), torch.isfinite(got.cpu()).sum(1).clamp(max=3).int())
    assert (c.cpu() > 0).any()


def rotated(case: Case) -> Case:
    """The case as vLLM's model caches it: keys and queries rotated at their true positions
    (fp32 rotation, rounded to the cache/query dtype)."""
    page_size = case.key_cache.shape[1]
    kc = case.key_cache.clone()
    for s, n in enumerate(case.seq_lens.tolist()):
        tok = torch.arange(n, device=DEVICE)
        idx = (case.block_table[s, tok // page_size].long(), tok % page_size)
        c, sn = case.cos[tok][:, None, :], case.sin[tok][:, None, :]
        kc[idx] = rotate_reference(kc[idx].float() * case.k_scale, c, sn).div(case.k_scale).to(kc.dtype)
    q = case.q.float().clone()
    qb = case.qblocks
    for q0, n, p in zip(qb.q_start.tolist(), qb.q_len.tolist(), qb.pos.tolist()):
        pos = torch.arange(p, p + n, device=DEVICE)
        q[q0:q0 + n] = rotate_reference(q[q0:q0 + n], case.cos[pos][:, None, :], case.sin[pos][:, None, :])
    return replace(case, q=q.to(case.q.dtype), key_cache=kc)


ROTATED_CASES = [  # kv dtype, mask_rope, explicit candidates, chunk, pool
    (torch.float32, "relative", False, 32, 4),
    (torch.float32, "chunk_indexed", True, 16, 2),
    (torch.bfloat16, "chunk_indexed", False, 32, 1),
    (torch.bfloat16, "relative", True, 16, 4),
]


@pytest.mark.parametrize("kv_dtype,mask_rope,explicit,chunk,pool", ROTATED_CASES)
def test_rotated_keys_match_reference_and_the_unrotated_scores(kv_dtype, mask_rope, explicit,
                                                               chunk, pool):
    """Keys cached rotated (as vLLM caches them for every backend): the kernels turn each query
    and sampled key to its scoring position and score as the un-rotated inputs do."""
    case = make_case(kv_dtype=kv_dtype, seed=23)
    rot = rotated(case)
    cs, cc = random_candidates(case, 4 * chunk, chunk, keep=4) if explicit else (None, None)
    kw = stage_kwargs(case, mask_rope, chunk_size=chunk, query_pool=pool, rope_distance=700)
    got, _, _ = score_chunks(*rot.args(), cs, cc, keys_rotated=True, **kw)
    ref, _, _ = score_chunks_reference(*rot.args(), cs, cc, keys_rotated=True, **kw)
    assert_scores_close(got, ref)
    s, c = run_stage(*rot.args(), cs, cc, keep_chunks=3, keys_rotated=True, **kw)
    rs, rc = run_stage_reference(*rot.args(), cs, cc, keep_chunks=3, keys_rotated=True, **kw)
    assert torch.equal(s.cpu(), rs.cpu()) and torch.equal(c.cpu(), rc.cpu())
    plain, _, _ = score_chunks(*case.args(), cs, cc, **kw)
    if kv_dtype == torch.float32:  # the same scores as un-rotated inputs, up to fp32 rounding
        torch.testing.assert_close(got.cpu(), plain.cpu(), rtol=1e-4, atol=1e-3)
    else:  # one more bf16 rounding of every key and query: close, not equal
        fin = torch.isfinite(plain)
        assert torch.equal(fin, torch.isfinite(got))
        assert (got[fin] - plain[fin]).abs().max() < 0.1 * plain[fin].abs().max()
    wrong, _, _ = score_chunks(*rot.args(), cs, cc, **kw)  # rotated keys read as un-rotated
    fin = torch.isfinite(plain)
    assert (wrong[fin] - plain[fin]).abs().max() > 0.1


@pytest.mark.parametrize("mask_rope", [None, "chunk_indexed"])
def test_keep_everything_is_exhaustive(mask_rope):
    """A stage whose keep covers every candidate returns all of them, in order."""
    case = make_case(seed=3)
    qb = case.qblocks
    chunk = 32
    kw = stage_kwargs(case, mask_rope, chunk_size=chunk, query_pool=4)
    s, c = run_stage(*case.args(), None, None, keep_chunks=64, **kw)
    s, c = s.cpu(), c.cpu()
    for b, w0 in enumerate(qb.window_start.tolist()):
        expect = list(range(case.sink, w0, chunk))
        assert c[b] == len(expect)
        assert s[b, : len(expect)].tolist() == expect
        assert (s[b, len(expect):] == -1).all()
    # explicit candidates, some blocks with fewer than keep
    cs, cc = random_candidates(case, 64, 16, keep=3)
    s2, c2 = run_stage(*case.args(), cs, cc, keep_chunks=12, **stage_kwargs(
        case, mask_rope, chunk_size=16, query_pool=1))
    assert torch.equal(c2.cpu(), cc.cpu())
    assert torch.equal(s2.cpu(), cs.cpu())


@pytest.mark.parametrize("mask_rope", [None, "chunk_indexed"])
def test_multistage_keep_all_equals_single_final_stage(mask_rope):
    case = make_case([(1, 400), (5, 18), (3, 300), (1, 60)], seed=5, heads=(5, 1))
    k = 48
    kw = stage_kwargs(case, mask_rope)
    multi, mc, inputs = select_blocks(
        *case.args(), [Stage(32, 4096, 1), Stage(8, k, 1)], **kw
    )
    single, sc, _ = select_blocks(*case.args(), [Stage(8, k, 1)], **kw)
    assert inputs[0] is None and inputs[1] is not None
    assert torch.equal(multi.cpu(), single.cpu())
    assert torch.equal(mc.cpu(), sc.cpu())
    # and a region small enough is selected whole (sparse == exact attention)
    w0 = case.qblocks.window_start.cpu()
    small = (w0 - case.sink) <= k
    for b in torch.nonzero(small).flatten().tolist():
        expect = list(range(case.sink, int(w0[b]), 8))
        assert single[b, : len(expect)].cpu().tolist() == expect and sc[b] == len(expect)


def check_selection_invariants(sel, cnt, qblocks, sink):
    sel, cnt = sel.cpu(), cnt.cpu()
    w0 = qblocks.window_start.cpu()
    for b in range(sel.shape[0]):
        n = int(cnt[b])
        v = sel[b, :n]
        assert (v >= sink).all() and (v < w0[b]).all(), (b, v, w0[b])
        assert (v % 8 == 0).all()
        assert (v[1:] > v[:-1]).all()
        assert (sel[b, n:] == -1).all()


@pytest.mark.parametrize("mask_rope", [None, "chunk_indexed"])
def test_select_blocks_matches_reference_and_caching(mask_rope):
    case = make_case(seed=7, page_size=32, specs=[(1, 700), (19, 463), (1, 60), (3, 1000)])
    stages = [Stage(64, 256, 4), Stage(16, 96, 2), Stage(8, 48, 1)]
    kw = stage_kwargs(case, mask_rope, rope_distance=512)
    sel, cnt, inputs = select_blocks(*case.args(), stages, **kw)
    rsel, rcnt, rinputs = select_blocks_reference(*case.args(), stages, **kw)
    assert sel.shape == (case.qblocks.num_blocks, 6)
    assert torch.equal(sel.cpu(), rsel.cpu()) and torch.equal(cnt.cpu(), rcnt.cpu())
    for i in (1, 2):
        assert torch.equal(inputs[i][0].cpu(), rinputs[i][0].cpu())
        assert torch.equal(inputs[i][1].cpu(), rinputs[i][1].cpu())
    check_selection_invariants(sel, cnt, case.qblocks, case.sink)
    # decode mask caching: rerunning from a cached stage input reproduces the selection
    for first in (1, 2):
        s2, c2, in2 = select_blocks(
            *case.args(), stages, cached_inputs=inputs[first], first_stage=first, **kw
        )
        assert torch.equal(s2, sel) and torch.equal(c2, cnt)
        assert all(x is None for x in in2[:first]) and in2[first] is inputs[first]


def test_head_max_normalization_matches_reference_and_changes_the_ranking():
    case = make_case(seed=11, page_size=16, specs=[(1, 700), (19, 463), (3, 1000)])
    stages = [Stage(64, 256, 4), Stage(8, 48, 1)]
    kw = stage_kwargs(case, None)
    sel, cnt, _ = select_blocks(*case.args(), stages, score_norm="head_max", **kw)
    rsel, rcnt, _ = select_blocks_reference(*case.args(), stages, score_norm="head_max", **kw)
    assert torch.equal(sel.cpu(), rsel.cpu()) and torch.equal(cnt.cpu(), rcnt.cpu())
    check_selection_invariants(sel, cnt, case.qblocks, case.sink)
    raw, _, _ = select_blocks(*case.args(), stages, **kw)
    assert not torch.equal(raw, sel)  # the normalization really changes which blocks win
    with pytest.raises(ValueError, match="score_norm="):
        select_blocks(*case.args(), stages, score_norm="l2", **kw)


def test_fused_head_max_equals_the_torch_normalization():
    """The keep-top kernel's HEAD_MAX (the per-head normalization fused in) picks bitwise what
    torch's normalize_head_scores + the stable-sort fallback pick: ties, a head without any
    finite score, a block with no valid candidate."""
    from vllm_hip_kernels.prune import _keep_top_torch, normalize_head_scores
    from vllm_hip_kernels.prune_kernels import _keep_top_kernel

    g = torch.Generator().manual_seed(4)
    nb, hkv, c, keep = 5, 3, 37, 9
    hs = torch.randn(nb, hkv, c, generator=g).round(decimals=1)  # rounding makes ties
    hs[:, :, 30:] = float("-inf")  # invalid candidates
    hs[1, 2] = float("-inf")  # a head with no finite score
    hs[3] = float("-inf")  # a block with no valid candidate
    hs = hs.to(DEVICE)
    starts = (8 + torch.arange(c, dtype=torch.int32) * 16).to(DEVICE)
    want, want_n = _keep_top_torch(normalize_head_scores(hs, "head_max").amax(1), starts[None], keep)
    out = torch.empty((nb, keep), device=DEVICE, dtype=torch.int32)
    n = torch.empty(nb, device=DEVICE, dtype=torch.int32)
    q_len = torch.ones(nb, device=DEVICE, dtype=torch.int32)  # unused by the first stage
    _keep_top_kernel[(nb,)](hs, c, hkv, q_len, 0, 8, 16, out, out.stride(0), n, keep,
                            FIRST_STAGE=True, BLOCK_T=64, HEAD_MAX=True)  # fmt: skip
    assert torch.equal(out.cpu(), want.cpu()) and torch.equal(n.cpu(), want_n.cpu())
    assert n.tolist()[3] == 0 and out[3].tolist() == [-1] * keep


@pytest.mark.parametrize("page", [16, 32])
def test_selection_invariants_ragged(page):
    specs = [(1, 1328), (5, 18), (64, 463), (1, 61), (2, 300), (1, 57)]
    case = make_case(specs, seed=11, page_size=page, window=40, sink=24, block_size_q=32)
    stages = [Stage(32, 192, 4), Stage(8, 64, 1)]
    sel, cnt, _ = select_blocks(*case.args(), stages, **stage_kwargs(case, None))
    check_selection_invariants(sel, cnt, case.qblocks, case.sink)
    w0 = case.qblocks.window_start.cpu()
    # every block keeps min(k, region) tokens' worth of blocks
    region_blocks = (w0 - case.sink + 7) // 8
    assert torch.equal(cnt.cpu(), region_blocks.clamp(max=8).int())


def test_empty_candidate_region():
    case = make_case([(1, 40), (5, 18), (16, 48), (1, 16)], seed=2)
    assert (case.qblocks.window_start.cpu() == case.sink).all()
    kw = stage_kwargs(case, "chunk_indexed", chunk_size=8, query_pool=1)
    scores, starts, n = score_chunks(*case.args(), None, None, **kw)
    assert scores.shape == (case.qblocks.num_blocks, 0) and (n.cpu() == 0).all()
    s, c = run_stage(*case.args(), None, None, keep_chunks=4, **kw)
    assert (c.cpu() == 0).all() and (s.cpu() == -1).all() and s.shape[1] == 4
    sel, cnt, _ = select_blocks(*case.args(), [Stage(32, 64), Stage(8, 32)],
                                **stage_kwargs(case, None))
    assert (cnt.cpu() == 0).all() and (sel.cpu() == -1).all()
    # mixed batch: a block with no region next to long ones scores -inf everywhere, never NaN
    case = make_case(seed=4)
    scores, _, _ = score_chunks(*case.args(), None, None,
                                **stage_kwargs(case, None, chunk_size=32, query_pool=1))
    assert not torch.isnan(scores).any()
    empty = (case.qblocks.window_start.cpu() == case.sink)
    assert empty.any() and torch.isneginf(scores.cpu()[empty]).all()


def test_no_stages_means_empty_selection():
    case = make_case(seed=1)
    sel, cnt, inputs = select_blocks(*case.args(), [], sink_tokens=case.sink)
    assert sel.shape == (case.qblocks.num_blocks, 0) and sel.dtype == torch.int32
    assert (cnt.cpu() == 0).all() and inputs == []


def test_split_chunks_matches_reference():
    g = torch.Generator().manual_seed(0)
    nb, k = 7, 5
    w0 = torch.tensor([16, 100, 333, 512, 40, 1000, 70], dtype=torch.int32)
    starts = torch.full((nb, k), -1, dtype=torch.int32)
    count = torch.zeros(nb, dtype=torch.int32)
    for b in range(nb):
        n = max(0, -(-(int(w0[b]) - 16) // 32))
        pick = torch.sort(torch.randperm(n, generator=g)[:k]).values
        starts[b, : pick.numel()] = (16 + 32 * pick).int()
        count[b] = pick.numel()
    count[3] = max(0, int(count[3]) - 2)  # stale entries past count must be ignored
    starts[6] = torch.tensor([16, 48, -1, -1, -1])  # [48, 80) straddles W0 = 70
    count[6] = 2
    args = (starts.to(DEVICE), count.to(DEVICE), 32, 8, w0.to(DEVICE))
    got = split_chunks(*args)
    ref = split_chunks_reference(*args)
    assert got[0].shape == (nb, 4 * k)
    assert torch.equal(got[0].cpu(), ref[0].cpu()) and torch.equal(got[1].cpu(), ref[1].cpu())
    # the block whose last chunk straddles W0 loses the sub-chunks at or past W0
    assert (got[0].cpu() < w0[:, None]).all()
    assert got[0][6, :8].tolist() == [16, 24, 32, 40, 48, 56, 64, -1] and int(got[1][6]) == 7


@pytest.mark.parametrize(
    "override",
    [{"bt_prefetch": True}, {"use_dot": False, "block_r": 4}, {"block_c": 16, "num_warps": 2}],
    ids=["table-prefetch", "broadcast-sum", "narrow-tiles"],
)
def test_launch_variants_agree(monkeypatch, override):
    """The tile/launch choices kept for benchmarking give the same answer as the reference."""
    import vllm_hip_kernels.prune as prune_mod

    monkeypatch.setattr(prune_mod, "_TILE_OVERRIDE", override)
    case = make_case([(1, 700), (21, 463), (2, 60)], seed=13, page_size=16)
    kw = stage_kwargs(case, "chunk_indexed", chunk_size=32, query_pool=2)
    got, _, _ = score_chunks(*case.args(), None, None, **kw)
    ref, _, _ = score_chunks_reference(*case.args(), None, None, **kw)
    assert_scores_close(got, ref)
    s, c = run_stage(*case.args(), None, None, keep_chunks=4, **kw)
    rs, rc = run_stage_reference(*case.args(), None, None, keep_chunks=4, **kw)
    assert torch.equal(s.cpu(), rs.cpu()) and torch.equal(c.cpu(), rc.cpu())


def test_torch_topk_fallback_for_many_candidates(monkeypatch):
    import vllm_hip_kernels.prune as prune_mod

    monkeypatch.setattr(prune_mod, "_MAX_FUSED_TOPK", 8)
    case = make_case(seed=14)
    kw = stage_kwargs(case, None, chunk_size=16, query_pool=1)
    s, c = run_stage(*case.args(), None, None, keep_chunks=5, **kw)
    rs, rc = run_stage_reference(*case.args(), None, None, keep_chunks=5, **kw)
    assert torch.equal(s.cpu(), rs.cpu()) and torch.equal(c.cpu(), rc.cpu())


@pytest.mark.parametrize("fallback", [False, True])
def test_ties_keep_the_earliest_chunks(fallback, monkeypatch):
    """Identical keys tie every chunk: the fused top-k and the torch fallback keep the lowest
    candidate indices, as the reference's stable ordering does (torch.topk would be free to pick
    any, and a batch-invariant selection cannot let it)."""
    import vllm_hip_kernels.prune as prune_mod

    if fallback:
        monkeypatch.setattr(prune_mod, "_MAX_FUSED_TOPK", 8)
    case = make_case(seed=15)
    case.key_cache[:] = case.key_cache[0, 0, 0]
    kw = stage_kwargs(case, None, chunk_size=16, query_pool=1)
    s, c = run_stage(*case.args(), None, None, keep_chunks=3, **kw)
    rs, rc = run_stage_reference(*case.args(), None, None, keep_chunks=3, **kw)
    assert torch.equal(s.cpu(), rs.cpu()) and torch.equal(c.cpu(), rc.cpu())
    w0 = case.qblocks.window_start.cpu()
    for b in range(len(w0)):
        expect = list(range(case.sink, int(w0[b]), 16))[:3]
        assert s[b, : len(expect)].cpu().tolist() == expect


# ----------------------------------------------------------------------------- scoring quality
@pytest.mark.parametrize("mask_rope", [None, "relative"])
def test_planted_key_is_selected(mask_rope):
    """One key aligned with the query, in a chunk in the middle of a long context, wins."""
    case = make_case([(1, 1100)], heads=(8, 2), head_dim=64, seed=9)
    chunk, target_chunk = 32, 15
    qv = case.q[0, 5].float()  # query head 5 -> kv head 1: exercises the max over kv heads
    if mask_rope == "relative":
        qv = rotate_reference(qv, case.cos[700], case.sin[700])
    # offset chunk//4 is the left-half sample of the first halving: always scored
    tok = case.sink + target_chunk * chunk + chunk // 4
    page = case.block_table[0, tok // 16].long()
    case.key_cache[page, tok % 16, 1] = (3.0 * qv).to(case.key_cache.dtype)
    kw = stage_kwargs(case, mask_rope, chunk_size=chunk, query_pool=1, rope_distance=700)
    s, c = run_stage(*case.args(), None, None, keep_chunks=1, **kw)
    assert int(c[0]) == 1 and int(s[0, 0]) == case.sink + target_chunk * chunk
    scores, _, _ = score_chunks(*case.args(), None, None, **kw)
    ref, _, _ = score_chunks_reference(*case.args(), None, None, **kw)
    assert_scores_close(scores, ref)


def test_planted_needle_survives_three_stages():
    case = make_case([(1, 1500), (33, 1400)], heads=(5, 1), head_dim=64, seed=12,
                     block_size_q=64)
    # 16 tokens aligned with the mean query direction, at offset 16 of a 64-chunk: the
    # first stage's left sample; stage 2 and 3 then see the whole run
    needle = case.sink + 64 * 9 + 16
    direction = case.q.float().mean((0, 1))
    direction = direction / direction.norm() * 60.0
    for t in range(needle, needle + 16):
        for s in range(2):
            page = case.block_table[s, t // 16].long()
            case.key_cache[page, t % 16, 0] = direction.to(case.key_cache.dtype)
    stages = [Stage(64, 256, 4), Stage(16, 64, 4), Stage(8, 32, 1)]
    sel, cnt, _ = select_blocks(*case.args(), stages, **stage_kwargs(case, None))
    rsel, rcnt, _ = select_blocks_reference(*case.args(), stages, **stage_kwargs(case, None))
    assert torch.equal(sel.cpu(), rsel.cpu())
    for b in range(case.qblocks.num_blocks):
        got = sel[b, : int(cnt[b])].cpu().tolist()
        assert needle in got and needle + 8 in got, (b, got)


def test_bf16_score_error_within_torch_bf16_error():
    """Chunk size 2: one halving scores both tokens, so the score is max over the chunk of
    max over pooled query rows of q.k, a dense definition independent of the search. The kernel's
    error against it in fp64 stays within twice that of the same computation in bf16 PyTorch."""
    case = make_case([(1, 300), (13, 250)], heads=(8, 2), head_dim=64, seed=21)
    pool, sink, chunk = 2, case.sink, 2
    got, starts, _ = score_chunks(*case.args(), None, None, chunk_size=chunk, query_pool=pool,
                                  sink_tokens=sink)
    got = got.cpu().double()
    qb = case.qblocks

    def dense(dtype):
        out = torch.full(got.shape, float("-inf"), dtype=torch.float64)
        for b in range(qb.num_blocks):
            qs, ql, w0 = int(qb.q_start[b]), int(qb.q_len[b]), int(qb.window_start[b])
            seq = int(qb.seq[b])
            rows = case.q[qs:qs + ql].to(dtype)
            ng = -(-ql // pool)
            pooled = torch.stack([rows[i * pool:(i + 1) * pool].mean(0) for i in range(ng)])
            toks = torch.arange(sink, w0, device=case.q.device)
            pages = case.block_table[seq, toks // 16].long()
            keys = case.key_cache[pages, toks % 16].to(dtype)  # [T, Hkv, D]
            qh = pooled.view(ng, 2, 4, -1)  # [NG, Hkv, G, D]
            s = torch.einsum("thd,nhgd->thng", keys, qh).to(torch.float64)
            s = s.flatten(1).amax(1).cpu()  # [T]
            n = -(-(w0 - sink) // chunk)
            pad = torch.full((n * chunk - s.numel(),), float("-inf"), dtype=torch.float64)
            out[b, :n] = torch.cat([s, pad]).view(n, chunk).amax(1)
        return out

    exact = dense(torch.float64)
    err_torch = (dense(torch.bfloat16) - exact).nan_to_num(posinf=0, neginf=0).abs().max()
    err_kernel = (got - exact).nan_to_num(posinf=0, neginf=0).abs().max()
    assert torch.equal(torch.isinf(got), torch.isinf(exact))
    assert err_torch > 0
    assert err_kernel <= 2 * err_torch, (err_kernel, err_torch)


# ----------------------------------------------------------------------------- addressing
def test_page_offsets_beyond_int32():
    """Page index times page stride exceeds 2**31 elements while each fits int32 (fp8, 1 byte
    each: a 2 GiB storage, lazily allocated, of which only two pages are ever touched)."""
    page_size, hkv, head_dim = 16, 1, 32
    page_stride = 2**30 + 64
    try:
        storage = torch.empty(2 * page_stride + page_size * hkv * head_dim, dtype=torch.uint8,
                              device=DEVICE)
    except (RuntimeError, MemoryError) as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"cannot reserve a 2 GiB storage: {e}")
    kc = storage.view(torch.float8_e4m3fn).as_strided(
        (3, page_size, hkv, head_dim), (page_stride, hkv * head_dim, head_dim, 1)
    )
    g = torch.Generator().manual_seed(0)
    for p in (0, 2):
        kc[p] = (torch.randn(page_size, hkv, head_dim, generator=g) * 8).to(kc.dtype).to(DEVICE)
    # decode query at position 40: tokens 0-15 -> page 2 (offset > 2**31), 16-31 -> page 0
    seq_len, sink, window = 41, 0, 8
    table = torch.tensor([[2, 0, 2]], dtype=torch.int32, device=DEVICE)
    qb = build_query_blocks(torch.tensor([0, 1]), torch.tensor([seq_len]), block_size_q=16,
                            sink_tokens=sink, window_tokens=window, device=DEVICE)
    q = torch.randn(1, 2, head_dim, generator=g).bfloat16().to(DEVICE)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32, device=DEVICE)
    args = (q, kc, table, seq_lens, qb, None, None)
    kw = dict(chunk_size=8, query_pool=1, sink_tokens=sink, k_scale=0.25)
    got, _, _ = score_chunks(*args, **kw)
    ref, _, _ = score_chunks_reference(*args, **kw)
    assert_scores_close(got, ref)
    s, c = run_stage(*args, keep_chunks=2, **kw)
    rs, rc = run_stage_reference(*args, keep_chunks=2, **kw)
    assert torch.equal(s.cpu(), rs.cpu()) and torch.equal(c.cpu(), rc.cpu())


def test_input_checks():
    case = make_case(seed=0)
    with pytest.raises(ValueError, match="cos and sin"):
        run_stage(*case.args(), None, None, chunk_size=8, keep_chunks=2, query_pool=1,
                  sink_tokens=case.sink, mask_rope="relative")
    with pytest.raises(ValueError, match="mask_rope"):
        run_stage(*case.args(), None, None, chunk_size=8, keep_chunks=2, query_pool=1,
                  sink_tokens=case.sink, mask_rope="model")
    with pytest.raises(ValueError, match="cached_inputs"):
        select_blocks(*case.args(), [Stage(32, 64), Stage(8, 32)], sink_tokens=case.sink,
                      first_stage=1)
    assert case.qblocks.max_q_len > 1
    with pytest.raises(ValueError, match="tile_q_len=1 < the longest query block"):
        run_stage(*case.args(), None, None, chunk_size=8, keep_chunks=2, query_pool=1,
                  sink_tokens=case.sink, tile_q_len=1)


# ----------------------------------------------------------------------------- GPU timing
def _cuda_time_us(fn, iters):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1000 / iters


def _graph(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def bench_stage1(num_tokens=1 << 20, q_len=1, hq=32, hkv=8, head_dim=128, page_size=16,
                 stages=((256, 32768, 4), (32, 8192, 4), (8, 2048, 1)), iters=50, tiles=None):
    """Time pruning for one query block of ``q_len`` queries over ``num_tokens`` candidate tokens
    (bf16, CUDA).

    Returns µs per call: stage-1 scoring kernels (pool + score) and stage-1 run_stage replayed as
    CUDA graphs, run_stage launched eagerly (host overhead included), and all ``stages`` through
    select_blocks as a CUDA graph.
    """
    import vllm_hip_kernels.prune as prune_mod

    sink, window = 256, 1024
    seq_len = sink + num_tokens + window + q_len - 1
    n_pages = -(-seq_len // page_size)
    g = torch.Generator(device="cuda").manual_seed(0)
    kc = torch.randn(n_pages, page_size, hkv, head_dim, device="cuda", dtype=torch.bfloat16,
                     generator=g)
    table = torch.randperm(n_pages, device="cuda", generator=g).int()[None, :]
    seq_lens = torch.tensor([seq_len], dtype=torch.int32, device="cuda")
    qb = build_query_blocks(torch.tensor([0, q_len]), seq_lens.cpu(), block_size_q=64,
                            sink_tokens=sink, window_tokens=window, device="cuda")
    q = torch.randn(q_len, hq, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    chunk, keep, pool = stages[0]
    kw = dict(chunk_size=chunk, query_pool=pool, sink_tokens=sink)
    st = [Stage(*x) for x in stages]
    old = prune_mod._TILE_OVERRIDE
    prune_mod._TILE_OVERRIDE = tiles
    try:
        score = lambda: prune_mod._head_scores(  # noqa: E731
            q, kc, table, seq_lens, qb, None, None, k_scale=1.0, mask_rope=None, cos=None,
            sin=None, rope_distance=0, **kw)
        stage = lambda: run_stage(q, kc, table, seq_lens, qb, None, None,  # noqa: E731
                                  keep_chunks=keep // chunk, **kw)
        select = lambda: select_blocks(q, kc, table, seq_lens, qb, st,  # noqa: E731
                                       sink_tokens=sink)
        return {
            "score_graph": _cuda_time_us(_graph(score).replay, iters),
            "stage_graph": _cuda_time_us(_graph(stage).replay, iters),
            "stage_eager": _cuda_time_us(stage, iters),
            "select_graph": _cuda_time_us(_graph(select).replay, iters),
        }
    finally:
        prune_mod._TILE_OVERRIDE = old


@gpu
@requires_cuda
def test_stage1_one_million_tokens_is_fast():
    t = bench_stage1()
    print("\n1M tokens, decode, stage 1 (4096 chunks of 256, Hkv 8, D 128, bf16), us: "
          + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    assert t["stage_graph"] < 300.0
