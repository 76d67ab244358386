"""Copy whole pages between two paged tensors, skipping entries marked -1, without a host sync.

The GPU page cache of KV offloading (``vllm_hip.page_cache``) decides on the device which pages
to bring in; the index lists it produces have a fixed length with -1 padding, so the copy must
skip padding by itself. ``torch.index_copy_`` would read every listed page (host memory, over
PCIe), and the ``vllm_hip::gather_blocks`` op takes host-side indices (a sync to get them).
"""

from __future__ import annotations

import os

import torch

from vllm_hip_kernels.page_copy_kernels import _copy_pages_kernel

__all__ = ["copy_pages", "copy_pages_reference"]

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
    if dst.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
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
