"""GPU page cache of KV offloading: copy kernel, device-side LRU, sparse attention reading
through it, and the backend with ``offload: true`` (Triton interpreter on CPU, compiled on GPU)."""

from __future__ import annotations

import os
import random

import pytest
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

from test_sparse_attention import POISON, check_against_reference, make_case  # noqa: E402

from vllm_hip_kernels.page_copy import (  # noqa: E402
    copy_layer_pages,
    copy_layer_pages_reference,
    copy_pages,
    copy_pages_reference,
    layer_offsets,
    mirror_rows,
    mirror_rows_reference,
)
from vllm_hip_kernels.cached_pages import COUNTER_SLOTS, CachedPages  # noqa: E402
from vllm_hip_kernels.sparse_attention import sparse_attention  # noqa: E402
from vllm_hip.page_cache import (  # noqa: E402
    COUNTER_NAMES,
    DecodePages,
    DevicePageCache,
    PageCacheStack,
    StepKeyPages,
    key_list_pages,
    new_counters,
)
from vllm_hip.stats import HipStats  # noqa: E402


# ------------------------------------------------------------------ copy kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_copy_pages_matches_reference_and_skips_padding(dtype):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(12, 2, 4, 3, 8, generator=g).to(dtype).to(DEV)
    src_idx = torch.tensor([3, -1, 0, 11, -1], device=DEV)
    dst_idx = torch.tensor([1, 0, 4, 2, 0], device=DEV)
    got = torch.zeros(6, 2, 4, 3, 8, dtype=dtype, device=DEV)
    want = got.clone()
    copy_pages(src, got, src_idx, dst_idx)
    copy_pages_reference(src, want, src_idx, dst_idx)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(got[1].float(), src[3].float()) and torch.equal(got[2].float(), src[11].float())
    assert (got[0].float() == 0).all() and (got[3].float() == 0).all()  # padding wrote nothing


def test_copy_pages_strided_source_and_bad_input():
    big = torch.randn(10, 2, 2, 4, 8, device=DEV)
    src = big[:, 1]  # pages strided, each contiguous
    dst = torch.zeros(3, 2, 4, 8, device=DEV)
    copy_pages(src, dst, torch.tensor([7, 2], device=DEV), torch.tensor([0, 2], device=DEV))
    assert torch.equal(dst[0], src[7]) and torch.equal(dst[2], src[2])
    with pytest.raises(ValueError, match="pages differ"):
        copy_pages(src, torch.zeros(3, 2, 4, 4, device=DEV), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="one length"):
        copy_pages(src, dst, torch.tensor([0, 1], device=DEV), torch.tensor([0], device=DEV))


