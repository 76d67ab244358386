"""Copy whole pages between two paged tensors, skipping entries marked -1, without a host sync.

The GPU page cache of KV offloading (``vllm_hip.page_cache``) decides on the device which pages
to bring in; the index lists it produces have a fixed length with -1 padding, so the copy must
skip padding by itself. ``torch.index_copy_`` would read every listed page (host memory, over
PCIe), and the ``vllm_hip::gather_blocks`` op takes host-side indices (a sync to get them).
"""

from __future__ import annotations

import os

import torch
import triton

from vllm_hip_kernels.page_copy_kernels import (
    _copy_layer_pages_kernel,
    _copy_pages_kernel,
    _mirror_rows_kernel,
)

__all__ = [
    "copy_layer_pages",
    "copy_layer_pages_reference",
    "copy_pages",
    "copy_pages_reference",
    "layer_offsets",
    "mirror_rows",
    "mirror_rows_reference",
    "RowMirror",
]

_BLOCK = 1024
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _check(src: torch.Tensor, dst: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor):
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
        raise ValueError(
            f"pages differ: src {tuple(src.shape[1:])} {src.dtype}, dst {tuple(dst.shape[1:])} "
            f"{dst.dtype}"
        )
    for name, t in (("src", src), ("dst", dst)):
        if t.dim() < 2 or not t[:1].is_contiguous():
            raise ValueError(f"{name} must be [pages, ...] with contiguous pages")
    if src_idx.shape != dst_idx.shape or src_idx.dim() != 1:
        raise ValueError("src_idx and dst_idx must be 1-d of one length")
    for name, t in (("src_idx", src_idx), ("dst_idx", dst_idx)):
        if t.dtype not in (torch.int32, torch.int64) or t.device != dst.device:
            raise ValueError(f"{name} must be int32/int64 on {dst.device}")


