"""CUDA graphs of one layer's attention on decode steps that reuse every cached selection.

Attention runs eagerly between vLLM's piecewise CUDA graphs, once per layer. On a decode step
that reuses its selections (three steps in four with the paper's 16/8/4 intervals) a layer's
work is a handful of small launches: the KV write, the page-cache write-through, two gathers
of the cached selection and the sparse attention kernel. At 1M tokens on an H200 those steps
took ~42 ms of host time for ~8 ms of GPU work. Here each layer captures that sequence once
per batch size and replays it.

A graph reads the addresses it was captured with, so everything it reads from the step lives in
static buffers: the step's metadata is copied into :class:`StepStatics` once per step (shared
by all layers), q/k/v into :class:`LayerStatics` per layer call, and the output copied out.
The layer's own state (KV cache, page cache, mask cache, RoPE tables) keeps its address from
step to step; a :func:`signature` of those addresses and the launch's host-side values picks
the graph, so a reallocated cache gets a new capture rather than a stale read.

:class:`HostGraphs` stands in for CUDA graphs on CPU (tests): it keeps the captured function
and calls it again on replay, with the objects it captured, which is what a graph reads.
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
from typing import Callable

import torch

from vllm_hip_kernels.query_blocks import QueryBlocks

logger = logging.getLogger(__name__)

#: Graphs kept per layer before the oldest is dropped (batch sizes x cache layouts seen).
MAX_GRAPHS_PER_LAYER = 16


class _Replay:
    def replay(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class CudaGraphs:
    """Captures on a side stream into one memory pool shared by every layer's graphs (they
    replay one after another on one stream, and none keeps a temporary of another alive)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device=device)

    def capture(self, fn: Callable[[], None]) -> _Replay:
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            # thread_local: vLLM's other threads may call into CUDA meanwhile
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                fn()
            finally:
                graph.capture_end()
        current.wait_stream(self.stream)
        return graph


class _HostReplay(_Replay):
    def __init__(self, fn: Callable[[], None]):
        self.fn = fn

    def replay(self) -> None:
        self.fn()


class HostGraphs:
    """CPU stand-in: capture keeps ``fn``; replay calls it."""

    def capture(self, fn: Callable[[], None]) -> _Replay:
        return _HostReplay(fn)


def runner_for(device: torch.device):
    return CudaGraphs(device) if device.type == "cuda" else HostGraphs()


# ---------------------------------------------------------------------------- static inputs
_QB_FIELDS = ("seq", "q_start", "q_len", "pos", "window_start")


@dataclass
class StepStatics:
    """Static copies of a decode step's device metadata, for graphs of ``rows`` decode rows."""

    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    qblocks: QueryBlocks
    key: tuple
    """What the buffers were sized for (part of every graph's signature)."""

    @classmethod
    def allocate(cls, slot_mapping, seq_lens, block_table, qb: QueryBlocks, key: tuple) -> "StepStatics":
        fields = {n: torch.empty_like(getattr(qb, n)) for n in _QB_FIELDS}
        blocks = QueryBlocks(**fields, max_q_len=qb.max_q_len, max_window_start=qb.max_window_start,
                             max_seq_len=qb.max_seq_len)  # fmt: skip
        return cls(torch.empty_like(slot_mapping), torch.empty_like(seq_lens), torch.empty_like(block_table),
                   blocks, key)  # fmt: skip

    def load(self, slot_mapping, seq_lens, block_table, qb: QueryBlocks) -> "StepStatics":
        """Copy this step's values in (device to device, queued: no host wait); the blocks' host
        ints are this step's (launchers size grids with them: the graph signature holds what
        a capture bakes in)."""
        self.slot_mapping.copy_(slot_mapping)
        self.seq_lens.copy_(seq_lens)
        self.block_table.copy_(block_table)
        fields = {}
        for n in _QB_FIELDS:
            fields[n] = getattr(self.qblocks, n)
            fields[n].copy_(getattr(qb, n))
        self.qblocks = QueryBlocks(**fields, max_q_len=qb.max_q_len, max_window_start=qb.max_window_start,
                                   max_seq_len=qb.max_seq_len)  # fmt: skip
        return self


