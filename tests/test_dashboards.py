"""The Grafana dashboard, its provisioning and the deployment files are valid and consistent.

Tools used where installed, skipped with the reason otherwise:
- grafana-foundation-sdk (pip, ``grafana-foundation-sdk==1769699379!11.6.0``): regenerate the
  dashboard and compare with the committed JSON;
- promtool (Debian package ``prometheus``): ``check config``, ``check rules``, ``test rules``;
- docker-compose (Debian package ``docker-compose``) or ``docker compose``: ``config`` (parses
  and validates the file, needs no Docker engine);
- kubectl (``kustomize``, offline) and kubernetes-validate (pip): Kubernetes schemas, strict.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "grafana" / "dashboards" / "infinitehip.json"
GENERATOR = ROOT / "grafana" / "generate.py"
PROVISIONING = ROOT / "grafana" / "provisioning"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def _board() -> dict:
    return json.loads(DASHBOARD.read_text())


def _exprs() -> list[str]:
    return [t["expr"] for p in _board()["panels"] for t in p.get("targets", [])]


def _run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------- dashboard
def test_committed_dashboard_is_what_the_generator_makes():
    pytest.importorskip("grafana_foundation_sdk",
                        reason="pip install 'grafana-foundation-sdk==1769699379!11.6.0'")
    spec = importlib.util.spec_from_file_location("grafana_generate", GENERATOR)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.render() == DASHBOARD.read_text(), (
        "grafana/dashboards/infinitehip.json is stale: run python grafana/generate.py")
    assert gen.main(["--check"]) == 0


def test_dashboard_layout_and_variables():
    board = _board()
    assert board["uid"] == "vllm-hip-infinitehip" and board["title"]
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["type"] == "timeseries"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["legendFormat"] and t["refId"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model_name"]["allValue"] == ".*"
    # Panels filter on the variable everywhere, so one Grafana can show several models.
    for expr in _exprs():
        for selector in re.findall(r"vllm:[a-zA-Z0-9_:]+(\{[^}]*\})?", expr):
            assert selector == '{model_name=~"$model_name"}', expr


def _vllm_series() -> set[str]:
    """Series vLLM 0.26.0's PrometheusStatLogger exposes, with their exposition suffixes."""
    import vllm

    src = (Path(vllm.__file__).parent / "v1" / "metrics" / "loggers.py").read_text()
    found = re.findall(r'self\._(counter|gauge|histogram)_cls\(\s*name="(vllm:[^"]+)"', src)
    assert len(found) > 20, "vLLM's metric definitions moved: update this parser"
    series = set()
    for kind, name in found:
        if kind == "counter":
            series.add(name + "_total")
        elif kind == "gauge":
            series.add(name)
        else:
            series |= {name + "_bucket", name + "_sum", name + "_count"}
    return series


def test_every_dashboard_series_exists_and_every_hip_series_is_shown():
    pytest.importorskip("vllm")
    from vllm_hip import metrics

    ours = {s.series for s in (*metrics.COUNTERS, *metrics.GAUGES, metrics.STAGE_REFRESHES)}
    known = ours | _vllm_series()
    used = {m for e in _exprs() for m in re.findall(r"vllm:[a-zA-Z0-9_:]+", e)}
    assert used <= known, f"unknown series: {sorted(used - known)}"
    assert ours <= used, f"exported but not on the dashboard: {sorted(ours - used)}"
    # The vLLM side the brief asks for: decode throughput and latency.
    assert {"vllm:generation_tokens_total", "vllm:inter_token_latency_seconds_bucket"} <= used


def test_provisioning_points_at_the_dashboard_and_datasource():
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus"
    variable = next(v for v in _board()["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == source["uid"]
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "vllm-hip.yml").read_text())
    (provider,) = providers["providers"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["../grafana/dashboards"] == provider["options"]["path"]
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]


# ---------------------------------------------------------------------- Prometheus files
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="needs promtool: apt-get install -y --no-install-recommends prometheus")


