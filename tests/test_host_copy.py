"""Per-step host-to-GPU copies (vllm_hip_kernels.host_copy): right values, a private source,
and on a GPU no wait for the kernels queued before them."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vllm_hip_kernels.host_copy import to_device, to_device_rows  # noqa: E402
from vllm_hip_kernels.query_blocks import build_query_blocks  # noqa: E402


def test_copies_keep_values_and_rows_on_the_host():
    t = torch.arange(7, dtype=torch.int64)
    assert torch.equal(to_device(t, "cpu"), t)
    rows = to_device_rows([torch.arange(4, dtype=torch.int32), torch.ones(4, dtype=torch.int32)], "cpu")
    assert [r.tolist() for r in rows] == [[0, 1, 2, 3], [1, 1, 1, 1]]


def test_query_blocks_move_as_they_are():
    qsl = torch.tensor([0, 1, 70], dtype=torch.int32)
    qb = build_query_blocks(qsl, torch.tensor([500, 69], dtype=torch.int32), block_size_q=64,
                            sink_tokens=4, window_tokens=32)  # fmt: skip
    moved = qb.to("cpu")
    for name in ("seq", "q_start", "q_len", "pos", "window_start"):
        assert torch.equal(getattr(moved, name), getattr(qb, name)) and getattr(moved, name).dtype == torch.int32
    assert (moved.max_q_len, moved.max_window_start, moved.max_seq_len) == (qb.max_q_len, qb.max_window_start, qb.max_seq_len)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_copies_do_not_wait_for_queued_kernels_and_own_their_source():
    src = torch.arange(1000, dtype=torch.int64)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU work queued before the copies
    t0 = time.perf_counter()
    out = to_device(src, "cuda")
    qsl = torch.tensor([0, 1, 70], dtype=torch.int32)
    qb = build_query_blocks(qsl, torch.tensor([500, 69], dtype=torch.int32), block_size_q=64,
                            sink_tokens=4, window_tokens=32).to("cuda")  # fmt: skip
    waited = time.perf_counter() - t0
    src.zero_()  # the copy read a private pinned buffer, not this tensor
    torch.cuda.synchronize()
    assert waited < 0.2, f"the host waited {waited:.3f} s for the GPU"
    assert out.tolist() == list(range(1000))
    assert qb.seq.is_cuda and qb.q_len.tolist() == [1, 64, 5]
