"""Block-sparse attention (vllm_hip_kernels.sparse_attention) against the PyTorch references.

On a CPU machine the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported); on CUDA they run compiled. Tolerances for 16-bit inputs are relative to the error of a
PyTorch run in that dtype against the fp32 reference (flash-attention's rule): kernel error <=
2 x that error + a small floor.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

from vllm_hip_kernels.query_blocks import QueryBlocks, build_query_blocks
from vllm_hip_kernels.sparse_attention import (
    MAX_SPLITS,
    choose_num_splits,
    sparse_attention,
)
from vllm_hip_kernels.sparse_attention_reference import (
    apply_rope_reference,
    dense_causal_attention_reference,
    sparse_attention_reference,
)

gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BK = 8
POISON = 100.0  # fills every cache slot no sequence owns: reading one shows up as a huge error
# (q_len, seq_len): decode rows, a short prefill, a chunk of several query blocks, a decode row
# whose window start W0 is not 8-aligned (a selected block straddles W0), a context < sink.
RAGGED = [(1, 1328), (5, 18), (129, 463), (1, 701), (3, 10)]
RAGGED_SMALL = [
    (1, 1328),
    (5, 18),
    (33, 463),
    (1, 701),
    (3, 10),
]  # same, cheaper for the interpreter


@dataclass
class Case:
    q: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    qblocks: QueryBlocks
    sel_blocks: torch.Tensor
    sel_count: torch.Tensor
    kwargs: dict = field(default_factory=dict)

    def args(self):
        return (
            self.q,
            self.key_cache,
            self.value_cache,
            self.block_table,
            self.seq_lens,
            self.qblocks,
            self.sel_blocks,
            self.sel_count,
        )


def rope_tables(max_pos: int, head_dim: int, base: float = 10000.0):
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float().to(DEVICE), ang.sin().float().to(DEVICE)


def make_selection(
    qb: QueryBlocks, sink: int, max_sel: int | None, mode: str, gen: torch.Generator
):
    """Random sorted subsets ("random"), every block of [sink, W0) ("all") or nothing ("none")."""
    w0s = qb.window_start.cpu().tolist()
    cands = [list(range(sink, w0, BK)) for w0 in w0s]
    width = max([len(c) for c in cands] + [1]) if max_sel is None else max_sel
    sel = torch.full((len(w0s), width), -1, dtype=torch.int32)
    cnt = torch.zeros(len(w0s), dtype=torch.int32)
    for b, c in enumerate(cands):
        if mode == "all":
            chosen = c
        elif mode == "random":
            n = min(width, len(c))
            n = int(torch.randint(max(n // 2, 0), n + 1, (1,), generator=gen)) if n else 0
            idx = torch.randperm(len(c), generator=gen)[:n].sort().values
            chosen = [c[i] for i in idx.tolist()]
        else:
            chosen = []
            # entries beyond sel_count must be ignored even when they look valid
            sel[b, : min(width, len(c))] = torch.tensor(c[: min(width, len(c))], dtype=torch.int32)
        assert len(chosen) <= width
        if chosen:
            sel[b, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
        cnt[b] = len(chosen)
    return sel.to(DEVICE), cnt.to(DEVICE)


def make_case(
    ragged=RAGGED,
    heads=(8, 2),
    head_dim=64,
    page_size=16,
    dtype=torch.bfloat16,
    kv_dtype=None,
    sink=16,
    window=64,
    block_size_q=64,
    max_sel: int | None = 12,
    selection="random",
    rope=False,
    softcap=0.0,
    seed=0,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    q_lens = [a for a, _ in ragged]
    seq_lens = [b for _, b in ragged]
    pages_per = [math.ceil(s / page_size) for s in seq_lens]
    num_pages = sum(pages_per) + 3
    # vLLM's layout: one tensor [num_pages, 2, page_size, Hkv, D]; K and V are strided views.
    kv = torch.randn((num_pages, 2, page_size, hkv, head_dim), generator=gen)
    perm = torch.randperm(num_pages, generator=gen)
    width = max(pages_per) + 1
    bt = torch.empty((len(ragged), width), dtype=torch.int32)
    owned = torch.zeros((num_pages, page_size), dtype=torch.bool)
    i = 0
    for s, n in enumerate(pages_per):
        bt[s, :n] = perm[i : i + n].to(torch.int32)
        toks = torch.arange(seq_lens[s])
        owned[bt[s, toks // page_size].long(), toks % page_size] = True
        i += n
    bt[:, -1] = perm[-1]  # a never-owned page past every sequence's end
    for s, n in enumerate(pages_per):
        bt[s, n:] = perm[-1]
    kv.masked_fill_(~owned[:, None, :, None, None], POISON)
    kv_dtype = kv_dtype or dtype
    scales = {}
    if kv_dtype == torch.float8_e4m3fn:
        scales = {"k_scale": 0.25, "v_scale": 0.5}
        kv[:, 0] /= scales["k_scale"]
        kv[:, 1] /= scales["v_scale"]
    kv = kv.to(kv_dtype).to(DEVICE)
    qsl = torch.tensor([0] + q_lens).cumsum(0)
    q = torch.randn((int(qsl[-1]), hq, head_dim), generator=gen).to(dtype).to(DEVICE)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    qb = build_query_blocks(
        qsl, sl, block_size_q=block_size_q, sink_tokens=sink, window_tokens=window, device=DEVICE
    )
    sel, cnt = make_selection(qb, sink, max_sel, selection, gen)
    kwargs = dict(
        sink_tokens=sink, block_size_k=BK, sm_scale=head_dim**-0.5, softcap=softcap, **scales
    )
    if rope:
        kwargs["cos"], kwargs["sin"] = rope_tables(max(seq_lens) + 5, head_dim)
    return Case(
        q, kv[:, 0], kv[:, 1], bt.to(DEVICE), sl.to(DEVICE), qsl.to(DEVICE), qb, sel, cnt, kwargs
    )


def check_against_reference(case: Case, out: torch.Tensor, lse: torch.Tensor, floor: float = 1e-3):
    """Kernel vs fp32 reference; 16-bit: within 2x the error of a PyTorch run in that dtype."""
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    ref, ref_lse = sparse_attention_reference(*case.args(), **case.kwargs, return_lse=True)
    err = (out.float() - ref).abs().max().item()
    lse_err = (lse - ref_lse).abs().max().item()
    if case.q.dtype == torch.float32:
        tol, lse_tol = 2e-5, 2e-5
    else:
        low, low_lse = sparse_attention_reference(
            *case.args(), **case.kwargs, return_lse=True, compute_dtype=case.q.dtype
        )
        tol = 2 * (low - ref).abs().max().item() + floor
        lse_tol = 2 * (low_lse - ref_lse).abs().max().item() + floor
    assert err <= tol, f"output error {err:.3g} > {tol:.3g}"
    assert lse_err <= lse_tol, f"lse error {lse_err:.3g} > {lse_tol:.3g}"
    return ref, tol


# ------------------------------------------------------------------ kernel vs reference
@pytest.mark.parametrize(
    "heads,page_size,head_dim,dtype,rope,softcap,ragged,num_splits",
    [
        ((8, 2), 16, 64, torch.bfloat16, False, 0.0, RAGGED, 0),
        ((8, 2), 32, 128, torch.bfloat16, True, 0.0, RAGGED, 3),  # prefill + split-K
        ((5, 1), 16, 128, torch.float16, False, 0.0, RAGGED, 0),
        ((5, 1), 32, 64, torch.float16, True, 0.0, RAGGED_SMALL, 0),
        ((8, 2), 16, 64, torch.bfloat16, True, 1.5, RAGGED_SMALL, 0),
        ((5, 1), 32, 128, torch.bfloat16, False, 1.5, RAGGED_SMALL, 2),
        ((8, 2), 16, 32, torch.float32, True, 0.0, RAGGED_SMALL, 0),
    ],
)
def test_ragged_batch_matches_reference(
    heads, page_size, head_dim, dtype, rope, softcap, ragged, num_splits
):
    case = make_case(
        ragged=ragged,
        heads=heads,
        page_size=page_size,
        head_dim=head_dim,
        dtype=dtype,
        rope=rope,
        softcap=softcap,
    )
    out, lse = sparse_attention(*case.args(), **case.kwargs, return_lse=True, num_splits=num_splits)
    check_against_reference(case, out, lse)


@pytest.mark.parametrize("rope", [False, True])
def test_fp8_kv_cache(rope):
    case = make_case(
        ragged=[(1, 1328), (17, 300), (1, 97)], kv_dtype=torch.float8_e4m3fn, rope=rope
    )
    out, lse = sparse_attention(*case.args(), **case.kwargs, return_lse=True)
    check_against_reference(case, out, lse)
    if not rope:
        # the scales are applied: dropping them changes the result
        wrong = sparse_attention(*case.args(), **{**case.kwargs, "k_scale": 1.0, "v_scale": 1.0})
        assert (wrong.float() - out.float()).abs().max() > 0.1


def test_softcap_changes_result():
    case = make_case(ragged=[(1, 500), (9, 120)], head_dim=64, softcap=0.5)
    capped = sparse_attention(*case.args(), **case.kwargs)
    plain = sparse_attention(*case.args(), **{**case.kwargs, "softcap": None})
    assert (capped.float() - plain.float()).abs().max() > 0.05


# ------------------------------------------------------------------ sparse == dense
@pytest.mark.parametrize("rope", [False, True])
def test_all_selected_equals_dense_causal(rope):
    """Every block of [sink, W0) selected: exact causal attention (streaming positions = true)."""
    ragged = [(1, 300), (70, 250), (5, 18), (3, 10), (1, 133)]  # W0 unaligned in the last row
    case = make_case(
        ragged=ragged,
        heads=(4, 2),
        head_dim=64,
        sink=16,
        window=32,
        max_sel=None,
        selection="all",
        rope=rope,
        seed=3,
    )
    dense_kw = {"cos": case.kwargs.get("cos"), "sin": case.kwargs.get("sin")}
    dense = dense_causal_attention_reference(
        case.q,
        case.key_cache,
        case.value_cache,
        case.block_table,
        case.seq_lens,
        case.query_start_loc,
        case.kwargs["sm_scale"],
        **dense_kw,
    )
    ref = sparse_attention_reference(*case.args(), **case.kwargs)
    assert (ref - dense).abs().max() < 2e-5  # the reference itself
    out, lse = sparse_attention(*case.args(), **case.kwargs, return_lse=True)
    _, tol = check_against_reference(case, out, lse)
    assert (out.float() - dense).abs().max() <= tol + 2e-5


def test_streaming_rope_is_dense_attention_over_the_compacted_sequence():
    """Streaming positions = the kept keys laid out contiguously (sink, selected, window, query).

    Checked independently of the position formula: RoPE scores depend only on q-k distances, so a
    decode query over sink + selected + window must equal dense attention over a new sequence that
    holds just those tokens in that order.
    """
    case = make_case(
        ragged=[(1, 701)],
        heads=(4, 1),
        head_dim=64,
        sink=16,
        window=64,
        max_sel=5,
        rope=True,
        dtype=torch.float32,
        seed=7,
    )
    seq_len, w0 = 701, int(case.qblocks.window_start[0])
    starts = case.sel_blocks[0, : int(case.sel_count[0])].tolist()
    assert w0 % BK and starts  # an unaligned W0: a block may straddle it
    # make the last selected block straddle W0
    case.sel_blocks[0, int(case.sel_count[0]) - 1] = (w0 // BK) * BK
    starts = case.sel_blocks[0, : int(case.sel_count[0])].tolist()
    kept = (
        list(range(16))
        + [t for s in starts for t in range(s, s + BK) if t < w0]
        + list(range(w0, seq_len))
    )
    page_size = case.key_cache.shape[1]
    bt = case.block_table[0].long()
    kept_t = torch.tensor(kept, device=DEVICE)
    k = case.key_cache[bt[kept_t // page_size], kept_t % page_size]
    v = case.value_cache[bt[kept_t // page_size], kept_t % page_size]
    n = len(kept)
    pages = math.ceil(n / page_size)
    kc = torch.zeros((pages * page_size,) + k.shape[1:], device=DEVICE)
    vc = torch.zeros_like(kc)
    kc[:n], vc[:n] = k, v
    kc = kc.view(pages, page_size, *k.shape[1:])
    vc = vc.view(pages, page_size, *k.shape[1:])
    compact = dense_causal_attention_reference(
        case.q,
        kc,
        vc,
        torch.arange(pages, dtype=torch.int32, device=DEVICE)[None],
        torch.tensor([n], dtype=torch.int32, device=DEVICE),
        case.query_start_loc,
        case.kwargs["sm_scale"],
        cos=case.kwargs["cos"],
        sin=case.kwargs["sin"],
    )
    ref = sparse_attention_reference(*case.args(), **case.kwargs)
    assert (ref - compact).abs().max() < 1e-4
    out = sparse_attention(*case.args(), **case.kwargs)
    assert (out - compact).abs().max() < 1e-4


# ------------------------------------------------------------------ keys cached rotated
def rotated_case(case: Case) -> Case:
    """The same case as a vLLM model would cache it: every key rotated at its token position
    and every query at its own (fp32, then rounded to the cache/query dtype)."""
    cos, sin = case.kwargs["cos"], case.kwargs["sin"]
    page_size = case.key_cache.shape[1]
    kc = case.key_cache.clone()
    q = case.q.float().clone()
    qsl = case.query_start_loc.tolist()
    for s, n in enumerate(case.seq_lens.tolist()):
        toks = torch.arange(n, device=DEVICE)
        idx = (case.block_table[s, toks // page_size].long(), toks % page_size)
        kc[idx] = apply_rope_reference(kc[idx].float(), toks, cos, sin).to(kc.dtype)
        rows = slice(qsl[s], qsl[s + 1])
        pos = torch.arange(n - (qsl[s + 1] - qsl[s]), n, device=DEVICE)
        q[rows] = apply_rope_reference(q[rows], pos, cos, sin)
    return replace(case, q=q.to(case.q.dtype), key_cache=kc,
                   kwargs={**case.kwargs, "keys_rotated": True})  # fmt: skip


@pytest.mark.parametrize("dtype,num_splits", [(torch.float32, 0), (torch.bfloat16, 2)])
def test_rotated_keys_give_the_streaming_positions(dtype, num_splits):
    """Keys and queries cached the way vLLM's model rotates them: the kernel turns each key by
    its assigned minus its true position, and attends exactly as over un-rotated inputs."""
    case = make_case(ragged=RAGGED_SMALL, heads=(8, 2), head_dim=64, dtype=dtype, rope=True,
                     max_sel=6, seed=5)  # fmt: skip
    rot = rotated_case(case)
    out, lse = sparse_attention(*rot.args(), **rot.kwargs, return_lse=True, num_splits=num_splits)
    check_against_reference(rot, out, lse)
    # the two conventions agree: the rotated reference equals the un-rotated one
    ref_rot = sparse_attention_reference(*rot.args(), **rot.kwargs)
    ref = sparse_attention_reference(*case.args(), **case.kwargs)
    assert (ref_rot - ref).abs().max() < (2e-5 if dtype == torch.float32 else 0.05)
    if dtype == torch.float32:
        assert (out - ref).abs().max() < 5e-5
    # and the flag matters: reading rotated keys as un-rotated ones is wrong
    wrong = sparse_attention(*rot.args(), **{**rot.kwargs, "keys_rotated": False})
    assert (wrong.float() - ref).abs().max() > 0.05


def test_rotated_keys_with_everything_selected_need_no_rotation():
    """Exact attention (every block selected): assigned = true positions, so with rotated keys
    the result is plain dense attention over the cache as it is, the rope tables unused."""
    ragged = [(1, 300), (70, 250), (5, 18), (1, 133)]
    case = make_case(ragged=ragged, heads=(4, 2), head_dim=64, sink=16, window=32, max_sel=None,
                     selection="all", rope=True, dtype=torch.float32, seed=3)  # fmt: skip
    rot = rotated_case(case)
    out = sparse_attention(*rot.args(), **rot.kwargs)
    dense = dense_causal_attention_reference(
        rot.q, rot.key_cache, rot.value_cache, rot.block_table, rot.seq_lens,
        rot.query_start_loc, rot.kwargs["sm_scale"],
    )  # fmt: skip
    assert (out - dense).abs().max() < 2e-5


# ------------------------------------------------------------------ selections
def test_empty_selection_is_sink_plus_window():
    case = make_case(ragged=[(1, 900), (20, 200), (1, 50)], selection="none", max_sel=6)
    assert int(case.sel_count.sum()) == 0 and int((case.sel_blocks >= 0).sum()) > 0
    out, lse = sparse_attention(*case.args(), **case.kwargs, return_lse=True, num_splits=1)
    check_against_reference(case, out, lse)
    # no selection width at all
    case0 = replace(case, sel_blocks=case.sel_blocks[:, :0])
    out0 = sparse_attention(*case0.args(), **case0.kwargs, num_splits=1)
    torch.testing.assert_close(out0, out, atol=0, rtol=0)
    # the selection matters: the same query blocks with every candidate selected differ
    full_sel, full_cnt = make_selection(case.qblocks, 16, None, "all", torch.Generator())
    full = sparse_attention(
        *replace(case, sel_blocks=full_sel, sel_count=full_cnt).args(), **case.kwargs
    )
    assert (full.float() - out.float()).abs().max() > 0.05


@pytest.mark.parametrize("rope", [False, True])
def test_really_sparse_long_context(rope):
    """Two selected blocks out of ~500 candidates, one of them straddling W0."""
    case = make_case(
        ragged=[(1, 4093), (1, 3000)],
        heads=(8, 2),
        head_dim=64,
        page_size=32,
        sink=16,
        window=64,
        max_sel=2,
        rope=rope,
        seed=5,
    )
    w0 = case.qblocks.window_start.tolist()
    assert w0[0] % BK
    case.sel_blocks[0] = torch.tensor([1000, (w0[0] // BK) * BK], dtype=torch.int32)
    case.sel_blocks[1] = torch.tensor([24, -1], dtype=torch.int32)
    case.sel_count.copy_(torch.tensor([2, 1], dtype=torch.int32))
    out, lse = sparse_attention(*case.args(), **case.kwargs, return_lse=True)
    check_against_reference(case, out, lse)


# ------------------------------------------------------------------ decode split-K
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_split_counts_agree(dtype):
    ragged = [(1, 1328), (1, 700), (1, 90), (1, 12)]
    case = make_case(
        ragged=ragged, heads=(8, 2), head_dim=64, dtype=dtype, rope=True, max_sel=16, seed=11
    )
    assert case.qblocks.is_decode_only
    results = {}
    for ns in (1, 2, 5, 13, 0):
        results[ns] = sparse_attention(*case.args(), **case.kwargs, return_lse=True, num_splits=ns)
    for ns, (out, lse) in results.items():
        check_against_reference(case, out, lse)
        # splits change only the summation order (partials are fp32): <= 1 output ulp apart
        same = 1e-5 if dtype == torch.float32 else 1e-2
        assert (out.float() - results[1][0].float()).abs().max() <= same, ns


def test_choose_num_splits():
    # Llama-3.1-8B decode, batch 1: 8 (block, kv head) programs, 26 key tiles of 128 (sink 2,
    # selected 16, window 8): at least 2 tiles per split (13 splits: 17 us on an H100)
    assert choose_num_splits(8, 26, 132) == 13
    assert choose_num_splits(32, 26, 132) == 9  # batch 4: ~2 waves of programs
    assert choose_num_splits(132, 26, 132) == 1  # the grid already fills the GPU
    assert choose_num_splits(8, 1, 132) == 1  # nothing to split
    assert choose_num_splits(1, 10_000, 132) == MAX_SPLITS


# ------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("num_splits", [1, 3])
def test_rows_without_keys_get_zero_and_minus_inf(num_splits):
    """Hand-made blocks whose key set is empty (W0 past the query, no sink, no selection)."""
    case = make_case(ragged=[(1, 40), (4, 30)], heads=(4, 2), sink=0, selection="none", max_sel=2)
    qb = case.qblocks
    empty = replace(qb, window_start=qb.pos + qb.q_len)  # window [W0, p] is empty for every row
    out = torch.full_like(case.q, 7.0)
    out, lse = sparse_attention(
        *replace(case, qblocks=empty).args(),
        **case.kwargs,
        out=out,
        return_lse=True,
        num_splits=num_splits,
    )
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    _, ref_lse = sparse_attention_reference(
        *replace(case, qblocks=empty).args(), **case.kwargs, return_lse=True
    )
    assert torch.isneginf(ref_lse).all()


def test_block_with_no_queries_writes_nothing():
    case = make_case(ragged=[(1, 40), (4, 30)], heads=(4, 2), sink=8)
    qb = case.qblocks
    q_len = qb.q_len.clone()
    q_len[1] = 0  # the prefill block: its 4 rows must stay untouched
    out = torch.full_like(case.q, 7.0)
    sparse_attention(
        *replace(case, qblocks=replace(qb, q_len=q_len)).args(), **case.kwargs, out=out
    )
    assert torch.equal(out[1:], torch.full_like(out[1:], 7.0))
    assert not torch.equal(out[:1], torch.full_like(out[:1], 7.0))


def test_int64_page_offsets():
    """Pages whose element offset page * page_stride exceeds 2**31 (int32 would wrap).

    The cache is a view over ~4 GiB of untouched memory (bf16); only the pages used are written,
    so the host never backs the rest with physical memory.
    """
    hkv, d, page_size = 1, 64, 16
    page_stride = 2 * page_size * hkv * d  # vLLM's [num_pages, 2, page, Hkv, D]
    num_pages = (1 << 31) // page_stride + 256
    try:
        kv = torch.empty((num_pages, 2, page_size, hkv, d), dtype=torch.bfloat16, device=DEVICE)
    except (RuntimeError, MemoryError) as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"cannot reserve a {num_pages * page_stride * 2 / 2**30:.1f} GiB cache: {e}")
    small = make_case(
        ragged=[(1, 600), (9, 200)],
        heads=(4, 1),
        head_dim=d,
        page_size=page_size,
        sink=16,
        window=64,
        max_sel=8,
        rope=True,
        seed=13,
    )
    used = small.block_table.unique().long()
    high = torch.arange(num_pages - len(used), num_pages, device=DEVICE)
    assert int(high[0]) * page_stride > 2**31
    remap = torch.full((int(used.max()) + 1,), -1, dtype=torch.long, device=DEVICE)
    remap[used] = high
    kv[high, 0] = small.key_cache[used]
    kv[high, 1] = small.value_cache[used]
    big = replace(
        small,
        key_cache=kv[:, 0],
        value_cache=kv[:, 1],
        block_table=remap[small.block_table.long()].to(torch.int32),
    )
    out, lse = sparse_attention(*big.args(), **big.kwargs, return_lse=True)
    check_against_reference(big, out, lse)
    expected = sparse_attention(*small.args(), **small.kwargs)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_input_validation():
    case = make_case(ragged=[(1, 40)], heads=(4, 2))
    with pytest.raises(ValueError, match="multiple of Hkv"):
        sparse_attention(case.q[:, :3], *case.args()[1:], **case.kwargs)
    with pytest.raises(ValueError, match="together"):
        sparse_attention(*case.args(), **{**case.kwargs, "cos": torch.zeros(64, 32, device=DEVICE)})
    with pytest.raises(ValueError, match="NB="):
        sparse_attention(*case.args()[:6], case.sel_blocks[:0], case.sel_count[:0], **case.kwargs)
    with pytest.raises(ValueError, match="int32"):
        sparse_attention(*case.args()[:3], case.block_table.long(), *case.args()[4:], **case.kwargs)
    with pytest.raises(ValueError, match="tile_q_len=0 < the longest query block"):
        sparse_attention(*case.args(), **case.kwargs, tile_q_len=0)


# ------------------------------------------------------------------ GPU-only: real shapes
@gpu
@requires_cuda
def test_llama_decode_shape_matches_reference():
    """Llama-3.1-8B heads, sink 256 + window 1024 + 2048 selected tokens, a 32K context."""
    case = make_case(
        ragged=[(1, 32768), (1, 20000)],
        heads=(32, 8),
        head_dim=128,
        sink=256,
        window=1024,
        max_sel=256,
        rope=True,
        seed=17,
    )
    out, lse = sparse_attention(*case.args(), **case.kwargs, return_lse=True, window_tokens=1024)
    check_against_reference(case, out, lse)


# ------------------------------------------------------------------ GPU-only: batch invariance
def _blocks_of(qb_cpu: QueryBlocks, rows: set[int], single: bool) -> torch.Tensor:
    seq, q_len = qb_cpu.seq.long(), qb_cpu.q_len.long()
    keep = torch.tensor([int(s) in rows for s in seq]) & ((q_len == 1) == single)
    return torch.nonzero(keep).flatten()


def _launch(case: Case, qb_cpu: QueryBlocks, idx: torch.Tensor, out: torch.Tensor, **options):
    from vllm_hip.masks import subset_blocks

    dev_idx = idx.to(DEVICE)
    sparse_attention(
        case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens,
        subset_blocks(case.qblocks, qb_cpu, idx), case.sel_blocks[dev_idx], case.sel_count[dev_idx],
        **case.kwargs, window_tokens=1024, out=out, **options,
    )  # fmt: skip


@gpu
@requires_cuda
def test_fixed_launches_keep_a_block_independent_of_its_batch():
    """What the backend launches under VLLM_BATCH_INVARIANT=1, at Llama-3.1-8B shapes: a decode
    row's output (one-query launch: decode tiles, 8 splits) and a prefill chunk's (tiles for 64
    queries, one split) are bitwise the same alone and beside other rows. The default launches'
    difference is printed (measured, not asserted: it is what the mode exists to remove)."""
    ragged = [(1, 9000), (700, 5000), (1, 3000), (200, 2000)]
    case = make_case(ragged=ragged, heads=(32, 8), head_dim=128, dtype=torch.bfloat16, rope=True,
                     sink=256, window=1024, max_sel=256, seed=3)  # fmt: skip
    qsl = torch.tensor([0] + [a for a, _ in ragged]).cumsum(0)
    qb_cpu = build_query_blocks(qsl, torch.tensor([b for _, b in ragged]), block_size_q=64,
                                sink_tokens=256, window_tokens=1024)  # fmt: skip
    from vllm_hip.launch_options import invariant_launch_options
    from vllm_hip.config import InfiniteHipConfig

    cfg = InfiniteHipConfig(sink_tokens=256, window_tokens=1024, block_size_q=64)
    kinds = {single: invariant_launch_options(cfg, single) for single in (True, False)}
    rows_of = {True: (0, {0, 2}), False: (1, {1, 3})}  # (the row checked, the rows beside it)
    for single, (row, batch_rows) in rows_of.items():
        alone, mixed = torch.zeros_like(case.q), torch.zeros_like(case.q)
        _launch(case, qb_cpu, _blocks_of(qb_cpu, {row}, single), alone, **kinds[single])
        _launch(case, qb_cpu, _blocks_of(qb_cpu, batch_rows, single), mixed, **kinds[single])
        lo, hi = int(qsl[row]), int(qsl[row + 1])
        assert torch.equal(alone[lo:hi], mixed[lo:hi]), (single, (alone[lo:hi] - mixed[lo:hi]).abs().max())
        # the default: one launch for the whole batch, tiles and splits chosen from it
        default_alone, default_mixed = torch.zeros_like(case.q), torch.zeros_like(case.q)
        _launch(case, qb_cpu, _blocks_of(qb_cpu, {row}, single), default_alone)
        all_blocks = torch.arange(qb_cpu.num_blocks)
        _launch(case, qb_cpu, all_blocks, default_mixed)
        diff = (default_alone[lo:hi].float() - default_mixed[lo:hi].float()).abs().max().item()
        print(f"default launches, {'decode' if single else 'prefill'} row alone vs in the batch: "
              f"max |diff| {diff:.3g}")
