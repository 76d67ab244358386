"""Serve a model with INFINITEHIP and FLASH_ATTN and compare greedy outputs (issue: foundation).

Starts ``vllm serve MODEL --attention-backend B`` for each backend in turn, sends the same short
prompts through the ``openai`` client to ``/v1/completions`` and ``/v1/chat/completions`` (greedy),
and counts prompts whose outputs differ from the first backend's.

    python benchmarks/serve_equivalence.py --model $SMOLLM2 \\
        --out benchmarks/results/serve_equivalence_h100.json

Writes records (``output_mismatches``, ``server_errors``) in the project's benchmark format and
prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colors are",
    "Write a haiku about autumn leaves.",
    "What is 12 times 7?",
    "Name the largest planet in our solar system.",
    "Translate 'good morning' into Spanish.",
    "A short poem about the sea:",
    "The chemical symbol for gold is",
    "List three fruits that are red.",
    "Who wrote Romeo and Juliet?",
    "Explain photosynthesis in one sentence.",
    "The opposite of hot is",
    "How many days are in a leap year?",
    "Give me a synonym for happy.",
    "The speed of light is approximately",
    "What color is the sky on a clear day?",
    "Finish the sentence: Once upon a time,",
    "The first man on the moon was",
    "What is the square root of 81?",
]


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - reporting only
        pass
    return "cpu"


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(2)
    raise TimeoutError(f"server on port {port} not healthy after {timeout:.0f}s")


def launch(model: str, backend: str, port: int, extra: list[str], log_path: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model,
        "--port", str(port), "--attention-backend", backend, "--served-model-name", "m",
        *extra,
    ]  # fmt: skip
    log = open(log_path, "w")
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def query_all(port: int, prompts: list[str], max_tokens: int) -> tuple[dict, int]:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    outputs: dict[str, str] = {}
    errors = 0
    for i, p in enumerate(prompts):
        try:
            c = client.completions.create(model="m", prompt=p, max_tokens=max_tokens, temperature=0)
            outputs[f"completion/{i}"] = c.choices[0].text
            ch = client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": p}],
                max_tokens=max_tokens,
                temperature=0,
            )
            outputs[f"chat/{i}"] = ch.choices[0].message.content or ""
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors += 1
            outputs[f"error/{i}"] = repr(e)
    return outputs, errors


def long_requests_and_metrics(port: int, n_tokens: int, path: str) -> None:
    """Exercise the pruning path with a few long prompts, then save the server's /metrics."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    words = n_tokens // 24
    for i in range(3):
        text = f"Document {i}. " + filler * words + f" The secret number is {1000 + i}. What is the secret number?"
        client.completions.create(model="m", prompt=text, max_tokens=32, temperature=0)
    time.sleep(6)  # vLLM publishes engine stats every few seconds
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body = r.read().decode()
    with open(path, "w") as f:
        f.write(body)
    ours = [line for line in body.splitlines() if "infinitehip" in line and not line.startswith("#")]
    print(f"{len(ours)} infinitehip series samples on /metrics; first ones:")
    for line in ours[:40]:
        print("  " + line)


def comparison_records(results: dict, errors: dict, args, argv) -> list[dict]:
    """Records comparing every run with the first one (``output_mismatches``, ``server_errors``)."""
    if not results:
        return []
    names = list(results)
    ref = results[names[0]]
    records = []
    dev = device_name()
    cmd = "python benchmarks/serve_equivalence.py " + " ".join(argv or sys.argv[1:])
    for b in names:
        pairs = [("server_errors", errors[b])]
        if ref:  # without the reference's outputs there is nothing to compare with
            pairs.insert(0, ("output_mismatches", sum(results[b].get(k) != v for k, v in ref.items())))
        for metric, value in pairs:
            records.append({
                "metric": metric, "backend": b, "context_tokens": 0, "value": value,
                "unit": "count", "device": dev, "command": cmd,
                "num_requests": 2 * len(PROMPTS[: args.num_prompts]), "reference_backend": names[0],
            })  # fmt: skip
    return records


