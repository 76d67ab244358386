"""INFINITEHIP stats reach vLLM's /metrics, and every dashboard query works on a real Prometheus.

The end-to-end test drives the path a served model takes, with vLLM's own classes wherever
they run without a GPU: the worker-side stats connector snapshots HipStats, vLLM's
KVOutputAggregator merges two workers, the scheduler's payload goes through vLLM's msgpack
encoder/decoder (the engine core → API server hop), vLLM's PrometheusStatLogger records it,
prometheus_client serves the registry over HTTP as vLLM's /metrics does, and Debian's
`prometheus` binary scrapes it. Every PromQL expression of the committed dashboard JSON is
then evaluated through Prometheus' HTTP API. Not covered here (needs a GPU): a real engine
core and model runner calling the connector, and Ray.

Needs the `prometheus` binary (Debian: `apt-get install -y --no-install-recommends prometheus`);
that test skips without it.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

pytest.importorskip("vllm")

from vllm_hip import metrics, stats  # noqa: E402
from vllm_hip.stats import HipStats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "grafana" / "dashboards" / "infinitehip.json"
DEPLOY_PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"


# ---------------------------------------------------------------------- HipStats
def test_snapshot_returns_deltas_and_keeps_counters_cumulative():
    s = HipStats()
    s.record_mask_lookup(True, 6)
    s.record_mask_lookup(False, 2)
    s.add_stage_refresh(2, 3)
    s.set_gpu_cache(5, 10)
    s.record_h2d(4096, 0.5)
    first = s.snapshot_and_reset()
    assert first["mask_cache_queries"] == 8 and first["mask_cache_hits"] == 6
    assert first["stage_refreshes"] == [0, 0, 3]
    assert first["h2d_bytes"] == 4096 and first["h2d_seconds"] == 0.5
    assert first["gpu_cache_occupied_blocks"] == 5 and first["gpu_cache_capacity_blocks"] == 10

    s.record_mask_lookup(True)
    s.add_stage_refresh(0)
    s.add_stage_refresh(3, 2)  # a stage seen for the first time
    s.set_gpu_cache(7, 10)
    second = s.snapshot_and_reset()
    assert second["mask_cache_queries"] == 1 and second["mask_cache_hits"] == 1
    assert second["stage_refreshes"] == [1, 0, 0, 2]
    assert second["h2d_bytes"] == 0
    assert second["gpu_cache_occupied_blocks"] == 7  # gauges: current value, not a delta
    # Counters themselves never go back: nothing bumped concurrently is lost.
    assert s.mask_cache_queries == 9 and s.stage_refreshes == [1, 0, 3, 2]
    assert s.snapshot_and_reset()["mask_cache_queries"] == 0


def test_every_counter_has_a_recorder_and_reaches_the_snapshot():
    s = HipStats()
    s.record_mask_lookups(4, 3)
    s.record_attn_cache(10, 9)
    s.record_mask_estimation_cache(6, 3)
    s.record_h2d(100, 0.25)
    s.record_attended(queries=2, tokens_per_query=2048)
    s.record_selection(512, queries=1)
    s.add_prune_seconds(0.5)
    s.add_attention_seconds(0.25)
    s.record_exact_fallback()
    s.record_decode_graph(captured=True)
    s.record_decode_graph(captured=False)
    s.record_step(3)
    snap = s.snapshot_and_reset()
    assert snap == {
        "mask_cache_queries": 4, "mask_cache_hits": 3, "attn_cache_queries": 10,
        "attn_cache_hits": 9, "mask_estimation_cache_queries": 6,
        "mask_estimation_cache_hits": 3, "h2d_bytes": 100, "h2d_copy_bytes": 100, "h2d_seconds": 0.25,
        "selected_tokens": 2 * 2048 + 512, "attended_queries": 3, "prune_seconds": 0.5,
        "attention_seconds": 0.25, "exact_fallbacks": 1, "decode_graph_replays": 2,
        "decode_graph_captures": 1, "steps": 3, "stage_refreshes": [],
        "gpu_cache_occupied_blocks": 0, "gpu_cache_capacity_blocks": 0, "gpu_cache_bytes": 0,
    }


def test_tensor_counts_are_converted_once_at_snapshot():
    torch = pytest.importorskip("torch")
    s = HipStats()
    s.attn_cache_hits += torch.tensor(7)
    s.attn_cache_queries += torch.tensor(9)
    snap = s.snapshot_and_reset()
    assert snap["attn_cache_hits"] == 7 and type(snap["attn_cache_hits"]) is int
    s.attn_cache_hits += torch.tensor(1)
    assert s.snapshot_and_reset()["attn_cache_hits"] == 1


def test_reset_zeroes_in_place_and_process_stats_are_one_object():
    st = stats.get_stats()
    st.record_step(5)
    st.add_stage_refresh(1)
    stats.reset_stats()
    assert stats.get_stats() is st
    assert st.steps == 0 and st.stage_refreshes == [] and isinstance(st.h2d_seconds, float)
    st.record_step()
    assert stats.snapshot_and_reset()["steps"] == 1
    stats.reset_stats()


# ---------------------------------------------------------------------- stats container
def _stats(counters=None, stages=(), gauges=None):
    return metrics.InfiniteHipConnectorStats(data={
        "counters": dict(counters or {}), "stage_refreshes": list(stages),
        "gauges": dict(gauges or {}),
    })


def test_aggregate_sums_counters_and_stages_and_keeps_gauges_per_worker():
    a = _stats({"steps": 1, "mask_cache_queries": 4}, [1, 2], {"w0": [3, 10]})
    b = _stats({"steps": 1, "mask_cache_hits": 2}, [0, 1, 5], {"w1": [4, 10]})
    a.aggregate(b)
    assert a.data["counters"] == {"steps": 2, "mask_cache_queries": 4, "mask_cache_hits": 2}
    assert a.data["stage_refreshes"] == [1, 3, 5]
    # A later step of worker w0 replaces its gauge; w1 stays.
    a.aggregate(_stats({}, [], {"w0": [6, 10]}))
    assert a.data["gauges"] == {"w0": [6, 10], "w1": [4, 10]}
    red = a.reduce()
    assert red["mask_cache_hit_rate"] == 0.5 and red["gpu_cache_occupancy"] == 0.5
    assert red["stage2_refreshes"] == 5
    with pytest.raises(TypeError):
        a.aggregate(metrics.KVConnectorStats())


def test_empty_stats_and_round_trip_through_build_kv_connector_stats():
    assert metrics.InfiniteHipConnectorStats().is_empty()
    assert _stats({"steps": 0}).is_empty()
    assert not _stats({}, [0, 1]).is_empty()
    s = _stats({"steps": 2}, [1], {"w": [1, 2]})
    rebuilt = metrics.InfiniteHipStatsConnector.build_kv_connector_stats(s.data)
    assert rebuilt.data == s.data and rebuilt.data is not s.data
    assert metrics.InfiniteHipStatsConnector.build_kv_connector_stats(None).is_empty()


def test_collect_step_stats_sends_nothing_when_idle_and_gauges_only_on_change():
    stats.reset_stats()
    metrics.collect_step_stats()  # drain whatever earlier tests left
    assert metrics.collect_step_stats() is None
    st = stats.get_stats()
    st.set_gpu_cache(3, 8)
    first = metrics.collect_step_stats()
    assert first is not None and list(first.data["gauges"].values()) == [[3, 8, 0]]
    st.record_step()
    second = metrics.collect_step_stats()
    assert second.data["counters"] == {"steps": 1} and second.data["gauges"] == {}
    assert metrics.collect_step_stats() is None
    stats.reset_stats()
    metrics.collect_step_stats()


# ---------------------------------------------------------------------- configuration
def test_with_stats_connector_composes_with_existing_connectors():
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    alone = metrics.with_stats_connector(None)
    assert alone.kv_connector == metrics.CONNECTOR_NAME
    assert alone.kv_connector_module_path == "vllm_hip.metrics"
    assert alone.kv_role == "kv_producer" and not alone.is_kv_consumer
    # Supporting HMA keeps vLLM from turning the hybrid KV cache manager off.
    assert KVConnectorFactory.supports_hma_config(alone)
    assert metrics.with_stats_connector(alone) is alone
    empty = KVTransferConfig(kv_buffer_size=5.0)  # a config without a connector
    filled = metrics.with_stats_connector(empty)
    assert filled.kv_connector == metrics.CONNECTOR_NAME and filled.kv_role == "kv_producer"
    assert filled.kv_buffer_size == 5.0 and empty.kv_connector is None
    assert metrics.with_stats_connector(metrics.stats_connector_config()).kv_connector == (
        metrics.CONNECTOR_NAME)

    other = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both",
                             kv_connector_extra_config={"shared_storage_path": "/tmp/x"})
    wrapped = metrics.with_stats_connector(other)
    assert wrapped.kv_connector == "MultiConnector" and wrapped.kv_role == "kv_both"
    assert wrapped.engine_id == other.engine_id
    children = wrapped.kv_connector_extra_config["connectors"]
    assert children[0]["kv_connector"] == "ExampleConnector"
    assert children[0]["kv_connector_extra_config"] == {"shared_storage_path": "/tmp/x"}
    assert "engine_id" not in children[0]
    assert children[1] == metrics.stats_connector_config()
    # Each child builds a valid config the way MultiConnector does.
    for child in children:
        KVConnectorFactory.get_connector_class(
            KVTransferConfig(**child, engine_id=wrapped.engine_id))
    assert metrics.with_stats_connector(wrapped) is wrapped  # already listed: unchanged

    multi = KVTransferConfig(kv_connector="MultiConnector", kv_role="kv_both",
                             kv_connector_extra_config={"connectors": [
                                 {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}]})
    appended = metrics.with_stats_connector(multi)
    assert [c["kv_connector"] for c in appended.kv_connector_extra_config["connectors"]] == [
        "ExampleConnector", metrics.CONNECTOR_NAME]
    assert len(multi.kv_connector_extra_config["connectors"]) == 1  # input untouched


def test_enable_stats_connector_on_engine_args():
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model="m", additional_config={"infinitehip": {}})
    assert metrics.uses_infinitehip(args)
    assert metrics.enable_stats_connector(args)
    assert args.kv_transfer_config.kv_connector == metrics.CONNECTOR_NAME

    quiet = EngineArgs(model="m", disable_log_stats=True)
    assert not metrics.enable_stats_connector(quiet)
    assert quiet.kv_transfer_config is None

    assert not metrics.uses_infinitehip(EngineArgs(model="m"))
    assert metrics.uses_infinitehip(EngineArgs(model="m", attention_backend="infinitehip"))


def test_engine_args_hook_is_idempotent_and_runs_before_the_original():
    seen = []

    class FakeArgs:
        disable_log_stats = False
        kv_transfer_config = None
        attention_backend = "INFINITEHIP"

        def create_engine_config(self, usage_context=None):
            seen.append(self.kv_transfer_config)
            return "config"

    assert metrics.install_engine_args_hook(engine_args_classes=[FakeArgs])
    assert not metrics.install_engine_args_hook(engine_args_classes=[FakeArgs])
    assert FakeArgs().create_engine_config() == "config"
    assert seen[0].kv_connector == metrics.CONNECTOR_NAME

    other = FakeArgs()
    other.attention_backend = "FLASH_ATTN"
    other.create_engine_config()
    assert seen[1] is None


def test_connector_moves_no_kv_and_only_the_worker_side_reports():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    class Cfg:
        kv_transfer_config = metrics.with_stats_connector(None)

    stats.reset_stats()
    metrics.collect_step_stats()
    sched = metrics.InfiniteHipStatsConnector(Cfg(), KVConnectorRole.SCHEDULER)
    worker = metrics.InfiniteHipStatsConnector(Cfg(), KVConnectorRole.WORKER)
    assert sched.get_num_new_matched_tokens(None, 0) == (0, False)
    assert sched.request_finished_all_groups(None, ([1],)) == (False, None)
    assert isinstance(sched.build_connector_meta(None), metrics.InfiniteHipConnectorMetadata)
    stats.get_stats().record_step()
    assert sched.get_kv_connector_stats() is None  # same process: must not count twice
    assert worker.get_kv_connector_stats().data["counters"] == {"steps": 1}
    stats.reset_stats()
    metrics.collect_step_stats()


# ---------------------------------------------------------------------- vLLM plumbing
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
    }))
    return str(d)


def _vllm_config(model_dir: str, kv_transfer_config):
    from vllm.config import DeviceConfig, ModelConfig, VllmConfig

    mc = ModelConfig(model=model_dir, skip_tokenizer_init=True, served_model_name="tiny-hip",
                     dtype="float32")
    return VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"),
                      kv_transfer_config=kv_transfer_config,
                      additional_config={"infinitehip": {"refresh": "fast"}})


def _engine_step(connector, second_worker: metrics.InfiniteHipConnectorStats | None,
                 num_running: int = 2):
    """What happens to one step's stats between the workers and the API server."""
    from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    outs = [ModelRunnerOutput(req_ids=[], req_id_to_index={}, kv_connector_output=(
        KVConnectorOutput(kv_connector_stats=s))) for s in (connector.get_kv_connector_stats(),
                                                            second_worker)]
    merged = KVOutputAggregator(expected_finished_count=2).aggregate(outs)
    kv_stats = merged.kv_connector_output.kv_connector_stats
    sched = SchedulerStats(num_running_reqs=num_running,
                           kv_connector_stats=kv_stats.data if kv_stats else None)
    wire = MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=sched))
    return MsgpackDecoder(EngineCoreOutputs).decode(wire).scheduler_stats


