"""KV offloading: the full KV cache in pinned host memory, hot pages cached on the GPU per layer.

::

    HostKVStore.kv  (pinned, mapped; one allocation)
      [num_layers, num_pages, 2, page_size, num_kv_heads, head_dim]     2 = (key, value)
            │  store.blocks(layer, part)  ->  [num_pages, *block_shape]  (one block = one page)
            │
            │  admit(page_ids): misses -> LRU victims, one gather_blocks (host -> GPU)
            ▼
    GpuBlockCache (one per layer and part)
      cache       [capacity, *block_shape]   on the GPU
      page_table  [num_pages] int32          on the GPU: page -> slot, -1 = not cached;
                                             kernels read it, and host memory (through
                                             store.device_view()) on a miss

Bookkeeping (recency, pins, the page -> slot mirror) lives on the host in small CPU tensors, so
``lookup`` never reads the GPU. Cost per call: ``lookup`` is O(n) in the pages asked; ``admit`` is
O(n) when everything hits, O(n + capacity) when it must pick victims (a key per slot and a
``topk``), which for a few thousand slots per layer is tens of microseconds.

Recency order is strict: every page named in a call gets its own tick, in the order given, so the
policy equals a sequential LRU (an ``OrderedDict`` where each access moves the page to the end).

Transfers run on the current stream, or on ``copy_stream`` when one is given: the copy then waits
for work already queued on the current stream (it may still read the victims) and
:meth:`GpuBlockCache.wait_ready` makes a consumer stream wait for the last admission.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable

import torch

from vllm_hip_kernels.host_copy import to_device_rows

from vllm_hip import _ops

__all__ = [
    "GpuBlockCache",
    "HostKVStore",
    "HostMemoryError",
    "available_host_bytes",
    "combined_stats",
]

_PARTS = {"kv": None, "k": 0, "v": 1}
_NEVER = torch.iinfo(torch.int64).max


class HostMemoryError(MemoryError):
    """More pinned host memory was asked for than the machine can give."""


def available_host_bytes() -> int:
    """Host memory available to new allocations, in bytes (psutil, else ``os.sysconf``)."""
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.virtual_memory().available)


def _gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"


class HostKVStore:
    """Full KV cache of every layer in one pinned, device-mapped host allocation.

    Parameters
    ----------
    num_layers, num_pages, page_size, num_kv_heads, head_dim : int
        Layout ``[num_layers, num_pages, 2, page_size, num_kv_heads, head_dim]`` (2 = key, value);
        pages of one layer are contiguous, so a layer's blocks are one strided tensor.
    dtype : torch.dtype
        Element type of the cache.
    max_host_fraction : float
        At most this fraction of the currently available host memory may be pinned: pinned pages
        cannot be swapped, and pinning everything starves the rest of the process.

    Raises
    ------
    HostMemoryError
        If the store needs more than ``max_host_fraction`` of the available host memory, or the
        pinned allocation itself fails. The message gives both sizes and the largest page count
        that fits.
    ValueError
        On a non-positive size.

    Notes
    -----
    The memory is uninitialized. Without a GPU it is ordinary host memory.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        *,
        max_host_fraction: float = 0.9,
    ):
        sizes = dict(
            num_layers=num_layers,
            num_pages=num_pages,
            page_size=page_size,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
        )
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"HostKVStore: {name} must be a positive int, got {value!r}")
        if not 0.0 < max_host_fraction <= 1.0:
            raise ValueError(
                f"HostKVStore: max_host_fraction must be in (0, 1], got {max_host_fraction}"
            )
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.shape = (num_layers, num_pages, 2, page_size, num_kv_heads, head_dim)
        per_page = self.page_bytes(num_layers, page_size, num_kv_heads, head_dim, dtype)
        nbytes = per_page * num_pages
        free = available_host_bytes()
        limit = int(free * max_host_fraction)
        if nbytes > limit:
            raise HostMemoryError(
                f"HostKVStore: {nbytes} bytes ({_gib(nbytes)}) of pinned host memory asked for "
                f"{num_layers} layers x {num_pages} pages, but only {free} bytes ({_gib(free)}) "
                f"of host memory are free and at most {max_host_fraction:.0%} of that may be "
                f"pinned: use at most {limit // per_page} pages or free host memory"
            )
        try:
            self.kv = _ops.alloc_pinned_mapped(self.shape, dtype)
        except torch.OutOfMemoryError as exc:
            raise HostMemoryError(
                f"HostKVStore: pinning {nbytes} bytes ({_gib(nbytes)}) of host memory failed "
                f"with {free} bytes ({_gib(free)}) free: {exc}"
            ) from exc
        self._device_view: torch.Tensor | None = None

    @staticmethod
    def page_bytes(
        num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes of one page over all layers (keys and values)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return num_layers * 2 * page_size * num_kv_heads * head_dim * itemsize

    @classmethod
    def from_bytes(
        cls,
        nbytes: int,
        num_layers: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        **kwargs,
    ) -> HostKVStore:
        """A store with as many pages as fit in ``nbytes`` (see the class for the arguments).

        Raises
        ------
        ValueError
            If ``nbytes`` holds less than one page.
        HostMemoryError
            As for the constructor.
        """
        per_page = cls.page_bytes(num_layers, page_size, num_kv_heads, head_dim, dtype)
        if nbytes < per_page:
            raise ValueError(
                f"HostKVStore: {nbytes} bytes hold no page; one page of {num_layers} layers "
                f"needs {per_page} bytes"
            )
        return cls(
            num_layers, nbytes // per_page, page_size, num_kv_heads, head_dim, dtype, **kwargs
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the whole store."""
        return self.kv.numel() * self.kv.element_size()

    def layer(self, layer: int) -> torch.Tensor:
        """``[num_pages, 2, page_size, num_kv_heads, head_dim]`` view of one layer."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"HostKVStore: layer {layer} out of range [0, {self.num_layers})")
        return self.kv[layer]

    def blocks(self, layer: int, part: str = "kv") -> torch.Tensor:
        """Blocks of one layer: ``[num_pages, 2, page_size, Hkv, D]`` for ``part="kv"``,
        ``[num_pages, page_size, Hkv, D]`` (a strided view) for ``"k"`` or ``"v"``."""
        if part not in _PARTS:
            raise ValueError(f"HostKVStore: part must be one of {sorted(_PARTS)}, got {part!r}")
        view = self.layer(layer)
        return view if _PARTS[part] is None else view[:, _PARTS[part]]

    def device_view(self) -> torch.Tensor:
        """The whole store as a CUDA tensor aliasing host memory (kernels read misses from it).

        Without a GPU, the store itself.
        """
        if self._device_view is None:
            self._device_view = _ops.host_device_view(self.kv)
        return self._device_view


class GpuBlockCache:
    """GPU cache of ``capacity`` blocks (pages) of one layer of a :class:`HostKVStore`, with LRU.

    Parameters
    ----------
    store : HostKVStore
        Where every page lives.
    layer : int
        Layer of ``store`` this cache serves.
    capacity : int
        Blocks (pages) held on the GPU.
    device : torch.device or str, optional
        Device of the cache and page table; default ``cuda`` when available, else ``cpu``.
    part : {"kv", "k", "v"}
        Cache keys and values (sparse attention) or keys only (mask estimation).
    copy_stream : torch.cuda.Stream, optional
        Side stream for the host-to-GPU fills (see the module docstring).

    Attributes
    ----------
    cache : torch.Tensor
        ``[capacity, *block_shape]`` on ``device``.
    page_table : torch.Tensor
        ``[num_pages]`` int32 on ``device``: slot of each page, -1 when not cached.
    """

    def __init__(
        self,
        store: HostKVStore,
        layer: int,
        capacity: int,
        device: torch.device | str | None = None,
        *,
        part: str = "kv",
        copy_stream: torch.cuda.Stream | None = None,
    ):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
            raise ValueError(f"GpuBlockCache: capacity must be a positive int, got {capacity!r}")
        self.store = store
        self.layer = layer
        self.part = part
        self._src = store.blocks(layer, part)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if copy_stream is not None and self.device.type != "cuda":
            raise ValueError("GpuBlockCache: copy_stream needs a CUDA device")
        self.capacity = capacity
        self.num_pages = store.num_pages
        self.block_shape = tuple(self._src.shape[1:])
        self.cache = torch.empty(
            (capacity, *self.block_shape), dtype=store.dtype, device=self.device
        )
        self.page_table = torch.full((self.num_pages,), -1, dtype=torch.int32, device=self.device)
        self.block_bytes = self.cache[0].numel() * self.cache.element_size()
        self._copy_stream = copy_stream
        if copy_stream is not None:
            self.cache.record_stream(copy_stream)
            self.page_table.record_stream(copy_stream)
        self._ready: torch.cuda.Event | None = None

        # Host-side state; the page table above is its device copy.
        self._page_slot = torch.full((self.num_pages,), -1, dtype=torch.int64)
        self._slot_page = torch.full((capacity,), -1, dtype=torch.int64)
        self._last_use = torch.full((capacity,), -1, dtype=torch.int64)
        self._pinned = torch.zeros(capacity, dtype=torch.bool)
        self._tick = 0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event, str]] = []
        self.reset_stats()

    # ------------------------------------------------------------------ stats
    def reset_stats(self) -> None:
        """Zero the counters (not the cache contents)."""
        self.queries = 0
        self.hits = 0
        self.h2d_bytes = 0
        self.h2d_seconds = 0.0
        self.d2h_bytes = 0
        self.d2h_seconds = 0.0
        self.admitted_blocks = 0
        self.evictions = 0
        self.admit_overflow = 0

    def stats(self, sync: bool = False) -> dict[str, int | float]:
        """Counters since construction or :meth:`reset_stats`.

        Parameters
        ----------
        sync : bool
            Wait for transfers still in flight so ``h2d_seconds`` includes them (GPU only);
            otherwise they are counted once finished, by a later call.

        Returns
        -------
        dict
            ``queries`` (pages looked up), ``hits`` (found on the GPU), ``h2d_bytes``,
            ``h2d_seconds`` (host-to-GPU fills), ``occupied_blocks``, ``capacity_blocks``.
        """
        self._drain(block=sync)
        return {
            "queries": self.queries,
            "hits": self.hits,
            "h2d_bytes": self.h2d_bytes,
            "h2d_seconds": self.h2d_seconds,
            "occupied_blocks": int((self._slot_page >= 0).sum()),
            "capacity_blocks": self.capacity,
        }

    def detailed_stats(self, sync: bool = False) -> dict[str, int | float]:
        """:meth:`stats` plus ``misses``, ``admitted_blocks``, ``evictions``, ``admit_overflow``
        (pages an admission could not place: every slot pinned or asked for), ``pinned_blocks``,
        ``d2h_bytes`` and ``d2h_seconds`` (write-backs)."""
        out = self.stats(sync)
        out.update(
            misses=self.queries - self.hits,
            admitted_blocks=self.admitted_blocks,
            evictions=self.evictions,
            admit_overflow=self.admit_overflow,
            pinned_blocks=int(self._pinned.sum()),
            d2h_bytes=self.d2h_bytes,
            d2h_seconds=self.d2h_seconds,
        )
        return out

    # ------------------------------------------------------------------ queries
    def lookup(self, page_ids) -> torch.Tensor:
        """Slots of pages, counting hits and misses and refreshing the recency of hits.

        Parameters
        ----------
        page_ids : torch.Tensor or sequence of int
            ``[n]`` page ids (any integer dtype; a GPU tensor costs one device sync).

        Returns
        -------
        torch.Tensor
            ``[n]`` int64 slots, -1 for pages not cached; on ``page_ids``' device.
        """
        ids, out_device = self._pages(page_ids)
        slots = self._page_slot[ids]
        hit = slots >= 0
        self.queries += ids.numel()
        self.hits += int(hit.sum())
        self._touch(slots, hit)
        return slots.to(out_device)

    def resident(self, page_ids) -> torch.Tensor:
        """Like :meth:`lookup` without counting or refreshing anything."""
        ids, out_device = self._pages(page_ids)
        return self._page_slot[ids].to(out_device)

    def lru_order(self) -> list[int]:
        """Cached, unpinned pages from least to most recently used (the eviction order)."""
        slots = ((self._slot_page >= 0) & ~self._pinned).nonzero().squeeze(1)
        order = torch.argsort(self._last_use[slots])
        return self._slot_page[slots[order]].tolist()

    # ------------------------------------------------------------------ updates
    def admit(self, page_ids) -> torch.Tensor:
        """Make pages resident, filling misses from the host store into LRU victims.

        Pages are placed in the order given (put the most wanted first): free slots go first,
        then the least recently used unpinned pages not named in this call. Pages that find no
        slot (every slot pinned or named in the call) stay uncached and are counted in
        ``admit_overflow``. Every named page that is resident afterwards becomes the most
        recently used, in the order given. The fill is one batched :func:`gather_blocks`.

        Parameters
        ----------
        page_ids : torch.Tensor or sequence of int
            ``[n]`` page ids; repeats are allowed.

        Returns
        -------
        torch.Tensor
            ``[n]`` int64 slots after admission (-1 where none was found); on ``page_ids``'
            device.
        """
        ids, out_device = self._pages(page_ids)
        uniq = self._unique_in_order(ids)
        slots = self._page_slot[uniq]
        missing = uniq[slots < 0]
        if missing.numel():
            key = self._victim_keys()
            key[slots[slots >= 0]] = _NEVER  # pages named in this call stay
            k = min(missing.numel(), int((key < _NEVER).sum()))
            self.admit_overflow += missing.numel() - k
            if k:
                victims = torch.topk(key, k, largest=False, sorted=True).indices
                new_pages = missing[:k]
                old_pages = self._slot_page[victims]
                evicted = old_pages[old_pages >= 0]
                self._page_slot[evicted] = -1
                self._slot_page[victims] = new_pages
                self._page_slot[new_pages] = victims
                self._last_use[victims] = -1
                self.evictions += evicted.numel()
                self.admitted_blocks += k
                self._fill(new_pages, victims, evicted)
            slots = self._page_slot[uniq]
        self._touch(slots, slots >= 0)
        return self._page_slot[ids].to(out_device)

    def pin(self, page_ids) -> torch.Tensor:
        """Admit pages and keep them resident until :meth:`unpin` (sink and window pages).

        Returns
        -------
        torch.Tensor
            ``[n]`` int64 slots of the pages.

        Raises
        ------
        ValueError
            If the pinned pages would not fit in the cache; nothing is changed then.
        """
        ids, out_device = self._pages(page_ids)
        uniq = self._unique_in_order(ids)
        slots = self._page_slot[uniq]
        already = int(self._pinned[slots[slots >= 0]].sum())
        pinned = int(self._pinned.sum())
        if pinned + uniq.numel() - already > self.capacity:
            raise ValueError(
                f"GpuBlockCache: cannot pin {uniq.numel() - already} more pages: {pinned} of "
                f"{self.capacity} slots are pinned already"
            )
        self.admit(uniq)
        self._pinned[self._page_slot[uniq]] = True
        return self._page_slot[ids].to(out_device)

    def unpin(self, page_ids) -> None:
        """Let pages be evicted again (they keep their recency); uncached pages are ignored."""
        ids, _ = self._pages(page_ids)
        slots = self._page_slot[ids]
        self._pinned[slots[slots >= 0]] = False

    def invalidate(self, page_ids) -> None:
        """Drop the cached copies of pages (e.g. after their host copy changed); unpins them."""
        ids, _ = self._pages(page_ids)
        uniq = torch.unique(ids)
        slots = self._page_slot[uniq]
        cached = slots >= 0
        pages, slots = uniq[cached], slots[cached]
        if not pages.numel():
            return
        self._slot_page[slots] = -1
        self._last_use[slots] = -1
        self._pinned[slots] = False
        self._page_slot[pages] = -1
        with self._on_copy_stream():
            self._set_page_table(pages, torch.full_like(pages, -1))

    def write_back(self, page_ids) -> int:
        """Copy the cached blocks of pages back to the host store (GPU -> host, asynchronous on
        the current stream: synchronize before reading the host copy).

        Returns
        -------
        int
            Number of pages written (uncached pages are skipped).
        """
        ids, _ = self._pages(page_ids)
        uniq = torch.unique(ids)
        slots = self._page_slot[uniq]
        cached = slots >= 0
        pages, slots = uniq[cached], slots[cached]
        if pages.numel():
            with self._on_copy_stream(), self._timed("d2h"):
                _ops.gather_blocks(self.cache, self._src, slots, pages)
            self.d2h_bytes += pages.numel() * self.block_bytes
        return int(pages.numel())

    def wait_ready(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current one) wait for the last fill on ``copy_stream``."""
        if self._ready is not None:
            (stream or torch.cuda.current_stream(self.device)).wait_event(self._ready)

    # ------------------------------------------------------------------ internals
    def _pages(self, page_ids) -> tuple[torch.Tensor, torch.device]:
        if isinstance(page_ids, torch.Tensor):
            t, device = page_ids, page_ids.device
        else:
            t, device = torch.as_tensor(list(page_ids), dtype=torch.int64), torch.device("cpu")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"GpuBlockCache: page ids must be integers, got {t.dtype}")
        t = t.reshape(-1).to("cpu", torch.int64)
        bad = ((t < 0) | (t >= self.num_pages)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise IndexError(
                f"GpuBlockCache: page id {int(t[i])} (position {i}) out of range "
                f"[0, {self.num_pages})"
            )
        return t, device

    @staticmethod
    def _unique_in_order(ids: torch.Tensor) -> torch.Tensor:
        uniq, inverse = torch.unique(ids, return_inverse=True)
        first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(ids.numel()), reduce="amin")
        return uniq[torch.argsort(first)]

    def _touch(self, slots: torch.Tensor, mask: torch.Tensor) -> None:
        # One tick per position: a repeated page keeps the tick of its last occurrence.
        ticks = self._tick + torch.arange(slots.numel(), dtype=torch.int64)
        self._last_use.scatter_reduce_(0, slots[mask], ticks[mask], reduce="amax")
        self._tick += slots.numel()

    def _victim_keys(self) -> torch.Tensor:
        # Smallest key = evicted first: free slots (lowest index first), then by last use.
        key = self._last_use.clone()
        free = self._slot_page < 0
        key[free] = torch.arange(self.capacity, dtype=torch.int64)[free] - self.capacity
        key[self._pinned] = _NEVER
        return key

    @contextlib.contextmanager
    def _on_copy_stream(self):
        # Every transfer and page-table write goes through here, so they stay ordered among
        # themselves and after the work already queued on the current stream.
        if self._copy_stream is None:
            yield
            return
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            yield
        self._ready = torch.cuda.Event()
        self._ready.record(self._copy_stream)

    @contextlib.contextmanager
    def _timed(self, kind: str):
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            yield
            self._add_seconds(kind, time.perf_counter() - t0)
            return
        stream = torch.cuda.current_stream(self.device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        yield
        end.record(stream)
        self._pending.append((start, end, kind))
        self._drain(block=False)

    def _drain(self, block: bool) -> None:
        while self._pending:
            start, end, kind = self._pending[0]
            if block:
                end.synchronize()
            elif not end.query():
                return
            self._add_seconds(kind, start.elapsed_time(end) / 1000.0)
            self._pending.pop(0)

    def _add_seconds(self, kind: str, seconds: float) -> None:
        if kind == "h2d":
            self.h2d_seconds += seconds
        else:
            self.d2h_seconds += seconds

    def _fill(self, pages: torch.Tensor, slots: torch.Tensor, evicted: torch.Tensor) -> None:
        with self._on_copy_stream():
            with self._timed("h2d"):
                _ops.gather_blocks(self._src, self.cache, pages, slots)
            self.h2d_bytes += pages.numel() * self.block_bytes
            self._set_page_table(
                torch.cat([evicted, pages]), torch.cat([torch.full_like(evicted, -1), slots])
            )

    def _set_page_table(self, pages: torch.Tensor, slots: torch.Tensor) -> None:
        if self.device.type != "cuda":
            self.page_table[pages] = slots.to(torch.int32)
            return
        # One small pinned upload (host_copy): no wait for the GPU.
        pages, slots = to_device_rows([pages, slots], self.device)
        self.page_table[pages] = slots.to(torch.int32)


def combined_stats(caches: Iterable[GpuBlockCache], sync: bool = False) -> dict[str, int | float]:
    """Sum of :meth:`GpuBlockCache.stats` over caches (e.g. every layer)."""
    total: dict[str, int | float] = {}
    for cache in caches:
        for key, value in cache.stats(sync).items():
            total[key] = total.get(key, 0) + value
    return total
