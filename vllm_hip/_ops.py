"""The compiled KV-offload ops (``vllm_hip._C``), their fake implementations and fallbacks.

Importing this module never fails. When the extension is built, its ops are registered under
``torch.ops.vllm_hip`` (schemas in ``csrc/bindings.cpp``) and the wrappers below call them; when it
is missing (``VLLM_HIP_SKIP_EXT=1``, a failed build, an ABI mismatch) one warning is logged and the
wrappers run pure-PyTorch equivalents with the same checks and the same exceptions, only slower.

Ops (all take and return ordinary tensors):

``alloc_pinned_mapped(int[] shape, ScalarType dtype) -> Tensor``
    Host tensor in pinned memory mapped into every GPU's address space.
``host_device_view(Tensor(a) host) -> Tensor(a)``
    CUDA tensor aliasing pinned host memory, so GPU kernels (Triton too) read it over PCIe.
``gather_blocks(Tensor src, Tensor! dst, Tensor src_idx, Tensor dst_idx) -> ()``
    ``dst[dst_idx[i]] = src[src_idx[i]]`` over dim 0, host<->GPU, GPU<->GPU or CPU<->CPU.

``gather_blocks`` runs on the current stream of the GPU involved. To overlap a transfer with
compute, call it under ``torch.cuda.stream(side_stream)`` after ``side_stream.wait_stream(main)``
and make the consumer wait on an event recorded after it (``vllm_hip.offload.GpuBlockCache`` does
this when given a ``copy_stream``). The op uploads its indices each call, so it is not meant to be
captured in a CUDA graph.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

__all__ = [
    "alloc_pinned_mapped",
    "built_with_cuda",
    "gather_blocks",
    "has_ops",
    "host_device_view",
]

logger = logging.getLogger(__name__)

try:
    from vllm_hip import _C  # noqa: F401  (loading the library registers torch.ops.vllm_hip.*)
except (ImportError, OSError) as exc:  # OSError: a dependent shared library failed to load
    _C = None
    logger.warning(
        "vllm_hip._C is not available (%s); KV-offload transfers use the pure-PyTorch fallback "
        "(build the extension with `pip install -e .` without VLLM_HIP_SKIP_EXT=1)",
        exc,
    )

# Tests switch this off to run the fallbacks on a machine that has the extension.
_USE_EXT = _C is not None


def has_ops() -> bool:
    """Whether the compiled ops are loaded (``torch.ops.vllm_hip.*`` exist)."""
    return _C is not None


def built_with_cuda() -> bool:
    """Whether the loaded extension has CUDA kernels (False without the extension)."""
    return has_ops() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "vllm_hip::gather_blocks", "CUDA"
    )


def _view_device(host: torch.Tensor) -> torch.device:
    # Mirrors host_device_view_cuda: a GPU view on the current device when one is present.
    if torch.cuda.device_count() > 0 and built_with_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return host.device


if _C is not None:

    @torch.library.register_fake("vllm_hip::alloc_pinned_mapped")
    def _alloc_pinned_mapped_fake(shape, dtype):
        return torch.empty(shape, dtype=dtype, device="cpu")

    # The schema declares the alias (true on both paths). torch.compile cannot functionalize a
    # custom op with an aliased output, so call this op outside compiled regions: it is a
    # setup-time op anyway.
    @torch.library.register_fake("vllm_hip::host_device_view")
    def _host_device_view_fake(host):
        device = _view_device(host)
        if device == host.device:
            return host.view_as(host)
        return torch.empty_strided(host.shape, host.stride(), dtype=host.dtype, device=device)

    @torch.library.register_fake("vllm_hip::gather_blocks")
    def _gather_blocks_fake(src, dst, src_idx, dst_idx):
        return None


# --------------------------------------------------------------------------- public wrappers
def alloc_pinned_mapped(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Allocate a host tensor in pinned memory that GPUs can address directly.

    Parameters
    ----------
    shape : sequence of int
        Shape of the tensor (contiguous).
    dtype : torch.dtype
        Element type.

    Returns
    -------
    torch.Tensor
        CPU tensor of ``shape``: pinned and mapped (``cudaHostAllocMapped | Portable``) when a GPU
        is present, ordinary memory otherwise. Contents are uninitialized.

    Raises
    ------
    torch.OutOfMemoryError
        If the allocation fails; the message names the requested bytes.
    ValueError
        On a negative dimension.
    """
    if _USE_EXT:
        return torch.ops.vllm_hip.alloc_pinned_mapped(list(shape), dtype)
    return _alloc_pinned_mapped_torch(shape, dtype)