def _exposition() -> str:
    from prometheus_client import REGISTRY, generate_latest

    return generate_latest(REGISTRY).decode()


def test_multiconnector_child_reaches_metrics_and_log_line(model_dir, caplog):
    """Beside another connector (vLLM's MultiConnector), our series and log line still work."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    kvt = metrics.with_stats_connector(
        {"kv_connector": "MultiConnector", "kv_role": "kv_both",
         "kv_connector_extra_config": {"connectors": []}})
    vc = _vllm_config(model_dir, kvt)
    worker = KVConnectorFactory.create_connector(vc, KVConnectorRole.WORKER, None)
    stats.reset_stats()
    metrics.collect_step_stats()
    prom = PrometheusStatLogger(vc, [0])
    st = stats.get_stats()
    st.record_mask_lookups(10, 7)
    st.record_step()
    sched = _engine_step(worker, None)
    prom.record(sched, None, engine_idx=0)
    text = _exposition()
    assert ('vllm:infinitehip_mask_cache_hits_total{engine="0",model_name="tiny-hip"} 7.0'
            in text)
    assert 'vllm:infinitehip_stage_refreshes_total{engine="0",model_name="tiny-hip",stage="2"}' \
        in text  # stages of the configured preset exist before any refresh
    logging_ = KVConnectorLogging(vc.kv_transfer_config)
    logging_.observe(sched.kv_connector_stats)
    lines: list[str] = []
    logging_.log(log_fn=lambda fmt, *a: lines.append(fmt % a))
    assert lines and "mask_cache_hit_rate': 0.7" in lines[0]
    stats.reset_stats()
    metrics.collect_step_stats()


def test_gauges_are_multiprocess_safe(tmp_path):
    """With several API servers vLLM sets PROMETHEUS_MULTIPROC_DIR: gauges must aggregate."""
    code = textwrap.dedent(f"""
        import os
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = {str(tmp_path)!r}
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector
        from vllm_hip import metrics
        class Cfg:
            kv_transfer_config = None
            additional_config = None
        prom = metrics.InfiniteHipPromMetrics(
            Cfg(), {{Gauge: Gauge, Counter: Counter, Histogram: Histogram}},
            ["model_name", "engine"], {{0: ["m", "0"]}})
        prom.observe({{"counters": {{"steps": 3}}, "stage_refreshes": [1],
                       "gauges": {{"a/1": [2, 8], "b/2": [3, 8]}}}})
        reg = CollectorRegistry()
        MultiProcessCollector(reg)
        print(generate_latest(reg).decode())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert 'vllm:infinitehip_steps_total{engine="0",model_name="m"} 3.0' in out
    assert 'vllm:infinitehip_gpu_cache_occupied_blocks{engine="0",model_name="m"} 5.0' in out
    assert 'vllm:infinitehip_gpu_cache_capacity_blocks{engine="0",model_name="m"} 16.0' in out


