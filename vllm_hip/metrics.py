"""Prometheus export of the INFINITEHIP backend's stats on vLLM's own ``/metrics``.

The backend runs in worker processes (or Ray actors, possibly on other nodes) while
``/metrics`` is served by the API server. vLLM 0.26.0 already carries one free-form channel
from workers to the API server's Prometheus logger: KV-connector stats. This module plugs a
do-nothing KV connector, :class:`InfiniteHipStatsConnector`, into that channel::

    worker (every step, called by vLLM's model runner)
      InfiniteHipStatsConnector.get_kv_connector_stats()
        -> HipStats.snapshot_and_reset()             # vllm_hip.stats: counters the backend bumps
        -> InfiniteHipConnectorStats(data={...})     # pickled to the engine core (shm / Ray)
    engine core
      KVOutputAggregator.aggregate()                 # .aggregate() over TP/PP workers
      Scheduler.make_stats() -> SchedulerStats.kv_connector_stats = stats.data
                                                     # msgpack over ZMQ to the API server
    API server
      PrometheusStatLogger.record() -> KVConnectorProm.observe()
        -> InfiniteHipPromMetrics.observe(data, engine_idx)   # vllm:infinitehip_* series

The connector moves no KV data: scheduler-side it matches no tokens, worker-side its hooks
return at once. Because the Prometheus series are created by ``build_prom_metrics`` after
vLLM's logger has unregistered every ``vllm:*`` collector, they survive that purge, get
vLLM's ``model_name``/``engine`` labels, multiprocess-safe gauges when several API servers
run, and Ray metric classes under Ray Serve (where ``:`` becomes ``_`` in names).

Enable it with (``vllm serve`` flag; :func:`stats_connector_config` returns the dict)::

    --kv-transfer-config '{"kv_connector": "InfiniteHipStatsConnector",
                           "kv_connector_module_path": "vllm_hip.metrics",
                           "kv_role": "kv_producer"}'

or let the plugin inject it (:func:`install_engine_args_hook`). Stats need vLLM's stat
logging, which ``--disable-log-stats`` turns off.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.logger import init_logger
from vllm.v1.metrics.utils import create_metric_per_engine

from vllm_hip import stats as hip_stats

if TYPE_CHECKING:
    import torch
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = [
    "CONNECTOR_MODULE",
    "CONNECTOR_NAME",
    "COUNTERS",
    "GAUGES",
    "METRIC_PREFIX",
    "STAGE_REFRESHES",
    "InfiniteHipConnectorStats",
    "InfiniteHipPromMetrics",
    "InfiniteHipStatsConnector",
    "MetricSpec",
    "collect_step_stats",
    "enable_stats_connector",
    "install_engine_args_hook",
    "register_connector",
    "stats_connector_config",
    "uses_infinitehip",
    "with_stats_connector",
]

logger = init_logger(__name__)

#: Every series of this module starts with this (vLLM's convention for connector metrics:
#: ``vllm:nixl_*``, ``vllm:kv_offload_*``).
METRIC_PREFIX = "vllm:infinitehip_"
#: Name of the connector class, as ``kv_connector`` and in vLLM's connector registry.
CONNECTOR_NAME = "InfiniteHipStatsConnector"
#: Module vLLM imports the connector from (``kv_connector_module_path``).
CONNECTOR_MODULE = "vllm_hip.metrics"
#: Extra label of the per-stage refresh counter (0-based index into ``infinitehip.stages``).
STAGE_LABEL = "stage"


@dataclass(frozen=True)
class MetricSpec:
    """One exported series: the :class:`~vllm_hip.stats.HipStats` field it comes from."""

    field: str
    kind: str  # "counter" or "gauge"
    documentation: str

    @property
    def name(self) -> str:
        """Name given to prometheus_client (counters get ``_total`` appended on exposition)."""
        return METRIC_PREFIX + self.field

    @property
    def series(self) -> str:
        """Name of the sample in ``/metrics`` and in PromQL."""
        return self.name + "_total" if self.kind == "counter" else self.name


COUNTERS: tuple[MetricSpec, ...] = (
    MetricSpec("mask_cache_queries", "counter",
               "Decode (step x layer) pairs that needed a block selection (mask caching)."),
    MetricSpec("mask_cache_hits", "counter",
               "Decode (step x layer) pairs that reused the cached block selection."),
    MetricSpec("attn_cache_queries", "counter",
               "Offload: lookups in the GPU cache of keys/values read by sparse attention."),
    MetricSpec("attn_cache_hits", "counter",
               "Offload: sparse-attention lookups served from the GPU cache."),
    MetricSpec("mask_estimation_cache_queries", "counter",
               "Offload: lookups in the GPU cache of keys read by the pruning stages."),
    MetricSpec("mask_estimation_cache_hits", "counter",
               "Offload: pruning-stage key lookups served from the GPU cache."),
    MetricSpec("h2d_bytes", "counter",
               "Bytes moved from host memory to the GPU (cache fills and missed reads)."),
    MetricSpec("h2d_copy_bytes", "counter",
               "Of those, bytes of explicit copies (cache fills): the ones h2d_seconds covers."),
    MetricSpec("h2d_seconds", "counter", "Seconds spent in explicit host-to-GPU copies."),
    MetricSpec("selected_tokens", "counter",
               "Tokens selected by pruning, summed over attended queries (x layers)."),
    MetricSpec("attended_queries", "counter",
               "Queries (x layers) attended by sparse attention."),
    MetricSpec("prune_seconds", "counter",
               "Seconds in the pruning stages (only when backend timing is enabled)."),
    MetricSpec("attention_seconds", "counter",
               "Seconds in block-sparse attention (only when backend timing is enabled)."),
    MetricSpec("exact_fallbacks", "counter",
               "Steps attended exactly because the context fits sink + window + k."),
    MetricSpec("decode_graph_replays", "counter",
               "Layer steps served by replaying a CUDA graph (decode_graphs: decode-only steps)."),
    MetricSpec("decode_graph_captures", "counter",
               "CUDA graphs captured for decode steps (per layer and batch layout)."),
    MetricSpec("steps", "counter", "Forward steps that ran the INFINITEHIP backend."),
)

GAUGES: tuple[MetricSpec, ...] = (
    MetricSpec("gpu_cache_occupied_blocks", "gauge",
               "Offload: GPU cache slots holding a block, summed over layers and workers."),
    MetricSpec("gpu_cache_capacity_blocks", "gauge",
               "Offload: GPU cache slots in total, summed over layers and workers."),
    MetricSpec("gpu_cache_bytes", "gauge",
               "Offload: GPU memory of the KV page caches (all KV on the GPU), summed over layers and workers."),
)

STAGE_REFRESHES = MetricSpec(
    "stage_refreshes", "counter",
    "Decode (step x layer) pairs that reran a pruning stage (label stage: 0 = coarsest).",
)

assert tuple(s.field for s in COUNTERS) == hip_stats.COUNTER_FIELDS
assert tuple(s.field for s in GAUGES) == hip_stats.GAUGE_FIELDS


# ---------------------------------------------------------------------- stats container
@dataclass
class InfiniteHipConnectorStats(KVConnectorStats):
    """Increments of one or more workers over one or more steps, in a msgpack-safe dict::

        {"counters": {field: number},            # summed by aggregate()
         "stage_refreshes": [n_stage0, ...],     # summed element-wise
         "gauges": {worker_key: [occupied, capacity]}}   # latest value per worker

    Gauges are kept per worker so that merging workers sums them while merging steps of the
    same worker keeps its latest value.
    """

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {"counters": {}, "stage_refreshes": [], "gauges": {}}

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any], worker_key: str) -> InfiniteHipConnectorStats:
        counters = {f: snapshot[f] for f in hip_stats.COUNTER_FIELDS if snapshot.get(f)}
        gauges = {worker_key: [snapshot[f] for f in hip_stats.GAUGE_FIELDS]}
        return cls(data={
            "counters": counters,
            "stage_refreshes": list(snapshot.get("stage_refreshes", [])),
            "gauges": gauges,
        })

    def aggregate(self, other: KVConnectorStats) -> InfiniteHipConnectorStats:
        if not isinstance(other, InfiniteHipConnectorStats):
            raise TypeError(f"cannot aggregate {type(other).__name__} into {type(self).__name__}")
        mine = self.data["counters"]
        for name, value in other.data.get("counters", {}).items():
            mine[name] = mine.get(name, 0) + value
        stages = self.data["stage_refreshes"]
        for i, value in enumerate(other.data.get("stage_refreshes", [])):
            if i < len(stages):
                stages[i] += value
            else:
                stages.append(value)
        self.data["gauges"].update(other.data.get("gauges", {}))
        return self

    def reduce(self) -> dict[str, int | float]:
        """Summary for vLLM's periodic log line ("KV Transfer metrics: ...")."""
        c = self.data["counters"]

        def ratio(num: str, den: str) -> float:
            d = c.get(den, 0)
            return round(c.get(num, 0) / d, 4) if d else 0.0

        out: dict[str, int | float] = {
            "infinitehip_steps": c.get("steps", 0),
            "mask_cache_hit_rate": ratio("mask_cache_hits", "mask_cache_queries"),
            "attn_cache_hit_rate": ratio("attn_cache_hits", "attn_cache_queries"),
            "mask_estimation_cache_hit_rate": ratio(
                "mask_estimation_cache_hits", "mask_estimation_cache_queries"),
            "mean_selected_tokens": ratio("selected_tokens", "attended_queries"),
            "exact_fallbacks": c.get("exact_fallbacks", 0),
            "h2d_MB": round(c.get("h2d_bytes", 0) / 1e6, 3),
        }
        if c.get("h2d_seconds"):
            out["h2d_GBps"] = round(c.get("h2d_copy_bytes", 0) / c["h2d_seconds"] / 1e9, 3)
        for i, n in enumerate(self.data["stage_refreshes"]):
            out[f"stage{i}_refreshes"] = n
        gauges = list(self.data["gauges"].values())
        capacity = sum(g[1] for g in gauges)
        if capacity:
            out["gpu_cache_occupancy"] = round(sum(g[0] for g in gauges) / capacity, 4)
        return out

    def is_empty(self) -> bool:
        return (not any(self.data["counters"].values())
                and not any(self.data["stage_refreshes"])
                and not self.data["gauges"])


