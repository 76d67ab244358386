"""Reading device-side counters for the per-step metrics export without waiting for the GPU.

The offload kernels count page-cache hits and misses with atomics in a small device tensor
(``page_cache.shared_counters``). The worker's stats connector exports counters once per engine
step, from the model runner's thread, right after the step's kernels are queued. Reading the
tensor there (``tolist()``) would wait for the whole step to finish on the GPU, and under vLLM's
asynchronous scheduling (on by default) that wait removes the overlap of the next step's host
work with this step's kernels. :class:`CounterReader` instead starts a copy into pinned host
memory and returns the last copy that has finished: the export runs a step or so behind, never
backwards (each copy starts after the previous one finished, and the counters only grow).
"""

from __future__ import annotations

import torch

__all__ = ["CounterReader"]


class CounterReader:
    """A 1-d device counter tensor, readable exactly (:meth:`tolist`, synchronizes) or without
    waiting (:meth:`read_nowait`). Host tensors are always read exactly."""

    def __init__(self, counters: torch.Tensor):
        if counters.dim() != 1:
            raise ValueError(f"counters must be 1-d, got shape {tuple(counters.shape)}")
        self.counters = counters
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        self._last = [0] * counters.numel()

    def tolist(self) -> list:
        """The current values (waits for the kernels queued so far). Later :meth:`read_nowait`
        calls return these or newer: a copy in flight is older, so it is dropped."""
        self._last = self.counters.tolist()
        self._event = None
        return list(self._last)

    def zero_(self) -> None:
        """Zero the counters and forget any copy in flight (its values predate the reset)."""
        self.counters.zero_()
        self._event = None
        self._last = [0] * self.counters.numel()

    def read_nowait(self) -> list:
        """The values of the last finished copy; starts a new copy if none is in flight."""
        if not self.counters.is_cuda:
            return self.counters.tolist()
        if self._event is not None and self._event.query():
            self._last = self._host.tolist()
            self._event = None
        if self._event is None:
            if self._host is None:
                self._host = torch.zeros(self.counters.shape, dtype=self.counters.dtype, pin_memory=True)
            self._host.copy_(self.counters, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        return list(self._last)