# ---------------------------------------------------------------------- real Prometheus
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _query(base: str, expr: str) -> list:
    body = _get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _dashboard_targets() -> list[tuple[str, str, str]]:
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target.get("legendFormat", ""), target["expr"]))
    return out


def _grafana_to_promql(expr: str) -> str:
    # What Grafana substitutes: the "All" value of $model_name, and a rate window that
    # spans several of the test's 1 s scrapes.
    return (expr.replace("$__rate_interval", "10s").replace("${model_name}", ".*")
            .replace("$model_name", ".*"))


# Values the driver below makes each ratio panel show (two workers, per step).
EXPECTED = {
    ("Cache hit rate", "mask cache"): 9 / 12,
    ("Cache hit rate", "attention cache (offload)"): 135 / 150,
    ("Cache hit rate", "mask-estimation cache (offload)"): 0.5,
    ("Host to GPU transfers", "bandwidth while copying"): 1.5e6 / 1.5e-4,
    ("GPU cache occupancy", "occupancy"): 40 / 80,
    ("Mean selected tokens", "selected tokens / query"): 2048.0,
    ("Backend time per step", "pruning"): 0.002 / 1,  # one step counted per engine step
    ("Backend time per step", "sparse attention"): 0.001 / 1,
}


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="needs Debian's prometheus binary: "
                           "apt-get install -y --no-install-recommends prometheus")