_worker_key: str | None = None
_last_gauges: list[Any] | None = None


def _get_worker_key() -> str:
    global _worker_key
    if _worker_key is None:
        _worker_key = f"{socket.gethostname()}/{os.getpid()}"
    return _worker_key


def collect_step_stats() -> InfiniteHipConnectorStats | None:
    """Increments of this process's :class:`~vllm_hip.stats.HipStats` since the last call.

    Called once per step by :meth:`InfiniteHipStatsConnector.get_kv_connector_stats` on every
    worker; returns None when nothing changed (vLLM then ships nothing). Gauges are sent
    when they change.
    """
    global _last_gauges
    # No GPU wait here: this runs on the model runner's thread once per step, and waiting
    # for the step's kernels would stall asynchronous scheduling (vllm_hip.counter_reader).
    snap = hip_stats.snapshot_and_reset(wait=False)
    gauges = [snap[f] for f in hip_stats.GAUGE_FIELDS]
    stats = InfiniteHipConnectorStats.from_snapshot(snap, _get_worker_key())
    if gauges == _last_gauges:
        stats.data["gauges"] = {}
    if stats.is_empty():
        return None
    _last_gauges = gauges
    return stats


# ---------------------------------------------------------------------- Prometheus side
def _num_stages(vllm_config: VllmConfig) -> int:
    try:
        from vllm_hip.config import InfiniteHipConfig

        cfg = InfiniteHipConfig.from_vllm_additional_config(
            getattr(vllm_config, "additional_config", None))
        return len(cfg.stages)
    except Exception:  # noqa: BLE001 - a bad config is reported by the backend, not here
        return 0


