"""Decode graphs (``vllm_hip.decode_graphs``): a layer's reuse-step attention replayed from a
capture gives what the eager path gives, step after step.

On CPU the capture is :class:`HostGraphs` (the captured function called again with the objects
it captured): a graph reads what it was captured with, so an input the replay does not refresh
(a metadata tensor made anew each step, a cache that moved) shows up here as a wrong output.
On a GPU the same tests run real CUDA graphs.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("vllm")

from test_backend import (  # noqa: E402
    DEV, FakeLayer, PagedBatch, fresh_offload_state, make_impl, run_impl, small_sparse_config,
)
from vllm_hip import decode_graphs  # noqa: E402
from vllm_hip.masks import RowTracker  # noqa: E402


def _decode_run(cfg, steps=12):
    """Two rows through decode steps (refreshing and reusing their selections), then row 1
    alone (a batch of one: other graphs), then both again. Returns every layer's output of
    every step and the impls."""
    fresh_offload_state()
    decode_graphs.reset()
    hq, hkv, d = 4, 2, 64
    lens = [620, 530]
    batch = PagedBatch([L + steps + 8 for L in lens], hq, hkv, d, torch.float32, seed=5, num_pages=140)
    layers = [FakeLayer(3), FakeLayer(4)]
    impls = [make_impl(cfg, hq, hkv, d) for _ in layers]
    tracker = RowTracker(num_pages=140, max_rows=4, device=torch.device(DEV))
    for i, L in enumerate(lens):
        for layer in layers:
            batch.prefill_context(i, L, layer)
    pos = list(lens)
    outs = []
    schedule = [(0, 1)] * steps + [(1,)] * 4 + [(0, 1)] * 4
    for step_id, rows in enumerate(schedule, start=1):
        spans = [(r, pos[r], pos[r] + 1) for r in rows]
        md, q, k, v = batch.step(cfg, spans, tracker=tracker, step_id=step_id, decode_rows=tuple(range(len(rows))))
        outs.append([run_impl(impl, layer, batch, md, q, k, v).clone() for impl, layer in zip(impls, layers)])
        for r in rows:
            pos[r] += 1
    return outs, impls


@pytest.mark.parametrize(
    "options",
    [{}, {"offload": True, "offload_gpu_cache_tokens": 160}, {"offload": True, "offload_gpu_cache_tokens": 4096}],
    ids=["plain", "offload-evicting", "offload"],
)
def test_replayed_reuse_steps_equal_eager(options):
    base = replace(small_sparse_config(refresh=(4, 2)), **options)
    eager, _ = _decode_run(replace(base, decode_graphs=False))
    graphed, impls = _decode_run(replace(base, decode_graphs=True))
    for step, (a, b) in enumerate(zip(eager, graphed), start=1):
        for layer, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(y, x, atol=0, rtol=0, msg=f"step {step}, layer {layer}")
    # the graph path ran: reuse steps replayed (two batch sizes, so at least two captures)
    for impl in impls:
        g = impl._graphs
        assert g is not None and g.captures >= 2 and g.replays >= 6, (g.captures, g.replays)


def test_graphs_off_or_refreshing_every_step_never_capture():
    _, impls = _decode_run(replace(small_sparse_config(refresh=(4, 2)), decode_graphs=False), steps=4)
    assert all(impl._graphs is None for impl in impls)
    _, impls = _decode_run(small_sparse_config(refresh=(1, 1)), steps=4)  # no step reuses
    assert all(impl._graphs is None or impl._graphs.replays == 0 for impl in impls)


def test_layer_graphs_warm_capture_replay_and_new_signatures():
    calls = []
    graphs = decode_graphs.LayerGraphs(decode_graphs.HostGraphs())
    graphs.run(("a",), lambda: calls.append("a"))  # first: eager (warm-up)
    assert (graphs.captures, graphs.replays, calls) == (0, 0, ["a"])
    graphs.run(("a",), lambda: calls.append("new body"))  # second: captured and replayed
    graphs.run(("a",), lambda: calls.append("ignored"))  # later: the captured one replays
    assert (graphs.captures, graphs.replays) == (1, 2) and calls == ["a", "new body", "new body"]
    graphs.run(("b",), lambda: calls.append("b"))  # another signature warms up on its own
    assert graphs.captures == 1 and calls[-1] == "b"


def test_a_layer_whose_inputs_keep_moving_stops_capturing():
    graphs = decode_graphs.LayerGraphs(decode_graphs.HostGraphs())
    for i in range(2 * graphs.MAX_CAPTURES + 2):
        if not graphs.enabled:
            break
        graphs.run((i // 2,), lambda: None)
    assert not graphs.enabled and graphs.captures == graphs.MAX_CAPTURES
    assert len(graphs.graphs) <= decode_graphs.MAX_GRAPHS_PER_LAYER


def test_signature_tells_moved_tensors_apart():
    a = torch.zeros(4)
    b = torch.zeros(4)
    assert decode_graphs.signature(a, 1) == decode_graphs.signature(a, 1)
    assert decode_graphs.signature(a, 1) != decode_graphs.signature(b, 1)
    assert decode_graphs.signature(a, 1) != decode_graphs.signature(a, 2)
    assert decode_graphs.signature(a[:2]) != decode_graphs.signature(a)


def test_a_failed_capture_runs_the_step_eagerly_and_stops_capturing():
    class Failing:
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    calls = []
    graphs = decode_graphs.LayerGraphs(Failing())
    graphs.run(("a",), lambda: calls.append(1))
    graphs.run(("a",), lambda: calls.append(2))
    assert calls == [1, 2] and not graphs.enabled and graphs.captures == 0