def test_dashboard_queries_return_data_from_a_real_prometheus(model_dir, tmp_path):
    from prometheus_client import start_http_server
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.stats import IterationStats

    t0 = time.monotonic()
    vc = _vllm_config(model_dir, metrics.with_stats_connector(None))
    worker = KVConnectorFactory.create_connector(vc, KVConnectorRole.WORKER, None)
    stats.reset_stats()
    metrics.collect_step_stats()
    prom_logger = PrometheusStatLogger(vc, [0])  # drops vllm:* collectors, then adds ours

    # vLLM mounts prometheus_client's exposition of the same registry at /metrics.
    exporter, _ = start_http_server(0, addr="127.0.0.1")
    exporter_port = exporter.server_port

    # The deployed scrape job, pointed at the test exporter and scraped every second. Its
    # relabeling is what makes vLLM's names survive prometheus_client 0.26 + Prometheus 2.x.
    deployed = yaml.safe_load(DEPLOY_PROMETHEUS.read_text())
    job = next(j for j in deployed["scrape_configs"] if j["job_name"] == "vllm")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{exporter_port}"]}]
    web_port = _free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [job],
    }))
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{web_port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{web_port}"
    stop = threading.Event()
    errors: list[BaseException] = []

    def drive():
        st = stats.get_stats()
        st.timing_enabled = True
        try:
            while not stop.is_set():
                # Worker A: what the backend and the offload cache record during one step.
                st.record_mask_lookups(8, 6)
                st.record_attn_cache(100, 90)
                st.record_mask_estimation_cache(20, 10)
                st.record_h2d(1_000_000, 1e-4)
                st.set_gpu_cache(30, 40)
                st.add_stage_refresh(1)
                st.add_stage_refresh(2, 2)
                st.record_attended(queries=4, tokens_per_query=2048)
                st.add_prune_seconds(0.002)
                st.add_attention_seconds(0.001)
                st.record_exact_fallback()
                st.record_step()
                # Worker B (another TP rank, another process in a real engine).
                other = metrics.InfiniteHipConnectorStats(data={
                    "counters": {"mask_cache_queries": 4, "mask_cache_hits": 3,
                                 "attn_cache_queries": 50, "attn_cache_hits": 45,
                                 "mask_estimation_cache_queries": 10,
                                 "mask_estimation_cache_hits": 5,
                                 "h2d_bytes": 500_000, "h2d_copy_bytes": 500_000,
                                 "h2d_seconds": 5e-5},
                    "stage_refreshes": [1],
                    "gauges": {"other-host/1": [10, 40]}})
                sched = _engine_step(worker, other)
                it = IterationStats()
                it.num_generation_tokens = 16
                it.inter_token_latencies_iter = [0.02, 0.025, 0.03]
                it.time_to_first_tokens_iter = [0.4]
                prom_logger.record(sched, it, engine_idx=0)
                stop.wait(0.1)
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    driver = threading.Thread(target=drive, daemon=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert prom.poll() is None, prom.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        driver.start()
        # Enough scrapes for rate() over the 10 s window.
        deadline = time.monotonic() + 30
        while True:
            assert not errors, errors
            res = _query(base, "count_over_time(vllm:infinitehip_steps_total[1m])")
            if res and float(res[0]["value"][1]) >= 6:
                break
            assert time.monotonic() < deadline, "prometheus scraped too few samples"
            time.sleep(0.5)

        up = _query(base, "up")
        assert up and up[0]["value"][1] == "1"
        targets = _dashboard_targets()
        assert len(targets) >= 15
        checked = set()
        for title, legend, expr in targets:
            result = _query(base, _grafana_to_promql(expr))
            assert result, f"panel {title!r} / {legend!r}: no data for {expr}"
            for series in result:
                value = float(series["value"][1])
                assert math.isfinite(value), f"panel {title!r} / {legend!r}: {value} for {expr}"
            if (title, legend) in EXPECTED:
                want = EXPECTED[(title, legend)]
                assert len(result) == 1
                assert float(result[0]["value"][1]) == pytest.approx(want, rel=0.05), (
                    title, legend, expr)
                checked.add((title, legend))
        assert checked == set(EXPECTED)
        stages = _query(base, _grafana_to_promql(
            next(e for t, _, e in targets if t == "Stage refreshes / s")))
        assert sorted(s["metric"]["stage"] for s in stages) == ["0", "1", "2"]
        rates = {s["metric"]["stage"]: float(s["value"][1]) for s in stages}
        # Per step: stage 0 once (worker B), stage 1 once (A), stage 2 twice (A).
        assert rates["2"] == pytest.approx(2 * rates["1"], rel=0.1)
        assert rates["0"] == pytest.approx(rates["1"], rel=0.1)
    finally:
        stop.set()
        if driver.is_alive():
            driver.join(timeout=5)
        prom.terminate()
        try:
            prom.wait(timeout=10)
        except subprocess.TimeoutExpired:
            prom.kill()
        exporter.shutdown()
        exporter.server_close()
        stats.get_stats().timing_enabled = False
        stats.reset_stats()
        metrics.collect_step_stats()
    assert time.monotonic() - t0 < 60
