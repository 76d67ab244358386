"""A serving step never makes the host wait for the GPU.

Attention runs eagerly between vLLM's CUDA graphs, once per layer: one operation that waits for
the GPU (a blocking copy, ``.item()``) makes the host sit out every kernel queued before it, and
the next layer's launches start late. A handful of them per step kept the GPU of the 1M-token
offload benchmark idle for most of each decode step (8.5 stream synchronizations a step, every
one behind a Python scalar assigned through an index tensor, which PyTorch copies to the GPU
from pageable memory).

On a GPU, PyTorch's sync debug mode turns any such wait into an error. On CPU the same steps run
under a dispatch mode that refuses the pattern that caused them: ``index_put`` of a 0-dim value
through integer index tensors (``t[idx] = 1``); ``index_fill_`` or a full-size value does not
copy.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("vllm")

from test_backend import (  # noqa: E402
    DEV, FakeLayer, PagedBatch, fresh_offload_state, make_impl, run_impl, small_sparse_config,
)
from vllm_hip import stats as hip_stats  # noqa: E402
from vllm_hip.masks import RowTracker  # noqa: E402

_INDEX_PUTS = {torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
               torch.ops.aten._index_put_impl_.default}  # fmt: skip


class ScalarIndexPuts(TorchDispatchMode):
    """Records what copies a Python number to the GPU on its way: ``index_put`` of a number (a
    0-dim tensor made for the call) through indices that are not all boolean masks (a mask goes
    to ``masked_fill_``, which takes the number on the host), and ``copy_`` of a number into one
    element (``t[i] = 1``)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default and args[1].dim() == 0 and not args[1]._is_view():
            # t[i] = x for a Python number x: x becomes a fresh 0-dim CPU tensor copied into
            # t[i] (fill_ takes the number on the host instead). Seen on the H200.
            self.found.append(f"{_caller()}: {func} of {args[1].item()!r} into an element")
        if func in _INDEX_PUTS:
            indices, values = args[1], args[2]
            masks_only = all(i is None or i.dtype == torch.bool for i in indices)
            # (Python's t[idx] = x also hands over a one-element tensor x as a 0-dim *view*:
            # that one already lives on the device.)
            if values.dim() == 0 and not values._is_view() and not masks_only:
                self.found.append(f"{_caller()}: {func} of {values.item()!r} into {tuple(args[0].shape)}")
        return func(*args, **kwargs)


def _caller() -> str:
    """The innermost frame of the package's code (where the assignment is written)."""
    frames = [f for f in traceback.extract_stack() if "/vllm_hip" in f.filename or "/triton_kernels/" in f.filename]
    return f"{frames[-1].filename.rsplit('/', 2)[-2:]}:{frames[-1].lineno}" if frames else "?"


@contextlib.contextmanager
def no_host_waits(found: list[str]):
    """Watch one step's host work: on a GPU every synchronizing call raises; everywhere the
    scalar index_puts are recorded into ``found``."""
    mode = ScalarIndexPuts()
    sync = torch.cuda.is_available()
    if sync:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with mode:
            yield
    finally:
        if sync:
            torch.cuda.set_sync_debug_mode("default")
        found += mode.found


def _serve(cfg, batch_invariant=False, watch=True):
    """Two layers through a decode step, a mixed step (row 1's prompt chunk beside row 0's
    decode), decode steps that refresh and reuse their masks, then row 0 alone (a batch whose
    reuse steps replay decode graphs); with offload, a page cache too small for a row's key
    list (admissions evict)."""
    fresh_offload_state()
    hq, hkv, d = 4, 2, 64
    batch = PagedBatch([620, 530], hq, hkv, d, torch.float32, seed=13, num_pages=120)
    layers = [FakeLayer(3), FakeLayer(4)]
    impls = []
    for _ in layers:
        impl = make_impl(cfg, hq, hkv, d)
        impl.batch_invariant = batch_invariant
        impls.append(impl)
    tracker = RowTracker(num_pages=120, max_rows=4, device=torch.device(DEV))
    for layer in layers:
        batch.prefill_context(0, 580, layer)
    found: list[str] = []
    around = (lambda: no_host_waits(found)) if watch else contextlib.nullcontext

    def step(spans, step_id, decode_rows):
        md, q, k, v = batch.step(cfg, spans, tracker=tracker, step_id=step_id, decode_rows=decode_rows,
                                 around=around)  # fmt: skip
        for impl, layer in zip(impls, layers):
            with around():
                run_impl(impl, layer, batch, md, q, k, v)

    step([(0, 580, 600)], 1, ())
    pos = 600
    for t, (lo, hi) in enumerate([(0, 200), (200, 400), (400, 520)]):
        step([(0, pos, pos + 1), (1, lo, hi)], 2 + t, (0,))
        pos += 1
    for t in range(4):
        step([(0, pos, pos + 1), (1, 520 + t, 521 + t)], 5 + t, (0, 1))
        pos += 1
    for t in range(6):  # row 0 alone: every other step reuses every selection with refresh (4, 2)
        step([(0, pos, pos + 1)], 9 + t, (0,))
        pos += 1
    return found


@pytest.mark.parametrize(
    "options,batch_invariant,refresh",
    [({}, False, (2, 1)), ({"offload": True, "offload_gpu_cache_tokens": 160}, False, (2, 1)),
     ({"offload": True, "offload_gpu_cache_tokens": 4096}, True, (2, 1)),
     ({"offload": True, "offload_gpu_cache_tokens": 4096}, False, (4, 2))],
    ids=["plain", "offload-evicting", "offload-batch-invariant", "offload-decode-graphs"],
)  # fmt: skip
def test_serving_steps_never_wait_for_the_gpu(options, batch_invariant, refresh):
    """(4, 2): decode steps that reuse every selection, replayed as decode graphs (captured in
    the unwatched first pass on a GPU)."""
    cfg = replace(small_sparse_config(refresh=refresh), **options)
    if torch.cuda.is_available():
        _serve(cfg, batch_invariant, watch=False)  # compile every kernel first, unwatched
    found = _serve(cfg, batch_invariant)
    assert not found, "scalar assigned through index tensors (a blocking copy on a GPU):\n" + "\n".join(found)
    if refresh == (4, 2):
        assert hip_stats.get_stats().decode_graph_replays > 0  # the graph path was watched too


def test_the_watch_sees_a_scalar_index_put():
    """The check itself: ``t[idx] = -1`` is seen, ``index_fill_`` and a mask are not."""
    t = torch.zeros(8, dtype=torch.int32)
    idx = torch.tensor([1, 3])
    mode = ScalarIndexPuts()
    with mode:
        t.index_fill_(0, idx, -1)
        t[t > 5] = 2
        t[idx] = torch.tensor([4, 5], dtype=torch.int32)
        t[idx[:1]] = torch.tensor([7], dtype=torch.int32)  # a one-element tensor: a 0-dim view
        t[2:4] = 3  # a slice: filled with the number on the host
        t[0].fill_(5)
    assert mode.found == []
    with mode:
        t[idx] = -1
        t[1] = 7
    assert len(mode.found) == 2 and "index_put" in mode.found[0] and "copy_" in mode.found[1]