class InfiniteHipPromMetrics(KVConnectorPromMetrics):
    """``vllm:infinitehip_*`` series, registered when vLLM's Prometheus logger starts.

    Labels are vLLM's (``model_name``, ``engine``), plus ``stage`` on the stage counter.
    Metric classes come from vLLM (prometheus_client, or Ray's wrappers under Ray Serve).
    """

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[str, dict[int, Any]] = {}
        for spec in COUNTERS:
            metric = self._counter_cls(
                name=spec.name, documentation=spec.documentation, labelnames=labelnames)
            self._counters[spec.field] = create_metric_per_engine(metric, per_engine_labelvalues)
        self._gauges: dict[str, dict[int, Any]] = {}
        for spec in GAUGES:
            metric = self._gauge_cls(
                name=spec.name, documentation=spec.documentation, labelnames=labelnames,
                multiprocess_mode="mostrecent")
            self._gauges[spec.field] = create_metric_per_engine(metric, per_engine_labelvalues)
        self._stage_metric = self._counter_cls(
            name=STAGE_REFRESHES.name, documentation=STAGE_REFRESHES.documentation,
            labelnames=[*labelnames, STAGE_LABEL])
        self._stage_children: dict[tuple[int, int], Any] = {}
        # Workers send gauges only when they change: remember each worker's latest values.
        self._worker_gauges: dict[int, dict[str, list[float]]] = {}
        # Create the known stages now so that their series exist (at 0) before any refresh.
        for engine_idx in per_engine_labelvalues:
            for stage in range(_num_stages(vllm_config)):
                self._stage_child(engine_idx, stage)

    def _stage_child(self, engine_idx: int, stage: int) -> Any:
        key = (engine_idx, stage)
        child = self._stage_children.get(key)
        if child is None:
            values = [*self.per_engine_labelvalues[engine_idx], str(stage)]
            child = self._stage_children[key] = self._stage_metric.labels(*values)
        return child

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        data = transfer_stats_data
        for name, value in (data.get("counters") or {}).items():
            per_engine = self._counters.get(name)
            if per_engine is not None and value > 0:
                per_engine[engine_idx].inc(value)
        for stage, value in enumerate(data.get("stage_refreshes") or ()):
            if value > 0:
                self._stage_child(engine_idx, stage).inc(value)
        gauges = data.get("gauges")
        if gauges:
            known = self._worker_gauges.setdefault(engine_idx, {})
            known.update(gauges)
            for i, spec in enumerate(GAUGES):
                # A worker of an older vllm-hip may send fewer gauges: missing ones count 0.
                self._gauges[spec.field][engine_idx].set(sum(g[i] for g in known.values() if i < len(g)))


