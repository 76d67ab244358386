"""Host-to-GPU copies of small per-step tensors that never make the host wait for the GPU.

``t.to("cuda")`` from ordinary (pageable) host memory synchronizes: PyTorch ends a blocking copy
with a stream synchronization, and the driver may synchronize a ``non_blocking`` one from pageable
memory too, to stage it. Either way the host waits until every kernel queued before has run: once
per engine step in the metadata builder, that wait undoes vLLM's asynchronous scheduling (the next
step's host work can no longer overlap this step's kernels). A copy from pinned memory is truly
asynchronous, so these helpers copy into a *private* pinned buffer first (never the caller's
tensor, which its owner, e.g. vLLM's pinned input buffers, may overwrite before the copy runs).
PyTorch's caching host allocator keeps that buffer until the copy has run.
"""

from __future__ import annotations

import torch

__all__ = ["to_device", "to_device_rows"]


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t)
    return out


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` (a host tensor) on ``device``; to a GPU without waiting for its queued work."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return _pinned_copy(t).to(device, non_blocking=True)


def to_device_rows(tensors: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Several 1-d host tensors of one dtype and length on ``device`` in one copy (rows of one
    [len(tensors), n] tensor: each contiguous)."""
    device = torch.device(device)
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    return list(to_device(torch.stack(tensors), device).unbind(0))