def host_device_view(host: torch.Tensor) -> torch.Tensor:
    """View pinned host memory as a CUDA tensor (zero-copy, reads cross PCIe).

    Parameters
    ----------
    host : torch.Tensor
        CPU tensor in pinned memory (:func:`alloc_pinned_mapped` or ``Tensor.pin_memory()``).

    Returns
    -------
    torch.Tensor
        Same shape, strides and dtype on the current CUDA device, aliasing ``host`` and keeping it
        alive. Without a GPU: ``host`` itself (an alias), since the CPU sees host memory directly.

    Raises
    ------
    ValueError
        If a GPU is present and ``host`` is pageable memory, or ``host`` is not a CPU tensor.
    """
    if _USE_EXT:
        return torch.ops.vllm_hip.host_device_view(host)
    return _host_device_view_torch(host)


def gather_blocks(
    src: torch.Tensor, dst: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor
) -> None:
    """Copy blocks ``dst[dst_idx[i]] = src[src_idx[i]]`` over dim 0, in one batched transfer.

    Parameters
    ----------
    src : torch.Tensor
        ``[S, *block_shape]``; each block (``src[j]``) contiguous, any stride between blocks.
        Pinned host memory, a CUDA tensor, or (with a CPU ``dst``) any CPU tensor.
    dst : torch.Tensor
        ``[T, *block_shape]``, same dtype and block shape; written in place.
    src_idx, dst_idx : torch.Tensor
        ``[N]`` int64 on the CPU, ``0 <= src_idx < S``, ``0 <= dst_idx < T``, no repeated
        ``dst_idx``.

    Notes
    -----
    Host<->GPU and GPU<->GPU copies are asynchronous on the current stream of the GPU involved; a
    host ``dst`` is complete only after that stream is synchronized.

    Raises
    ------
    TypeError
        Index tensors not int64, or ``src``/``dst`` dtypes differ.
    IndexError
        An index out of range (the message names its position and value).
    ValueError
        Block shapes differ, blocks not contiguous, indices not 1-D CPU tensors of equal length,
        repeated destinations, pageable host memory paired with a GPU tensor.
    """
    if _USE_EXT:
        torch.ops.vllm_hip.gather_blocks(src, dst, src_idx, dst_idx)
    else:
        _gather_blocks_torch(src, dst, src_idx, dst_idx)


# --------------------------------------------------------------------------- pure-PyTorch fallbacks
def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        if s < 0:
            raise ValueError(f"alloc_pinned_mapped: negative dimension in shape {list(shape)}")
        n *= s
    return n


def _alloc_pinned_mapped_torch(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    nbytes = _nbytes(shape, dtype)
    try:
        # The caching host allocator uses cudaHostAlloc, which under UVA is mapped and portable.
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=torch.cuda.device_count() > 0)
    except RuntimeError as exc:
        raise torch.OutOfMemoryError(
            f"alloc_pinned_mapped: could not allocate {nbytes} bytes ({nbytes / 2**30:.3f} GiB) "
            f"of host memory: {exc}"
        ) from exc


class _CudaArrayOverHost:
    """``__cuda_array_interface__`` of a pinned host tensor viewed as bytes (holds it alive)."""

    def __init__(self, host: torch.Tensor):
        self._host = host
        es = host.element_size()
        self.__cuda_array_interface__ = {
            "shape": (*host.shape, es),
            "strides": (*(s * es for s in host.stride()), 1),
            "typestr": "|u1",
            # Under UVA the device address of cudaHostAlloc memory equals its host address.
            "data": (host.data_ptr(), False),
            "version": 3,
        }


def _host_device_view_torch(host: torch.Tensor) -> torch.Tensor:
    if host.device.type != "cpu":
        raise ValueError(f"host_device_view: expected a host (CPU) tensor, got {host.device}")
    if torch.cuda.device_count() == 0:
        return host.view_as(host)
    device = torch.device("cuda", torch.cuda.current_device())
    if host.numel() == 0:
        return torch.empty_strided(host.shape, host.stride(), dtype=host.dtype, device=device)
    if not host.is_pinned():
        raise ValueError(
            "host_device_view: host is in pageable host memory; the GPU can only reach pinned, "
            "mapped host memory (allocate it with alloc_pinned_mapped or Tensor.pin_memory())"
        )
    raw = torch.as_tensor(_CudaArrayOverHost(host), device=device)
    return raw.view(host.dtype).squeeze(-1)


