"""Benchmark records from a saved ``/metrics`` scrape of an INFINITEHIP server.

``serve_equivalence.py --metrics-tokens N`` sends a few long prompts to each INFINITEHIP run and
saves the server's ``/metrics`` text as ``metrics_<run>.txt``. This turns such a scrape into
records in the project's format: hit rates of the decode mask cache and of the offload GPU page
cache (hits / queries of the counter pairs, summed over engines), host->GPU bytes and cache
occupancy.

    python benchmarks/metrics_records.py benchmarks/results/logs/metrics_offload_h200.txt \\
        --backend "INFINITEHIP[offload]" --device "NVIDIA H200" --out benchmarks/results/metrics_offload_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "vllm:infinitehip_"

#: (record metric, cache, hits counter, queries counter) — counters without the _total suffix.
HIT_RATES = (
    ("cache_hit_rate", "mask", "mask_cache_hits", "mask_cache_queries"),
    ("cache_hit_rate", "attention", "attn_cache_hits", "attn_cache_queries"),
    ("cache_hit_rate", "mask_estimation", "mask_estimation_cache_hits", "mask_estimation_cache_queries"),
)
TOTALS = (
    ("h2d_bytes", "bytes"),
    ("h2d_copy_bytes", "bytes"),
    ("h2d_seconds", "s"),
    ("gpu_cache_occupied_blocks", "blocks"),
    ("gpu_cache_capacity_blocks", "blocks"),
    ("steps", "count"),
)


def series_sums(text: str) -> dict[str, float]:
    """Sum of every ``vllm:infinitehip_*`` sample per name (over engines and labels), with
    counters under their family name (no ``_total``)."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(PREFIX):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            name = family.name[len(PREFIX):]
            sums[name] = sums.get(name, 0.0) + float(sample.value)
    return sums


def records_from_scrape(text: str, *, backend: str, device: str, command: str) -> list[dict]:
    sums = series_sums(text)
    base = {"backend": backend, "context_tokens": 0, "device": device, "command": command}
    records = []
    for metric, cache, hits, queries in HIT_RATES:
        q = sums.get(queries, 0.0)
        if q > 0:  # a cache that was never queried has no hit rate
            records.append({"metric": metric, **base, "cache": cache, "value": sums.get(hits, 0.0) / q,
                            "unit": "fraction", "hits": sums.get(hits, 0.0), "queries": q})  # fmt: skip
    for name, unit in TOTALS:
        if name in sums:
            records.append({"metric": name, **base, "value": sums[name], "unit": unit})
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scrape", help="a saved /metrics text")
    ap.add_argument("--backend", default="INFINITEHIP", help="label of the server run")
    ap.add_argument("--device", default="unknown")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    command = "python benchmarks/metrics_records.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(args.scrape) as f:
        records = records_from_scrape(f.read(), backend=args.backend, device=args.device, command=command)
    for r in records:
        extra = f" ({r['cache']} cache, {r['hits']:.0f}/{r['queries']:.0f})" if "cache" in r else ""
        print(f"{r['metric']:<28} {r['value']:.4g} {r['unit']}{extra}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
