"""GPU cache of hot KV pages in front of a host-resident KV cache (KV offloading, §6).

With ``offload: true`` vLLM's whole paged KV cache lives in pinned, GPU-mapped host memory
(``vllm_hip.worker``). Each attention layer then keeps a :class:`DevicePageCache` on the GPU, a
layer of one :class:`PageCacheStack` shared by the layers::

    main KV (host, read over PCIe)        PageCacheStack (GPU), layer l of L
    [num_pages, 2, page, Hkv, D]   ──►    kv           [L, capacity + 1, 2, page, Hkv, D]
                                          slot_of_page [L, num_pages + 1] int32, -1 = not cached
                                          page_of_slot / last_use [L, capacity + 1] int64

Per step and layer:

1. new keys/values are written to host memory and copied to their pages' slots where cached
   (:meth:`DevicePageCache.mirror_new_tokens`: write-through, so a cached page is never stale,
   also when vLLM hands a freed page to another request); on a step with prefill rows and
   ``offload_prefill_staging`` off, the backend then admits their sink and window pages (every
   query block of the chunk reads them, so one copy beats a read across PCIe per block);
2. sparse attention (keys and values) and mask estimation (keys) read every page through
   ``slot_of_page``: from the GPU on a hit, from host memory on a miss, and count both
   (:class:`~vllm_hip_kernels.cached_pages.CachedPages`);
3. the pages the decode rows just read are handed to :meth:`PageCacheStack.end_layer`; after
   the step's last layer, :meth:`PageCacheStack.admit` marks the cached ones used and brings
   the others in, evicting each layer's least recently used slots, for all layers in one batch
   (the backend skips layers that reused every selection: those pages came in with it).

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

from vllm_hip_kernels.cached_pages import COUNTER_SLOTS
from vllm_hip_kernels.host_copy import to_device
from vllm_hip_kernels.page_copy import RowMirror, copy_layer_pages, layer_offsets

__all__ = [
    "COUNTER_NAMES",
    "DecodePages",
    "DevicePageCache",
    "PageCacheStack",
    "StepKeyPages",
    "key_list_pages",
    "new_counters",
    "shared_counters",
]

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
        from vllm_hip.counter_reader import CounterReader

        # read without waiting for the GPU by the per-step metrics export
        stats.get_stats().attach_device_counters(CounterReader(_SHARED[device]), COUNTER_NAMES)
    return _SHARED[device]


class PageCacheStack:
    """The GPU page caches of the layers of one offloaded KV cache, in stacked tensors.

    One per (host allocation, capacity, page shape); the backend gets a layer's handle with
    :meth:`layer_cache`. Stacking lets the decode rows' admissions of *all* layers of a step run
    as one batch (:meth:`end_layer` defers them to the step's last layer): a refresh step used
    to pay ~40 small launches per layer for them, which on a 32-layer model was most of its host
    time.

    Tensors (``L`` = layers, ``C`` = capacity, ``P`` = pages)::

        kv            [L, C + 1, 2, page, Hkv, D]   slot C of each layer is scratch
        slot_of_page  [L, P + 1] int32              -1 = not cached; entry P is scratch
        page_of_slot  [L, C + 1] int64
        last_use      [L, C + 1] int64              tick of the layer's last admission naming it
    """

    _SHARED: dict[tuple, "PageCacheStack"] = {}

    def __init__(self, main: torch.Tensor, capacity: int, counters: torch.Tensor | None = None,
                 layers: int = 1):  # fmt: skip
        if main.dim() != 5 or main.shape[1] != 2:
            raise ValueError(
                f"main KV cache must be [num_pages, 2, page_size, Hkv, D], got {tuple(main.shape)}"
            )
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive number of pages, got {capacity!r}")
        self.device = main.device
        self.page_shape = tuple(main.shape[1:])
        self.dtype = main.dtype
        self.num_pages = int(main.shape[0])
        self.page_size = int(main.shape[2])
        self.capacity = capacity
        self.page_bytes = main[0].numel() * main.element_size()
        self.counters = counters if counters is not None else new_counters(self.device)
        self.mains: list[torch.Tensor] = []
        self._tick = 0
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._pending_md: object = None
        self._seen = 0
        self._common: tuple | None = None
        # (start, end) CUDA events around fills whose time is not yet added to h2d_seconds.
        self._timings: deque = deque()
        self.copy_seconds = 0.0
        """Seconds the fills took (CUDA events; those still running are not counted yet)."""
        self._allocate(max(1, layers))

    def _allocate(self, layers: int) -> None:
        dev, cap, pages = self.device, self.capacity, self.num_pages
        old = getattr(self, "kv", None)
        kv = torch.zeros((layers, cap + 1, *self.page_shape), dtype=self.dtype, device=dev)
        slot_of_page = torch.full((layers, pages + 1), -1, dtype=torch.int32, device=dev)
        page_of_slot = torch.full((layers, cap + 1), -1, dtype=torch.int64, device=dev)
        last_use = torch.full((layers, cap + 1), -1, dtype=torch.int64, device=dev)
        last_use[:, cap] = _NEVER
        src_off = torch.zeros(layers, dtype=torch.int64, device=dev)
        if old is not None:  # a layer joined past the hint: keep what the others hold
            n = old.shape[0]
            kv[:n] = old
            slot_of_page[:n] = self.slot_of_page
            page_of_slot[:n] = self.page_of_slot
            last_use[:n] = self.last_use
            src_off[:n] = self.src_off
        self.kv, self.slot_of_page, self.page_of_slot = kv, slot_of_page, page_of_slot
        self.last_use, self.src_off = last_use, src_off

    @classmethod
    def shared(cls, main: torch.Tensor, capacity: int, counters: torch.Tensor,
               layers_hint: int) -> "PageCacheStack":  # fmt: skip
        """The stack of the allocation ``main`` is a view of (one per capacity and page shape)."""
        key = (main.untyped_storage().data_ptr(), str(main.device), capacity,
               tuple(main.shape), main.dtype)  # fmt: skip
        stack = cls._SHARED.get(key)
        if stack is None:
            stack = cls._SHARED[key] = cls(main, capacity, counters, layers_hint)
        return stack

    @classmethod
    def release_shared(cls) -> None:
        """Forget every shared stack (tests)."""
        cls._SHARED.clear()

    @property
    def num_layers(self) -> int:
        return len(self.mains)

    @property
    def layer_bytes(self) -> int:
        """GPU bytes of one layer's cache."""
        return self.kv[0].numel() * self.kv.element_size()

    def layer_cache(self, main: torch.Tensor) -> "DevicePageCache":
        """A new layer's handle (its own slot in the stack) in front of ``main``."""
        if tuple(main.shape[1:]) != self.page_shape or main.dtype != self.dtype:
            raise ValueError(f"layer cache {tuple(main.shape)} {main.dtype} does not fit the stack")
        layer = len(self.mains)
        if layer >= self.kv.shape[0]:
            self._allocate(max(layer + 1, 2 * self.kv.shape[0]))
        base = self.mains[0] if self.mains else main
        self.mains.append(main)
        # fill_, not src_off[layer] = ...: a number assigned to one element is copied to the
        # GPU from pageable memory first, a blocking copy
        self.src_off[layer].fill_(layer_offsets(base, [main])[0])
        return DevicePageCache(self, layer)

    # ------------------------------------------------------------------ admission
    def admit(self, layers: list[int], pages: torch.Tensor) -> None:
        """For each row ``g``: mark ``pages[g]`` used now in layer ``layers[g]`` and bring in
        those not cached, evicting that layer's least recently used slots.

        Parameters
        ----------
        layers : list of int
            Distinct layer slots, one per row.
        pages : torch.Tensor
            int32/int64 [G, n] page ids on the device; -1 entries and repeats are ignored. When
            more distinct pages of a row miss than slots can be freed without evicting a page
            named in this call, the surplus stays uncached (read from host memory next time).
        """
        g, n = int(pages.shape[0]), int(pages.shape[1])
        if g == 0 or n == 0:
            return
        self._tick += 1
        tick = self._tick
        cap, num_pages = self.capacity, self.num_pages
        dev = self.device
        lay = to_device(torch.tensor(layers, dtype=torch.int64), dev)
        rows = lay[:, None]
        p = torch.where(pages.long() >= 0, pages.long(), _NEVER)
        p, _ = torch.sort(p, dim=1)
        valid = p != _NEVER
        first = torch.ones_like(valid)
        first[:, 1:] = p[:, 1:] != p[:, :-1]
        uniq = valid & first
        p_safe = torch.where(valid, p, num_pages)
        slot = self.slot_of_page[rows, p_safe].long()
        hit = uniq & (slot >= 0)
        miss = uniq & (slot < 0)
        last_use = self.last_use[lay]  # [G, C + 1], written back below
        # Touch the hits (misses and padding write the scratch slot, reset below).
        last_use.scatter_(1, torch.where(hit, slot, cap), tick)
        last_use[:, cap] = _NEVER
        n_victims = min(n, cap)
        _, victims = torch.topk(last_use[:, :cap], n_victims, dim=1, largest=False, sorted=True)
        rank = torch.cumsum(miss.long(), 1) - 1
        victim = victims.gather(1, rank.clamp(0, n_victims - 1))
        take = miss & (rank < n_victims)
        take &= last_use.gather(1, victim) < tick  # never evict a page used in this call
        victim = torch.where(take, victim, cap)
        old = self.page_of_slot[rows, victim]
        newly_filled = take & (old < 0)
        # Evicted pages leave the table: index_fill_ on the flat table, because assigning a
        # Python scalar through index tensors copies it to the GPU blocking (a host wait).
        evicted = torch.where(take & (old >= 0), old, num_pages)
        self.slot_of_page.view(-1).index_fill_(0, (rows * self.slot_of_page.stride(0) + evicted).flatten(), -1)
        self.slot_of_page[rows, torch.where(take, p_safe, num_pages)] = victim.to(torch.int32)
        self.slot_of_page[:, num_pages] = -1
        self.page_of_slot[rows, victim] = torch.where(take, p_safe, -1)
        last_use.scatter_(1, victim, tick)
        last_use[:, cap] = _NEVER
        self.last_use[lay] = last_use
        with self._copy_timer():
            copy_layer_pages(self.mains[0], self.src_off, self.kv, lay,
                             torch.where(take, p_safe, -1), victim)  # fmt: skip
        fill_bytes = take.sum() * self.page_bytes
        self.counters[COUNTER_SLOTS["h2d_bytes"]] += fill_bytes
        self.counters[COUNTER_SLOTS["copy_bytes"]] += fill_bytes
        self.counters[COUNTER_SLOTS["occupied"]] += newly_filled.sum()

    def end_layer(self, step: object, layer: int, decode_pages: "DecodePages | None") -> None:
        """A layer finished its step (``step``: the step's metadata object); ``decode_pages``:
        what its decode rows read (None: nothing to admit). The layers' admissions run as one
        batch once every layer of the stack has reported for the step (or, should a step end
        early, when the next one begins)."""
        if step is not self._pending_md:
            self.flush()
            self._pending_md, self._seen = step, 0
        self._seen += 1
        if decode_pages is not None:
            self._pending.append((layer, decode_pages.sel, decode_pages.count))
            self._common = decode_pages.common
        if self._seen >= self.num_layers:
            self.flush()

    def flush(self) -> None:
        """Admit the pages of every deferred layer: one batch per selection width."""
        pending, self._pending = self._pending, []
        self._pending_md, self._seen = None, 0
        if not pending:
            return
        common = self._common
        by_width: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for entry in pending:
            by_width.setdefault(int(entry[1].shape[-1]), []).append(entry)
        for group in by_width.values():
            layers = [e[0] for e in group]
            sel = torch.stack([e[1] for e in group])
            count = torch.stack([e[2] for e in group])
            self.admit(layers, common.pages_of(sel, count))

    # ------------------------------------------------------------------ fill timing
    @contextlib.contextmanager
    def _copy_timer(self):
        """Time the fill with CUDA events and add finished fills to ``h2d_seconds``, never
        waiting: an event pair is read only once the GPU has passed its end (``query()``)."""
        timed = (
            self.device.type == "cuda"
            and len(self._timings) < _MAX_PENDING_TIMINGS
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
        self._timings.append((start, end))
        self.collect_copy_seconds()

    def collect_copy_seconds(self) -> float:
        """Add the time of every finished fill to ``copy_seconds`` and to the process stats'
        ``h2d_seconds``; returns the seconds added."""
        added = 0.0
        while self._timings and self._timings[0][1].query():
            start, end = self._timings.popleft()
            added += start.elapsed_time(end) / 1e3
        if added:
            from vllm_hip import stats

            self.copy_seconds += added
            stats.get_stats().h2d_seconds += added
        return added


class DevicePageCache:
    """LRU cache of one layer's KV pages on the GPU, managed without host synchronization: a
    layer of a :class:`PageCacheStack` (its own one-layer stack when built directly).

    Parameters
    ----------
    main : torch.Tensor or PageCacheStack
        The layer's KV cache ``[num_pages, 2, page_size, Hkv, D]`` (a device view of host memory
        when offloading), each page contiguous; or the stack this handle is layer ``layer`` of.
    capacity : int
        Pages the GPU cache holds (>= 1), when ``main`` is a tensor.
    counters : torch.Tensor, optional
        int64 [7] (:func:`new_counters`) this cache adds to; a private one by default.
    """

    def __init__(self, main, capacity: int = 0, counters: torch.Tensor | None = None):
        if isinstance(main, PageCacheStack):
            self.stack, self.layer = main, capacity
        else:
            self.stack = PageCacheStack(main, capacity, counters)
            self.layer = self.stack.layer_cache(main).layer
        st = self.stack
        self.main = st.mains[self.layer]
        self.num_pages, self.page_size, self.capacity = st.num_pages, st.page_size, st.capacity
        self.counters, self.page_bytes = st.counters, st.page_bytes
        self._mirror: RowMirror | None = None

    # Views into the stack, taken anew on each use: the stack reallocates when a layer joins
    # past its size hint.
    @property
    def kv(self) -> torch.Tensor:
        """[capacity + 1, 2, page_size, Hkv, D] (slot ``capacity`` is scratch)."""
        return self.stack.kv[self.layer]

    @property
    def slot_of_page(self) -> torch.Tensor:
        return self.stack.slot_of_page[self.layer]

    @property
    def page_of_slot(self) -> torch.Tensor:
        return self.stack.page_of_slot[self.layer]

    @property
    def last_use(self) -> torch.Tensor:
        return self.stack.last_use[self.layer]

    @property
    def nbytes(self) -> int:
        return self.stack.layer_bytes

    @property
    def _tick(self) -> int:
        return self.stack._tick

    # ------------------------------------------------------------------ writes
    def mirror_new_tokens(self, slot_mapping: torch.Tensor) -> None:
        """Write-through: the key/value rows just written to host memory at ``slot_mapping``
        copied to their pages' cache slots where cached, so a cached page never goes stale (also
        when vLLM hands a freed page to another request)."""
        kv = self.kv
        if self._mirror is None or self._mirror.cache.data_ptr() != kv.data_ptr():
            self._mirror = RowMirror(self.main, kv)  # laid out once (again if the stack grew)
        self._mirror(self.slot_of_page, slot_mapping)

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
        self.stack.admit([self.layer], pages.reshape(1, -1))

    @property
    def copy_seconds(self) -> float:
        return self.stack.copy_seconds

    def collect_copy_seconds(self) -> float:
        return self.stack.collect_copy_seconds()

    # ------------------------------------------------------------------ inspection (tests)
    def resident_pages(self) -> dict[int, int]:
        """{page: slot} of every cached page (synchronizes; for tests and debugging)."""
        pages = self.page_of_slot[: self.capacity].tolist()
        return {pg: s for s, pg in enumerate(pages) if pg >= 0}


class DecodePages:
    """What the decode rows of one step read, per layer: the sink and window pages (the same for
    every layer, made once per step) and each layer's selection, turned into pages when the
    stack admits them (:meth:`pages_of`, for all deferred layers at once)."""

    def __init__(self, common: "StepKeyPages", sel: torch.Tensor, count: torch.Tensor):
        self.common, self.sel, self.count = common, sel, count


class StepKeyPages:
    """The sink and window pages of some query blocks of a step (:func:`key_list_pages` without
    a selection), and how to add selections of several layers to them."""

    def __init__(self, block_table: torch.Tensor, seq_lens: torch.Tensor, block_seq: torch.Tensor,
                 window_start: torch.Tensor, *, sink_tokens: int, page_size: int,
                 max_window_pages: int):  # fmt: skip
        n = int(block_seq.shape[0])
        dev = block_table.device
        self.block_rows = block_table.long()[block_seq.long()]
        self.page_size = page_size
        self.fixed = key_list_pages(
            block_table, seq_lens, block_seq, window_start,
            torch.zeros((n, 0), dtype=torch.int32, device=dev),
            torch.zeros(n, dtype=torch.int32, device=dev),
            sink_tokens=sink_tokens, page_size=page_size, max_window_pages=max_window_pages,
        )  # fmt: skip

    def pages_of(self, sel: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """[G, n] pages of ``G`` layers: the fixed pages, then each layer's selected blocks'
        (``sel`` [G, blocks, w] token starts, -1 padded; ``count`` [G, blocks])."""
        g, nb, w = sel.shape
        col = torch.arange(w, device=sel.device)
        ok = (col < count.long()[..., None]) & (sel >= 0)
        logical = torch.where(ok, sel.long(), 0) // self.page_size
        logical = logical.clamp(max=self.block_rows.shape[1] - 1)
        phys = torch.gather(self.block_rows.expand(g, -1, -1), 2, logical)
        sel_pages = torch.where(ok, phys, -1).reshape(g, nb * w)
        return torch.cat([self.fixed.expand(g, -1), sel_pages], 1)


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
