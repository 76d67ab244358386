"""Host-resident KV allocation (offload: true): layout, aliasing, sizing errors, vLLM hooks."""

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