# ---------------------------------------------------------------------- the connector
class InfiniteHipConnectorMetadata(KVConnectorMetadata):
    """Nothing travels from scheduler to workers."""


class InfiniteHipStatsConnector(KVConnectorBase_V1, SupportsHMA):
    """A KV connector that transfers no KV: it only carries :mod:`vllm_hip.stats` to
    ``/metrics``. It supports the hybrid KV cache manager, so enabling it does not turn HMA
    off, and it can sit inside vLLM's ``MultiConnector`` beside a real connector."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)

    # worker side ------------------------------------------------------------------
    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        return

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_kv_connector_stats(self) -> InfiniteHipConnectorStats | None:
        # The scheduler-side instance may share the process (single-GPU engine core): only
        # the worker side reads the counters, so nothing is counted twice.
        if self.role != KVConnectorRole.WORKER:
            return None
        return collect_step_stats()

    # scheduler side ---------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        return

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return InfiniteHipConnectorMetadata()

    def request_finished_all_groups(self, request: Request,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, None]:
        return False, None

    # stats plumbing ---------------------------------------------------------------
    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> InfiniteHipConnectorStats:
        return InfiniteHipConnectorStats(data=copy.deepcopy(data) if data else {})

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> InfiniteHipPromMetrics:
        return InfiniteHipPromMetrics(vllm_config, metric_types, labelnames,
                                      per_engine_labelvalues)


# ---------------------------------------------------------------------- configuration
def register_connector() -> None:
    """Add the connector to vLLM's registry by name (idempotent).

    ``kv_connector_module_path`` alone is enough to run it; the registry entry is what
    vLLM's ``MultiConnector`` uses to rebuild child stats by class name in its log line.
    """
    try:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
    except ValueError:
        pass  # already registered


def stats_connector_config() -> dict[str, Any]:
    """The ``--kv-transfer-config`` value that enables the stats connector alone.

    ``kv_role`` is ``kv_producer`` on purpose: vLLM defers freeing KV blocks under async
    scheduling for *consumer* roles, and this connector consumes no KV.
    """
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_producer",
    }


def _is_ours(cfg: dict[str, Any]) -> bool:
    return cfg.get("kv_connector") == CONNECTOR_NAME


def with_stats_connector(kv_transfer_config: KVTransferConfig | dict[str, Any] | None
                         ) -> KVTransferConfig:
    """A KV-transfer config that also runs the stats connector.

    - None (or no connector): the stats connector alone;
    - already ours, or a ``MultiConnector`` that lists ours: unchanged;
    - a ``MultiConnector``: ours appended to its ``connectors``;
    - any other connector: wrapped in a ``MultiConnector`` ``[existing, ours]``; the existing
      connector keeps loading and saving KV exactly as before (ours matches no tokens).
    """
    from vllm.config import KVTransferConfig

    if kv_transfer_config is None:
        return KVTransferConfig(**stats_connector_config())
    if isinstance(kv_transfer_config, dict):
        kv_transfer_config = KVTransferConfig(**kv_transfer_config)
    cfg = kv_transfer_config
    if cfg.kv_connector is None:
        out = copy.deepcopy(cfg)
        for key, value in stats_connector_config().items():
            if key != "kv_role" or out.kv_role is None:
                setattr(out, key, value)
        return out
    if cfg.kv_connector == CONNECTOR_NAME:
        return cfg
    if cfg.kv_connector == "MultiConnector":
        children = list(cfg.kv_connector_extra_config.get("connectors", []))
        if any(_is_ours(c) for c in children):
            return cfg
        out = copy.deepcopy(cfg)
        out.kv_connector_extra_config["connectors"] = [*children, stats_connector_config()]
        return out
    child = {f.name: copy.deepcopy(getattr(cfg, f.name))
             for f in dataclasses.fields(cfg) if f.name != "engine_id"}
    logger.info("vllm-hip: wrapping KV connector %s in a MultiConnector with %s to export "
                "INFINITEHIP metrics", cfg.kv_connector, CONNECTOR_NAME)
    return KVTransferConfig(
        kv_connector="MultiConnector",
        kv_role=cfg.kv_role,
        engine_id=cfg.engine_id,
        kv_connector_extra_config={"connectors": [child, stats_connector_config()]},
    )


def enable_stats_connector(engine_args: Any) -> bool:
    """Set ``engine_args.kv_transfer_config`` so that the stats connector runs.

    Must run before ``engine_args.create_engine_config()`` (the VllmConfig decides at
    construction whether a connector exists). Returns False, and changes nothing, when vLLM's
    stat logging is disabled (``--disable-log-stats``): nothing would reach ``/metrics``.
    """
    if getattr(engine_args, "disable_log_stats", False):
        logger.warning("vllm-hip: --disable-log-stats is set, INFINITEHIP metrics are off")
        return False
    engine_args.kv_transfer_config = with_stats_connector(engine_args.kv_transfer_config)
    return True


def _backend_name(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        value = value.get("backend")
    elif hasattr(value, "backend") and not hasattr(value, "name"):
        value = value.backend
    return str(getattr(value, "name", value) or "").upper()


def uses_infinitehip(engine_args: Any) -> bool:
    """Whether these engine args select the INFINITEHIP backend (by ``--attention-backend``,
    ``--attention-config`` or an ``infinitehip`` entry in ``--additional-config``)."""
    names = {_backend_name(getattr(engine_args, "attention_backend", None)),
             _backend_name(getattr(engine_args, "attention_config", None))}
    # INFINITEHIP is an alias of the CUSTOM slot, so an already-resolved enum says CUSTOM.
    if names & {"INFINITEHIP", "CUSTOM"}:
        return True
    extra = getattr(engine_args, "additional_config", None)
    return isinstance(extra, dict) and "infinitehip" in extra


_HOOK_MARK = "_vllm_hip_stats_hook"


def install_engine_args_hook(
    should_enable: Callable[[Any], bool] = uses_infinitehip,
    engine_args_classes: Iterable[type] | None = None,
) -> bool:
    """Make ``EngineArgs.create_engine_config`` add the stats connector when
    ``should_enable(engine_args)`` holds. Idempotent; returns True when it patched.

    Call from the plugin's ``register()`` (it runs in the API server from
    ``EngineArgs.__post_init__``, before ``create_engine_config``).
    """
    if engine_args_classes is None:
        from vllm.engine.arg_utils import EngineArgs

        engine_args_classes = (EngineArgs,)
    patched = False
    for klass in engine_args_classes:
        original = klass.create_engine_config
        if getattr(original, _HOOK_MARK, False):
            continue
        klass.create_engine_config = _hooked(original, should_enable)
        patched = True
    return patched


def _hooked(original: Callable[..., Any], should_enable: Callable[[Any], bool]
            ) -> Callable[..., Any]:
    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        if should_enable(self):
            enable_stats_connector(self)
        return original(self, *args, **kwargs)

    setattr(create_engine_config, _HOOK_MARK, True)
    return create_engine_config


# MultiConnector rebuilds child stats through the registry by class name: register as soon
# as vLLM imports this module through kv_connector_module_path, in whichever process.
register_connector()
