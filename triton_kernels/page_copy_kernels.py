"""Triton kernel of the masked page copy (launcher: ``vllm_hip_kernels.page_copy.copy_pages``)."""

import triton
import triton.language as tl


@triton.jit
def _copy_pages_kernel(
    Src,
    Dst,
    SrcIdx,
    DstIdx,
    stride_src,
    stride_dst,
    page_elems,
    BLOCK: tl.constexpr,
):
    """Grid ``(n, cdiv(page_elems, BLOCK))``: ``Dst[DstIdx[i]] = Src[SrcIdx[i]]`` where
    ``SrcIdx[i] >= 0``; entries with ``SrcIdx[i] < 0`` read and write nothing (so a fixed-size
    index list costs only the pages it names: the source may be host memory)."""
    i = tl.program_id(0)
    c = tl.program_id(1)
    s = tl.load(SrcIdx + i).to(tl.int64)
    if s >= 0:
        d = tl.load(DstIdx + i).to(tl.int64)
        off = c * BLOCK + tl.arange(0, BLOCK)
        m = off < page_elems
        x = tl.load(Src + s * stride_src + off, mask=m)
        tl.store(Dst + d * stride_dst + off, x, mask=m)
