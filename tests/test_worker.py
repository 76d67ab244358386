"""Host-resident KV allocation (offload: true): layout, aliasing, sizing errors, vLLM hooks."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from vllm_hip import worker
from vllm_hip.offload import HostMemoryError


def _config():
    e = lambda size, names, stride=0: SimpleNamespace(size=size, shared_by=names, block_stride=stride)  # noqa: E731
    return SimpleNamespace(kv_cache_tensors=[
        e(4096, ["layers.0.attn"]), e(4096, ["layers.1.attn", "layers.1.shared"]),
        e(8192, ["layers.2.attn"], stride=64), e(8192, ["layers.3.attn"], stride=64),
    ])


def test_buffers_are_carved_from_one_host_allocation():
    out = worker.allocate_host_resident(_config(), "cpu")
    assert set(out) == {"layers.0.attn", "layers.1.attn", "layers.1.shared", "layers.2.attn", "layers.3.attn"}
    assert out["layers.0.attn"].numel() == 4096 and out["layers.0.attn"].dtype == torch.int8
    assert out["layers.1.attn"].data_ptr() == out["layers.1.shared"].data_ptr()
    # Packed entries alias one backing, as in vLLM.
    assert out["layers.2.attn"].data_ptr() == out["layers.3.attn"].data_ptr()
    ptrs = sorted(t.data_ptr() for t in out.values())
    assert ptrs[-1] - ptrs[0] == 8192  # contiguous: 4096 + 4096, then the packed backing
    assert all(int(t.abs().sum()) == 0 for t in out.values())
    out["layers.0.attn"].fill_(3)
    assert int(out["layers.1.attn"].abs().sum()) == 0  # no overlap


def test_refuses_more_than_the_host_can_pin(monkeypatch):
    monkeypatch.setattr(worker, "available_host_bytes", lambda: 10_000)
    with pytest.raises(HostMemoryError, match=r"needs 16384 bytes .* only 10000 bytes .* at most 9000"):
        worker.allocate_host_resident(_config(), "cpu")


def _groups_config(num_blocks=65536, layers=32, page_bytes=16 * 2 * 8 * 128):
    """A vLLM-like KVCacheConfig: one attention group, 16-token pages of fp8 Llama-3.1-8B
    (2 x 8 kv heads x 128 dims a token)."""
    spec = SimpleNamespace(page_size_bytes=page_bytes, block_size=16)
    group = SimpleNamespace(kv_cache_spec=spec, layer_names=[f"layers.{i}.attn" for i in range(layers)])
    return SimpleNamespace(num_blocks=num_blocks, kv_cache_groups=[group], kv_cache_tensors=[])


def test_offload_gpu_bytes_are_page_caches_plus_one_layer_for_staging():
    from vllm_hip.config import InfiniteHipConfig

    cfg = InfiniteHipConfig(offload=True, offload_gpu_cache_tokens=16384)
    need = worker.offload_gpu_bytes(_groups_config(), cfg)
    assert need["staging"] == 65536 * 16 * 2048  # 1M tokens of one layer: 2 GiB
    per_layer = (16384 + 16) * 2048 + 4 * 65537 + 16 * 1025
    assert need["page_caches"] == 32 * per_layer
    off = worker.offload_gpu_bytes(_groups_config(), InfiniteHipConfig(offload=True, offload_prefill_staging=False))
    assert off["staging"] == 0
    # with the longest request plus a step's budget known, staging holds that much only
    capped = worker.offload_gpu_bytes(_groups_config(), cfg, staging_tokens=131072 + 8192)
    assert capped["staging"] == (139264 // 16) * 16 * 2048 and capped["page_caches"] == need["page_caches"]


def test_offload_gpu_buffers_that_cannot_fit_are_refused_at_start_up():
    from vllm_hip.config import InfiniteHipConfig

    cfg = InfiniteHipConfig(offload=True, offload_gpu_cache_tokens=16384)
    gib = 1 << 30
    worker.check_offload_gpu_memory(_groups_config(), "cuda", cfg, mem_info=(80 * gib, 80 * gib))
    with pytest.raises(worker.GpuMemoryError, match=r"offload_gpu_cache_tokens=16384.*offload_prefill_staging.*"
                       r"only 3221225472 bytes \(3.0 GiB\).*1073741824 \(1.0 GiB\) stay.*lower "
                       r"offload_gpu_cache_tokens, set offload_prefill_staging to false"):
        worker.check_offload_gpu_memory(_groups_config(), "cuda", cfg, mem_info=(3 * gib, 16 * gib))
    # without staging the page caches alone (~1 GiB) fit in the same room
    worker.check_offload_gpu_memory(
        _groups_config(), "cuda", replace(cfg, offload_prefill_staging=False),
        mem_info=(3 * gib, 16 * gib),
    )


def test_hooks_route_allocation_only_when_requested(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.v1.worker.gpu import attn_utils

    worker.install_allocation_hooks()
    worker.install_allocation_hooks()  # idempotent
    assert getattr(attn_utils._allocate_kv_cache, "_vllm_hip", False)
    calls = []
    monkeypatch.setattr(worker, "allocate_host_resident", lambda cfg, dev: calls.append(dev) or {})
    monkeypatch.setattr(worker, "_offload_requested", True)
    assert attn_utils._allocate_kv_cache(_config(), {}, "cpu") == {} and calls == ["cpu"]
