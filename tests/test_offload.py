"""Host KV store and GPU block cache (vllm_hip.offload): sizing, LRU policy, pins, stats.

The policy tests run on CPU tensors; a randomized test replays operations against a sequential
``OrderedDict`` model of the LRU. ``gpu`` tests repeat the data path on CUDA with a side stream.
"""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest
import torch

from vllm_hip import _ops, offload
from vllm_hip.offload import GpuBlockCache, HostKVStore, HostMemoryError, combined_stats

needs_ext = pytest.mark.skipif(not _ops.has_ops(), reason="vllm_hip._C is not built")


@pytest.fixture(params=[pytest.param("ext", marks=needs_ext), "torch"])
def impl(request, monkeypatch):
    monkeypatch.setattr(_ops, "_USE_EXT", request.param == "ext")
    return request.param


def make_store(num_layers=2, num_pages=12, page_size=4, heads=2, dim=8, dtype=torch.float32):
    store = HostKVStore(num_layers, num_pages, page_size, heads, dim, dtype)
    # Every element distinct, so a block copied from the wrong page or layer is caught.
    store.kv.copy_(torch.arange(store.kv.numel(), dtype=torch.float64).reshape(store.shape))
    return store


def check_consistent(cache: GpuBlockCache, store: HostKVStore):
    """Page table, host mirror and cache contents agree; returns {page: slot}."""
    table = cache.page_table.cpu().long()
    resident = {p: int(s) for p, s in enumerate(table.tolist()) if s >= 0}
    assert len(set(resident.values())) == len(resident)  # no slot shared
    assert all(0 <= s < cache.capacity for s in resident.values())
    assert torch.equal(cache.resident(torch.arange(store.num_pages)), table)
    blocks = store.blocks(cache.layer, cache.part)
    for page, slot in resident.items():
        assert torch.equal(cache.cache[slot].cpu(), blocks[page]), (page, slot)
    return resident