def _check_rows(t: torch.Tensor, name: str) -> None:
    if t.dim() < 1:
        raise ValueError(f"gather_blocks: {name} must have at least one dimension")
    expected = 1
    for d in range(t.dim() - 1, 0, -1):
        if t.size(d) != 1 and t.stride(d) != expected:
            raise ValueError(
                f"gather_blocks: each block of {name} (dims 1..) must be contiguous, got shape "
                f"{list(t.shape)} and strides {list(t.stride())}"
            )
        expected *= t.size(d)


def _check_index(idx: torch.Tensor, name: str, limit: int, of: str) -> None:
    if idx.dtype != torch.int64:
        raise TypeError(f"gather_blocks: {name} must be an int64 tensor, got {idx.dtype}")
    if idx.device.type != "cpu":
        raise ValueError(
            f"gather_blocks: {name} must be a CPU tensor (indices are range-checked on the host "
            f"and uploaded in one copy), got a tensor on {idx.device}"
        )
    if idx.dim() != 1:
        raise ValueError(f"gather_blocks: {name} must be 1-D, got shape {list(idx.shape)}")
    bad = ((idx < 0) | (idx >= limit)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise IndexError(
            f"gather_blocks: {name}[{i}] = {int(idx[i])} is out of range for {of} with {limit} "
            "blocks"
        )


def _gather_blocks_torch(
    src: torch.Tensor, dst: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor
) -> None:
    for idx, name in ((src_idx, "src_idx"), (dst_idx, "dst_idx")):
        if idx.dtype != torch.int64:
            raise TypeError(f"gather_blocks: {name} must be an int64 tensor, got {idx.dtype}")
    if src_idx.dim() == 1 and dst_idx.dim() == 1 and src_idx.numel() != dst_idx.numel():
        raise ValueError(
            "gather_blocks: src_idx and dst_idx must have the same length, got "
            f"{src_idx.numel()} and {dst_idx.numel()}"
        )
    if src.dtype != dst.dtype:
        raise TypeError(
            f"gather_blocks: src and dst must have the same dtype, got {src.dtype} and {dst.dtype}"
        )
    _check_rows(src, "src")
    _check_rows(dst, "dst")
    if src.shape[1:] != dst.shape[1:]:
        raise ValueError(
            f"gather_blocks: src and dst blocks must have the same shape, got src "
            f"{list(src.shape)} and dst {list(dst.shape)} (dims 1.. must match)"
        )
    row_numel = dst[0].numel() if dst.size(0) else 0
    if dst.size(0) > 1 and row_numel and dst.stride(0) < row_numel:
        raise ValueError(
            f"gather_blocks: dst blocks overlap in memory (stride(0) = {dst.stride(0)} < "
            f"{row_numel} elements per block)"
        )
    if src.untyped_storage().data_ptr() == dst.untyped_storage().data_ptr() and src.numel():
        raise ValueError("gather_blocks: src and dst must not share storage")
    _check_index(src_idx, "src_idx", src.size(0), "src")
    _check_index(dst_idx, "dst_idx", dst.size(0), "dst")
    if torch.unique(dst_idx).numel() != dst_idx.numel():
        raise ValueError(
            "gather_blocks: dst_idx repeats a block; every destination block must be written at "
            "most once"
        )
    gpu = [t.device for t in (src, dst) if t.device.type == "cuda"]
    if len(gpu) == 2 and gpu[0] != gpu[1]:
        raise ValueError(f"gather_blocks: src and dst are on different GPUs ({gpu[0]}, {gpu[1]})")
    for t, name in ((src, "src"), (dst, "dst")):
        if gpu and t.device.type == "cpu" and not t.is_pinned():
            raise ValueError(
                f"gather_blocks: {name} is in pageable host memory; the GPU can only reach "
                "pinned, mapped host memory (allocate it with alloc_pinned_mapped or "
                "Tensor.pin_memory())"
            )
    if src_idx.numel() == 0:
        return
    rows = src.index_select(0, src_idx.to(src.device))
    dst.index_copy_(0, dst_idx.to(dst.device), rows.to(dst.device))