def copy_pages(
    src: torch.Tensor, dst: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor
) -> None:
    """``dst[dst_idx[i]] = src[src_idx[i]]`` for every ``i`` with ``src_idx[i] >= 0``.

    Parameters
    ----------
    src, dst : torch.Tensor
        ``[pages, ...]`` with the same page shape and dtype, each page contiguous (pages may be
        strided). ``src`` may be a device view of pinned host memory.
    src_idx, dst_idx : torch.Tensor
        int32/int64 [n] on ``dst``'s device. Destinations of valid entries must be distinct.
    """
    _check(src, dst, src_idx, dst_idx)
    n = src_idx.shape[0]
    if n == 0:
        return
    if not _run_kernels_here(dst):
        copy_pages_reference(src, dst, src_idx, dst_idx)
        return
    s, d = _widest_views(src, dst)
    page_elems = s[0].numel()
    grid = (n, -(-page_elems // _BLOCK))
    _copy_pages_kernel[grid](
        s, d, src_idx, dst_idx, s.stride(0), d.stride(0), page_elems, BLOCK=_BLOCK
    )


def _widest_views(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tensors viewed as the widest integer type their pages allow (up to 8 bytes): an
    fp8 page moved as int64 takes 8x fewer loads, which matters when the source is host memory
    read across PCIe."""
    size = src.element_size()
    for wide in (8, 4, 2):
        if wide <= size or src.shape[-1] * size % wide:
            continue
        try:
            return src.view(_INT_OF_SIZE[wide]), dst.view(_INT_OF_SIZE[wide])
        except RuntimeError:  # a storage offset or stride that the wider type cannot express
            continue
    return src.view(_INT_OF_SIZE[size]), dst.view(_INT_OF_SIZE[size])


def copy_pages_reference(
    src: torch.Tensor, dst: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor
) -> None:
    """PyTorch reference of :func:`copy_pages` (synchronizes: it selects the valid entries)."""
    _check(src, dst, src_idx, dst_idx)
    keep = src_idx >= 0
    si = src_idx[keep].long()
    di = dst_idx[keep].long()
    dst[di] = src[si.to(src.device)].to(dst.device)


def _run_kernels_here(t: torch.Tensor) -> bool:
    return t.device.type != "cpu" or os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------ several layers at once
def layer_offsets(base: torch.Tensor, layers: list[torch.Tensor]) -> list[int]:
    """Byte offsets of each layer's cache from ``base``'s (the layers of an offloaded KV cache
    are views of one allocation, so one pointer and an offset per layer address them all)."""
    out = []
    for t in layers:
        if t.shape != base.shape or t.stride() != base.stride() or t.dtype != base.dtype:
            raise ValueError(
                f"layer caches differ: {tuple(t.shape)} {t.stride()} {t.dtype} vs "
                f"{tuple(base.shape)} {base.stride()} {base.dtype}"
            )
        out.append(t.data_ptr() - base.data_ptr())
    return out


def copy_layer_pages(
    src_base: torch.Tensor,
    src_layer_off: torch.Tensor,
    dst: torch.Tensor,
    layer: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
) -> None:
    """Page copies of several layers in one launch: for every row ``g`` and entry ``i`` with
    ``src_idx[g, i] >= 0``, ``dst[layer[g], dst_idx[g, i]] = page src_idx[g, i] of layer
    layer[g]``, whose pages lie ``src_layer_off[layer[g]]`` words from ``src_base``'s
    (:func:`layer_offsets`).

    Parameters
    ----------
    src_base : torch.Tensor
        ``[pages, ...]``, contiguous pages: one layer's cache (others are addressed from it).
    src_layer_off : torch.Tensor
        int64 [layers] on ``dst``'s device: bytes from ``src_base``'s first page to each layer's
        (:func:`layer_offsets`), multiples of the page's alignment.
    dst : torch.Tensor
        ``[layers, slots, ...]``, contiguous, ``src_base``'s page shape and dtype.
    layer : torch.Tensor
        int64 [G] on ``dst``'s device.
    src_idx, dst_idx : torch.Tensor
        int32/int64 [G, n] on ``dst``'s device; destinations of valid entries distinct per row.
    """
    _check(src_base, dst[0], src_idx.flatten(), dst_idx.flatten())
    if not dst.is_contiguous() or src_idx.dim() != 2 or layer.shape[0] != src_idx.shape[0]:
        raise ValueError("dst must be contiguous [layers, slots, ...] and layer one entry per row")
    g, n = src_idx.shape
    if g * n == 0:
        return
    if not _run_kernels_here(dst):
        copy_layer_pages_reference(src_base, src_layer_off, dst, layer, src_idx, dst_idx)
        return
    s, d = _widest_views(src_base, dst)
    page_elems = s[0].numel()
    grid = (g * n, -(-page_elems // _BLOCK))
    _copy_layer_pages_kernel[grid](
        s, d, src_layer_off, layer, src_idx.contiguous(), dst_idx.contiguous(), n,
        s.stride(0), d.stride(0), d.stride(1), page_elems, s.element_size(), BLOCK=_BLOCK,
    )  # fmt: skip


def copy_layer_pages_reference(
    src_base: torch.Tensor,
    src_layer_off: torch.Tensor,
    dst: torch.Tensor,
    layer: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
) -> None:
    """PyTorch reference of :func:`copy_layer_pages` (synchronizes)."""
    s, d = _widest_views(src_base, dst)
    for g, lay in enumerate(layer.tolist()):
        off = int(src_layer_off[lay]) // s.element_size()
        src_layer = torch.as_strided(s, s.shape, s.stride(), s.storage_offset() + off)
        copy_pages_reference(src_layer, d[lay], src_idx[g], dst_idx[g])


# ------------------------------------------------------------------ write-through
class RowMirror:
    """:func:`mirror_rows` for one ``(main, cache)`` pair, checked and laid out once: a decode
    step calls it once per layer, where each view and check would cost host time."""

    def __init__(self, main: torch.Tensor, cache: torch.Tensor):
        if (
            main.dim() < 4
            or main.shape[1] != 2
            or cache.shape[1:] != main.shape[1:]
            or cache.dtype != main.dtype
        ):
            raise ValueError(
                f"main {tuple(main.shape)} {main.dtype} and cache {tuple(cache.shape)} "
                f"{cache.dtype} must be [pages, 2, page_size, ...] of one row shape and dtype"
            )
        if not (main[0, 0, 0].is_contiguous() and cache[0, 0, 0].is_contiguous()):
            raise ValueError("token rows must be contiguous")
        self.main, self.cache = main, cache
        self.on_device = _run_kernels_here(cache)
        ms, cs = _widest_views(main, cache)
        self.args = (
            ms, cs, ms.stride(0), ms.stride(1), ms.stride(2), cs.stride(0), cs.stride(1),
            cs.stride(2), int(main.shape[2]), ms[0, 0, 0].numel(),
        )  # fmt: skip
        self.block = min(triton.next_power_of_2(ms[0, 0, 0].numel()), 1024)

    def __call__(self, slot_of_page: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        n = int(slot_mapping.shape[0])
        if n == 0:
            return
        if not self.on_device:
            mirror_rows_reference(self.main, self.cache, slot_of_page, slot_mapping)
            return
        ms, cs, *rest = self.args
        _mirror_rows_kernel[(n, 2)](ms, cs, slot_of_page, slot_mapping, *rest, BLOCK=self.block)


def mirror_rows(
    main: torch.Tensor, cache: torch.Tensor, slot_of_page: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Copy the key and value rows just written to ``main`` at ``slot_mapping`` (page *
    page_size + offset, -1 = padding) to the same rows of their pages' cache slots, for the
    pages that are cached (``slot_of_page[page] >= 0``): one launch keeps a GPU page cache equal
    to host memory, bit for bit, whatever the cache dtype.

    Parameters
    ----------
    main : torch.Tensor
        ``[pages, 2, page_size, ...]`` (a layer's KV cache; may be a device view of host memory),
        each token row contiguous.
    cache : torch.Tensor
        ``[slots, 2, page_size, ...]`` of the same row shape and dtype.
    slot_of_page : torch.Tensor
        int32 [>= pages] on ``cache``'s device.
    slot_mapping : torch.Tensor
        int32/int64 [num_tokens] on ``cache``'s device.
    """
    RowMirror(main, cache)(slot_of_page, slot_mapping)


def mirror_rows_reference(
    main: torch.Tensor, cache: torch.Tensor, slot_of_page: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """PyTorch reference of :func:`mirror_rows` (synchronizes)."""
    page_size = int(main.shape[2])
    for s in slot_mapping.tolist():
        if s < 0:
            continue
        page, tok = divmod(s, page_size)
        c = int(slot_of_page[page])
        if c >= 0:
            cache[c, :, tok] = main[page, :, tok].to(cache.device)