# --------------------------------------------------------------------------- host store
def test_host_store_layout():
    store = make_store()
    assert store.kv.shape == (2, 12, 2, 4, 2, 8)
    assert store.nbytes == 2 * 12 * 2 * 4 * 2 * 8 * 4
    assert HostKVStore.page_bytes(2, 4, 2, 8, torch.float32) * 12 == store.nbytes
    assert torch.equal(store.layer(1), store.kv[1])
    assert store.blocks(1).shape == (12, 2, 4, 2, 8)
    assert torch.equal(store.blocks(0, "k"), store.kv[0, :, 0])
    assert torch.equal(store.blocks(0, "v"), store.kv[0, :, 1])
    assert store.blocks(0, "k").data_ptr() == store.kv.data_ptr()  # a view, not a copy
    with pytest.raises(IndexError, match="layer 2"):
        store.layer(2)
    with pytest.raises(ValueError, match="part"):
        store.blocks(0, "q")
    if torch.cuda.device_count() == 0:
        assert store.device_view().data_ptr() == store.kv.data_ptr()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_pages=0), "num_pages must be a positive int"),
        (dict(head_dim=-8), "head_dim must be a positive int"),
        (dict(num_layers=2.0), "num_layers must be a positive int"),
        (dict(max_host_fraction=0.0), "max_host_fraction"),
    ],
)
def test_host_store_bad_sizes(kwargs, match):
    args = dict(num_layers=2, num_pages=4, page_size=4, num_kv_heads=1, head_dim=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        HostKVStore(**args)


def test_host_store_refuses_more_than_free(monkeypatch):
    free = 1 << 20
    monkeypatch.setattr(offload, "available_host_bytes", lambda: free)
    per_page = HostKVStore.page_bytes(4, 16, 2, 64, torch.bfloat16)  # 32 KiB
    with pytest.raises(HostMemoryError) as info:
        HostKVStore(4, 64, 16, 2, 64, torch.bfloat16)  # 2 MiB
    msg = str(info.value)
    assert f"{64 * per_page} bytes" in msg and f"only {free} bytes" in msg
    assert f"at most {int(free * 0.9) // per_page} pages" in msg
    store = HostKVStore(4, 28, 16, 2, 64, torch.bfloat16)  # 0.875 MiB < 90% of 1 MiB
    assert store.num_pages == 28


def test_host_store_refuses_real_machine():
    # Far beyond any machine: refused by the size check, nothing is allocated.
    with pytest.raises(HostMemoryError, match="of host memory are free"):
        HostKVStore(64, 1 << 30, 64, 8, 128, torch.bfloat16)


def test_host_store_allocation_failure(monkeypatch):
    def fail(shape, dtype):
        raise torch.OutOfMemoryError("cudaHostAlloc failed")

    monkeypatch.setattr(_ops, "alloc_pinned_mapped", fail)
    with pytest.raises(HostMemoryError, match="pinning .* failed .*cudaHostAlloc failed"):
        HostKVStore(1, 4, 4, 1, 8, torch.float32)


def test_host_store_from_bytes():
    per_page = HostKVStore.page_bytes(2, 4, 2, 8, torch.float16)
    store = HostKVStore.from_bytes(10 * per_page + per_page // 2, 2, 4, 2, 8, torch.float16)
    assert store.num_pages == 10
    with pytest.raises(ValueError, match="hold no page"):
        HostKVStore.from_bytes(per_page - 1, 2, 4, 2, 8, torch.float16)


# --------------------------------------------------------------------------- GPU cache (on CPU)
@pytest.mark.parametrize("part", ["kv", "k", "v"])
def test_admit_fills_from_store(impl, part):
    store = make_store()
    cache = GpuBlockCache(store, layer=1, capacity=4, device="cpu", part=part)
    assert cache.cache.shape == (4, *store.blocks(1, part).shape[1:])
    slots = cache.admit(torch.tensor([7, 2, 11]))
    assert slots.tolist() == [0, 1, 2]  # free slots in order
    resident = check_consistent(cache, store)
    assert resident == {7: 0, 2: 1, 11: 2}
    assert cache.page_table.dtype == torch.int32


def test_lookup_counts_hits_and_misses(impl):
    store = make_store()
    cache = GpuBlockCache(store, 0, capacity=4, device="cpu")
    assert cache.lookup([1, 2]).tolist() == [-1, -1]
    cache.admit([1, 2])
    assert cache.lookup(torch.tensor([2, 5, 1, 2])).tolist() == [1, -1, 0, 1]
    s = cache.stats()
    assert (s["queries"], s["hits"]) == (6, 3)
    assert cache.detailed_stats()["misses"] == 3
    cache.resident([1, 5])  # a peek counts nothing
    assert cache.stats()["queries"] == 6


def test_lru_eviction_order(impl):
    store = make_store()
    cache = GpuBlockCache(store, 0, capacity=3, device="cpu")
    cache.admit([0, 1, 2])
    assert cache.lru_order() == [0, 1, 2]
    cache.lookup([0])
    assert cache.lru_order() == [1, 2, 0]
    cache.lookup([2, 1, 2])  # repeated page: its last occurrence counts
    assert cache.lru_order() == [0, 1, 2]
    slot_of_0 = int(cache.resident([0])[0])
    assert cache.admit([3]).tolist() == [slot_of_0]  # the LRU page's slot
    assert cache.lru_order() == [1, 2, 3]
    cache.admit([4, 5])  # evicts 1 then 2
    assert cache.lru_order() == [3, 4, 5]
    assert cache.resident([0, 1, 2]).tolist() == [-1, -1, -1]
    assert cache.detailed_stats()["evictions"] == 3
    check_consistent(cache, store)


def test_free_slots_before_eviction(impl):
    store = make_store()
    cache = GpuBlockCache(store, 0, capacity=3, device="cpu")
    cache.admit([0, 1, 2])
    cache.invalidate([1])
    assert cache.resident([1]).tolist() == [-1]
    assert cache.admit([9]).tolist() == [1]  # the freed slot, nobody evicted
    assert cache.lru_order() == [0, 2, 9]
    assert cache.detailed_stats()["evictions"] == 0
    check_consistent(cache, store)


def test_pages_named_in_call_are_not_victims(impl):
    store = make_store()
    cache = GpuBlockCache(store, 0, capacity=3, device="cpu")
    cache.admit([0, 1, 2])
    slots = cache.admit([2, 0, 1, 5, 6])
    assert slots.tolist() == [2, 0, 1, -1, -1]
    assert cache.detailed_stats()["admit_overflow"] == 2
    assert cache.lru_order() == [2, 0, 1]


def test_pinned_pages_never_evicted(impl):
    store = make_store()
    cache = GpuBlockCache(store, 0, capacity=4, device="cpu")
    sink = cache.pin([0, 1]).tolist()
    rng = random.Random(0)
    for _ in range(50):
        cache.admit(rng.sample(range(2, 12), 3))
        assert cache.resident([0, 1]).tolist() == sink
    assert set(cache.lru_order()).isdisjoint({0, 1})
    assert cache.detailed_stats()["pinned_blocks"] == 2
    with pytest.raises(ValueError, match="cannot pin 3 more pages: 2 of 4"):
        cache.pin([5, 6, 7])
    assert cache.detailed_stats()["pinned_blocks"] == 2  # nothing changed
    # Only two slots are evictable: the third page overflows.
    assert (cache.admit([8, 9, 10]) >= 0).sum() == 2
    cache.unpin([0])
    cache.admit([3, 4])
    assert cache.resident([0]).tolist() == [-1]  # unpinned and least recent: evicted
    assert cache.resident([1]).tolist() == [sink[1]]
    check_consistent(cache, store)


def test_stats_values(impl):
    store = make_store()
    cache = GpuBlockCache(store, 1, capacity=5, device="cpu", part="k")
    block_bytes = 4 * 2 * 8 * 4  # page_size * heads * dim * fp32
    assert cache.block_bytes == block_bytes
    cache.admit([3, 4, 3])
    cache.lookup([3, 9])
    cache.admit([9, 10, 11, 0])  # 4 more blocks: one eviction
    s = cache.stats()
    assert set(s) == {"queries", "hits", "h2d_bytes", "h2d_seconds", "occupied_blocks",
                      "capacity_blocks"}
    assert s["queries"] == 2 and s["hits"] == 1
    assert s["h2d_bytes"] == 6 * block_bytes
    assert s["h2d_seconds"] > 0
    assert (s["occupied_blocks"], s["capacity_blocks"]) == (5, 5)
    assert cache.detailed_stats()["admitted_blocks"] == 6
    other = GpuBlockCache(store, 0, capacity=2, device="cpu")
    other.admit([1])
    total = combined_stats([cache, other])
    assert total["occupied_blocks"] == 6 and total["capacity_blocks"] == 7
    assert total["h2d_bytes"] == 6 * block_bytes + 2 * block_bytes
    cache.reset_stats()
    assert cache.stats()["h2d_bytes"] == 0 and cache.stats()["occupied_blocks"] == 5


def test_write_back(impl):
    store = make_store()
    cache = GpuBlockCache(store, 1, capacity=3, device="cpu", part="v")
    keys_before = store.blocks(1, "k").clone()
    slots = cache.admit([4, 6])
    cache.cache[slots[0]] = -7.0
    assert cache.write_back([4, 4, 5]) == 1  # page 5 is not cached
    assert torch.equal(store.blocks(1, "v")[4], torch.full_like(store.blocks(1, "v")[4], -7.0))
    assert torch.equal(store.blocks(1, "k"), keys_before)
    assert cache.detailed_stats()["d2h_bytes"] == cache.block_bytes


def test_bad_page_ids():
    cache = GpuBlockCache(make_store(), 0, capacity=2, device="cpu")
    with pytest.raises(IndexError, match="page id 12 .position 1. out of range"):
        cache.lookup([3, 12])
    with pytest.raises(IndexError, match="page id -1"):
        cache.admit(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integers"):
        cache.admit(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="capacity"):
        GpuBlockCache(make_store(), 0, capacity=0, device="cpu")
    assert cache.lookup([]).numel() == 0 and cache.admit([]).numel() == 0


class LruModel:
    """Sequential LRU with pins: the policy GpuBlockCache implements, one page at a time."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.order: OrderedDict[int, None] = OrderedDict()  # resident pages, oldest first
        self.pinned: set[int] = set()
        self.hits = self.queries = 0

    def lookup(self, ids):
        for p in ids:
            self.queries += 1
            if p in self.order:
                self.hits += 1
                self.order.move_to_end(p)

    def admit(self, ids):
        u = list(dict.fromkeys(ids))
        for p in u:
            if p in self.order:
                continue
            if len(self.order) >= self.capacity:
                victim = next((q for q in self.order if q not in self.pinned and q not in u), None)
                if victim is None:
                    continue
                del self.order[victim]
            self.order[p] = None
        for p in u:
            if p in self.order:
                self.order.move_to_end(p)

    def pin(self, ids):
        u = set(ids)
        if len(self.pinned | u) > self.capacity:
            return False
        self.admit(ids)
        self.pinned |= u
        return True

    def unpin(self, ids):
        self.pinned -= set(ids)

    def invalidate(self, ids):
        for p in ids:
            self.order.pop(p, None)
            self.pinned.discard(p)

    def lru_order(self):
        return [p for p in self.order if p not in self.pinned]


@pytest.mark.parametrize("seed", [0, 1])
def test_random_against_sequential_model(impl, seed):
    rng = random.Random(seed)
    store = make_store(num_pages=16)
    cache = GpuBlockCache(store, 1, capacity=5, device="cpu")
    model = LruModel(5)
    for step in range(300):
        op = rng.choices(["lookup", "admit", "pin", "unpin", "invalidate"], [4, 4, 1, 1, 1])[0]
        n = rng.randint(0, 7 if op in ("lookup", "admit") else 2)
        ids = [rng.randrange(16) for _ in range(n)]
        if op == "pin":
            ok = model.pin(ids)
            if ok:
                cache.pin(ids)
            else:
                with pytest.raises(ValueError):
                    cache.pin(ids)
        else:
            getattr(model, op)(ids)
            getattr(cache, op)(ids)
        assert cache.lru_order() == model.lru_order(), (step, op, ids)
        resident = check_consistent(cache, store) if step % 25 == 0 else None
        if resident is not None:
            assert set(resident) == set(model.order)
    s = cache.stats()
    assert (s["queries"], s["hits"]) == (model.queries, model.hits)
    assert s["occupied_blocks"] == len(model.order)


# --------------------------------------------------------------------------- GPU
@pytest.mark.usefixtures("impl")
@pytest.mark.parametrize("side_stream", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cache_end_to_end(side_stream):
    store = make_store(num_pages=64, dtype=torch.bfloat16)
    assert store.kv.is_pinned()
    stream = torch.cuda.Stream() if side_stream else None
    cache = GpuBlockCache(store, 1, capacity=16, part="kv", copy_stream=stream)
    assert cache.cache.is_cuda and cache.page_table.is_cuda
    cache.pin([0, 1])
    for start in range(2, 54, 7):
        want = torch.arange(start, start + 10, device="cuda")
        slots = cache.admit(want)
        assert slots.is_cuda
        cache.wait_ready()
        got = cache.cache[slots]
        assert torch.equal(got.cpu(), store.blocks(1)[want.cpu()])
        # A GPU-side read through the page table (what the kernels do).
        assert torch.equal(cache.page_table[want].long(), slots)
    torch.cuda.synchronize()
    check_consistent(cache, store)
    s = cache.stats(sync=True)
    assert s["h2d_seconds"] > 0
    assert s["h2d_bytes"] == cache.detailed_stats()["admitted_blocks"] * cache.block_bytes
    # Misses read straight from host memory through the device view.
    view = store.device_view()
    assert view.is_cuda and torch.equal(view[1, 63].cpu(), store.kv[1, 63])
