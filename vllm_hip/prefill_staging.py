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
   memory into :class:`PrefillStaging`'s buffer, the rows one after another, with a block table
   of the buffer for them (:func:`stage_layout`). The buffer holds the longest request
   plus a step's token budget (:func:`staging_tokens`), not the whole KV cache;
3. runs mask estimation and sparse attention of those rows on the buffer as on a GPU-resident
   cache. Decode rows of the same step are launched apart and read through the page cache, as
   in a decode-only step: copying a long decode row's whole context on every prefill chunk
   would cost more than the chunk.

The layers take turns with the one buffer: they run one after another on one stream, so a
layer's copy starts after the previous layer's kernels are queued and the stream orders them.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_hip_kernels.host_copy import to_device_rows
from vllm_hip_kernels.page_copy import copy_pages

__all__ = ["PrefillStaging", "release_buffers", "stage_layout", "staged_rows", "staging_tokens"]

_BUFFERS: dict[tuple, "PrefillStaging"] = {}


def release_buffers() -> None:
    """Drop every staging buffer (tests; a later prefill step makes a new one)."""
    _BUFFERS.clear()


def staging_tokens(vllm_config: Any) -> int | None:
    """Tokens the staging buffer holds per layer: the longest request plus one step's token
    budget, which bounds what a step's prefill rows read (vLLM prefills long prompts in chunks,
    one at a time by default, beside short ones). None when the config does not say: the buffer
    then spans the whole KV cache."""
    try:
        return int(vllm_config.model_config.max_model_len) + int(
            vllm_config.scheduler_config.max_num_batched_tokens
        )
    except (AttributeError, TypeError, ValueError):
        return None


def _page_counts(seq_lens_cpu: torch.Tensor, page_size: int) -> torch.Tensor:
    """Pages each row reads (int64, host): ``ceil(seq_len / page_size)``."""
    return (seq_lens_cpu.long() + page_size - 1) // page_size


def staged_rows(is_prefill: torch.Tensor, seq_lens_cpu: torch.Tensor, page_size: int,
                capacity: int) -> torch.Tensor:  # fmt: skip
    """[num_reqs] bool (host): the prefill rows whose pages go to the buffer, in row order while
    they fit ``capacity`` pages. A row left out (a step reading more than the longest request
    and a token budget, e.g. several long prefix-cache hits at once) reads through the page
    cache instead: slower, same values."""
    pages = torch.where(is_prefill, _page_counts(seq_lens_cpu, page_size), 0)
    return is_prefill & (torch.cumsum(pages, 0) <= capacity)


def stage_layout(block_table: torch.Tensor, seq_lens_cpu: torch.Tensor,
                 page_size: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Where the rows' pages go in the buffer, laid out one row after another:

    - ``pages``: int64, ``block_table[r, j]`` for ``j < ceil(seq_len_r / page_size)``, row after
      row (rows of length 0 read none), the source of buffer page ``i``;
    - ``table``: int32, shaped like ``block_table``: row r's page j is buffer page
      ``first_r + j``; 0 past a row's length (never read).

    Both on ``block_table``'s device. The lengths are known on the host (``seq_lens_cpu``), so
    nothing waits for the GPU. A page shared by two rows (prefix caching) is copied twice,
    harmlessly.
    """
    n_cpu = _page_counts(seq_lens_cpu, page_size)
    total = int(n_cpu.sum())
    dev = block_table.device
    n, first = to_device_rows([n_cpu, torch.cumsum(n_cpu, 0) - n_cpu], dev)
    col = torch.arange(block_table.shape[1], device=dev)
    table = torch.where(col < n[:, None], first[:, None] + col, 0).to(torch.int32)
    if total == 0:
        return torch.empty(0, dtype=torch.int64, device=dev), table
    row = torch.repeat_interleave(torch.arange(n.shape[0], device=dev), n, output_size=total)
    pages = block_table[row, torch.arange(total, device=dev) - first[row]].long()
    return pages, table


class PrefillStaging:
    """A GPU buffer of ``pages`` KV pages shaped like a layer's ``[num_pages, 2, page, Hkv, D]``.

    Get it with :meth:`for_cache` (one per device, page shape, dtype and size, shared by the
    layers).
    """

    def __init__(self, like: torch.Tensor, pages: int, device: torch.device):
        self.buffer = torch.empty((pages, *like.shape[1:]), dtype=like.dtype, device=device)
        self.page_bytes = like[0].numel() * like.element_size()

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @property
    def num_pages(self) -> int:
        return int(self.buffer.shape[0])

    @classmethod
    def for_cache(cls, main: torch.Tensor, pages: int | None = None) -> tuple["PrefillStaging", bool]:
        """The buffer of ``pages`` pages (default: as many as ``main``) for caches shaped like
        ``main`` on its device; ``True`` when it was made by this call (its bytes are then new
        GPU memory)."""
        pages = int(main.shape[0]) if pages is None else pages
        key = (main.device, tuple(main.shape[1:]), main.dtype, pages)
        made = key not in _BUFFERS
        if made:
            _BUFFERS[key] = cls(main, pages, main.device)
        return _BUFFERS[key], made

    def fill(self, main: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
        """Copy ``main[pages[i]]`` (host memory) to buffer page ``i``; returns the buffer, which
        the staged launches read with :func:`stage_layout`'s table."""
        if main.shape[1:] != self.buffer.shape[1:] or main.dtype != self.buffer.dtype:
            raise ValueError(
                f"staging pages are {tuple(self.buffer.shape[1:])} {self.buffer.dtype}, the cache's "
                f"{tuple(main.shape[1:])} {main.dtype}"
            )
        n = int(pages.shape[0])
        if n > self.num_pages:
            raise ValueError(f"{n} pages to stage, the buffer holds {self.num_pages}")
        copy_pages(main, self.buffer, pages, torch.arange(n, device=pages.device))
        return self.buffer
