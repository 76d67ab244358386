"""Process-wide counters of the INFINITEHIP backend, cheap enough for the hot path.

The backend, the mask cache and the offload cache only bump plain numbers in one
:class:`HipStats` per process (:func:`get_stats`); nothing here formats, locks or talks to
Prometheus. Once per engine step the worker-side stats connector of :mod:`vllm_hip.metrics`
calls :meth:`HipStats.snapshot_and_reset` and ships the increments to vLLM's ``/metrics``.

Counters only grow; a snapshot returns the increments since the previous snapshot and moves the
baseline, so an increment made while a snapshot is being taken is never lost, only reported one
step later. Gauges (``gpu_cache_*``) are *set*, and a snapshot reports their current value.

Writers: one thread per worker process (the model runner's). A value may be a 0-d tensor
(``stats.attn_cache_hits += hits_tensor``); it is converted with ``float()`` at snapshot time,
which synchronizes the device once per step, so prefer host-side counts where they exist.
Counters the kernels bump on the device are attached as a whole (:meth:`attach_device_counters`);
the per-step export reads them without waiting for the GPU (``snapshot_and_reset(wait=False)``,
a step or so behind), everything else reads them exactly.

This module imports nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "COUNTER_FIELDS",
    "GAUGE_FIELDS",
    "HipStats",
    "get_stats",
    "reset_stats",
    "snapshot_and_reset",
]

#: Monotonic counters, in the order they are exported. ``stage_refreshes`` (one counter per
#: pruning stage) is kept apart because it is a list.
COUNTER_FIELDS: tuple[str, ...] = (
    "mask_cache_queries",
    "mask_cache_hits",
    "attn_cache_queries",
    "attn_cache_hits",
    "mask_estimation_cache_queries",
    "mask_estimation_cache_hits",
    "h2d_bytes",
    "h2d_copy_bytes",
    "h2d_seconds",
    "selected_tokens",
    "attended_queries",
    "prune_seconds",
    "attention_seconds",
    "exact_fallbacks",
    "decode_graph_replays",
    "decode_graph_captures",
    "steps",
)

#: Values that are set, not added: the latest value is exported.
GAUGE_FIELDS: tuple[str, ...] = (
    "gpu_cache_occupied_blocks", "gpu_cache_capacity_blocks", "gpu_cache_bytes",
)


def _num(value: Any) -> float | int:
    if isinstance(value, (int, float)):
        return value
    # A 0-d tensor (or anything number-like): one conversion per snapshot.
    f = float(value)
    return int(f) if f.is_integer() else f


@dataclass
class HipStats:
    """Counters of one process. Bump them through the ``record_*``/``add_*`` methods or ``+=``.

    "Queries"/"hits" pairs are exported as two counters and divided in PromQL, so a hit rate
    is always correct over any time window and across workers.
    """

    mask_cache_queries: int = 0
    """Decode (step × layer) pairs that needed a block selection (mask caching, §3)."""

    mask_cache_hits: int = 0
    """Of those, pairs that reused the cached selection instead of rerunning a stage."""

    attn_cache_queries: int = 0
    """Offload: lookups in the GPU cache of keys+values read by sparse attention (§6)."""

    attn_cache_hits: int = 0
    """Offload: of those, lookups served from the GPU cache (the rest went to host memory)."""

    mask_estimation_cache_queries: int = 0
    """Offload: lookups in the GPU cache of keys read by the pruning stages (§6)."""

    mask_estimation_cache_hits: int = 0
    """Offload: of those, lookups served from the GPU cache."""

    h2d_bytes: int = 0
    """Bytes moved from host memory to the GPU (cache fills and missed reads)."""

    h2d_copy_bytes: int = 0
    """Of those, the bytes of explicit copies (page-cache fills, the offload store's batched
    transfers): the ones ``h2d_seconds`` is spent on. Missed reads happen inside the attention
    and pruning kernels, whose transfer time cannot be told apart from their compute."""

    h2d_seconds: float = 0.0
    """Seconds spent in explicit host-to-GPU copies (0 where they are not timed)."""

    gpu_cache_occupied_blocks: int = 0
    """Gauge: GPU cache slots currently holding a block (offload), summed over layers."""

    gpu_cache_capacity_blocks: int = 0
    """Gauge: GPU cache slots in total (offload), summed over layers."""

    gpu_cache_bytes: int = 0
    """Gauge: GPU memory of the offload page caches (all the KV the GPU holds), summed over layers."""

    stage_refreshes: list[int] = field(default_factory=list)
    """Per pruning stage index (0 = coarsest): (step × layer) pairs that reran that stage."""

    selected_tokens: int = 0
    """Sum over attended queries of the tokens selected by pruning (k actually used)."""

    attended_queries: int = 0
    """Queries (× layers; a prefill query block that shares one selection counts once) attended
    by sparse attention: ``selected_tokens / attended_queries`` is the mean budget k."""

    prune_seconds: float = 0.0
    """Seconds in the pruning stages (only when ``timing_enabled``)."""

    attention_seconds: float = 0.0
    """Seconds in block-sparse attention (only when ``timing_enabled``)."""

    exact_fallbacks: int = 0
    """Steps attended exactly because the context fits sink + window + k."""

    decode_graph_replays: int = 0
    """Layer steps served by replaying a decode graph (``decode_graphs``)."""

    decode_graph_captures: int = 0
    """Decode graphs captured (one per layer and batch layout; many later ones mean something
    moves between steps)."""

    steps: int = 0
    """Forward steps that ran the backend."""

    timing_enabled: bool = False
    """Set by the backend when it measures ``prune_seconds``/``attention_seconds`` (timing
    costs a device synchronization, so it is off by default). Not exported."""

    _baseline: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _device_counters: list[tuple[Any, tuple[str, ...]]] = field(
        default_factory=list, repr=False, compare=False
    )

    def attach_device_counters(self, counters: Any, names: tuple[str, ...]) -> None:
        """Add a 1-d tensor whose entry i is added to field ``names[i]`` (a counter or gauge).

        Kernels bump such tensors on the device (atomics); reading them costs one transfer per
        snapshot instead of one per update. Anything with ``tolist()`` and ``zero_()`` will do;
        one that also has ``read_nowait()`` (``vllm_hip.counter_reader.CounterReader``) is read
        with it when a snapshot does not wait. Attaching the same object twice is a no-op.
        """
        unknown = [n for n in names if n not in COUNTER_FIELDS + GAUGE_FIELDS]
        if unknown:
            raise ValueError(f"unknown stats fields {unknown}")
        if not any(c is counters for c, _ in self._device_counters):
            self._device_counters.append((counters, tuple(names)))

    # ------------------------------------------------------------------ hot-path helpers
    def record_mask_lookup(self, hit: bool, n: int = 1) -> None:
        """``n`` (step × layer) pairs asked the mask cache; all hit or all missed."""
        self.mask_cache_queries += n
        if hit:
            self.mask_cache_hits += n

    def record_mask_lookups(self, queries: int, hits: int) -> None:
        self.mask_cache_queries += queries
        self.mask_cache_hits += hits

    def record_attn_cache(self, queries: int, hits: int) -> None:
        self.attn_cache_queries += queries
        self.attn_cache_hits += hits

    def record_mask_estimation_cache(self, queries: int, hits: int) -> None:
        self.mask_estimation_cache_queries += queries
        self.mask_estimation_cache_hits += hits

    def record_h2d(self, nbytes: int, seconds: float = 0.0) -> None:
        """An explicit host-to-GPU copy of ``nbytes`` that took ``seconds``."""
        self.h2d_bytes += nbytes
        self.h2d_copy_bytes += nbytes
        self.h2d_seconds += seconds

    def set_gpu_cache(self, occupied_blocks: int, capacity_blocks: int) -> None:
        self.gpu_cache_occupied_blocks = occupied_blocks
        self.gpu_cache_capacity_blocks = capacity_blocks

    def add_stage_refresh(self, stage: int, n: int = 1) -> None:
        """Stage ``stage`` (0-based index into ``config.stages``) reran ``n`` times."""
        refreshes = self.stage_refreshes
        if stage >= len(refreshes):
            if stage < 0:
                raise ValueError(f"stage index must be >= 0, got {stage}")
            refreshes.extend([0] * (stage + 1 - len(refreshes)))
        refreshes[stage] += n

    def record_selection(self, selected_tokens: int, queries: int = 1) -> None:
        """``queries`` queries attended ``selected_tokens`` selected tokens in total."""
        self.selected_tokens += selected_tokens
        self.attended_queries += queries

    def record_attended(self, queries: int, tokens_per_query: int) -> None:
        """``queries`` queries (or query blocks) each attended ``tokens_per_query`` selected
        tokens."""
        self.selected_tokens += queries * tokens_per_query
        self.attended_queries += queries

    def add_prune_seconds(self, seconds: float) -> None:
        self.prune_seconds += seconds

    def add_attention_seconds(self, seconds: float) -> None:
        self.attention_seconds += seconds

    def record_exact_fallback(self, n: int = 1) -> None:
        self.exact_fallbacks += n

    def record_decode_graph(self, captured: bool) -> None:
        """A layer step replayed a decode graph, captured for it first if ``captured``."""
        self.decode_graph_replays += 1
        self.decode_graph_captures += int(captured)

    def record_step(self, n: int = 1) -> None:
        self.steps += n

    # ------------------------------------------------------------------ export side
    def totals(self, wait: bool = True) -> dict[str, Any]:
        """Cumulative values since start (or :meth:`reset`), as plain Python numbers; with
        ``wait=False`` device counters as of their last finished copy (no GPU wait)."""
        out: dict[str, Any] = {name: _num(getattr(self, name)) for name in COUNTER_FIELDS}
        out["stage_refreshes"] = [_num(v) for v in self.stage_refreshes]
        for name in GAUGE_FIELDS:
            out[name] = _num(getattr(self, name))
        for counters, names in self._device_counters:
            nowait = not wait and hasattr(counters, "read_nowait")
            for name, value in zip(names, counters.read_nowait() if nowait else counters.tolist()):
                out[name] += value
        return out

    def snapshot_and_reset(self, wait: bool = True) -> dict[str, Any]:
        """Increments since the previous call (gauges: current values); moves the baseline.
        ``wait=False`` (the per-step export): device counters as :meth:`totals` reads them then.

        Returns
        -------
        dict
            ``{counter: delta for counter in COUNTER_FIELDS}``, ``"stage_refreshes"``: list of
            per-stage deltas (length = number of stages seen so far), and each of
            ``GAUGE_FIELDS``: its current value. Plain ints/floats only.
        """
        now = self.totals(wait)
        base = self._baseline
        delta: dict[str, Any] = {}
        for name in COUNTER_FIELDS:
            delta[name] = now[name] - base.get(name, 0)
        prev = base.get("stage_refreshes", [])
        delta["stage_refreshes"] = [
            v - (prev[i] if i < len(prev) else 0) for i, v in enumerate(now["stage_refreshes"])
        ]
        for name in GAUGE_FIELDS:
            delta[name] = now[name]
        self._baseline = now
        return delta

    def reset(self) -> None:
        """Zero every counter and gauge and the snapshot baseline (tests, benchmarks)."""
        for f in fields(self):
            if f.name in ("timing_enabled",):
                continue
            if f.name == "stage_refreshes":
                self.stage_refreshes = []
            elif f.name == "_baseline":
                self._baseline = {}
            elif f.name == "_device_counters":
                for counters, _ in self._device_counters:
                    counters.zero_()
            else:
                setattr(self, f.name, type(f.default)())


_STATS = HipStats()


def get_stats() -> HipStats:
    """The process-wide :class:`HipStats` (the same object for the life of the process, so the
    backend may keep a reference)."""
    return _STATS


def reset_stats() -> None:
    """Zero the process-wide stats in place (references stay valid)."""
    _STATS.reset()


def snapshot_and_reset(wait: bool = True) -> dict[str, Any]:
    """:meth:`HipStats.snapshot_and_reset` of the process-wide stats."""
    return _STATS.snapshot_and_reset(wait)
