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


@triton.jit
def _copy_layer_pages_kernel(
    Src,
    Dst,
    SrcLayerOff,
    Layer,
    SrcIdx,
    DstIdx,
    n_per_layer,
    stride_src,
    stride_dst_layer,
    stride_dst,
    page_elems,
    word_bytes,
    BLOCK: tl.constexpr,
):
    """Grid ``(G * n_per_layer, cdiv(page_elems, BLOCK))``: row ``g = i // n_per_layer`` copies
    page ``SrcIdx[i]`` of layer ``Layer[g]`` (whose pages start ``SrcLayerOff[Layer[g]]`` bytes
    from ``Src``'s, elements of ``word_bytes``) to slot ``DstIdx[i]`` of that layer in ``Dst``
    (a stack with layer stride ``stride_dst_layer``); ``SrcIdx[i] < 0`` copies nothing."""
    i = tl.program_id(0)
    c = tl.program_id(1)
    s = tl.load(SrcIdx + i).to(tl.int64)
    if s >= 0:
        layer = tl.load(Layer + i // n_per_layer).to(tl.int64)
        src_base = tl.load(SrcLayerOff + layer) // word_bytes
        d = tl.load(DstIdx + i).to(tl.int64)
        off = c * BLOCK + tl.arange(0, BLOCK)
        m = off < page_elems
        x = tl.load(Src + src_base + s * stride_src + off, mask=m)
        tl.store(Dst + layer * stride_dst_layer + d * stride_dst + off, x, mask=m)


@triton.jit
def _mirror_rows_kernel(
    Main,
    Cache,
    SlotOfPage,
    SlotMapping,
    stride_main_page,
    stride_main_part,
    stride_main_tok,
    stride_cache_page,
    stride_cache_part,
    stride_cache_tok,
    page_size,
    row_elems,
    BLOCK: tl.constexpr,
):
    """Grid ``(num_tokens, 2)``: the key (axis 1 = 0) or value row of token ``t``, just written
    to ``Main`` at slot ``SlotMapping[t]``, copied to the same row of its page's cache slot when
    the page is cached (``SlotOfPage[page] >= 0``); padding (-1) and uncached pages copy
    nothing."""
    t = tl.program_id(0)
    part = tl.program_id(1)
    s = tl.load(SlotMapping + t).to(tl.int64)
    if s >= 0:
        page = s // page_size
        c = tl.load(SlotOfPage + page).to(tl.int64)
        if c >= 0:
            tok = s % page_size
            src = Main + page * stride_main_page + part * stride_main_part + tok * stride_main_tok
            dst = Cache + c * stride_cache_page + part * stride_cache_part + tok * stride_cache_tok
            for start in range(0, row_elems, BLOCK):
                off = start + tl.arange(0, BLOCK)
                m = off < row_elems
                tl.store(dst + off, tl.load(src + off, mask=m), mask=m)