@needs_promtool
def test_promtool_accepts_config_and_rules():
    r = _run(["promtool", "check", "config", "prometheus.yml"], cwd=DEPLOY / "prometheus")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout + r.stderr  # the rules glob matches our file
    r = _run(["promtool", "check", "rules", "rules/infinitehip.rules.yml"],
             cwd=DEPLOY / "prometheus")
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_alerting_and_recording_rules_unit_tests():
    r = _run(["promtool", "test", "rules", "infinitehip.rules.test.yml"],
             cwd=DEPLOY / "prometheus" / "rules")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_scrape_job_restores_vllm_names():
    """prometheus_client 0.26 + Prometheus 2.x store vllm_x for vllm:x (client_python #1177)."""
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    (rule,) = job["metric_relabel_configs"]
    assert rule["source_labels"] == ["__name__"] and rule["target_label"] == "__name__"
    pattern = re.compile(rule["regex"])  # Prometheus anchors relabel regexes
    restore = rule["replacement"].replace("$1", r"\1")
    assert pattern.fullmatch("vllm_infinitehip_steps_total").expand(restore) == (
        "vllm:infinitehip_steps_total")
    assert pattern.fullmatch("vllm:infinitehip_steps_total") is None
    monitor = yaml.safe_load((K8S / "servicemonitor.yaml").read_text())
    (mrule,) = monitor["spec"]["endpoints"][0]["metricRelabelings"]
    assert (mrule["regex"], mrule["replacement"]) == (rule["regex"], rule["replacement"])


# ---------------------------------------------------------------------- serve arguments
def _compose_args() -> list[str]:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return compose["services"]["vllm"]["command"]


def _flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


def test_compose_and_k8s_serve_with_the_backend_and_the_stats_connector():
    pytest.importorskip("vllm")
    from vllm_hip import metrics
    from vllm_hip.config import InfiniteHipConfig

    args = _compose_args()
    assert "--attention-backend=INFINITEHIP" in args
    assert json.loads(_flag(args, "kv-transfer-config")) == metrics.stats_connector_config()
    InfiniteHipConfig.from_vllm_additional_config(_flag(args, "additional-config"))

    cm = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    assert json.loads(cm["KV_TRANSFER_CONFIG"]) == metrics.stats_connector_config()
    InfiniteHipConfig.from_vllm_additional_config(cm["ADDITIONAL_CONFIG"])
    deploy = yaml.safe_load((K8S / "deployment.yaml").read_text())
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert "--attention-backend=INFINITEHIP" in container["args"]
    # Every $(VAR) in the arguments comes from the ConfigMap.
    for var in re.findall(r"\$\((\w+)\)", " ".join(container["args"])):
        assert var in cm, var
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    port = container["ports"][0]["containerPort"]
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_dockerfile_builds_on_the_pinned_vllm_and_copies_existing_paths():
    text = (DEPLOY / "Dockerfile").read_text()
    vllm = pytest.importorskip("vllm")
    assert f"vllm/vllm-openai:v{vllm.__version__.split('+')[0]}" in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in shlex.split(line)[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert 'ENTRYPOINT ["vllm", "serve"]' in text


def _compose_cmd() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and _run([*cmd, "version"]).returncode == 0:
            return cmd
    return None


@pytest.mark.skipif(_compose_cmd() is None,
                    reason="needs docker compose or docker-compose "
                           "(apt-get install -y --no-install-recommends docker-compose)")
def test_docker_compose_file_is_valid():
    r = _run([*_compose_cmd(), "-f", "docker-compose.yml", "config", "-q"], cwd=DEPLOY)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------- Kubernetes
def _k8s_docs() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def test_k8s_objects_fit_together():
    docs = {d["kind"]: d for d in _k8s_docs()}
    assert set(docs) == {"ConfigMap", "Deployment", "Service"}
    dep, svc = docs["Deployment"], docs["Service"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    assert container["envFrom"][0]["configMapRef"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    monitor = yaml.safe_load((K8S / "servicemonitor.yaml").read_text())
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in svc["spec"]["ports"]}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (kustomize)")
def test_kustomize_builds_and_manifests_match_kubernetes_schemas():
    r = _run(["kubectl", "kustomize", str(K8S)])
    assert r.returncode == 0, r.stderr
    built = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert sorted(d["kind"] for d in built) == ["ConfigMap", "Deployment", "Service"]
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "vllm-hip"
               for d in built)
    kv = pytest.importorskip("kubernetes_validate",
                             reason="pip install kubernetes-validate for schema checks")
    for doc in built:
        kv.validate(doc, "1.33", strict=True)  # raises on any schema error