# ------------------------------------------------------------------ LRU on the device
class LruModel:
    """Sequential model: one tick per call; evict smallest tick; pages of the current call are
    never evicted; a call's misses are taken in ascending page order while slots can be freed."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.tick_of = {}
        self.tick = 0

    def admit(self, pages):
        self.tick += 1
        ps = sorted({p for p in pages if p >= 0})
        for p in ps:
            if p in self.tick_of:
                self.tick_of[p] = self.tick
        for p in ps:
            if p in self.tick_of:
                continue
            if len(self.tick_of) < self.capacity:
                self.tick_of[p] = self.tick
                continue
            old = [q for q, t in self.tick_of.items() if t < self.tick]
            if not old:
                break
            oldest = min(self.tick_of[q] for q in old)
            # Ties: any page of the oldest tick may go; the test accepts each of them.
            self.candidates = {q for q in old if self.tick_of[q] == oldest}
            victim = min(self.candidates)
            del self.tick_of[victim]
            self.tick_of[p] = self.tick


def test_device_lru_matches_sequential_model_when_ticks_do_not_tie():
    # One page per call: no ties, so the resident set is exactly the model's.
    main = torch.randn(40, 2, 4, 1, 8, device=DEV)
    pc = DevicePageCache(main, capacity=5)
    model = LruModel(5)
    rng = random.Random(0)
    for _ in range(60):
        p = rng.randrange(40) if rng.random() < 0.6 else rng.choice([1, 2, 3, 4, 5, 6])
        pc.admit(torch.tensor([p], device=DEV))
        model.admit([p])
        assert set(pc.resident_pages()) == set(model.tick_of)
    for page, slot in pc.resident_pages().items():
        assert torch.equal(pc.kv[slot], main[page])
    # slot_of_page is the inverse of page_of_slot
    slots = pc.slot_of_page[:40].tolist()
    assert {p: s for p, s in enumerate(slots) if s >= 0} == pc.resident_pages()


def test_device_lru_batches_dedupes_and_never_evicts_the_current_call():
    main = torch.randn(30, 2, 4, 1, 8, device=DEV)
    counters = new_counters(DEV)
    pc = DevicePageCache(main, capacity=4, counters=counters)
    pc.admit(torch.tensor([3, 1, -1, 3, 2], device=DEV))
    assert set(pc.resident_pages()) == {1, 2, 3}
    pc.admit(torch.tensor([9, 3], device=DEV))  # 1 and 2 are the oldest; one empty slot first
    assert set(pc.resident_pages()) == {1, 2, 3, 9}
    pc.admit(torch.tensor([20, 21], device=DEV))  # evicts both of the oldest call's survivors
    assert set(pc.resident_pages()) == {3, 9, 20, 21}
    pc.admit(torch.tensor([5, 6, 7, 8, 9, 10], device=DEV))  # 6 distinct > capacity 4
    res = set(pc.resident_pages())
    assert 9 in res and len(res) == 4 and res <= {5, 6, 7, 8, 9, 10}
    page_bytes = main[0].numel() * 4
    assert counters[2].item() == (3 + 1 + 2 + 3) * page_bytes  # pages brought in
    assert counters[6].item() == counters[2].item()  # all of them by explicit copies
    assert counters[3].item() == 4  # slots that went from empty to full
    for page, slot in pc.resident_pages().items():
        assert torch.equal(pc.kv[slot], main[page])


def test_bad_construction():
    with pytest.raises(ValueError, match="num_pages, 2, page_size"):
        DevicePageCache(torch.zeros(4, 4, 1, 8), 2)
    with pytest.raises(ValueError, match="capacity"):
        DevicePageCache(torch.zeros(4, 2, 4, 1, 8), 0)


# ------------------------------------------------------------------ pages of key lists
def test_key_list_pages_cover_sink_selection_and_window():
    page = 8
    bt = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 0, 0, 0, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([61, 30], dtype=torch.int32)
    block_seq = torch.tensor([0, 1], dtype=torch.int32)
    w0 = torch.tensor([40, 14], dtype=torch.int32)
    sel = torch.tensor([[16, 24, 32], [8, -1, -1]], dtype=torch.int32)
    cnt = torch.tensor([2, 1], dtype=torch.int32)
    got = key_list_pages(
        *(t.to(DEV) for t in (bt, seq_lens, block_seq, w0, sel, cnt)),
        sink_tokens=4, page_size=page, max_window_pages=4,
    ).view(2, -1).cpu()
    # row 0: sink page 0 -> 5; selected 16, 24 -> pages 2, 3 -> 7, 8 (32 is beyond count);
    # window [40, 61) -> pages 5..7 -> 10, 11, 12
    assert sorted(p for p in got[0].tolist() if p >= 0) == [5, 7, 8, 10, 11, 12]
    # row 1: sink -> 20; selected 8 -> page 1 -> 21; window [14, 30) -> pages 1..3 -> 21, 22, 23
    assert sorted(p for p in got[1].tolist() if p >= 0) == [20, 21, 21, 22, 23]


def test_step_key_pages_add_each_layers_selection_as_key_list_pages_does():
    page = 8
    bt = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 0, 0, 0, 0]], dtype=torch.int32, device=DEV)
    seq_lens = torch.tensor([61, 30], dtype=torch.int32, device=DEV)
    block_seq = torch.tensor([0, 1], dtype=torch.int32, device=DEV)
    w0 = torch.tensor([40, 14], dtype=torch.int32, device=DEV)
    sels = [torch.tensor([[16, 24, 32], [8, -1, -1]], dtype=torch.int32, device=DEV),
            torch.tensor([[8, 32, -1], [-1, -1, -1]], dtype=torch.int32, device=DEV)]
    cnts = [torch.tensor([2, 1], dtype=torch.int32, device=DEV), torch.tensor([2, 0], dtype=torch.int32, device=DEV)]
    kw = dict(sink_tokens=4, page_size=page, max_window_pages=4)
    step = StepKeyPages(bt, seq_lens, block_seq, w0, **kw)
    got = step.pages_of(torch.stack(sels), torch.stack(cnts)).cpu()
    for g in range(2):
        want = key_list_pages(bt, seq_lens, block_seq, w0, sels[g], cnts[g], **kw).cpu()
        assert sorted(got[g].tolist()) == sorted(want.tolist())


# ------------------------------------------------------------------ several layers in one stack
def _layers(num_layers, num_pages, dtype=torch.float32, seed=0):
    """Layer caches as the offload worker makes them: views of one allocation."""
    g = torch.Generator().manual_seed(seed)
    whole = torch.randn(num_layers, num_pages, 2, 4, 2, 8, generator=g).to(dtype).to(DEV)
    return whole, [whole[i] for i in range(num_layers)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_copy_layer_pages_copies_each_rows_layer(dtype):
    whole, mains = _layers(3, 10, dtype)
    dst = torch.zeros(3, 5, *mains[0].shape[1:], dtype=dtype, device=DEV)
    want = dst.clone()
    off = torch.tensor(layer_offsets(mains[0], mains), device=DEV)
    layer = torch.tensor([2, 0], device=DEV)
    src_idx = torch.tensor([[4, -1, 9], [1, 7, -1]], device=DEV)
    dst_idx = torch.tensor([[0, 1, 3], [4, 2, 0]], device=DEV)
    copy_layer_pages(mains[0], off, dst, layer, src_idx, dst_idx)
    copy_layer_pages_reference(mains[0], off, want, layer, src_idx, dst_idx)
    u8 = lambda t: t.view(torch.uint8)  # noqa: E731
    assert torch.equal(u8(dst), u8(want))
    assert torch.equal(u8(dst[2, 0]), u8(whole[2, 4])) and torch.equal(u8(dst[2, 3]), u8(whole[2, 9]))
    assert torch.equal(u8(dst[0, 4]), u8(whole[0, 1])) and torch.equal(u8(dst[0, 2]), u8(whole[0, 7]))
    assert (dst[1].float() == 0).all() and (dst[2, 1].float() == 0).all()  # untouched


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_mirror_rows_copies_new_rows_of_cached_pages_only(dtype):
    g = torch.Generator().manual_seed(1)
    main = torch.randn(6, 2, 4, 2, 8, generator=g).to(dtype).to(DEV)
    cache = torch.zeros(3, 2, 4, 2, 8, dtype=dtype, device=DEV)
    slot_of_page = torch.tensor([-1, 2, -1, 0, -1, -1, -1], dtype=torch.int32, device=DEV)
    slot_mapping = torch.tensor([1 * 4 + 3, -1, 2 * 4, 3 * 4 + 1, 3 * 4 + 2], device=DEV)
    want = cache.clone()
    mirror_rows(main, cache, slot_of_page, slot_mapping)
    mirror_rows_reference(main, want, slot_of_page, slot_mapping)
    u8 = lambda t: t.view(torch.uint8)  # noqa: E731
    assert torch.equal(u8(cache), u8(want))
    assert torch.equal(u8(cache[2, :, 3]), u8(main[1, :, 3]))  # key and value rows
    assert torch.equal(u8(cache[0, :, 1:3]), u8(main[3, :, 1:3]))
    written = torch.zeros(3, 4, dtype=torch.bool)
    written[2, 3] = written[0, 1] = written[0, 2] = True
    assert (cache.float().abs().sum((1, 3, 4)).cpu()[~written] == 0).all()  # nothing else


def test_stacked_admission_equals_one_cache_per_layer():
    """Admissions of several layers in one batch leave each layer as its own cache would."""
    _, mains = _layers(3, 40)
    stack = PageCacheStack(mains[0], 6, layers=2)  # grows past the hint
    handles = [stack.layer_cache(m) for m in mains]
    alone = [DevicePageCache(m, capacity=6) for m in mains]
    rng = random.Random(3)
    for _ in range(12):
        rows = [[rng.randrange(40) if rng.random() < 0.7 else -1 for _ in range(5)] for _ in range(3)]
        layers = sorted(rng.sample(range(3), rng.randint(1, 3)))
        stack.admit(layers, torch.tensor([rows[i] for i in layers], device=DEV))
        for i in layers:
            alone[i].admit(torch.tensor(rows[i], device=DEV))
        for h, a in zip(handles, alone):
            assert set(h.resident_pages()) == set(a.resident_pages())
            for page, slot in h.resident_pages().items():
                assert torch.equal(h.kv[slot], h.main[page])


def test_end_layer_admits_once_every_layer_reported():
    _, mains = _layers(2, 30)
    stack = PageCacheStack(mains[0], 8, layers=2)
    h0, h1 = (stack.layer_cache(m) for m in mains)
    bt = torch.arange(30, dtype=torch.int32, device=DEV)[None]
    lens = torch.tensor([30], dtype=torch.int32, device=DEV)
    common = StepKeyPages(bt, lens, torch.zeros(1, dtype=torch.int32, device=DEV),
                          torch.tensor([24], dtype=torch.int32, device=DEV),
                          sink_tokens=4, page_size=4, max_window_pages=3)  # fmt: skip
    sel = torch.tensor([[8, 16]], dtype=torch.int32, device=DEV)
    cnt = torch.tensor([2], dtype=torch.int32, device=DEV)
    step = object()
    stack.end_layer(step, 0, DecodePages(common, sel, cnt))
    assert stack._tick == 0 and not h0.resident_pages()  # deferred
    stack.end_layer(step, 1, None)  # the last layer: layer 0's pages come in now
    assert stack._tick == 1
    assert set(h0.resident_pages()) == {0, 2, 4, 6, 7} and not h1.resident_pages()
    # A step whose layers did not all report is flushed when the next begins.
    stack.end_layer(step, 1, DecodePages(common, sel + 4, cnt))
    stack.end_layer(object(), 0, None)
    assert set(h1.resident_pages()) == {0, 3, 5, 6, 7}


# ------------------------------------------------------------------ sparse attention through it
def _cache_some_pages(case, fraction, seed=0):
    kv = torch.stack([case.key_cache, case.value_cache], 1)  # [pages, 2, page, Hkv, D]
    num_pages = kv.shape[0]
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(num_pages, generator=g)[: int(num_pages * fraction)]
    counters = new_counters(DEV)
    pc = DevicePageCache(kv, capacity=max(1, len(chosen)), counters=counters)
    pc.admit(chosen.to(DEV))
    counters.zero_()
    return kv, pc, chosen


@pytest.mark.parametrize("num_splits", [1, 3])
def test_sparse_attention_reads_cached_pages_from_the_cache(num_splits):
    case = make_case(ragged=[(1, 1328), (17, 300), (1, 97)])
    kv, pc, chosen = _cache_some_pages(case, 0.5)
    want, _ = sparse_attention(*case.args(), **case.kwargs, return_lse=True, num_splits=num_splits)
    # Poison the main copy of every cached page: correct output now needs the cache.
    main = kv.clone()
    main[chosen.to(DEV)] = POISON
    poisoned = replace_kv(case, main)
    out, lse = sparse_attention(
        *poisoned.args(), **case.kwargs, return_lse=True, num_splits=num_splits,
        page_cache=CachedPages(pc.slot_of_page, *pc.kv.unbind(1), pc.counters),
    )
    check_against_reference(case, out, lse)
    assert torch.allclose(out.float(), want.float(), atol=1e-2)
    rows, hits, h2d = pc.counters[:3].tolist()
    assert 0 < hits < rows
    assert h2d == (rows - hits) * 2 * 64 * 2  # K + V head rows of 64 bf16 elements per miss


def test_sparse_attention_counts_every_key_row_of_a_decode_row():
    # One decode row, one kv head tile, one split: rows read = |key list| x Hkv.
    case = make_case(ragged=[(1, 700)], heads=(4, 2), sink=16, window=64, max_sel=12)
    kv, pc, chosen = _cache_some_pages(case, 1.0)
    sparse_attention(*case.args(), **case.kwargs, num_splits=1,
                     page_cache=CachedPages(pc.slot_of_page, *pc.kv.unbind(1), pc.counters))
    w0 = int(case.qblocks.window_start[0])
    key_list = 16 + int(case.sel_count[0]) * 8 + (700 - w0)
    rows, hits, h2d = pc.counters[:3].tolist()
    assert rows == key_list * 2 and hits == rows and h2d == 0


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_mask_estimation_reads_cached_pages_from_the_cache(fraction):
    """Pruning with a page cache: keys of cached pages come from the cache (their main copy is
    poisoned), the rest from the main cache; every key row read is counted, misses in bytes."""
    from dataclasses import replace

    import test_prune as tp

    from vllm_hip_kernels.prune import select_blocks

    case = tp.make_case(seed=7)
    kv = torch.stack([case.key_cache, case.key_cache], 1).contiguous()  # [pages, 2, page, Hkv, D]
    stages = [tp.Stage(64, 256, 2), tp.Stage(8, 64, 1)]
    kw = tp.stage_kwargs(case, "relative", rope_distance=32)
    from vllm_hip_kernels.prune_reference import select_blocks_reference

    want, want_n, _ = select_blocks(*replace(case, key_cache=kv[:, 0]).args(), stages, **kw)
    pages_read = []  # the reference's sampled keys, as pages (its on_read hook)

    def on_read(stage, seq, tok, read):
        pages_read.append(case.block_table[seq, (tok[read] // kv.shape[2]).to(DEV)].long().cpu())

    ref, ref_n, _ = select_blocks_reference(*replace(case, key_cache=kv[:, 0]).args(), stages, **kw,
                                            on_read=on_read)  # fmt: skip
    assert torch.equal(want_n.cpu(), ref_n.cpu()) and int(want_n.sum()) > 0
    chosen = torch.randperm(kv.shape[0], generator=torch.Generator().manual_seed(1))
    chosen = chosen[: int(kv.shape[0] * fraction)].to(DEV)
    counters = new_counters(DEV)
    pc = DevicePageCache(kv, capacity=max(1, int(chosen.numel())), counters=counters)
    pc.admit(chosen)
    counters.zero_()
    main = kv.clone()
    main[chosen] = 300.0  # a poisoned main copy would win every comparison it entered
    got, got_n, _ = select_blocks(
        *replace(case, key_cache=main[:, 0]).args(), stages, **kw,
        page_cache=CachedPages(pc.slot_of_page, *pc.kv.unbind(1), counters),
    )
    assert torch.equal(got_n, want_n) and torch.equal(got, want)
    c = counters.tolist()
    h2d, rows, hits = c[COUNTER_SLOTS["h2d_bytes"]], c[COUNTER_SLOTS["mask_rows"]], c[COUNTER_SLOTS["mask_hits"]]
    assert rows > 0
    assert h2d == (rows - hits) * 64 * 2  # one bf16 key head row per miss
    # the reference's hook sees exactly the reads the kernel counts, and which of them hit
    read = torch.cat(pages_read)
    assert read.numel() == rows
    assert int(torch.isin(read, chosen.long().cpu()).sum()) == hits
    if fraction == 0.0:
        assert hits == 0
    elif fraction == 1.0:
        assert hits == rows
    else:
        assert 0 < hits < rows


def test_page_cache_argument_checks():
    case = make_case(ragged=[(1, 200)])
    kv, pc, _ = _cache_some_pages(case, 0.5)
    bad = CachedPages(pc.slot_of_page, pc.kv[:, 0, :, :1], pc.kv[:, 1], pc.counters)
    with pytest.raises(ValueError, match="in-page strides"):
        sparse_attention(*case.args(), **case.kwargs, page_cache=bad)
    bad = CachedPages(pc.slot_of_page.long(), *pc.kv.unbind(1), pc.counters)
    with pytest.raises(ValueError, match="slot_of_page"):
        sparse_attention(*case.args(), **case.kwargs, page_cache=bad)


def replace_kv(case, kv):
    from dataclasses import replace

    return replace(case, key_cache=kv[:, 0], value_cache=kv[:, 1])


# ------------------------------------------------------------------ stats
def test_device_counters_reach_stats_snapshots():
    st = HipStats()
    c = new_counters(DEV)
    st.attach_device_counters(c, COUNTER_NAMES)
    st.attach_device_counters(c, ("attn_cache_queries",))  # same tensor: ignored
    st.attn_cache_queries += 5
    c += torch.tensor([10, 7, 4096, 3, 20, 2, 1024], device=DEV)
    snap = st.snapshot_and_reset()
    assert (snap["attn_cache_queries"], snap["attn_cache_hits"], snap["h2d_bytes"]) == (15, 7, 4096)
    assert snap["gpu_cache_occupied_blocks"] == 3 and snap["h2d_copy_bytes"] == 1024
    assert (snap["mask_estimation_cache_queries"], snap["mask_estimation_cache_hits"]) == (20, 2)
    c += torch.tensor([1, 1, 0, 0, 0, 0, 0], device=DEV)
    snap = st.snapshot_and_reset()
    assert (snap["attn_cache_queries"], snap["attn_cache_hits"]) == (1, 1)
    st.reset()
    assert c.tolist() == [0] * len(COUNTER_NAMES)
    with pytest.raises(ValueError, match="unknown"):
        st.attach_device_counters(c, ("nope",))


def test_per_step_export_reads_device_counters_through_read_nowait():
    """snapshot_and_reset(wait=False) (the per-step export) takes read_nowait() where the
    attached object has it; snapshots that wait take tolist()."""

    class Lagging:
        def __init__(self):
            self.now, self.copied = [5, 4], [2, 1]

        def tolist(self):
            return list(self.now)

        def read_nowait(self):
            return list(self.copied)

        def zero_(self):
            self.now = self.copied = [0, 0]

    st = HipStats()
    st.attach_device_counters(Lagging(), ("attn_cache_queries", "attn_cache_hits"))
    snap = st.snapshot_and_reset(wait=False)
    assert (snap["attn_cache_queries"], snap["attn_cache_hits"]) == (2, 1)
    snap = st.snapshot_and_reset()
    assert (snap["attn_cache_queries"], snap["attn_cache_hits"]) == (3, 3)


def test_counter_reader_on_the_host_reads_exactly():
    from vllm_hip.counter_reader import CounterReader

    c = torch.zeros(3, dtype=torch.int64)
    r = CounterReader(c)
    c += 4
    assert r.read_nowait() == [4, 4, 4] and r.tolist() == [4, 4, 4]
    r.zero_()
    assert c.tolist() == [0, 0, 0] and r.read_nowait() == [0, 0, 0]
    with pytest.raises(ValueError, match="1-d"):
        CounterReader(torch.zeros(2, 2))


@pytest.mark.gpu
def test_counter_reader_does_not_wait_for_the_gpu():
    """read_nowait returns the last finished copy (zeros before any), never waits, and never
    goes backwards after an exact read."""
    from vllm_hip.counter_reader import CounterReader

    c = torch.zeros(2, dtype=torch.int64, device="cuda")
    r = CounterReader(c)
    c += 3
    assert r.read_nowait() == [0, 0]  # starts the first copy
    torch.cuda.synchronize()
    assert r.read_nowait() == [3, 3]  # that copy finished; a new one starts
    torch.cuda._sleep(50_000_000)  # keep the stream busy: the next copy cannot finish yet
    c += 1
    assert r.read_nowait() in ([3, 3], [4, 4])
    assert r.tolist() == [4, 4]
    assert r.read_nowait() == [4, 4]
    r.zero_()
    assert r.read_nowait() == [0, 0]


@pytest.mark.gpu
def test_shared_counters_are_one_tensor_per_gpu_however_it_is_named():
    # The backend asks with a tensor's device ("cuda:0"), tests and tools often say "cuda".
    from vllm_hip.page_cache import shared_counters

    assert shared_counters("cuda") is shared_counters(torch.device("cuda", torch.cuda.current_device()))


def test_fills_on_the_cpu_are_not_timed():
    pc = DevicePageCache(torch.randn(8, 2, 4, 1, 8), capacity=2)
    pc.admit(torch.tensor([3, 5]))
    assert pc.copy_seconds == 0.0 and not pc.stack._timings and pc.collect_copy_seconds() == 0.0


@pytest.mark.gpu
def test_fills_are_timed_with_events_into_h2d_seconds():
    from vllm_hip import stats

    main = torch.randn(64, 2, 16, 8, 128, device="cuda")
    pc = DevicePageCache(main, capacity=32)
    before = stats.get_stats().h2d_seconds
    pc.admit(torch.arange(32, device="cuda"))
    torch.cuda.synchronize()
    pc.collect_copy_seconds()  # the admit itself may already have collected it
    assert pc.copy_seconds > 0 and not pc.stack._timings
    assert stats.get_stats().h2d_seconds >= before + pc.copy_seconds * (1 - 1e-9)
