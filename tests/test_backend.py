"""The INFINITEHIP impl on a paged cache with ragged batches, against PyTorch references.

Runs the impl's real forward (cache write, selection, sparse attention) on CPU tensors with the
Triton interpreter (compiled on a GPU): exact attention while contexts fit sink + window + k, the
pruning path against the pure-PyTorch pruning + attention references, and the decode mask cache
across steps whose batch rows move.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllm_hip_kernels.prune_reference import select_blocks_reference  # noqa: E402
from vllm_hip_kernels.sparse_attention_reference import (  # noqa: E402
    dense_causal_attention_reference,
    sparse_attention_reference,
)
from vllm_hip.backend import (  # noqa: E402
    InfiniteHipImpl,
    all_blocks_selection,
    build_metadata,
    write_kv_cache,
)
from vllm_hip.config import InfiniteHipConfig  # noqa: E402
from vllm_hip import prefill_lens  # noqa: E402
from vllm_hip import stats as hip_stats  # noqa: E402
from vllm_hip.masks import RowTracker  # noqa: E402
from vllm_hip.page_cache import PageCacheStack  # noqa: E402
from vllm_hip.prefill_staging import release_buffers  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
PAGE = 16


class FakeLayer:
    def __init__(self, idx: int):
        self.layer_name = f"model.layers.{idx}.self_attn.attn"
        self._k_scale = torch.tensor(1.0, device=DEV)
        self._v_scale = torch.tensor(1.0, device=DEV)
        self._k_scale_float = 1.0
        self._v_scale_float = 1.0


class PagedBatch:
    """Full K/V of a few sequences, stored page-shuffled in one vLLM-layout cache."""

    def __init__(self, seq_lens, hq, hkv, d, dtype, seed=0, num_pages=None):
        g = torch.Generator().manual_seed(seed)
        self.hq, self.hkv, self.d, self.dtype = hq, hkv, d, dtype
        self.seq_lens = list(seq_lens)
        need = sum(-(-L // PAGE) for L in self.seq_lens) + 4
        num_pages = num_pages or need
        perm = torch.randperm(num_pages, generator=g)
        self.kv_cache = torch.zeros(num_pages, 2, PAGE, hkv, d, dtype=dtype, device=DEV)
        width = max(-(-L // PAGE) for L in self.seq_lens)
        self.block_table = torch.zeros(len(self.seq_lens), width, dtype=torch.int32)
        used = 0
        for i, L in enumerate(self.seq_lens):
            n = -(-L // PAGE)
            self.block_table[i, :n] = perm[used : used + n].to(torch.int32)
            used += n
        self.block_table = self.block_table.to(DEV)
        mk = lambda h, L: torch.randn(L, h, d, generator=g).to(dtype).to(DEV)  # noqa: E731
        self.q = [mk(hq, L) for L in self.seq_lens]
        self.k = [mk(hkv, L) for L in self.seq_lens]
        self.v = [mk(hkv, L) for L in self.seq_lens]

    def slots(self, i: int, lo: int, hi: int) -> torch.Tensor:
        t = torch.arange(lo, hi, device=DEV)
        return (self.block_table[i, t // PAGE].long() * PAGE + t % PAGE)

    def prefill_context(self, i: int, upto: int, layer) -> None:
        kc, vc = self.kv_cache.unbind(1)
        write_kv_cache(self.k[i][:upto], self.v[i][:upto], kc, vc, self.slots(i, 0, upto), "auto", layer)

    def step(self, cfg, spans, tracker=None, step_id=1, decode_rows=(), around=contextlib.nullcontext):
        """Metadata + packed q/k/v for new tokens ``spans[i] = (lo, hi)`` of sequence ``order[i]``
        (``around``: a context manager for the builder's call alone)."""
        order = [s[0] for s in spans]
        q = torch.cat([self.q[i][lo:hi] for i, lo, hi in spans])
        k = torch.cat([self.k[i][lo:hi] for i, lo, hi in spans])
        v = torch.cat([self.v[i][lo:hi] for i, lo, hi in spans])
        q_lens = torch.tensor([hi - lo for _, lo, hi in spans])
        qsl = torch.zeros(len(spans) + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(q_lens, 0)
        seq_lens = torch.tensor([hi for _, _, hi in spans], dtype=torch.int32)
        slot = torch.cat([self.slots(i, lo, hi) for i, lo, hi in spans])
        prefilling = torch.tensor([r not in decode_rows for r in range(len(spans))])
        args = dict(query_start_loc=qsl.to(DEV), seq_lens=seq_lens.to(DEV), block_table=self.block_table[order])
        with around():
            md = build_metadata(
                cfg,
                query_start_loc_cpu=qsl,
                seq_lens_cpu=seq_lens.long(),
                slot_mapping=slot,
                positions=None,
                is_prefilling_cpu=prefilling,
                max_query_len=int(q_lens.max()),
                max_seq_len=int(seq_lens.max()),
                page_size=PAGE,
                tracker=tracker,
                step_id=step_id,
                **args,
            )
        return md, q, k, v


def fresh_offload_state() -> None:
    """Forget the process-wide offload state other tests left: the page-cache counters (every
    layer adds to them), the stats, the staging buffers and the shared page-cache stacks."""
    from vllm_hip.page_cache import shared_counters

    shared_counters(DEV).zero_()
    hip_stats.reset_stats()
    release_buffers()
    PageCacheStack.release_shared()


def make_impl(cfg: InfiniteHipConfig, hq, hkv, d) -> InfiniteHipImpl:
    impl = InfiniteHipImpl(hq, d, d**-0.5, hkv, kv_cache_dtype="auto")
    impl.hip_config = cfg
    impl.rope_handed_over = False  # these tests feed q/k as the model's own RoPE left them
    return impl


def run_impl(impl, layer, batch, md, q, k, v):
    out = torch.full((q.shape[0], impl.num_heads * impl.head_size), float("nan"), dtype=q.dtype, device=DEV)
    impl.forward(layer, q.flatten(1), k.flatten(1), v.flatten(1), batch.kv_cache, md, out)
    return out.view(q.shape[0], impl.num_heads, impl.head_size)


def tolerance(dtype):
    return 2e-3 if dtype == torch.float32 else 3e-2


@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (5, 1, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_path_equals_dense_causal_attention(hq, hkv, d, dtype):
    # Ragged: a decode row, a short extend, a long chunked-prefill chunk, a fresh prompt.
    cfg = InfiniteHipConfig(rope_mode="model")
    batch = PagedBatch([1328, 18, 463, 70], hq, hkv, d, dtype)
    layer = FakeLayer(4)
    spans = [(0, 1327, 1328), (1, 13, 18), (2, 334, 463), (3, 0, 70)]
    for i, lo, _ in spans:
        if lo:
            batch.prefill_context(i, lo, layer)
    impl = make_impl(cfg, hq, hkv, d)
    md, q, k, v = batch.step(cfg, spans, decode_rows=(0,))
    out = run_impl(impl, layer, batch, md, q, k, v)
    kc, vc = batch.kv_cache.unbind(1)
    ref = dense_causal_attention_reference(
        q.float(), kc, vc, md.block_table, md.seq_lens, md.query_start_loc, sm_scale=d**-0.5
    )
    assert not torch.isnan(out).any()
    err = (out.float() - ref).abs().max().item()
    assert err < tolerance(dtype), err


def test_all_blocks_selection_covers_sink_to_window():
    cfg = InfiniteHipConfig(rope_mode="model", sink_tokens=16, window_tokens=64, block_size_q=16)
    batch = PagedBatch([300, 40], 2, 1, 64, torch.float32)
    md, *_ = batch.step(cfg, [(0, 299, 300), (1, 0, 40)], decode_rows=(0,))
    sel, cnt = all_blocks_selection(md.qblocks, md.qblocks_cpu, 16, 8)
    w0 = md.qblocks_cpu.window_start
    for b in range(md.qblocks_cpu.num_blocks):
        n = int(cnt[b])
        assert n == -(-(int(w0[b]) - 16) // 8)
        assert sel[b, :n].tolist() == list(range(16, 16 + 8 * n, 8))
        assert (sel[b, n:] == -1).all()


def small_sparse_config(refresh=(1, 1)) -> InfiniteHipConfig:
    return InfiniteHipConfig.from_dict(
        {
            "rope_mode": "model",
            "sink_tokens": 16,
            "window_tokens": 64,
            "selected_tokens": 64,
            "early_layers": 0,
            "block_size_q": 16,
            "stages": [
                {"chunk_size": 32, "keep_tokens": 256, "query_pool": 2, "refresh_interval": refresh[0]},
                {"chunk_size": 8, "keep_tokens": 64, "query_pool": 1, "refresh_interval": refresh[1]},
            ],
        }
    )


def reference_forward(cfg, batch, md, q, d, layer_idx=0):
    kc, vc = batch.kv_cache.unbind(1)
    stages = [SimpleNamespace(chunk_size=s.chunk_size, keep_tokens=cfg.stage_keep_tokens(i, layer_idx),
                              query_pool=s.query_pool) for i, s in enumerate(cfg.stages)]
    sel, cnt, _ = select_blocks_reference(q.float(), kc.float(), md.block_table, md.seq_lens, md.qblocks,
                                          stages, sink_tokens=cfg.sink_tokens,
                                          score_norm=cfg.score_norm)
    out = sparse_attention_reference(q.float(), kc, vc, md.block_table, md.seq_lens, md.qblocks, sel, cnt,
                                     sink_tokens=cfg.sink_tokens, block_size_k=cfg.block_size_k,
                                     sm_scale=d**-0.5)
    return out, sel, cnt


def test_pruned_path_matches_pytorch_references():
    cfg = small_sparse_config()
    hq, hkv, d = 4, 2, 64
    batch = PagedBatch([700, 410, 90], hq, hkv, d, torch.float32, seed=3)
    layer = FakeLayer(7)
    spans = [(0, 699, 700), (1, 380, 410), (2, 0, 90)]
    for i, lo, _ in spans:
        if lo:
            batch.prefill_context(i, lo, layer)
    impl = make_impl(cfg, hq, hkv, d)
    md, q, k, v = batch.step(cfg, spans, decode_rows=(0,))
    out = run_impl(impl, layer, batch, md, q, k, v)
    ref, _, cnt = reference_forward(cfg, batch, md, q, d)
    assert int(cnt.max()) > 0 and md.qblocks_cpu.max_window_start - 16 > 64  # really sparse
    assert (out.float() - ref).abs().max().item() < 2e-3


def test_decode_mask_cache_follows_rows_and_refresh_schedule():
    """Stage 1 every 4 steps, stage 2 every 2: reused steps keep the row's last selection even
    when the batch order changes; refresh steps equal a fresh recomputation."""
    cfg = small_sparse_config(refresh=(4, 2))
    hq, hkv, d = 4, 2, 64
    lens0 = [600, 520]
    steps = 5
    batch = PagedBatch([L + steps for L in lens0], hq, hkv, d, torch.float32, seed=5, num_pages=200)
    layer = FakeLayer(9)
    impl = make_impl(cfg, hq, hkv, d)
    tracker = RowTracker(num_pages=200, max_rows=4, device=torch.device(DEV))
    # Prefill both prompts (last chunk), which seeds the mask cache.
    for i, L in enumerate(lens0):
        batch.prefill_context(i, L - 20, layer)
    md, q, k, v = batch.step(cfg, [(0, lens0[0] - 20, lens0[0]), (1, lens0[1] - 20, lens0[1])],
                             tracker=tracker, step_id=1)
    run_impl(impl, layer, batch, md, q, k, v)
    last_sel = {}
    prev_order = [0, 1]
    for t in range(steps):
        order = [0, 1] if t % 2 == 0 else [1, 0]  # rows swap every step
        spans = [(i, lens0[i] + t, lens0[i] + t + 1) for i in order]
        md, q, k, v = batch.step(cfg, spans, tracker=tracker, step_id=2 + t, decode_rows=(0, 1))
        assert md.src_row.tolist() == [prev_order.index(i) for i in order]
        prev_order = order
        out = run_impl(impl, layer, batch, md, q, k, v)
        cache = impl._mask_cache
        phase = cfg.refresh_phase(9)  # the layer's shift of the schedule (stagger_refresh)
        for row, i in enumerate(order):
            pos = lens0[i] + t + phase
            sel = cache.sel[row, : int(cache.sel_count[row])].tolist()
            if pos % 2 != 0 and i in last_sel:  # no stage due: the previous selection, moved
                assert sel == last_sel[i], (t, i)
            last_sel[i] = sel
        assert not torch.isnan(out).any()
    # At a full-refresh position the selection equals a from-scratch reference run.
    assert any((lens0[i] + t + phase) % 4 == 0 for i in range(2) for t in range(steps))


@pytest.mark.parametrize("stagger", [True, False])
def test_staggered_refresh_spreads_the_first_stage_over_steps(stagger):
    """stagger_refresh: with the first stage due every 2 steps, layers 0 and 1 rerun it on
    alternate steps (one layer a step) instead of both on the same steps; each layer still
    reruns it every 2 steps."""
    cfg = replace(small_sparse_config(refresh=(2, 1)), stagger_refresh=stagger)
    hq, hkv, d = 4, 2, 64
    L = 600
    batch = PagedBatch([L + 6], hq, hkv, d, torch.float32, seed=2, num_pages=60)
    layers = [FakeLayer(0), FakeLayer(1)]
    impls = [make_impl(cfg, hq, hkv, d) for _ in layers]
    tracker = RowTracker(num_pages=60, max_rows=4, device=torch.device(DEV))
    for layer in layers:
        batch.prefill_context(0, L - 20, layer)
    md, q, k, v = batch.step(cfg, [(0, L - 20, L)], tracker=tracker, step_id=1)
    for impl, layer in zip(impls, layers):
        run_impl(impl, layer, batch, md, q, k, v)
    per_step = []
    for t in range(6):
        before = list(hip_stats.get_stats().stage_refreshes) or [0]
        md, q, k, v = batch.step(cfg, [(0, L + t, L + t + 1)], tracker=tracker, step_id=2 + t, decode_rows=(0,))
        for impl, layer in zip(impls, layers):
            assert not torch.isnan(run_impl(impl, layer, batch, md, q, k, v)).any()
        per_step.append(hip_stats.get_stats().stage_refreshes[0] - before[0])
    assert sum(per_step) == 6  # each of the 2 layers every other step, either way
    assert per_step == ([1] * 6 if stagger else [2, 0] * 3 if L % 2 == 0 else [0, 2] * 3), per_step


def test_mask_cache_grows_when_a_batch_has_more_rows_than_the_first():
    """The first batch of an engine often holds one request; a later batch with more rows must
    not overflow the mask cache (it did on the H100/H200 passkey run: the cache was sized by the
    first batch), and the rows already cached keep their state."""
    cfg = small_sparse_config(refresh=(4, 4))
    hq, hkv, d = 4, 2, 64
    lens0 = [601, 520, 560]
    batch = PagedBatch([L + 2 for L in lens0], hq, hkv, d, torch.float32, seed=7, num_pages=240)
    layer = FakeLayer(4)
    impl = make_impl(cfg, hq, hkv, d)  # no vLLM config here: sized for one row at first
    tracker = RowTracker(num_pages=240, max_rows=1, device=torch.device(DEV))
    for i, L in enumerate(lens0):
        batch.prefill_context(i, L - 20, layer)
    # Step 1: only request 0 (its last prefill chunk).
    md, q, k, v = batch.step(cfg, [(0, lens0[0] - 20, lens0[0])], tracker=tracker, step_id=1)
    run_impl(impl, layer, batch, md, q, k, v)
    first_rows = impl._mask_cache.num_rows
    sel0 = impl._mask_cache.sel[0, : int(impl._mask_cache.sel_count[0])].tolist()
    # Step 2: request 0 decodes (no stage due at its position), requests 1 and 2 prefill.
    assert lens0[0] % 4 != 0
    spans = [(1, lens0[1] - 20, lens0[1]), (0, lens0[0], lens0[0] + 1), (2, lens0[2] - 20, lens0[2])]
    md, q, k, v = batch.step(cfg, spans, tracker=tracker, step_id=2, decode_rows=(1,))
    out = run_impl(impl, layer, batch, md, q, k, v)
    cache = impl._mask_cache
    assert first_rows < 4 <= cache.num_rows
    assert md.src_row.tolist()[1] == 0
    assert cache.sel[1, : int(cache.sel_count[1])].tolist() == sel0  # reused, moved to row 1
    assert not torch.isnan(out).any()


def test_mask_cache_follows_requests_through_a_changing_batch():
    """An engine-like schedule: requests join with their last prefill chunk at different steps,
    leave and come back (preemption: a new prefill), and the batch order is shuffled every step,
    with more rows than the first batch had. On every decode step where no stage is due, each
    request gets back its own last selection, never another request's."""
    import random

    cfg = small_sparse_config(refresh=(4, 2))
    hq, hkv, d = 4, 2, 64
    rng = random.Random(3)
    lens0 = [601, 523, 555, 577]
    steps = 8
    batch = PagedBatch([L + steps for L in lens0], hq, hkv, d, torch.float32, seed=9, num_pages=260)
    layer = FakeLayer(5)
    impl = make_impl(cfg, hq, hkv, d)
    tracker = RowTracker(num_pages=260, max_rows=len(lens0), device=torch.device(DEV))
    for i, L in enumerate(lens0):
        batch.prefill_context(i, L - 20, layer)
    join = {0: 0, 1: 1, 2: 1, 3: 3}  # step at which each request prefills its last chunk
    away = {2: 4}  # request 2 is preempted at step 4 and re-prefills at step 5
    done = {i: 0 for i in range(len(lens0))}  # decode tokens generated so far
    last_sel: dict[int, list[int]] = {}
    reused = 0
    for t in range(steps):
        spans, decode_rows, prefill = [], [], set()
        live = [i for i in range(len(lens0)) if join[i] <= t and away.get(i) != t]
        rng.shuffle(live)
        for row, i in enumerate(live):
            L = lens0[i] + done[i]
            if join[i] == t or away.get(i) == t - 1:  # (re-)prefill: the last 20 tokens
                spans.append((i, L - 20, L))
                prefill.add(i)
            else:
                spans.append((i, L, L + 1))
                decode_rows.append(row)
        md, q, k, v = batch.step(cfg, spans, tracker=tracker, step_id=t + 1, decode_rows=tuple(decode_rows))
        out = run_impl(impl, layer, batch, md, q, k, v)
        assert not torch.isnan(out).any()
        cache = impl._mask_cache
        for row, (i, lo, hi) in enumerate(spans):
            sel = cache.sel[row, : int(cache.sel_count[row])].tolist()
            if i not in prefill:
                pos = lo + cfg.refresh_phase(5)  # the layer's shift of the schedule
                if pos % 2 and pos % 4 and i in last_sel:  # no stage due: reused
                    assert sel == last_sel[i], (t, i)
                    reused += 1
                done[i] += 1
            last_sel[i] = sel
    assert reused >= 3 and cache.num_rows > 2


@pytest.mark.parametrize("rope_cache", ["unrotated", "rotated"])
def test_streaming_rope_exact_path_equals_dense_attention_at_true_positions(rope_cache):
    """q/k arrive rotated by the model; the impl stores them un-rotated and the kernels rotate at
    streaming positions, which equal the true ones while everything is attended, or (rotated)
    stores them as they come and attends over them as they are."""
    rope = pytest.importorskip("vllm_hip.rope")
    cfg = InfiniteHipConfig(rope_mode="streaming", rope_cache=rope_cache)
    hq, hkv, d = 4, 2, 64
    batch = PagedBatch([900, 60], hq, hkv, d, torch.float32, seed=7)
    layer = FakeLayer(1)
    impl = make_impl(cfg, hq, hkv, d)
    impl._hf_config = SimpleNamespace(model_type="llama", rope_theta=10000.0, head_dim=d,
                                      hidden_size=d * hq, num_attention_heads=hq,
                                      max_position_embeddings=8192, rope_scaling=None)
    impl._max_positions = 1024
    cos, sin = rope.rope_tables_from_config(impl._hf_config, 1025, device=DEV)
    assert impl.keys_rotated == (rope_cache == "rotated")
    if impl.keys_rotated:  # the context as earlier steps cached it
        batch.k[0] = rope.apply_rope(batch.k[0], torch.arange(900, device=DEV), cos, sin)
        batch.prefill_context(0, 880, layer)
        batch.k[0] = rope.unrotate(batch.k[0], torch.arange(900, device=DEV), cos, sin)
    else:
        batch.prefill_context(0, 880, layer)
    md, q, k, v = batch.step(cfg, [(0, 880, 900), (1, 0, 60)])
    q_rot = rope.apply_rope(q, md.positions, cos, sin)
    k_rot = rope.apply_rope(k, md.positions, cos, sin)
    out = run_impl(impl, layer, batch, md, q_rot, k_rot, v)
    # Reference: dense causal attention over keys rotated at their true positions.
    ref_cache = batch.kv_cache.clone()
    for i, L in ((0, 900), (1, 60)):
        t = torch.arange(L, device=DEV)
        slots = batch.slots(i, 0, L)
        ref_cache[slots // PAGE, 0, slots % PAGE] = rope.apply_rope(batch.k[i], t, cos, sin)
        ref_cache[slots // PAGE, 1, slots % PAGE] = batch.v[i]
    kc, vc = ref_cache.unbind(1)
    ref = dense_causal_attention_reference(q_rot.float(), kc, vc, md.block_table, md.seq_lens,
                                           md.query_start_loc, sm_scale=d**-0.5)
    assert (out.float() - ref).abs().max().item() < 2e-3


def test_streaming_rope_with_handover_takes_unrotated_inputs():
    """With the model's RoPE handed over (identity rotary embedding), q/k arrive un-rotated and
    the result equals the rotate-back path's."""
    rope = pytest.importorskip("vllm_hip.rope")
    cfg = InfiniteHipConfig(rope_mode="streaming")
    hq, hkv, d = 4, 2, 64
    hf = SimpleNamespace(model_type="llama", rope_theta=10000.0, head_dim=d, rope_scaling=None)
    outs = []
    for handover in (False, True):
        batch = PagedBatch([300], hq, hkv, d, torch.float32, seed=11)
        layer = FakeLayer(2)
        impl = make_impl(cfg, hq, hkv, d)
        impl._hf_config, impl._max_positions, impl.rope_handed_over = hf, 512, handover
        cos, sin = rope.rope_tables_from_config(hf, 513, device=DEV)
        md, q, k, v = batch.step(cfg, [(0, 0, 300)])
        if not handover:
            q, k = rope.apply_rope(q, md.positions, cos, sin), rope.apply_rope(k, md.positions, cos, sin)
        outs.append(run_impl(impl, layer, batch, md, q, k, v))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-4


@pytest.mark.parametrize("q_span", [(680, 700), (699, 700)])
def test_rotated_cache_equals_the_unrotated_path_in_the_sparse_regime(q_span):
    """rope_cache="rotated" (keys cached as the model rotated them, the kernels turning each by
    its assigned minus its true position) selects the same blocks and attends like the
    un-rotated cache beyond exact range (fp32: up to rounding)."""
    rope = pytest.importorskip("vllm_hip.rope")
    base = small_sparse_config(refresh=(1, 1))
    hq, hkv, d, L = 4, 2, 64, 700
    lo, hi = q_span
    hf = SimpleNamespace(model_type="llama", rope_theta=10000.0, head_dim=d, rope_scaling=None)
    cos, sin = rope.rope_tables_from_config(hf, 1025, device=DEV)
    outs, sels = [], []
    for rope_cache in ("unrotated", "rotated"):
        cfg = replace(base, rope_mode="streaming", rope_cache=rope_cache)
        batch = PagedBatch([L], hq, hkv, d, torch.float32, seed=13)
        layer = FakeLayer(5)
        impl = make_impl(cfg, hq, hkv, d)
        impl._hf_config, impl._max_positions = hf, 1024
        impl.rope_handed_over = rope_cache == "unrotated"
        t = torch.arange(L, device=DEV)
        if impl.keys_rotated:  # what the model hands every backend
            batch.q[0] = rope.apply_rope(batch.q[0], t, cos, sin)
            batch.k[0] = rope.apply_rope(batch.k[0], t, cos, sin)
        batch.prefill_context(0, lo, layer)
        md, q, k, v = batch.step(cfg, [(0, lo, hi)], decode_rows=(0,) if hi - lo == 1 else ())
        assert md.qblocks_cpu.max_window_start - cfg.sink_tokens > cfg.selected_tokens  # sparse
        outs.append(run_impl(impl, layer, batch, md, q, k, v))
        sels.append(impl._mask_cache.sel.clone())
    assert torch.equal(sels[0], sels[1])
    assert (outs[0] - outs[1]).abs().max().item() < 1e-4


def test_exact_steps_go_to_flash_attn_when_it_can(monkeypatch):
    """With FLASH_ATTN's metadata on the step (the builder makes it where the kernel exists), a
    layer whose k covers every row calls the kernel on our cache views; a layer beyond exact
    range keeps our kernels. The fake kernel computes dense attention from what it is given."""
    from vllm.v1.attention.backends import flash_attn as fa_backend

    from vllm_hip import flash_delegate

    calls = []

    def fake_varlen(*, q, k, v, out, cu_seqlens_q, seqused_k, block_table, softmax_scale, causal,
                    **kw):
        calls.append(kw)
        assert causal and k.shape[1:] == v.shape[1:] == (PAGE, hkv, d)
        assert k.data_ptr() != v.data_ptr() and k.stride(-1) == 1
        out.copy_(dense_causal_attention_reference(q.float(), k, v, block_table, seqused_k,
                                                   cu_seqlens_q, sm_scale=softmax_scale))

    monkeypatch.setattr(fa_backend, "flash_attn_varlen_func", fake_varlen, raising=False)
    monkeypatch.setattr(flash_delegate, "_flash_impl", lambda impl: SimpleNamespace(
        kv_cache_dtype="auto", num_kv_heads=impl.num_kv_heads, sliding_window=(-1, -1),
        scale=impl.scale, logits_soft_cap=0, vllm_flash_attn_version=3,
        supports_quant_query_input=False))
    cfg = small_sparse_config()  # k = 64: a 120-token context is exact, a 700-token one is not
    hq, hkv, d = 4, 2, 64
    for L, exact in ((120, True), (700, False)):
        calls.clear()
        batch = PagedBatch([L], hq, hkv, d, torch.float32, seed=2)
        layer = FakeLayer(1)
        impl = make_impl(cfg, hq, hkv, d)
        batch.prefill_context(0, L - 1, layer)
        md, q, k, v = batch.step(cfg, [(0, L - 1, L)], decode_rows=(0,))
        md.flash = SimpleNamespace(query_start_loc=md.query_start_loc, max_query_len=1,
                                   seq_lens=md.seq_lens, max_seq_len=L, causal=True,
                                   block_table=md.block_table, scheduler_metadata=None,
                                   max_num_splits=0, sliding_window=(-1, -1))
        out = run_impl(impl, layer, batch, md, q, k, v)
        assert len(calls) == (1 if exact else 0)
        kc, vc = batch.kv_cache.unbind(1)
        dense = dense_causal_attention_reference(q.float(), kc, vc, md.block_table, md.seq_lens,
                                                 md.query_start_loc, sm_scale=d**-0.5)
        assert ((out.float() - dense).abs().max().item() < 1e-4) == exact


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flash_kernel_on_our_cache_equals_it_on_its_own_layout():
    """FLASH_ATTN's kernel reading our [pages, 2, page, Hkv, D] cache through strided views gives
    bit for bit what it gives on FLASH_ATTN's own K|V-packed layout holding the same values."""
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

    from vllm_hip.flash_delegate import _flash_impl, flash_forward

    hq, hkv, d, pages = 8, 2, 64, 40
    g = torch.Generator(device="cuda").manual_seed(0)
    ours = torch.randn(pages, 2, PAGE, hkv, d, device="cuda", generator=g).to(torch.bfloat16)
    packed = torch.cat([ours[:, 0], ours[:, 1]], dim=-1)  # FLASH_ATTN's [pages, page, Hkv, 2D]
    lens, q_lens = [100, 37, 200], [5, 1, 64]
    bt = torch.randperm(pages, device="cuda", generator=g).to(torch.int32)[:39].view(3, 13)
    cu = torch.tensor([0, 5, 6, 70], dtype=torch.int32, device="cuda")
    seqused = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(sum(q_lens), hq, d, device="cuda", generator=g).to(torch.bfloat16)
    layer = FakeLayer(0)
    layer._q_scale = torch.tensor(1.0, device="cuda")
    impl = make_impl(InfiniteHipConfig(), hq, hkv, d)
    fa = _flash_impl(impl)
    md = SimpleNamespace(query_start_loc=cu, max_query_len=64, seq_lens=seqused, max_seq_len=200,
                         causal=True, block_table=bt, scheduler_metadata=None, max_num_splits=0,
                         sliding_window=(-1, -1))
    got = torch.empty_like(q)
    flash_forward(impl, layer, q, ours, got, md)
    want = torch.empty_like(q)
    ones = torch.ones(3, hkv, device="cuda")
    flash_attn_varlen_func(q=q, k=packed[..., :d], v=packed[..., d:], out=want, cu_seqlens_q=cu,
                           max_seqlen_q=64, seqused_k=seqused, max_seqlen_k=200,
                           softmax_scale=impl.scale, causal=True, window_size=[-1, -1],
                           block_table=bt, softcap=0, fa_version=fa.vllm_flash_attn_version,
                           q_descale=ones if fa.supports_quant_query_input else None,
                           k_descale=ones, v_descale=ones, num_splits=0)
    assert torch.equal(got, want)


def test_flash_delegate_only_where_keys_are_cached_its_way():
    from vllm_hip.flash_delegate import delegate_unavailable_reason

    why = lambda cfg, dev="cuda", inv=False, dt="auto": delegate_unavailable_reason(cfg, dev, inv, dt)  # noqa: E731
    assert "un-rotated" in why(InfiniteHipConfig(rope_cache="unrotated"))
    assert "host memory" in why(InfiniteHipConfig(offload=True))
    assert "BATCH_INVARIANT" in why(InfiniteHipConfig(), inv=True)
    assert "fp8" in why(InfiniteHipConfig(), dt="fp8_e4m3")
    assert "cpu" in why(InfiniteHipConfig(), dev="cpu")
    assert "cpu" in why(InfiniteHipConfig(rope_mode="model", rope_cache="unrotated"), dev="cpu")


@pytest.mark.parametrize("q_span", [(680, 700), (699, 700)])
def test_backend_equals_tensor_api_in_the_sparse_regime(q_span):
    """The vLLM backend (paged cache, RoPE handed over) and ``vllm_hip.infinitehip_attention``
    (the transformers path) select the same blocks and give the same output beyond exact range,
    in streaming RoPE: what the transformers passkey result shows holds for the backend too."""
    rope = pytest.importorskip("vllm_hip.rope")
    from vllm_hip.api import infinitehip_attention

    cfg = replace(small_sparse_config(refresh=(1, 1)), rope_mode="streaming", rope_cache="unrotated")
    hq, hkv, d = 4, 2, 64
    L = 700
    lo, hi = q_span
    batch = PagedBatch([L], hq, hkv, d, torch.float32, seed=13)
    layer = FakeLayer(5)
    impl = make_impl(cfg, hq, hkv, d)
    hf = SimpleNamespace(model_type="llama", rope_theta=10000.0, head_dim=d, rope_scaling=None)
    impl._hf_config, impl._max_positions, impl.rope_handed_over = hf, 1024, True
    cos, sin = rope.rope_tables_from_config(hf, 1025, device=DEV)
    batch.prefill_context(0, lo, layer)  # un-rotated keys, as with the RoPE handed over
    md, q, k, v = batch.step(cfg, [(0, lo, hi)], decode_rows=(0,) if hi - lo == 1 else ())
    assert md.qblocks_cpu.max_window_start - cfg.sink_tokens > cfg.selected_tokens  # sparse
    out = run_impl(impl, layer, batch, md, q, k, v)
    ref = infinitehip_attention(batch.q[0][None, lo:hi], batch.k[0][None, :hi], batch.v[0][None, :hi],
                                cfg, rope=(cos, sin), layer_idx=5, page_size=PAGE)
    assert (out.float() - ref[0].float()).abs().max().item() < 1e-4


def test_streaming_model_types_are_checked():
    from vllm_hip.backend import check_streaming_rope_support

    ok = SimpleNamespace(model_type="llama", rope_theta=1e4, head_dim=64, rope_scaling=None)
    check_streaming_rope_support(ok, 64)
    with pytest.raises(ValueError, match="rope_mode='streaming' supports model types"):
        check_streaming_rope_support(SimpleNamespace(model_type="chatglm"), 64)
    with pytest.raises(ValueError, match="yarn"):
        check_streaming_rope_support(
            SimpleNamespace(model_type="llama", head_dim=64, rope_theta=1e4,
                            rope_scaling={"rope_type": "yarn", "factor": 4.0}), 64)


@pytest.mark.parametrize("cache_tokens,refresh", [(4096, (2, 1)), (160, (2, 1)), (4096, (4, 2))])
def test_offload_page_cache_gives_the_same_outputs(cache_tokens, refresh):
    """offload: true reads through the GPU page cache (write-through, LRU admission of the
    decode rows' pages): outputs equal the plain path step by step, also when the cache is
    smaller than one row's key list and keeps evicting, and when steps that reuse every
    selection skip admission."""
    base = small_sparse_config(refresh=refresh)
    cfg = replace(base, offload=True, offload_gpu_cache_tokens=cache_tokens)
    hq, hkv, d = 4, 2, 64
    lens0 = [600, 300]
    steps = 4
    layer = FakeLayer(3)
    outs = {}
    fresh_offload_state()
    for name, c in (("plain", base), ("offload", cfg)):
        batch = PagedBatch([L + steps for L in lens0], hq, hkv, d, torch.float32, seed=11, num_pages=120)
        impl = make_impl(c, hq, hkv, d)
        tracker = RowTracker(num_pages=120, max_rows=4, device=torch.device(DEV))
        for i, L in enumerate(lens0):
            batch.prefill_context(i, L - 20, layer)
        md, q, k, v = batch.step(c, [(0, lens0[0] - 20, lens0[0]), (1, lens0[1] - 20, lens0[1])],
                                 tracker=tracker, step_id=1)
        got = [run_impl(impl, layer, batch, md, q, k, v)]
        admitted = []  # per decode step: (every selection reused, admission ran)
        for t in range(steps):
            spans = [(i, lens0[i] + t, lens0[i] + t + 1) for i in (0, 1)]
            md, q, k, v = batch.step(c, spans, tracker=tracker, step_id=2 + t, decode_rows=(0, 1))
            tick = impl._page_cache._tick if impl._page_cache is not None else 0
            got.append(run_impl(impl, layer, batch, md, q, k, v))
            if impl._page_cache is not None:
                # one layer: its stack admits at the end of the layer's step
                admitted.append((impl._reused_all, impl._page_cache._tick > tick))
        outs[name] = got
        if name == "offload":
            assert all(ran != reused for reused, ran in admitted), admitted
            assert any(r for r, _ in admitted) == (refresh[-1] > 1), admitted
        if name == "offload":
            pc = impl._page_cache
            rows, hits, h2d, occupied, mask_rows, mask_hits, _ = pc.counters.tolist()
            assert 0 < hits < rows and h2d > 0
            assert mask_rows > 0 and 0 <= mask_hits <= mask_rows  # pruning reads through it too
            assert occupied <= pc.capacity == cache_tokens // PAGE
            # The KV held on the GPU: the page cache and the prefill step's staging buffer.
            staging = batch.kv_cache.numel() * batch.kv_cache.element_size()
            assert hip_stats.get_stats().gpu_cache_bytes == pc.nbytes + staging
            # Cached pages equal host memory (write-through kept them current).
            for page, slot in pc.resident_pages().items():
                assert torch.equal(pc.kv[slot], batch.kv_cache[page])
    for a, b in zip(outs["plain"], outs["offload"]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_offload_prefill_reads_its_windows_from_the_gpu_cache():
    """A prefill step first brings the sink and window pages of its query blocks into the GPU
    page cache (one copy instead of a read across PCIe per query block): with a fresh cache,
    the step's attention already hits, and those pages are resident and current afterwards."""
    from vllm_hip.page_cache import shared_counters

    cfg = replace(small_sparse_config(), offload=True, offload_gpu_cache_tokens=4096,
                  offload_prefill_staging=False)
    hq, hkv, d = 4, 2, 64
    lens = [600, 300]
    layer = FakeLayer(3)
    batch = PagedBatch(lens, hq, hkv, d, torch.float32, seed=5, num_pages=120)
    impl = make_impl(cfg, hq, hkv, d)
    shared_counters(DEV).zero_()
    for i, L in enumerate(lens):
        batch.prefill_context(i, L - 100, layer)
    md, q, k, v = batch.step(cfg, [(0, lens[0] - 100, lens[0]), (1, lens[1] - 100, lens[1])], step_id=1)
    out = run_impl(impl, layer, batch, md, q, k, v)
    pc = impl._page_cache
    rows, hits = pc.counters.tolist()[:2]
    assert 0 < hits <= rows
    resident = pc.resident_pages()
    qb = md.qblocks_cpu
    for i, L in enumerate(lens):
        w0 = int(qb.window_start[qb.seq == i].min())
        want = set(range(-(-cfg.sink_tokens // PAGE))) | set(range(w0 // PAGE, -(-L // PAGE)))
        pages = {int(batch.block_table[i, p]) for p in want}
        assert pages <= resident.keys(), sorted(pages - resident.keys())
        for page in pages:
            assert torch.equal(pc.kv[resident[page]], batch.kv_cache[page])  # new tokens included
    ref, _, cnt = reference_forward(cfg, batch, md, q, d, layer_idx=3)
    assert int(cnt.max()) > 0  # the sparse path ran
    assert (out.float() - ref).abs().max().item() < 2e-3


def test_offload_prefill_staging_reads_a_gpu_copy_of_the_steps_pages():
    """offload_prefill_staging (default): a prefill step copies every page its rows read into
    the shared GPU buffer and attends there: the outputs equal the plain path's, nothing is read
    through the page cache, the buffer holds those pages as host memory has them (new tokens
    included), and the copy is counted in h2d bytes."""
    from vllm_hip.page_cache import shared_counters
    from vllm_hip.prefill_staging import PrefillStaging, stage_layout

    base = small_sparse_config()
    cfg = replace(base, offload=True, offload_gpu_cache_tokens=4096)
    hq, hkv, d = 4, 2, 64
    lens = [600, 300]
    layer = FakeLayer(3)
    outs = []
    for c in (base, cfg):
        batch = PagedBatch(lens, hq, hkv, d, torch.float32, seed=5, num_pages=120)
        impl = make_impl(c, hq, hkv, d)
        shared_counters(DEV).zero_()
        hip_stats.reset_stats()
        release_buffers()
        for i, L in enumerate(lens):
            batch.prefill_context(i, L - 100, layer)
        md, q, k, v = batch.step(c, [(0, lens[0] - 100, lens[0]), (1, lens[1] - 100, lens[1])],
                                 step_id=1)
        outs.append(run_impl(impl, layer, batch, md, q, k, v))
    pc = impl._page_cache
    assert pc.counters.tolist()[:2] == [0, 0]  # no key row read through the page cache
    staging, made = PrefillStaging.for_cache(batch.kv_cache)
    assert not made  # the step made it
    pages = stage_layout(md.block_table, torch.tensor(lens), PAGE)[0].tolist()
    assert len(pages) == sum(-(-L // PAGE) for L in lens)
    assert pages[: -(-lens[0] // PAGE)] == batch.block_table[0, : -(-lens[0] // PAGE)].tolist()
    for i, page in enumerate(pages):  # the rows' pages one after another
        assert torch.equal(staging.buffer[i], batch.kv_cache[page])
    st = hip_stats.get_stats()
    assert st.h2d_copy_bytes == len(pages) * staging.page_bytes
    assert st.gpu_cache_bytes == pc.nbytes + staging.nbytes
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_offload_mixed_step_stages_only_prefill_rows(batch_invariant):
    """A step with a prefill chunk and a long decode row: only the prefill row's pages are
    copied to the staging buffer; the decode row's blocks launch apart and read through the page
    cache (its reads are counted there); the outputs equal those without offload."""
    from vllm_hip.page_cache import shared_counters
    from vllm_hip.prefill_staging import PrefillStaging, stage_layout

    base = small_sparse_config()
    cfg = replace(base, offload=True, offload_gpu_cache_tokens=4096)
    hq, hkv, d = 4, 2, 64
    lens = [600, 700]
    spans = [(0, 500, 600), (1, 699, 700)]  # row 0: a prefill chunk; row 1: a decode step
    layer = FakeLayer(3)
    outs = []
    for c in (base, cfg):
        batch = PagedBatch(lens, hq, hkv, d, torch.float32, seed=6, num_pages=120)
        impl = make_impl(c, hq, hkv, d)
        impl.batch_invariant = batch_invariant
        shared_counters(DEV).zero_()
        hip_stats.reset_stats()
        release_buffers()
        batch.prefill_context(0, 500, layer)
        batch.prefill_context(1, 699, layer)
        md, q, k, v = batch.step(c, spans, step_id=1, decode_rows=(1,))
        outs.append(run_impl(impl, layer, batch, md, q, k, v))
    assert [kind.staged for kind in md.launch_classes].count(True) >= 1
    assert [kind.staged for kind in md.launch_classes].count(False) >= 1
    pc = impl._page_cache
    hits, misses = pc.counters.tolist()[:2]
    assert hits + misses > 0  # the decode row read through the page cache
    staging, _ = PrefillStaging.for_cache(batch.kv_cache)
    assert md.staged_pages.tolist() == stage_layout(md.block_table, torch.tensor([600, 0]), PAGE)[0].tolist()
    assert hip_stats.get_stats().h2d_copy_bytes >= md.staged_pages.numel() * staging.page_bytes
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


def test_offload_decode_through_a_chunked_prefill_equals_the_plain_path():
    """Row 0 decodes step after step while row 1's prompt arrives in chunks beside it (mixed
    steps: row 1 staged, row 0 through the page cache and its mask cache), then both decode:
    every step's outputs equal the plain path's."""
    base = small_sparse_config(refresh=(2, 1))
    cfg = replace(base, offload=True, offload_gpu_cache_tokens=4096)
    hq, hkv, d = 4, 2, 64
    layer = FakeLayer(3)
    chunks = [(0, 200), (200, 400), (400, 520)]
    outs = {}
    for name, c in (("plain", base), ("offload", cfg)):
        hip_stats.reset_stats()
        release_buffers()
        PageCacheStack.release_shared()
        batch = PagedBatch([620, 530], hq, hkv, d, torch.float32, seed=13, num_pages=120)
        impl = make_impl(c, hq, hkv, d)
        tracker = RowTracker(num_pages=120, max_rows=4, device=torch.device(DEV))
        batch.prefill_context(0, 580, layer)
        md, q, k, v = batch.step(c, [(0, 580, 600)], tracker=tracker, step_id=1)
        got = [run_impl(impl, layer, batch, md, q, k, v)]
        pos, step = 600, 2
        for lo, hi in chunks:  # mixed: row 0 decodes, row 1 prefills a chunk
            md, q, k, v = batch.step(c, [(0, pos, pos + 1), (1, lo, hi)], tracker=tracker,
                                     step_id=step, decode_rows=(0,))  # fmt: skip
            got.append(run_impl(impl, layer, batch, md, q, k, v))
            if name == "offload":
                assert [kind.staged for kind in md.launch_classes] == [True, False]
            pos, step = pos + 1, step + 1
        for t in range(3):  # both decode
            md, q, k, v = batch.step(c, [(0, pos, pos + 1), (1, 520 + t, 521 + t)], tracker=tracker,
                                     step_id=step, decode_rows=(0, 1))  # fmt: skip
            got.append(run_impl(impl, layer, batch, md, q, k, v))
            pos, step = pos + 1, step + 1
        outs[name] = got
    for a, b in zip(outs["plain"], outs["offload"]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_staging_smaller_than_the_step_leaves_rows_to_the_page_cache():
    """A staging buffer too small for both prefill rows (the longest request plus a step's
    budget, here shrunk) takes the first; the second launches apart and reads through the page
    cache, as decode rows do; outputs equal the plain path's."""
    from vllm_hip.prefill_staging import PrefillStaging

    base = small_sparse_config()
    cfg = replace(base, offload=True, offload_gpu_cache_tokens=4096)
    hq, hkv, d = 4, 2, 64
    lens = [600, 500]
    layer = FakeLayer(3)
    outs = []
    for c in (base, cfg):
        batch = PagedBatch(lens, hq, hkv, d, torch.float32, seed=8, num_pages=120)
        impl = make_impl(c, hq, hkv, d)
        impl._staging_tokens = 640  # 40 pages: row 0 (38 pages) fits, row 1 (32) does not
        hip_stats.reset_stats()
        release_buffers()
        PageCacheStack.release_shared()
        for i, L in enumerate(lens):
            batch.prefill_context(i, L - 100, layer)
        md, q, k, v = batch.step(c, [(0, 500, 600), (1, 400, 500)], step_id=1)
        outs.append(run_impl(impl, layer, batch, md, q, k, v))
    assert md.staged_rows.tolist() == [True, False]
    assert [kind.staged for kind in md.launch_classes] == [True, False]
    staging, made = PrefillStaging.for_cache(batch.kv_cache, 40)
    assert not made and staging.num_pages == 40
    assert md.staged_pages.numel() == 38
    assert impl._page_cache.counters.tolist()[0] > 0  # row 1 read through the page cache
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


def test_staged_block_table_lays_rows_out_one_after_another():
    from vllm_hip.prefill_staging import stage_layout, staged_rows

    table = torch.tensor([[5, 9, 2, 7], [3, 1, 8, 0], [4, 6, 0, 0]], dtype=torch.int32, device=DEV)
    got = stage_layout(table, torch.tensor([17, 0, 9]), 8)[1].tolist()
    assert got == [[0, 1, 2, 0], [0, 0, 0, 0], [3, 4, 0, 0]]
    prefill = torch.tensor([True, False, True])
    assert staged_rows(prefill, torch.tensor([17, 900, 9]), 8, capacity=5).tolist() == [True, False, True]
    assert staged_rows(prefill, torch.tensor([17, 900, 9]), 8, capacity=4).tolist() == [True, False, False]


def test_stage_layout_lists_each_rows_pages_up_to_its_length():
    from vllm_hip.prefill_staging import stage_layout

    table = torch.tensor([[5, 9, 2, 7], [3, 1, 8, 0], [4, 6, 0, 0]], dtype=torch.int32, device=DEV)
    got = stage_layout(table, torch.tensor([17, 16, 0]), 8)[0].tolist()
    assert got == [5, 9, 2, 3, 1]
    assert stage_layout(table, torch.tensor([0, 0, 0]), 8)[0].numel() == 0


PROMPT = 500  # tokens of the chunked-prefill tests' prompt (pruned: more than sink + window + k)


def _prefill(spans, prefill_len: int | None = None):
    """Prefill a prompt of PROMPT tokens in the chunks ``spans`` (with the model runner's prefill
    length published, if given): the output of every query, and each chunk's query blocks."""
    cfg = small_sparse_config()
    hq, hkv, d = 4, 2, 64
    layer = FakeLayer(3)
    batch = PagedBatch([PROMPT], hq, hkv, d, torch.float32, seed=9)
    impl = make_impl(cfg, hq, hkv, d)
    got, blocks = [], []
    for lo, hi in spans:
        with prefill_lens.publishing([prefill_len]) if prefill_len else contextlib.nullcontext():
            md, q, k, v = batch.step(cfg, [(0, lo, hi)])
        blocks.append(md.qblocks_cpu)
        got.append(run_impl(impl, layer, batch, md, q, k, v))
    return torch.cat(got), blocks


@functools.cache
def _one_pass() -> torch.Tensor:
    return _prefill([(0, PROMPT)])[0]


def _one_pass_and_chunked(cut: int, prefill_len: int | None = None):
    """One pass and two chunks cut at ``cut``: both outputs, and the chunks' blocks."""
    two, blocks = _prefill([(0, cut), (cut, PROMPT)], prefill_len)
    return (_one_pass(), two), blocks


def test_chunked_prefill_attends_like_one_pass_after_the_cut_block():
    """vLLM cuts prompts into chunks wherever the batch's token budget ends. Query blocks are
    aligned to absolute positions, so queries past the block that straddles the cut get the same
    selection, hence the same output, as in one pass (before, every later block shifted)."""
    cut = 333  # inside block [320, 336)
    (one, two), _ = _one_pass_and_chunked(cut)
    after = (cut // 16 + 1) * 16
    assert torch.allclose(one[after:], two[after:], atol=1e-5), (one[after:] - two[after:]).abs().max()


@pytest.mark.parametrize("published", [True, False])
def test_aligned_chunks_attend_like_one_pass_when_the_prefill_end_is_known(published):
    """With chunk cuts on query-block boundaries (vllm_hip.scheduler) and the prefill lengths
    published by the model runner (vllm_hip.prefill_lens), only the chunk that ends the prompt
    splits off its last query: every query attends as in one pass. Without the prefill lengths
    the last query of the first chunk is split off too, and its block attends differently."""
    cut = 336  # a multiple of block_size_q=16
    (one, two), chunks = _one_pass_and_chunked(cut, prefill_len=PROMPT if published else None)
    assert [int(b.q_len[-1]) for b in chunks] == ([16, 1] if published else [1, 1])
    err = (one - two).abs().amax(dim=(1, 2))
    if published:
        assert err.max().item() < 1e-5, err.max()
    else:
        assert err[cut - 16 : cut].max().item() > 1e-3  # the block the split changed
        assert err[cut:].max().item() < 1e-5


def test_prefill_lens_reach_the_builder_only_while_the_runner_builds():
    """The runner hook publishes each row's prefill length around the runner's metadata build;
    rows whose chunk reaches it split their last query, the others do not."""
    class Runner:
        def prepare_attn(self, input_batch):
            return prefill_lens.split_rows(torch.tensor([100, 64, 5]), True)

    prefill_lens._wrap(Runner, "prepare_attn", prefill_lens._v2_lens)
    prefill_lens._wrap(Runner, "prepare_attn", prefill_lens._v2_lens)  # idempotent
    batch = SimpleNamespace(prefill_len_np=np.array([100, 128, 5, 7]), num_reqs=3)
    assert Runner().prepare_attn(batch).tolist() == [True, False, True]
    assert prefill_lens.current() is None
    assert prefill_lens.split_rows(torch.tensor([100]), True) is True  # unknown: every chunk end
    assert prefill_lens.split_rows(torch.tensor([100]), False) is False
    # An input batch without the field (another vLLM layout): no lengths, the step still runs.
    assert Runner().prepare_attn(SimpleNamespace(num_reqs=1)) is True


def test_prefill_lens_hooks_the_real_runners():
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    prefill_lens.install()
    prefill_lens.install()
    for owner, name in ((DefaultModelState, "prepare_attn"), (GPUModelRunner, "_build_attention_metadata")):
        fn = getattr(owner, name)
        assert fn._vllm_hip and not getattr(fn.__wrapped__, "_vllm_hip", False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("invariant", [True, False])
def test_batch_invariant_launches_do_not_follow_the_batch(invariant, dtype, monkeypatch):
    """VLLM_BATCH_INVARIANT=1: one-query and longer query blocks are launched apart, each kind
    with fixed tiles and split-K, whatever else is in the batch; a long request's decode step and
    a short one's (exact alone, pruned beside a long one) give the same outputs alone and in a
    mixed batch. Without it the tiles follow the batch's longest block (what makes GPU results
    differ; the interpreter's arithmetic happens not to)."""
    from vllm_hip_kernels import prune as prune_mod
    from vllm_hip_kernels import sparse_attention as sa

    seen = {"attn": [], "prune": []}
    tile_config, launch_config = sa._tile_config, prune_mod._launch_config
    monkeypatch.setattr(sa, "_tile_config", lambda *a: seen["attn"].append(a[2]) or tile_config(*a))
    monkeypatch.setattr(prune_mod, "_launch_config", lambda *a: seen["prune"].append(a[:3]) or launch_config(*a))
    cfg = small_sparse_config()
    hq, hkv, d = 4, 2, 64
    batch = PagedBatch([700, 90, 120], hq, hkv, d, dtype, seed=5)
    layer = FakeLayer(3)
    for i, upto in ((0, 699), (2, 119)):
        batch.prefill_context(i, upto, layer)

    def run(spans, decode_rows):
        impl = make_impl(cfg, hq, hkv, d)
        impl.batch_invariant = invariant
        md, q, k, v = batch.step(cfg, spans, decode_rows=decode_rows)
        out = run_impl(impl, layer, batch, md, q, k, v)
        starts = torch.tensor([0] + [hi - lo for _, lo, hi in spans]).cumsum(0)
        return {i: out[starts[j] : starts[j + 1]] for j, (i, _, _) in enumerate(spans)}

    alone_long = run([(0, 699, 700)], decode_rows=(0,))
    # exact alone: 40 tokens between sink (16) and window (64) fit k = 64
    alone_short = run([(2, 119, 120)], decode_rows=(0,))
    attn_alone, prune_alone = list(seen["attn"]), list(seen["prune"])
    mixed = run([(1, 0, 90), (0, 699, 700), (2, 119, 120)], decode_rows=(1, 2))
    if invariant:
        # one-query blocks (decode, a prompt's split-off last query) and longer ones are launched
        # apart, each kind with tiles of its own that no batch changes
        assert set(attn_alone) == {1} and set(seen["attn"]) == {1, 16}, seen
        assert all(n is None for _, n, _ in seen["prune"])  # chunk tiles not from the batch
        assert set(prune_alone) < set(seen["prune"]), seen
        assert torch.equal(mixed[0], alone_long[0])
        assert torch.equal(mixed[2], alone_short[2])  # pruning kept every block, in order
    else:
        assert set(attn_alone) == {1} and 16 in seen["attn"], seen
        assert set(prune_alone) != set(seen["prune"][len(prune_alone):])


def test_batch_invariant_classes_keep_the_prompt_end_state_for_decode():
    """In batch-invariant mode a prompt's split-off last query is launched with the one-query
    blocks, apart from the rest of its chunk; the pruning state the first decode step reuses must
    still be that last query's (the mask cache keeps each prefill row's last block)."""
    cfg = small_sparse_config(refresh=(4, 2))
    hq, hkv, d = 4, 2, 64
    n = 401  # the first decode position, 401, is due for no stage: it reuses the prompt's state
    assert cfg.refresh_phase(4) == 0  # (layer 4's schedule is not shifted)
    outs = {}
    for invariant in (False, True):
        batch = PagedBatch([n + 2], hq, hkv, d, torch.float32, seed=11)
        layer = FakeLayer(4)
        impl = make_impl(cfg, hq, hkv, d)
        impl.batch_invariant = invariant
        with prefill_lens.publishing([n]):
            md, q, k, v = batch.step(cfg, [(0, 0, n)])
        assert int(md.qblocks_cpu.q_len[-1]) == 1  # the split-off last query
        run_impl(impl, layer, batch, md, q, k, v)
        md, q, k, v = batch.step(cfg, [(0, n, n + 1)], step_id=2, decode_rows=(0,))
        outs[invariant] = run_impl(impl, layer, batch, md, q, k, v)
        assert impl._reused_all  # the decode step took the stored selection
    torch.testing.assert_close(outs[True], outs[False], atol=1e-6, rtol=0)
