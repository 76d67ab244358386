"""vLLM's scheduler with prefill chunks cut at query-block boundaries.

INFINITEHIP selects key blocks per *query block* (``block_size_q`` queries aligned to absolute
positions, ``vllm_hip_kernels.query_blocks``). vLLM cuts a long prompt into chunks wherever the
step's token budget runs out, and that depends on what else is in the batch. A cut inside a query
block splits it in two, each half gets its own selection, and the request's output then depends
on its neighbours in the batch. Cutting mid-prompt chunks at multiples of ``block_size_q`` keeps
every block whole: a prompt prefilled in any number of chunks selects exactly what it selects in
one pass. The cost is at most ``block_size_q - 1`` tokens of a step's budget per prefilling row.

vLLM already clips chunk ends for Mamba state caching (``_mamba_block_aligned_split``, called
for every prefill chunk when ``need_mamba_block_aligned_split`` is set); the mixin reuses that
hook, composing with vLLM's own clipping when the model does have Mamba layers. The plugin sets
``scheduler_cls`` to :class:`AlignedScheduler` or :class:`AlignedAsyncScheduler` (whichever
matches vLLM's choice of async scheduling) when INFINITEHIP is selected, ``align_prefill_chunks``
is on and the user named no scheduler class of their own.

What it does not align: a prefix-cache hit ends on a KV page boundary (``--block-size``, 16 by
default); the block straddling it is split. ``--block-size`` a multiple of ``block_size_q``
aligns those too.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_hip.config import InfiniteHipConfig

logger = logging.getLogger("vllm_hip")

__all__ = ["aligned_chunk_tokens", "AlignedScheduler", "AlignedAsyncScheduler", "scheduler_class_for"]


def aligned_chunk_tokens(start: int, num_new_tokens: int, prefill_end: int, align: int) -> int:
    """Tokens to schedule from ``start`` so that the chunk ends on a multiple of ``align``,
    unless it reaches ``prefill_end`` (the last chunk ends where the prompt does). 0 when the
    budget does not reach the next boundary: the request waits for the next step's full budget.
    """
    end = start + num_new_tokens
    if align <= 1 or end >= prefill_end:
        return num_new_tokens
    return max(end // align * align - start, 0)


class _AlignedChunks:
    """Mixin over vLLM's :class:`Scheduler` (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        vllm_config = self.vllm_config  # type: ignore[attr-defined]
        cfg = InfiniteHipConfig.from_vllm_additional_config(vllm_config.additional_config)
        sc = vllm_config.scheduler_config
        budget, rows = int(sc.max_num_batched_tokens), int(sc.max_num_seqs)
        threshold = int(sc.long_prefill_token_threshold or 0)
        align = cfg.block_size_q if cfg.align_prefill_chunks else 1
        # Decodes are scheduled first (one token per row), and long prefills may be capped at
        # long_prefill_token_threshold: what a prefill can still get must always reach the next
        # boundary, or a prompt could wait forever.
        if align > 1 and (budget < rows + align or 0 < threshold < align):
            logger.warning(
                "vllm-hip: prefill chunks are not aligned to query blocks: --max-num-batched-tokens"
                "=%d must be at least --max-num-seqs + block_size_q = %d, and "
                "long_prefill_token_threshold (%d) 0 or at least block_size_q (%d)",
                budget, rows + align, threshold, align,
            )
            align = 1
        self._hip_align = align
        self._hip_mamba_split = bool(self.need_mamba_block_aligned_split)  # type: ignore[has-type]
        if align > 1:
            self.need_mamba_block_aligned_split = True

    def _mamba_block_aligned_split(
        self,
        request: Any,
        num_new_tokens: int,
        num_new_local_computed_tokens: int = 0,
        num_external_computed_tokens: int = 0,
    ) -> int:
        if self._hip_mamba_split:
            num_new_tokens = super()._mamba_block_aligned_split(  # type: ignore[misc]
                request, num_new_tokens, num_new_local_computed_tokens,
                num_external_computed_tokens,
            )  # fmt: skip
        start = (
            request.num_computed_tokens + num_new_local_computed_tokens
            + num_external_computed_tokens
        )  # fmt: skip
        # num_tokens: the prompt, plus the outputs a request resumed after preemption recomputes
        return aligned_chunk_tokens(start, num_new_tokens, request.num_tokens, self._hip_align)


class AlignedScheduler(_AlignedChunks, Scheduler):
    """vLLM's synchronous scheduler with query-block-aligned prefill chunks."""


class AlignedAsyncScheduler(_AlignedChunks, AsyncScheduler):
    """vLLM's async scheduler (the default) with query-block-aligned prefill chunks."""


def scheduler_class_for(async_scheduling: bool) -> str:
    """Qualified name of the aligned scheduler matching vLLM's choice (pickled by name into the
    engine core process)."""
    cls = AlignedAsyncScheduler if async_scheduling else AlignedScheduler
    return f"{cls.__module__}.{cls.__qualname__}"