def write_results(records: list[dict], results: dict, args) -> None:
    """The records to ``--out`` and the outputs beside them in ``$OUT`` (rewritten after every
    server run, so a run cut off later keeps the comparisons already made)."""
    if not args.out:
        return
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    if os.environ.get("OUT"):
        stem = os.path.splitext(os.path.basename(args.out))[0]
        with open(os.path.join(os.environ["OUT"], f"{stem}_outputs.json"), "w") as f:
            json.dump(results, f, indent=1)


def print_comparison(results: dict, errors: dict) -> None:
    if not results:
        return
    names = list(results)
    ref = results[names[0]]
    for b in names:
        mism = [k for k in ref if results[b].get(k) != ref[k]]
        print(f"\n== {b}: {len(mism)} mismatches vs {names[0]}, {errors[b]} errors")
        for k in mism[:10]:
            print(f"  {k}: {ref[k]!r}\n  {' ' * len(k)}  {results[b].get(k)!r}")
    print("\nsample outputs:")
    for k in list(ref)[:6]:
        print(f"  {k}: " + " | ".join(f"{b}={results[b].get(k)!r}" for b in names))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("SMOLLM2"), required=os.environ.get("SMOLLM2") is None)
    ap.add_argument("--backends", default="FLASH_ATTN,INFINITEHIP")
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--extra", default="--max-model-len 4096 --gpu-memory-utilization 0.5",
                    help="extra vllm serve arguments (one string)")
    ap.add_argument("--log-dir", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--metrics-tokens", type=int, default=0,
                    help="after the comparison, send 3 prompts of this many tokens to INFINITEHIP "
                         "servers and save /metrics to LOG_DIR/metrics_<backend>.txt")
    ap.add_argument("--label", action="append", default=[],
                    help="BACKEND=NAME:JSON to add a server run of BACKEND with --additional-config JSON")
    ap.add_argument("--run-args", action="append", default=[], metavar="NAME=ARGS",
                    help="more vllm serve arguments for the run called NAME (a backend or a label), "
                         "e.g. 'INFINITEHIP[ray]=--distributed-executor-backend ray'")
    args = ap.parse_args(argv)

    prompts = PROMPTS[: args.num_prompts]
    results: dict[str, dict] = {}
    errors: dict[str, int] = {}
    runs = [(b, b, []) for b in args.backends.split(",")]
    for spec in args.label:  # e.g. INFINITEHIP=INFINITEHIP[model]:{"infinitehip":{"rope_mode":"model"}}
        backend, rest = spec.split("=", 1)
        name, cfg = rest.split(":", 1)
        runs.append((backend, name, ["--additional-config", cfg]))
    run_args: dict[str, list[str]] = {}
    for spec in args.run_args:
        name, rest = spec.split("=", 1)
        run_args[name] = shlex.split(rest)
    unknown = set(run_args) - {name for _, name, _ in runs}
    if unknown:
        ap.error(f"--run-args names no run: {sorted(unknown)}")
    for backend, name, extra in runs:
        proc = launch(args.model, backend, args.port, shlex.split(args.extra) + extra + run_args.get(name, []),
                      os.path.join(args.log_dir, f"serve_{name}.log"))
        try:
            t0 = time.time()
            wait_healthy(args.port, proc, args.startup_timeout)
            print(f"{name}: healthy after {time.time() - t0:.0f}s", flush=True)
            results[name], errors[name] = query_all(args.port, prompts, args.max_tokens)
            if args.metrics_tokens and backend == "INFINITEHIP":
                long_requests_and_metrics(args.port, args.metrics_tokens,
                                          os.path.join(args.log_dir, f"metrics_{name}.txt"))
        except Exception as e:  # noqa: BLE001 - one failed run must not hide the others
            print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
            if name not in results:  # it never answered: every request counts as an error
                results[name], errors[name] = {}, 2 * len(prompts)
        finally:
            stop(proc)
        write_results(comparison_records(results, errors, args, argv), results, args)

    records = comparison_records(results, errors, args, argv)
    print_comparison(results, errors)
    return 0 if all(r["value"] == 0 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
