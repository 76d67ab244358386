"""Host-resident KV cache for INFINITEHIP with ``offload: true``.

vLLM sizes its KV cache from ``--kv-cache-memory-bytes`` and allocates it as raw int8 buffers on
the GPU. With offload on, those buffers are carved instead from one pinned, GPU-mapped host
allocation and handed to vLLM as CUDA tensors aliasing host memory (UVA): the cache can be far
larger than the GPU, vLLM's scheduler, prefix caching and preemption see ordinary blocks, and the
Triton kernels read pages over PCIe through the same pointers (zero-copy).

In front of those reads each attention layer keeps a GPU cache of hot pages
(``vllm_hip.page_cache.DevicePageCache``, made by the backend on first use): the kernels read a
cached page from the GPU and only the others over PCIe.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vllm_hip import _ops
from vllm_hip.config import InfiniteHipConfig
from vllm_hip.offload import HostMemoryError, available_host_bytes

logger = logging.getLogger("vllm_hip")

#: Set when an INFINITEHIP layer is built with ``offload: true`` (model construction happens
#: before vLLM allocates the KV cache, in the same worker process).
_offload_requested = False

#: The INFINITEHIP options of the layers that asked for offload and their staging buffer's
#: tokens (their GPU buffers are sized from them at start-up).
_offload_config: InfiniteHipConfig | None = None
_staging_tokens: int | None = None

#: Fraction of available host memory the KV store may pin (the rest keeps the OS alive).
MAX_HOST_FRACTION = 0.9

#: GPU memory the start-up check leaves beside the offload buffers for activations and CUDA
#: graphs, which vLLM allocates later: this fraction of the GPU, at least GPU_HEADROOM_MIN bytes.
GPU_HEADROOM_FRACTION = 0.05
GPU_HEADROOM_MIN = 1 << 30


class GpuMemoryError(MemoryError):
    """The offload buffers on the GPU (page caches, prefill staging) would not fit."""


def request_offload(enabled: bool, config: InfiniteHipConfig | None = None,
                    staging_tokens: int | None = None) -> None:  # fmt: skip
    global _offload_requested, _offload_config, _staging_tokens
    _offload_requested = _offload_requested or enabled
    if enabled and config is not None:
        _offload_config, _staging_tokens = config, staging_tokens


def offload_requested() -> bool:
    return _offload_requested


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def allocate_host_resident(kv_cache_config: Any, device: torch.device | str) -> dict[str, torch.Tensor]:
    """vLLM's raw KV buffers (layer name → int8 tensor), carved from pinned mapped host memory.

    Mirrors vLLM's allocation: one buffer per ``kv_cache_tensors`` entry, shared by the layers it
    names; entries with ``block_stride > 0`` alias one packed backing. Raises
    :class:`HostMemoryError` naming the bytes asked and free when the host cannot hold it, and
    on a GPU :class:`GpuMemoryError` when the backend's GPU buffers for it would not fit
    (:func:`check_offload_gpu_memory`).
    """
    entries = list(kv_cache_config.kv_cache_tensors)
    packed = [e for e in entries if getattr(e, "block_stride", 0) > 0]
    plain = [e for e in entries if getattr(e, "block_stride", 0) <= 0]
    sizes = [int(e.size) for e in plain] + ([int(packed[0].size)] if packed else [])
    total = sum(sizes)
    free = available_host_bytes()
    if total > MAX_HOST_FRACTION * free:
        raise HostMemoryError(
            f"INFINITEHIP offload: the KV cache needs {total} bytes ({_gib(total)}) of pinned host "
            f"memory but only {free} bytes ({_gib(free)}) are free and at most "
            f"{MAX_HOST_FRACTION:.0%} of that may be pinned: lower --kv-cache-memory-bytes "
            f"to at most {int(MAX_HOST_FRACTION * free)}"
        )
    if torch.device(device).type == "cuda" and _offload_config is not None:
        check_offload_gpu_memory(kv_cache_config, device, _offload_config, staging_tokens=_staging_tokens)
    host = _ops.alloc_pinned_mapped([total], torch.int8)
    host.zero_()
    view = _ops.host_device_view(host) if torch.device(device).type == "cuda" else host
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for e in plain:
        t = view[offset : offset + int(e.size)]
        offset += int(e.size)
        for name in e.shared_by:
            out[name] = t
    if packed:
        t = view[offset : offset + int(packed[0].size)]
        for e in packed:
            for name in e.shared_by:
                out[name] = t
    logger.info(
        "vllm-hip: KV cache of %s in pinned host memory (GPU-mapped, read over PCIe)", _gib(total)
    )
    return out


def offload_gpu_bytes(kv_cache_config: Any, config: InfiniteHipConfig,
                      staging_tokens: int | None = None) -> dict[str, int]:  # fmt: skip
    """GPU bytes the backend allocates beside this host-resident KV cache (on first use):
    ``page_caches`` and ``staging`` (``offload_plan.gpu_buffer_bytes``)."""
    from vllm_hip.offload_plan import gpu_buffer_bytes

    layers, page_bytes, page_tokens = 0, 0, 1
    for group in kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        layers += len(group.layer_names)
        page_bytes = max(page_bytes, int(spec.page_size_bytes))
        page_tokens = int(spec.block_size)
    return gpu_buffer_bytes(layers=layers, num_pages=int(kv_cache_config.num_blocks),
                            page_tokens=page_tokens, page_bytes=page_bytes, config=config,
                            staging_tokens=staging_tokens)  # fmt: skip


def check_offload_gpu_memory(
    kv_cache_config: Any,
    device: torch.device | str,
    config: InfiniteHipConfig,
    mem_info: tuple[int, int] | None = None,
    staging_tokens: int | None = None,
) -> None:
    """Refuse at start-up offload buffers that the GPU could not hold later, when the first
    request would allocate them. ``mem_info``: (free, total) bytes, default
    ``torch.cuda.mem_get_info(device)``. Raises :class:`GpuMemoryError` naming the options."""
    need = offload_gpu_bytes(kv_cache_config, config, staging_tokens)
    free, total = mem_info if mem_info is not None else torch.cuda.mem_get_info(torch.device(device))
    headroom = max(GPU_HEADROOM_MIN, int(GPU_HEADROOM_FRACTION * total))
    room = free - headroom
    if sum(need.values()) <= room:
        return
    staging = (
        f"; prefill staging (offload_prefill_staging, one layer's pages of the longest request "
        f"plus a step's tokens, --max-model-len + --max-num-batched-tokens): {need['staging']} "
        f"bytes ({_gib(need['staging'])})"
        if need["staging"] else ""
    )  # fmt: skip
    raise GpuMemoryError(
        f"INFINITEHIP offload: its GPU buffers need {sum(need.values())} bytes "
        f"({_gib(sum(need.values()))}): page caches (offload_gpu_cache_tokens="
        f"{config.offload_gpu_cache_tokens} per layer): {need['page_caches']} bytes "
        f"({_gib(need['page_caches'])}){staging}; but only {free} bytes ({_gib(free)}) of GPU "
        f"memory are free, of which {headroom} ({_gib(headroom)}) stay for activations and CUDA "
        f"graphs: lower offload_gpu_cache_tokens"
        + (", set offload_prefill_staging to false or lower --max-model-len" if need["staging"] else "")
    )


def install_allocation_hooks() -> None:
    """Route vLLM's KV allocation (V1 and V2 model runners) here when offload was requested."""
    try:
        from vllm.v1.worker.gpu import attn_utils
    except ImportError:  # pragma: no cover - other vLLM layouts
        attn_utils = None
    if attn_utils is not None and not getattr(attn_utils._allocate_kv_cache, "_vllm_hip", False):
        original_v2 = attn_utils._allocate_kv_cache

        def _allocate_kv_cache(kv_cache_config, shared_layers, device):
            if not _offload_requested:
                return original_v2(kv_cache_config, shared_layers, device)
            return allocate_host_resident(kv_cache_config, device)

        _allocate_kv_cache._vllm_hip = True  # type: ignore[attr-defined]
        attn_utils._allocate_kv_cache = _allocate_kv_cache
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:  # pragma: no cover
        return
    original_v1 = GPUModelRunner._allocate_kv_cache_tensors
    if getattr(original_v1, "_vllm_hip", False):
        return

    def _allocate_kv_cache_tensors(self, kv_cache_config):
        if not _offload_requested:
            return original_v1(self, kv_cache_config)
        return allocate_host_resident(kv_cache_config, self.device)

    _allocate_kv_cache_tensors._vllm_hip = True  # type: ignore[attr-defined]
    GPUModelRunner._allocate_kv_cache_tensors = _allocate_kv_cache_tensors
