"""A GPU cache of KV pages in front of the paged KV cache, as the kernels take it (offload, §6).

With KV offloading the paged cache lives in host memory; a per-layer GPU cache holds hot pages
(``vllm_hip.page_cache.DevicePageCache``). Sparse attention (keys and values) and mask estimation
(keys) read a page from the GPU cache when ``slot_of_page[page] >= 0`` and from the main cache
otherwise, and count both in ``counters``. The kernels address the cache through the main
cache's pointer plus an element offset (one pointer argument per tensor, so the same kernel
serves both paths); this module checks the two allocations agree on what that needs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["CachedPages", "COUNTER_SLOTS", "cache_offsets", "check_slot_table"]

#: Entries of ``CachedPages.counters`` the kernels add to (atomics), by index.
COUNTER_SLOTS = {
    "attn_rows": 0,  # key rows (token x kv head) sparse attention read
    "attn_hits": 1,  # of those, from the GPU cache
    "h2d_bytes": 2,  # bytes read from the main cache (host memory) on a miss, by any kernel
    "occupied": 3,  # GPU cache slots holding a page (the cache's own bookkeeping)
    "mask_rows": 4,  # key rows mask estimation (pruning) read
    "mask_hits": 5,  # of those, from the GPU cache
    "copy_bytes": 6,  # bytes of explicit page-cache fills (the cache's own bookkeeping)
}


class CachedPages(NamedTuple):
    """A GPU cache of pages in front of the paged KV cache.

    The kernels read a page from ``key_cache``/``value_cache`` at slot ``slot_of_page[page]``
    when that is >= 0 and from the main cache otherwise, and count both in ``counters``.
    """

    slot_of_page: torch.Tensor
    """int32 [num_pages] on the device: slot of each page in the cache, -1 if not cached."""
    key_cache: torch.Tensor
    """[num_slots, page_size, Hkv, D]: same dtype and in-page strides as the main key cache."""
    value_cache: torch.Tensor
    """[num_slots, page_size, Hkv, D]: same dtype and in-page strides as the main value cache."""
    counters: torch.Tensor
    """int64 [>= 7] on the device, added to (see :data:`COUNTER_SLOTS`)."""


def check_slot_table(cached: CachedPages, num_pages: int) -> None:
    slots = cached.slot_of_page
    if slots.dtype != torch.int32 or slots.dim() != 1 or slots.shape[0] < num_pages:
        raise ValueError(f"slot_of_page must be int32 [>= {num_pages}] (one entry per page)")
    cnt = cached.counters
    if cnt.dtype != torch.int64 or cnt.dim() != 1 or cnt.numel() < len(COUNTER_SLOTS):
        raise ValueError(f"page cache counters must be an int64 tensor of >= {len(COUNTER_SLOTS)} entries")


def cache_offsets(name: str, cache: torch.Tensor, main: torch.Tensor) -> tuple[int, int]:
    """(element offset of ``cache`` from ``main``, cache page stride) for a kernel that reads
    ``main + offset + slot * stride`` on a hit and ``main + page * main.stride(0)`` otherwise."""
    if cache.dim() != 4 or cache.shape[1:] != main.shape[1:] or cache.stride()[1:] != main.stride()[1:]:
        raise ValueError(
            f"page cache {name} must be [slots, {', '.join(map(str, main.shape[1:]))}] with "
            f"the main cache's in-page strides {main.stride()[1:]}, got "
            f"{tuple(cache.shape)} strides {cache.stride()}"
        )
    if cache.dtype != main.dtype or cache.device != main.device:
        raise ValueError(f"page cache {name} must be {main.dtype} on {main.device}")
    delta, rem = divmod(cache.data_ptr() - main.data_ptr(), main.element_size())
    if rem:
        raise ValueError("page cache and main cache must be aligned to the element size")
    return delta, cache.stride(0)
