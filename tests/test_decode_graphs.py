"""Decode graphs (``vllm_hip.decode_graphs``): a layer's decode-step attention replayed from a
capture gives what the eager path gives, step after step, on steps that reuse their selections
and on steps that refresh them.

On CPU the capture is :class:`HostGraphs` (the captured function called again with the objects
it captured): a graph reads what it was captured with, so an input the replay does not refresh
(a metadata tensor made anew each step, a cache that moved) shows up here as a wrong output.
On a GPU the same tests run real CUDA graphs.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from test_backend import (  # noqa: E402
    DEV, FakeLayer, PagedBatch, fresh_offload_state, make_impl, run_impl, small_sparse_config,
)
from vllm_hip import decode_graphs  # noqa: E402
from vllm_hip import stats as hip_stats  # noqa: E402
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
    if cfg.rope_mode == "streaming":  # positions assigned in the kernels, keys cached rotated
        from vllm_hip import rope

        hf = SimpleNamespace(model_type="llama", rope_theta=10000.0, head_dim=d, rope_scaling=None)
        cos, sin = rope.rope_tables_from_config(hf, 1025, device=DEV)
        for impl in impls:
            impl._hf_config, impl._max_positions, impl.rope_handed_over = hf, 1024, False
        assert impls[0].keys_rotated
        for i in range(len(lens)):  # what the model hands every backend
            t = torch.arange(batch.q[i].shape[0], device=DEV)
            batch.q[i] = rope.apply_rope(batch.q[i], t, cos, sin)
            batch.k[i] = rope.apply_rope(batch.k[i], t, cos, sin)
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
    [{}, {"offload": True, "offload_gpu_cache_tokens": 160}, {"offload": True, "offload_gpu_cache_tokens": 4096},
     {"rope_mode": "streaming"}, {"refresh": (1, 1)}, {"refresh": (1, 1), "offload": True}],
    ids=["plain", "offload-evicting", "offload", "streaming-rope", "refresh-every-step", "offload-refresh-every-step"],
)
def test_replayed_decode_steps_equal_eager(options):
    options = dict(options)
    base = replace(small_sparse_config(refresh=options.pop("refresh", (4, 2))), **options)
    eager, _ = _decode_run(replace(base, decode_graphs=False))
    graphed, impls = _decode_run(replace(base, decode_graphs=True))
    for step, (a, b) in enumerate(zip(eager, graphed), start=1):
        for layer, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(y, x, atol=0, rtol=0, msg=f"step {step}, layer {layer}")
    # the graph path ran on refresh and reuse steps alike: of the 20 decode steps (two batch
    # sizes: two warm-ups and two captures) at least 16 replayed
    for impl in impls:
        g = impl._graphs
        assert g is not None and g.captures >= 2 and g.replays >= 16, (g.captures, g.replays)
    st = hip_stats.get_stats()  # what /metrics exports
    assert st.decode_graph_replays == sum(i._graphs.replays for i in impls)
    assert st.decode_graph_captures == sum(i._graphs.captures for i in impls)


def test_graphs_off_never_capture():
    _, impls = _decode_run(replace(small_sparse_config(refresh=(4, 2)), decode_graphs=False), steps=4)
    assert all(impl._graphs is None for impl in impls)


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


def test_many_batch_layouts_keep_capturing_but_a_moving_input_stops_the_layer():
    graphs = decode_graphs.LayerGraphs(decode_graphs.HostGraphs())
    # a server's batch sizes: each layout warms up, captures once and replays after
    for layout in range(3 * graphs.MAX_GRAPHS):
        for _ in range(3):
            graphs.run((layout, "same addresses"), lambda: None, layout=layout)
    assert graphs.enabled and graphs.captures == 3 * graphs.MAX_GRAPHS
    assert len(graphs.graphs) == graphs.MAX_GRAPHS  # least recently used dropped
    for layout in range(2 * graphs.MAX_GRAPHS):  # dropped for room and captured again: fine
        for _ in range(2):
            graphs.run((layout, "same addresses"), lambda: None, layout=layout)
    assert graphs.enabled
    # one layout whose signature changes every step (an input that moves)
    step = 0
    while graphs.enabled and step < 100:
        graphs.run(("moving", step // 2), lambda: None, layout="B=1")
        step += 1
    assert not graphs.enabled and graphs.captures_of["B=1"] == graphs.MAX_RECAPTURES


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


def test_static_buffers_share_one_address_across_batch_sizes():
    bufs = decode_graphs._RowBuffers()
    bt = torch.arange(12, dtype=torch.int32).view(3, 4)
    a = bufs.take("block_table", bt)
    b = bufs.take("block_table", bt[:1])
    assert a.data_ptr() == b.data_ptr() and torch.equal(a, bt) and torch.equal(b, bt[:1])
    assert len(bufs.buffers) == 1  # one buffer for every row count
    big = torch.zeros(40, 4, dtype=torch.int32)
    c = bufs.take("block_table", big)  # more rows than it has: a larger buffer
    assert c.shape == (40, 4) and bufs.buffers[("block_table", (4,), torch.int32, "cpu")].shape[0] >= 40
    out = bufs.take("out", torch.ones(2, 3), copy=False)
    assert out.shape == (2, 3)  # handed out, not filled
