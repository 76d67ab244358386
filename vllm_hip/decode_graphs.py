"""CUDA graphs of one layer's attention on decode steps.

Attention runs eagerly between vLLM's piecewise CUDA graphs, once per layer. On a decode step
that reuses its selections (three steps in four with the paper's 16/8/4 intervals) a layer's
work is a handful of small launches: the KV write, the page-cache write-through, two gathers
of the cached selection and the sparse attention kernel. At 1M tokens on an H200 those steps
took ~42 ms of host time for ~8 ms of GPU work. Here each layer captures that sequence once
per batch size and replays it. On a step where some rows refresh their selection (in a batch,
rows refresh on their own positions, so most steps of a large batch have some), pruning runs
eagerly first and leaves every row's selection in the mask cache, where the same graph reads
it.

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

from collections import OrderedDict
from dataclasses import dataclass
import logging
from typing import Callable

import torch

from vllm_hip_kernels.query_blocks import QueryBlocks

logger = logging.getLogger(__name__)


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
class _RowBuffers:
    """Static buffers by rows: one per (name, row shape, dtype, device), with room for the most
    rows asked so far. ``take`` hands out its first rows, a view at the same address for every
    row count, so a server's many batch sizes share one buffer (a block table of a 1M-token
    ``max_model_len`` is 256 KiB a row: one copy per batch size would add up to gigabytes)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def take(self, name: str, t: torch.Tensor, copy: bool = True) -> torch.Tensor:
        key = (name, tuple(t.shape[1:]), t.dtype, str(t.device))
        n = int(t.shape[0])
        buf = self.buffers.get(key)
        if buf is None or buf.shape[0] < n:
            # grown: graphs captured on the old buffer keep its address in their signature, so
            # they are not replayed on the new one (and the old memory is released)
            rows = max(8, 1 << max(n - 1, 0).bit_length(), 2 * buf.shape[0] if buf is not None else 0)
            buf = self.buffers[key] = torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
        view = buf[:n]
        if copy:
            view.copy_(t)  # device to device, queued: no host wait
        return view


_BUFFERS = _RowBuffers()
_QB_FIELDS = ("seq", "q_start", "q_len", "pos", "window_start")


@dataclass
class StepStatics:
    """A decode step's device metadata in static buffers (shared by every layer's graphs)."""

    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    qblocks: QueryBlocks
    """Static device fields; the host ints are this step's (launchers size grids with them:
    the graph signature holds what a capture bakes in)."""

    @property
    def layout(self) -> tuple:
        """The batch layout: graphs of one layout differ only if something moved."""
        return (self.qblocks.num_blocks, tuple(self.block_table.shape))

    def tensors(self) -> tuple:
        return (self.slot_mapping, self.seq_lens, self.block_table,
                *(getattr(self.qblocks, n) for n in _QB_FIELDS))  # fmt: skip


def step_statics(slot_mapping, seq_lens, block_table, qb: QueryBlocks) -> StepStatics:
    """Copy the step's metadata into the static buffers (once per step, for all layers)."""
    take = _BUFFERS.take
    fields = {n: take(f"qblocks.{n}", getattr(qb, n)) for n in _QB_FIELDS}
    blocks = QueryBlocks(**fields, max_q_len=qb.max_q_len, max_window_start=qb.max_window_start,
                         max_seq_len=qb.max_seq_len)  # fmt: skip
    return StepStatics(take("slot_mapping", slot_mapping), take("seq_lens", seq_lens),
                       take("block_table", block_table), blocks)  # fmt: skip


@dataclass
class LayerStatics:
    """Static q/k/v/output of a layer call (shared by all layers: they run one after another)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor


def layer_statics(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> LayerStatics:
    take = _BUFFERS.take
    return LayerStatics(take("q", q), take("k", k), take("v", v), take("out", out, copy=False))


def reset() -> None:
    """Drop the process's static buffers (tests)."""
    _BUFFERS.buffers.clear()


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
    """One layer's graphs by signature, least recently used dropped past ``MAX_GRAPHS``. A
    signature's first call runs eagerly on the static buffers (Triton compiles its kernels,
    which capture must not do); its second captures.

    Each batch layout (``layout``: the rows of the step) needs a graph of its own, and a server
    sees many. A layout captured again and again means something the layer reads moves between
    steps: the layer would capture on every other step, far slower than running eagerly, so
    when one layout holds ``MAX_RECAPTURES`` graphs it stops (``enabled`` False) and says so."""

    MAX_GRAPHS = 64
    MAX_RECAPTURES = 4

    def __init__(self, runner):
        self.runner = runner
        self.graphs: OrderedDict[tuple, tuple[_Replay, object]] = OrderedDict()
        """signature -> (graph, its batch layout)"""
        self.warm: set[tuple] = set()
        self.captures_of: dict[object, int] = {}
        self.captures = 0
        self.replays = 0
        self.enabled = True

    def run(self, sig: tuple, body: Callable[[], None], layout: object = None) -> str:
        """Run ``body``'s step: ``"eager"`` (warm-up or a failed capture), ``"captured"`` (and
        replayed) or ``"replayed"``."""
        entry = self.graphs.get(sig)
        graph = entry[0] if entry is not None else None
        if graph is None:
            if sig not in self.warm:
                if len(self.warm) >= 4 * self.MAX_GRAPHS:
                    self.warm.clear()
                self.warm.add(sig)
                body()
                return "eager"
            try:
                graph = self.runner.capture(body)
            except Exception:
                # Nothing ran (a capture only records): run the step eagerly and keep serving.
                self.enabled = False
                logger.exception("INFINITEHIP: capturing a decode graph failed; this layer runs eagerly from now on")
                body()
                return "eager"
            if len(self.graphs) >= self.MAX_GRAPHS:
                _, (_, dropped) = self.graphs.popitem(last=False)
                self.captures_of[dropped] -= 1  # dropped for room, not moved: not counted
            self.graphs[sig] = (graph, layout)
            self.captures += 1
            n = self.captures_of[layout] = self.captures_of.get(layout, 0) + 1
            if n >= self.MAX_RECAPTURES:
                self.enabled = False
                logger.warning(
                    "INFINITEHIP: a layer captured %d decode graphs for one batch layout (its "
                    "inputs move between steps); it runs eagerly from now on", n,
                )  # fmt: skip
            done = "captured"
        else:
            self.graphs.move_to_end(sig)
            done = "replayed"
        graph.replay()
        self.replays += 1
        return done
