"""Pairwise comparison of saved greedy outputs of several server runs.

``serve_equivalence.py`` compares every run with its first one and saves the outputs as
``<out stem>_outputs.json`` (``{run name: {request key: text}}``). This reads one or more such
files (two chains on two ports, say) and counts, for every pair of runs, the requests whose texts
differ: e.g. INFINITEHIP with and without offload, or vLLM's TRITON_ATTN against FLASH_ATTN (how
far two exact attention kernels drift apart in greedy decoding, the noise floor for the others).

    python benchmarks/compare_outputs.py benchmarks/results/raw/serve_outputs_h200.json \\
        --device "NVIDIA H200" --out benchmarks/results/serve_pairs_h200.json

A run name found in two files with different outputs is kept twice (``NAME#2``), which itself
says that run is not reproducible.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys


def load_runs(paths: list[str]) -> dict[str, dict[str, str]]:
    runs: dict[str, dict[str, str]] = {}
    for path in paths:
        with open(path) as f:
            for name, outputs in json.load(f).items():
                if name in runs and runs[name] != outputs:
                    k = 2
                    while f"{name}#{k}" in runs:
                        k += 1
                    name = f"{name}#{k}"
                runs.setdefault(name, outputs)
    return runs


def mismatches(a: dict[str, str], b: dict[str, str]) -> tuple[int, int]:
    """(requests whose texts differ or are missing on one side, requests compared)."""
    keys = sorted(set(a) | set(b))
    return sum(a.get(k) != b.get(k) for k in keys), len(keys)


def pair_records(runs: dict[str, dict[str, str]], *, device: str, command: str) -> list[dict]:
    records = []
    for ref, other in itertools.combinations(runs, 2):
        n_diff, n = mismatches(runs[ref], runs[other])
        records.append({
            "metric": "output_mismatches", "backend": other, "reference_backend": ref,
            "context_tokens": 0, "value": n_diff, "unit": "count", "device": device,
            "command": command, "num_requests": n,
        })  # fmt: skip
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outputs", nargs="+", help="*_outputs.json files written by serve_equivalence.py")
    ap.add_argument("--device", default="unknown", help="device the outputs were produced on")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    runs = load_runs(args.outputs)
    command = "python benchmarks/compare_outputs.py " + " ".join(argv if argv is not None else sys.argv[1:])
    records = pair_records(runs, device=args.device, command=command)
    names = list(runs)
    diff = {}
    for r in records:
        diff[r["reference_backend"], r["backend"]] = diff[r["backend"], r["reference_backend"]] = r["value"]
    width = max(len(n) for n in names)
    print("requests with different greedy outputs (row vs column):")
    print(" " * width + "  " + "  ".join(f"{i:>4}" for i in range(len(names))))
    for i, a in enumerate(names):
        cells = ["   -" if a == b else f"{diff[a, b]:>4}" for b in names]
        print(f"{a:<{width}}  " + "  ".join(cells) + f"   ({i})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