_STEP_STATICS: dict[tuple, StepStatics] = {}


def _layout(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.dtype, str(t.device))


def step_statics(slot_mapping, seq_lens, block_table, qb: QueryBlocks) -> StepStatics:
    """The step's metadata in the static buffers of its shapes (one set per batch layout,
    process-wide: every layer's graphs of that layout read the same buffers)."""
    key = tuple(_layout(t) for t in (slot_mapping, seq_lens, block_table, qb.seq))
    st = _STEP_STATICS.get(key)
    if st is None:
        st = _STEP_STATICS[key] = StepStatics.allocate(slot_mapping, seq_lens, block_table, qb, key)
    return st.load(slot_mapping, seq_lens, block_table, qb)


@dataclass
class LayerStatics:
    """Static q/k/v/output of a layer call (shared by the layers of one shape: they run one
    after another)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor


_LAYER_STATICS: dict[tuple, LayerStatics] = {}


def layer_statics(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> LayerStatics:
    key = tuple(_layout(t) for t in (q, k, v, out))
    ls = _LAYER_STATICS.get(key)
    if ls is None:
        ls = _LAYER_STATICS[key] = LayerStatics(*(torch.empty_like(t, memory_format=torch.contiguous_format)
                                                  for t in (q, k, v, out)))  # fmt: skip
    ls.q.copy_(q)
    ls.k.copy_(k)
    ls.v.copy_(v)
    return ls


def reset() -> None:
    """Drop the process's static buffers (tests)."""
    _STEP_STATICS.clear()
    _LAYER_STATICS.clear()


def signature(*parts) -> tuple:
    """Tensors by address, shape, strides and dtype; anything else as it is."""
    sig = []
    for p in parts:
        if isinstance(p, torch.Tensor):
            sig.append((p.data_ptr(), tuple(p.shape), p.stride(), p.dtype))
        else:
            sig.append(p)
    return tuple(sig)


class LayerGraphs:
    """One layer's graphs by signature. A signature's first call runs eagerly on the static
    buffers (Triton compiles its kernels, which capture must not do); its second captures.

    A layer whose signatures keep changing (something it reads moves every step) would capture
    on every other step, far slower than running eagerly: after ``MAX_CAPTURES`` captures it
    stops (``enabled`` False) and says so once."""

    MAX_CAPTURES = 4 * MAX_GRAPHS_PER_LAYER

    def __init__(self, runner):
        self.runner = runner
        self.graphs: dict[tuple, _Replay] = {}
        self.warm: set[tuple] = set()
        self.captures = 0
        self.replays = 0
        self.enabled = True

    def run(self, sig: tuple, body: Callable[[], None]) -> None:
        graph = self.graphs.get(sig)
        if graph is None:
            if sig not in self.warm:
                if len(self.warm) >= self.MAX_CAPTURES:
                    self.warm.clear()
                self.warm.add(sig)
                body()
                return
            if len(self.graphs) >= MAX_GRAPHS_PER_LAYER:
                self.graphs.pop(next(iter(self.graphs)))
            try:
                graph = self.runner.capture(body)
            except Exception:
                # Nothing ran (a capture only records): run the step eagerly and keep serving.
                self.enabled = False
                logger.exception("INFINITEHIP: capturing a decode graph failed; this layer runs eagerly from now on")
                body()
                return
            self.graphs[sig] = graph
            self.captures += 1
            if self.captures >= self.MAX_CAPTURES:
                self.enabled = False
                logger.warning(
                    "INFINITEHIP: a layer captured %d decode graphs (its inputs move between "
                    "steps); it runs eagerly from now on", self.captures,
                )  # fmt: skip
        graph.replay()
        self.replays += 1
