"""GPU cache of hot KV pages in front of a host-resident KV cache (KV offloading, §6).

With ``offload: true`` vLLM's whole paged KV cache lives in pinned, GPU-mapped host memory
(``vllm_hip.worker``). Each attention layer then keeps a :class:`DevicePageCache` on the GPU::

    main KV (host, read over PCIe)        DevicePageCache (GPU)
    [num_pages, 2, page, Hkv, D]   ──►    kv           [capacity + 1, 2, page, Hkv, D]
                                          slot_of_page [num_pages + 1] int32, -1 = not cached
                                          page_of_slot / last_use [capacity + 1] int64

Per step and layer:

1. new keys/values are written to host memory and, for pages that are cached, to their slot
   too (:meth:`DevicePageCache.cache_slot_mapping`: write-through, so a cached page is never
   stale, also when vLLM hands a freed page to another request); on a step with prefill rows
   the backend then admits their sink and window pages (every query block of the chunk reads
   them, so one copy beats a read across PCIe per block);
2. sparse attention (keys and values) and mask estimation (keys) read every page through
   ``slot_of_page``: from the GPU on a hit, from host memory on a miss, and count both
   (:class:`~vllm_hip_kernels.cached_pages.CachedPages`);
3. :meth:`DevicePageCache.admit` takes the pages the decode rows just read, marks the cached
   ones used, and brings the others in, evicting the least recently used slots (the backend
   skips it on steps that reused every selection: those pages came in with the selection).

Everything stays on the device: the index lists have fixed lengths with -1 padding, victims come
from one ``topk`` over the slots' last-use ticks, and the copy kernel skips padding; no step
waits for the host. Recency has one tick per :meth:`admit` call, so pages named in one call tie
(which of them goes first when a later call must evict is unspecified).

Slot ``capacity`` is scratch: padded entries write there, and it is never a victim.
"""

from __future__ import annotations

import contextlib
from collections import deque

import torch

from vllm_hip_kernels.cached_pages import COUNTER_SLOTS, CachedPages
from vllm_hip_kernels.page_copy import copy_pages

__all__ = ["COUNTER_NAMES", "DevicePageCache", "key_list_pages", "new_counters", "shared_counters"]

#: Entries of the counters tensor (their order is the kernels', ``COUNTER_SLOTS``), named as the
#: :class:`vllm_hip.stats.HipStats` fields they feed: key rows (token x kv head) sparse attention
#: read, of those from the GPU cache, bytes moved host -> GPU (missed reads and cache fills), cache
#: slots holding a page, key rows mask estimation read, of those from the GPU cache, bytes of
#: cache fills (explicit copies, timed with CUDA events into ``h2d_seconds``).
COUNTER_NAMES = (
    "attn_cache_queries",
    "attn_cache_hits",
    "h2d_bytes",
    "gpu_cache_occupied_blocks",
    "mask_estimation_cache_queries",
    "mask_estimation_cache_hits",
    "h2d_copy_bytes",
)
assert len(COUNTER_NAMES) == len(COUNTER_SLOTS)

_SHARED: dict[torch.device, torch.Tensor] = {}

_NEVER = torch.iinfo(torch.int64).max

#: Fill timings awaiting their events; past this many (a GPU far behind) fills go untimed rather
#: than grow the queue.
_MAX_PENDING_TIMINGS = 4096


def new_counters(device: torch.device | str) -> torch.Tensor:
    """Zeroed int64 counters (see :data:`COUNTER_NAMES`), to share between layers."""
    return torch.zeros(len(COUNTER_NAMES), dtype=torch.int64, device=device)


