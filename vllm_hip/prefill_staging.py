"""Prefill over an offloaded KV cache: one layer's pages copied to the GPU in bulk.

With ``offload: true`` the KV cache lives in host memory. A decode step reads a few thousand
tokens per layer, which the GPU page cache (``vllm_hip.page_cache``) serves. A prefill chunk is
different: each of its query blocks (a 16K-token chunk has 256) samples keys of *every* earlier
chunk in pruning stage 1, so a chunk at context T reads ~T/16 key rows per block and head, all
over PCIe, and a 1M-token prompt would read tens of terabytes that way. One copy of the layer's
pages (2 GiB per layer for 1M tokens of Llama-3.1-8B in fp8) costs tens of milliseconds instead.

So on a step with prefill rows (``offload_prefill_staging``, on by default), each layer:

1. writes its new keys/values to host memory (as always);
2. copies every page of the step's prefill rows, up to each one's sequence length, from host
   memory into :class:`PrefillStaging`'s buffer, at the same page index (so the block table
   stays valid: the buffer is as large as one layer's KV cache);
3. runs mask estimation and sparse attention of those rows on the buffer as on a GPU-resident
   cache. Decode rows of the same step are launched apart and read through the page cache, as
   in a decode-only step: copying a long decode row's whole context on every prefill chunk
   would cost more than the chunk.

The layers take turns with the one buffer: they run one after another on one stream, so a
layer's copy starts after the previous layer's kernels are queued and the stream orders them.
"""

from __future__ import annotations

import torch

from vllm_hip_kernels.host_copy import to_device
from vllm_hip_kernels.page_copy import copy_pages

__all__ = ["PrefillStaging", "release_buffers", "step_pages"]

_BUFFERS: dict[tuple, "PrefillStaging"] = {}


def release_buffers() -> None:
    """Drop every staging buffer (tests; a later prefill step makes a new one)."""
    _BUFFERS.clear()


def step_pages(block_table: torch.Tensor, seq_lens_cpu: torch.Tensor, page_size: int) -> torch.Tensor:
    """The pages every row of the step reads: ``block_table[r, j]`` for ``j < ceil(seq_len_r /
    page_size)``, row after row, as one int64 list on ``block_table``'s device.

    The length is known on the host (from ``seq_lens_cpu``), so nothing waits for the GPU. A
    page shared by two rows (prefix caching) appears twice; copying it twice is harmless.
    """
    rows = int(seq_lens_cpu.shape[0])
    n_cpu = (seq_lens_cpu.long() + page_size - 1) // page_size
    total = int(n_cpu.sum())
    dev = block_table.device
    if total == 0:
        return torch.empty(0, dtype=torch.int64, device=dev)
    n = to_device(n_cpu, dev)
    row = torch.repeat_interleave(torch.arange(rows, device=dev), n, output_size=total)
    first = torch.cumsum(n, 0) - n
    col = torch.arange(total, device=dev) - first[row]
    return block_table[row, col].long()


class PrefillStaging:
    """A GPU buffer shaped like one layer's KV cache ``[num_pages, 2, page, Hkv, D]``.

    Get it with :meth:`for_cache` (one per device, page shape and dtype, shared by the layers).
    """

    def __init__(self, like: torch.Tensor, device: torch.device):
        self.buffer = torch.empty(like.shape, dtype=like.dtype, device=device)
        self.page_bytes = like[0].numel() * like.element_size()

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @classmethod
    def for_cache(cls, main: torch.Tensor) -> tuple["PrefillStaging", bool]:
        """The buffer for caches shaped like ``main`` on its device; ``True`` when it was made
        by this call (its bytes are then new GPU memory)."""
        key = (main.device, tuple(main.shape), main.dtype)
        made = key not in _BUFFERS
        if made:
            _BUFFERS[key] = cls(main, main.device)
        return _BUFFERS[key], made

    def fill(self, main: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
        """Copy ``main[pages]`` (host memory) to the same pages of the buffer; returns the
        buffer, which the kernels then read in place of ``main``."""
        if main.shape != self.buffer.shape or main.dtype != self.buffer.dtype:
            raise ValueError(
                f"staging buffer is {tuple(self.buffer.shape)} {self.buffer.dtype}, the cache "
                f"{tuple(main.shape)} {main.dtype}"
            )
        copy_pages(main, self.buffer, pages, pages)
        return self.buffer
