"""Generate the Grafana dashboard of vllm-hip as code (grafana-foundation-sdk).

    python grafana/generate.py           # rewrite grafana/dashboards/infinitehip.json
    python grafana/generate.py --check   # exit 1 if the committed JSON is out of date

Needs ``grafana-foundation-sdk==1769699379!11.6.0`` (types of Grafana 11.6; the odd version
is the SDK's own scheme: an epoch per build, the Grafana version after ``!``). Only this
generator needs it; the committed JSON is what Grafana, Prometheus tests and operators use.

The dashboard puts the INFINITEHIP series (left column) beside vLLM's own decode metrics
(right column), so that a drop of cache hit rate can be read against inter-token latency.
Every PromQL expression here is evaluated against a real Prometheus by tests/test_metrics.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from grafana_foundation_sdk.builders.common import VizLegendOptions
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    GridPos,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vllm_hip.stats import COUNTER_FIELDS, GAUGE_FIELDS  # noqa: E402  (stdlib-only module)

OUTPUT = os.path.join(ROOT, "grafana", "dashboards", "infinitehip.json")
UID = "vllm-hip-infinitehip"
PREFIX = "vllm:infinitehip_"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = '{model_name=~"$model_name"}'
RATE = "[$__rate_interval]"


def hip(field: str) -> str:
    """Series name of a HipStats field (checked, so a renamed counter breaks generation)."""
    if field in COUNTER_FIELDS or field == "stage_refreshes":
        return f"{PREFIX}{field}_total"
    if field in GAUGE_FIELDS:
        return f"{PREFIX}{field}"
    raise KeyError(f"{field} is not a HipStats counter or gauge")


def rate(series: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group}(rate({series}{SEL}{RATE}))"


def ratio(num: str, den: str) -> str:
    return f"{rate(num)} / {rate(den)}"


def quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{SEL}{RATE})))"


def panel(title: str, description: str, unit: str, targets: list[tuple[str, str]],
          pos: tuple[int, int], *, min_val: float | None = 0, max_val: float | None = None
          ) -> Timeseries:
    # Stable ids from the grid position (Grafana needs unique ids; rows use id 1).
    p = (
        Timeseries()
        .id(2 + pos[1] * 2 + (pos[0] > 0))
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .grid_pos(GridPos(h=8, w=12, x=pos[0], y=pos[1]))
        .line_width(1)
        .fill_opacity(10)
        .legend(VizLegendOptions().display_mode(LegendDisplayMode.LIST)
                .placement(LegendPlacement.BOTTOM).show_legend(True))
    )
    if min_val is not None:
        p = p.min(min_val)
    if max_val is not None:
        p = p.max(max_val)
    for i, (expr, legend) in enumerate(targets):
        p = p.with_target(
            Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i)).datasource(DS)
        )
    return p


def build() -> Dashboard:
    left, right = 0, 12
    d = (
        Dashboard("vLLM InfiniteHiP")
        .uid(UID)
        .description("INFINITEHIP attention backend (vllm-hip): sparse-attention caches, "
                     "KV offload traffic and pruning, beside vLLM's decode throughput and "
                     "latency.")
        .tags(["vllm", "vllm-hip", "infinitehip"])
        .editable()
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(
            DatasourceVariable("datasource").label("Data source").type("prometheus")
            .current(VariableOption(selected=True, text="Prometheus", value="prometheus"))
        )
        .with_variable(
            QueryVariable("model_name").label("Model").datasource(DS)
            .query("label_values(vllm:num_requests_running, model_name)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(VariableOption(selected=True, text="All", value="$__all"))
        )
    )

    y = 0
    d = d.with_row(Row("InfiniteHiP (left) | vLLM decode (right)").id(1).grid_pos(
        GridPos(h=1, w=24, x=0, y=y)))
    y += 1
    d = d.with_panel(panel(
        "Cache hit rate",
        "Hits / lookups. Mask cache: decode (step x layer) pairs that reused the cached block "
        "selection. Attention / mask-estimation caches: GPU cache of the KV offload (paper: "
        "~99.8% with cached masks, ~89% when stages 1-2 refresh).",
        "percentunit",
        [
            (ratio(hip("mask_cache_hits"), hip("mask_cache_queries")), "mask cache"),
            (ratio(hip("attn_cache_hits"), hip("attn_cache_queries")), "attention cache (offload)"),
            (ratio(hip("mask_estimation_cache_hits"), hip("mask_estimation_cache_queries")),
             "mask-estimation cache (offload)"),
        ],
        (left, y), max_val=1,
    ))
    d = d.with_panel(panel(
        "Inter-token latency",
        "vLLM's vllm:inter_token_latency_seconds histogram (time between two output tokens "
        "of a request).",
        "s",
        [
            (quantile(0.5, "vllm:inter_token_latency_seconds"), "p50"),
            (quantile(0.99, "vllm:inter_token_latency_seconds"), "p99"),
            (ratio("vllm:inter_token_latency_seconds_sum",
                   "vllm:inter_token_latency_seconds_count"), "mean"),
        ],
        (right, y),
    ))
    y += 8
    d = d.with_panel(panel(
        "Host to GPU transfers",
        "KV offload: bytes moved from host memory per second (cache fills and reads of missed "
        "pages), and the bandwidth of the explicit copies (fill bytes / seconds spent copying).",
        "Bps",
        [
            (rate(hip("h2d_bytes")), "host to GPU traffic"),
            (ratio(hip("h2d_copy_bytes"), hip("h2d_seconds")), "bandwidth while copying"),
        ],
        (left, y),
    ))
    d = d.with_panel(panel(
        "Generation throughput",
        "vLLM's vllm:generation_tokens_total: output tokens per second, all requests.",
        "short",
        [(rate("vllm:generation_tokens_total"), "tokens/s")],
        (right, y),
    ))
    y += 8
    d = d.with_panel(panel(
        "GPU cache occupancy",
        "KV offload: occupied / total slots of the GPU caches, summed over layers and workers.",
        "percentunit",
        [(f"sum({hip('gpu_cache_occupied_blocks')}{SEL}) / "
          f"sum({hip('gpu_cache_capacity_blocks')}{SEL})", "occupancy")],
        (left, y), max_val=1,
    ))
    d = d.with_panel(panel(
        "Time to first token",
        "vLLM's vllm:time_to_first_token_seconds histogram (prefill of long prompts).",
        "s",
        [
            (quantile(0.5, "vllm:time_to_first_token_seconds"), "p50"),
            (quantile(0.99, "vllm:time_to_first_token_seconds"), "p99"),
        ],
        (right, y),
    ))
    y += 8
    d = d.with_panel(panel(
        "Stage refreshes / s",
        "Decode (step x layer) pairs per second that reran a pruning stage (mask caching: "
        "stage i reruns every n_i steps). Stage 0 is the coarsest.",
        "short",
        [(rate(hip("stage_refreshes"), by="stage"), "stage {{stage}}")],
        (left, y),
    ))
    d = d.with_panel(panel(
        "Requests",
        "vLLM's scheduler: requests running and waiting.",
        "short",
        [
            (f"sum(vllm:num_requests_running{SEL})", "running"),
            (f"sum(vllm:num_requests_waiting{SEL})", "waiting"),
        ],
        (right, y),
    ))
    y += 8
    d = d.with_panel(panel(
        "Mean selected tokens",
        "Mean number of tokens chosen by pruning per attended query (or prefill query "
        "block): the effective k, beside sink and window.",
        "short",
        [(ratio(hip("selected_tokens"), hip("attended_queries")), "selected tokens / query")],
        (left, y),
    ))
    d = d.with_panel(panel(
        "Backend steps, exact fallbacks, decode graphs",
        "Forward steps that ran INFINITEHIP, steps attended exactly because the context fits "
        "sink + window + k, and layer steps replayed as CUDA graphs (captures should stop once "
        "each batch size has its graphs).",
        "short",
        [
            (rate(hip("steps")), "steps/s"),
            (rate(hip("exact_fallbacks")), "exact fallbacks/s"),
            (rate(hip("decode_graph_replays")), "decode graph replays/s (layer steps)"),
            (rate(hip("decode_graph_captures")), "decode graph captures/s"),
        ],
        (right, y),
    ))
    y += 8
    d = d.with_panel(panel(
        "Backend time per step",
        "Seconds per step in pruning and in sparse attention. Filled only when the backend "
        "times itself (costs a device synchronization).",
        "s",
        [
            (ratio(hip("prune_seconds"), hip("steps")), "pruning"),
            (ratio(hip("attention_seconds"), hip("steps")), "sparse attention"),
        ],
        (left, y),
    ))
    d = d.with_panel(panel(
        "vLLM KV cache usage",
        "vLLM's paged KV cache usage (fraction of blocks in use).",
        "percentunit",
        [(f"max(vllm:kv_cache_usage_perc{SEL})", "KV cache usage")],
        (right, y), max_val=1,
    ))
    y += 8
    d = d.with_panel(panel(
        "KV on the GPU (offload)",
        "KV offload: GPU memory of the page caches, i.e. all the KV the GPU holds while the full "
        "cache lives in host memory; summed over layers and workers.",
        "bytes",
        [(f"sum({hip('gpu_cache_bytes')}{SEL})", "page caches")],
        (left, y),
    ))
    return d


def render() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build().build()) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed JSON instead of writing it")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        with open(OUTPUT, encoding="utf-8") as f:
            if f.read() != text:
                print(f"{OUTPUT} is out of date: run python grafana/generate.py", file=sys.stderr)
                return 1
        return 0
    os.makedirs(os.path.dirname(OUTPUT), exist_ok=True)
    with open(OUTPUT, "w", encoding="utf-8") as f:
        f.write(text)
    json.loads(text)  # what we wrote parses
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