def shared_counters(device: torch.device | str) -> torch.Tensor:
    """The process's counters on ``device``, attached to the process-wide stats once."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # "cuda" and "cuda:0" must name one entry (a tensor's .device always has the index).
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _SHARED:
        from vllm_hip import stats

        _SHARED[device] = new_counters(device)
        stats.get_stats().attach_device_counters(_SHARED[device], COUNTER_NAMES)
    return _SHARED[device]


class DevicePageCache:
    """LRU cache of one layer's KV pages on the GPU, managed without host synchronization.

    Parameters
    ----------
    main : torch.Tensor
        The layer's KV cache ``[num_pages, 2, page_size, Hkv, D]`` (a device view of host memory
        when offloading), each page contiguous.
    capacity : int
        Pages the GPU cache holds (>= 1).
    counters : torch.Tensor, optional
        int64 [7] (:func:`new_counters`) this cache adds to; a private one by default.
    """

    def __init__(self, main: torch.Tensor, capacity: int, counters: torch.Tensor | None = None):
        if main.dim() != 5 or main.shape[1] != 2:
            raise ValueError(
                f"main KV cache must be [num_pages, 2, page_size, Hkv, D], got {tuple(main.shape)}"
            )
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive number of pages, got {capacity!r}")
        dev = main.device
        self.main = main
        self.num_pages = int(main.shape[0])
        self.page_size = int(main.shape[2])
        self.capacity = capacity
        self.kv = torch.zeros((capacity + 1, *main.shape[1:]), dtype=main.dtype, device=dev)
        self.slot_of_page = torch.full((self.num_pages + 1,), -1, dtype=torch.int32, device=dev)
        self.page_of_slot = torch.full((capacity + 1,), -1, dtype=torch.int64, device=dev)
        self.last_use = torch.full((capacity + 1,), -1, dtype=torch.int64, device=dev)
        self.last_use[capacity] = _NEVER
        self.counters = counters if counters is not None else new_counters(dev)
        self.page_bytes = main[0].numel() * main.element_size()
        self._tick = 0
        self._scratch = torch.tensor([capacity], dtype=torch.int64, device=dev)
        # (start, end) CUDA events around fills whose time is not yet added to h2d_seconds.
        self._pending: deque = deque()
        self.copy_seconds = 0.0
        """Seconds the fills took (CUDA events; those still running are not counted yet)."""
        key, value = self.kv.unbind(1)
        self.view = CachedPages(self.slot_of_page, key, value, self.counters)
        """What the kernels take as ``page_cache`` (sparse attention and mask estimation)."""

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    # ------------------------------------------------------------------ writes
    def cache_slot_mapping(self, slot_mapping: torch.Tensor) -> torch.Tensor:
        """Slots of the GPU cache that mirror ``slot_mapping`` (token slots of the main cache,
        -1 = padding): the same offset in the page's cache slot, -1 where the page is not cached.
        Writing new tokens there as well keeps cached pages equal to host memory."""
        sm = slot_mapping.long()
        ok = sm >= 0
        page = torch.where(ok, sm // self.page_size, self.num_pages)
        slot = self.slot_of_page[page].long()
        hit = ok & (slot >= 0)
        return torch.where(hit, slot * self.page_size + sm % self.page_size, -1)

    # ------------------------------------------------------------------ admission
    def admit(self, pages: torch.Tensor) -> None:
        """Mark ``pages`` used now and bring in those not cached, evicting least recently used.

        Parameters
        ----------
        pages : torch.Tensor
            int32/int64 [n] page ids on the cache's device; -1 entries and repeats are ignored.
            When more distinct pages miss than slots can be freed without evicting a page named
            in this call, the surplus stays uncached (and is read from host memory next time).
        """
        n = int(pages.numel())
        if n == 0:
            return
        self._tick += 1
        tick = self._tick
        cap = self.capacity
        p = torch.where(pages.long() >= 0, pages.long(), _NEVER)
        p, _ = torch.sort(p)
        valid = p != _NEVER
        first = torch.ones_like(valid)
        first[1:] = p[1:] != p[:-1]
        uniq = valid & first
        p_safe = torch.where(valid, p, self.num_pages)
        slot = self.slot_of_page[p_safe].long()
        hit = uniq & (slot >= 0)
        miss = uniq & (slot < 0)
        # Touch the hits (misses and padding write the scratch slot, reset below).
        self.last_use[torch.where(hit, slot, cap)] = tick
        n_victims = min(n, cap)
        _, victims = torch.topk(self.last_use[:cap], n_victims, largest=False, sorted=True)
        rank = torch.cumsum(miss.long(), 0) - 1
        victim = victims[rank.clamp(0, n_victims - 1)]
        take = miss & (rank < n_victims)
        take &= self.last_use[victim] < tick  # never evict a page used in this call
        victim = torch.where(take, victim, cap)
        old = self.page_of_slot[victim]
        newly_filled = take & (old < 0)
        self.slot_of_page[torch.where(take & (old >= 0), old, self.num_pages)] = -1
        self.slot_of_page[torch.where(take, p_safe, self.num_pages)] = victim.to(torch.int32)
        self.slot_of_page[self.num_pages] = -1
        self.page_of_slot[victim] = torch.where(take, p_safe, -1)
        self.last_use[victim] = tick
        self.last_use[cap] = _NEVER
        with self._copy_timer():
            copy_pages(self.main, self.kv, torch.where(take, p_safe, -1), victim)
        fill_bytes = take.sum() * self.page_bytes
        self.counters[COUNTER_SLOTS["h2d_bytes"]] += fill_bytes
        self.counters[COUNTER_SLOTS["copy_bytes"]] += fill_bytes
        self.counters[COUNTER_SLOTS["occupied"]] += newly_filled.sum()

    # ------------------------------------------------------------------ fill timing
    @contextlib.contextmanager
    def _copy_timer(self):
        """Time the fill with CUDA events and add finished fills to ``h2d_seconds``, never
        waiting: an event pair is read only once the GPU has passed its end (``query()``)."""
        timed = (
            self.main.is_cuda
            and len(self._pending) < _MAX_PENDING_TIMINGS
            and not torch.cuda.is_current_stream_capturing()
        )
        if not timed:
            yield
            return
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._pending.append((start, end))
        self.collect_copy_seconds()

    def collect_copy_seconds(self) -> float:
        """Add the time of every finished fill to ``copy_seconds`` and to the process stats'
        ``h2d_seconds``; returns the seconds added."""
        added = 0.0
        while self._pending and self._pending[0][1].query():
            start, end = self._pending.popleft()
            added += start.elapsed_time(end) / 1e3
        if added:
            from vllm_hip import stats

            self.copy_seconds += added
            stats.get_stats().h2d_seconds += added
        return added

    # ------------------------------------------------------------------ inspection (tests)
    def resident_pages(self) -> dict[int, int]:
        """{page: slot} of every cached page (synchronizes; for tests and debugging)."""
        pages = self.page_of_slot[: self.capacity].tolist()
        return {pg: s for s, pg in enumerate(pages) if pg >= 0}


def key_list_pages(
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_seq: torch.Tensor,
    window_start: torch.Tensor,
    sel_blocks: torch.Tensor,
    sel_count: torch.Tensor,
    *,
    sink_tokens: int,
    page_size: int,
    max_window_pages: int,
) -> torch.Tensor:
    """Physical pages that sparse attention reads for some query blocks, -1 padded, flattened.

    Parameters
    ----------
    block_table, seq_lens : torch.Tensor
        vLLM's per-sequence page table and lengths.
    block_seq, window_start : torch.Tensor
        Per query block: its sequence and window start W0.
    sel_blocks, sel_count : torch.Tensor
        Per query block: selected block starts (tokens, -1 padded) and their count.
    sink_tokens, page_size : int
        As configured.
    max_window_pages : int
        Upper bound of the pages [W0, seq_len) spans (a host int, so shapes stay static).
    """
    dev = block_table.device
    nb = int(block_seq.shape[0])
    seq = block_seq.long()
    n_tok = seq_lens.long()[seq]
    last_page = (n_tok - 1).clamp(min=0) // page_size
    sink_pages = -(-sink_tokens // page_size)
    sink = torch.arange(sink_pages, device=dev).expand(nb, sink_pages)
    sink_ok = sink * page_size < n_tok[:, None]
    width = sel_blocks.shape[1]
    col = torch.arange(width, device=dev)
    sel = sel_blocks.long()
    sel_ok = (col[None, :] < sel_count.long()[:, None]) & (sel >= 0)
    sel_page = torch.where(sel_ok, sel, 0) // page_size
    win = window_start.long()[:, None] // page_size + torch.arange(max_window_pages, device=dev)
    win_ok = win <= last_page[:, None]
    logical = torch.cat([sink, sel_page, win], 1)
    ok = torch.cat([sink_ok, sel_ok, win_ok], 1) & (n_tok[:, None] > 0)
    logical = torch.where(ok, logical, 0).clamp(max=block_table.shape[1] - 1)
    phys = torch.gather(block_table.long()[seq], 1, logical)
    return torch.where(ok, phys, -1).flatten()
