"""KV offloading through vLLM: one long request, INFINITEHIP (KV in host memory) vs FLASH_ATTN.

For each backend one vLLM engine (own process, in-process engine core so the worker's counters
are readable) serves a single request per context length, longest last: random token ids,
greedy, ``--decode-tokens`` new tokens. Per context it records the prefill time (request start to
first token), decode tokens/s (steady steps after the first token), and for INFINITEHIP with
``offload: true`` the attention page-cache and mask-cache hit rates over the decode steps and the
GPU memory the KV uses (the per-layer page caches) against the dense requirement.

Model shapes with dummy weights (no download), fp8 KV cache by default::

    python benchmarks/offload.py --shape llama-3.1-8b \\
        --backend-contexts "INFINITEHIP=131072,262144,524288,1048576" \\
        --backend-contexts "FLASH_ATTN=131072,262144" \\
        --out benchmarks/results/offload_h100.json --plot benchmarks/results/offload_h100.png

A context a backend cannot serve (start-up refusal, OOM, timeout) is recorded with its error;
``max_context_tokens`` is the longest context served.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: Hugging Face configs of the shapes (weights are vLLM's dummy initialization).
SHAPES = {
    "llama-3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=False,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=True,
    ),
}


def write_shape(shape: str, folder: str, min_positions: int = 0) -> str:
    """The shape's config.json in ``folder``; ``min_positions`` raises max_position_embeddings
    (vLLM sizes its RoPE table by it: a dense backend past it indexes out of bounds)."""
    cfg = dict(SHAPES[shape])
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], min_positions)
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="bfloat16",
               rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=1, eos_token_id=2)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return folder


def kv_bytes_per_token(shape: str, kv_bytes: int) -> int:
    from vllm_hip.offload_plan import KvShape

    return KvShape.from_hf_config(SHAPES[shape]).bytes_per_token(kv_bytes)


# ---------------------------------------------------------------------------------- worker
def worker(args) -> int:
    """One backend, every context in turn; appends one JSON line per context to args.worker_out."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine + worker here: stats readable
    import torch
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from vllm_hip import stats as hip_stats

    contexts = [int(x) for x in args.contexts.split(",")]
    kv_bytes = 1 if args.kv_cache_dtype.startswith("fp8") else 2
    per_tok = kv_bytes_per_token(args.shape, kv_bytes)
    max_len = max(contexts) + args.decode_tokens + 64
    # Dense backends get a RoPE table as long as the request (dummy weights: this measures speed
    # and memory, not quality); INFINITEHIP keeps the trained length and extends it itself.
    dense = args.backend != "INFINITEHIP"
    model = write_shape(args.shape, os.path.join(args.workdir, f"{args.shape}-{args.backend.lower()}"),
                        min_positions=max_len if dense else 0)
    kw = dict(model=model, load_format="dummy", skip_tokenizer_init=True, tokenizer=None,
              attention_backend=args.backend, max_model_len=max_len, max_num_seqs=1,
              enable_prefix_caching=False, kv_cache_dtype=args.kv_cache_dtype,
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
              max_num_batched_tokens=args.chunk)
    if args.backend == "INFINITEHIP":
        hip = {"offload": True, "offload_gpu_cache_tokens": args.gpu_cache_tokens}
        hip.update(json.loads(args.infinitehip or "{}"))
        kw["additional_config"] = {"infinitehip": hip}
        if hip.get("offload"):
            # The whole KV cache in host memory: room for the longest request and a page margin.
            kw["kv_cache_memory_bytes"] = (max_len + 4096) * per_tok
    t0 = time.time()
    try:
        llm = LLM(**kw)
    except Exception as e:  # noqa: BLE001 - reported as the result of every context
        for n in contexts:
            _emit(args, dict(context=n, error=f"start-up: {type(e).__name__}: {e}"[:500]))
        return 0
    startup = time.time() - t0
    engine = llm.llm_engine
    st = hip_stats.get_stats()
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate(contexts):
        ids = torch.randint(1000, 100000, (n,), generator=g).tolist()
        sp = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        stamps: list[float] = []
        base = None
        profiled = None
        last_note = start
        try:
            engine.add_request(f"r{i}", {"prompt_token_ids": ids}, sp)
            step = 0
            while engine.has_unfinished_requests():
                if args.profile_dir and len(stamps) == args.profile_after and profiled is None:
                    profiled = _profile_steps(engine, args, n, stamps)
                    continue
                for out in engine.step():
                    for _ in out.outputs[0].token_ids:
                        stamps.append(time.perf_counter())
                step += 1
                now = time.perf_counter()
                if not stamps and now - last_note > 20:  # a long prefill shows it is moving
                    print(f"[{args.backend}] {n} tokens: prefill step {step}, {now - start:.0f} s",
                          flush=True)
                    last_note = now
                if len(stamps) >= 2 and base is None:
                    base = st.totals()  # counters from the second decode step on
            err = None
        except Exception as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {e}"[:500]
            engine.abort_request([f"r{i}"]) if hasattr(engine, "abort_request") else None
        rec = dict(context=n, startup_s=startup, error=err,
                   peak_torch_bytes=torch.cuda.max_memory_allocated())
        if stamps:
            rec["prefill_s"] = stamps[0] - start
        # Steady decode: after the first token, and after the profiled steps (the profilers
        # slow those down and their tables take seconds to write).
        steady = stamps[1:] if profiled is None else stamps[profiled.pop("resume_at"):]
        if len(steady) >= 3:
            rec["decode_tokens_per_s"] = (len(steady) - 1) / (steady[-1] - steady[0])
            rec["decode_tokens"] = len(steady)
            # Token-to-token times: mask-refresh steps (every few tokens) against reuse steps.
            gaps = sorted(b - a for a, b in zip(steady, steady[1:]))
            for q in (50, 90):
                rec[f"decode_step_ms_p{q}"] = 1e3 * gaps[min(len(gaps) - 1, len(gaps) * q // 100)]
            rec["decode_step_ms_max"] = 1e3 * gaps[-1]
            # every step in order: warm-up, refresh and replayed steps tell apart by eye
            rec["decode_step_ms"] = [round(1e3 * (b - a), 2) for a, b in zip(steady, steady[1:])]
        if profiled:
            rec.update(profiled)
        if base is not None:
            end = st.totals()
            d = {k: end[k] - base[k] for k in ("attn_cache_queries", "attn_cache_hits",
                                               "mask_cache_queries", "mask_cache_hits",
                                               "mask_estimation_cache_queries",
                                               "mask_estimation_cache_hits", "h2d_bytes",
                                               "decode_graph_replays", "decode_graph_captures")}
            rec.update(d)
            rec["gpu_cache_capacity_blocks"] = end["gpu_cache_capacity_blocks"]
        rec["dense_kv_bytes"] = n * per_tok
        if args.backend == "INFINITEHIP":
            # page caches of every layer + the prefill staging buffer (offload_prefill_staging)
            rec["kv_gpu_bytes"] = st.totals()["gpu_cache_bytes"]
        _emit(args, rec)
        print(f"[{args.backend}] {n:>8} tokens: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()
            if k != "context"), flush=True)
    return 0


def _profile_steps(engine, args, context: int, stamps: list[float]) -> dict:
    """``--profile-steps`` decode steps under torch.profiler and cProfile (one pass: the Python
    profile inflates host time, so the step time here is not the reported throughput). Writes
    ``<backend>_<context>_kernels.txt`` and ``..._cprofile.txt``; returns the GPU busy time per
    step and the kernels per step."""
    import cProfile
    import io
    import pstats

    import torch

    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    prof = cProfile.Profile()
    steps = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as tp:
        prof.enable()
        while steps < args.profile_steps and engine.has_unfinished_requests():
            for out in engine.step():
                for _ in out.outputs[0].token_ids:
                    stamps.append(time.perf_counter())
            steps += 1
        torch.cuda.synchronize()
        prof.disable()
    wall = time.perf_counter() - t0
    ka = tp.key_averages()
    kernels = [e for e in ka if e.device_type == torch.autograd.DeviceType.CUDA]
    dev_us = sum(e.self_device_time_total for e in kernels)
    got = dict(profiled_decode_steps=steps, profiled_step_ms=1e3 * wall / max(steps, 1),
               gpu_time_per_step_ms=dev_us / 1e3 / max(steps, 1),
               kernels_per_step=sum(e.count for e in kernels) / max(steps, 1))
    os.makedirs(args.profile_dir, exist_ok=True)
    stem = os.path.join(args.profile_dir, f"{args.backend}_{context}")
    with open(stem + "_kernels.txt", "w") as f:
        f.write(f"{steps} decode steps at {context} tokens; GPU busy {got['gpu_time_per_step_ms']:.2f} ms, "
                f"{got['kernels_per_step']:.0f} kernels, wall {got['profiled_step_ms']:.2f} ms per step "
                "(under both profilers)\n")
        f.write("==== by device time\n" + ka.table(sort_by="self_device_time_total", row_limit=40))
        f.write("\n==== by CPU time\n" + ka.table(sort_by="self_cpu_time_total", row_limit=40))
    s = io.StringIO()
    for key in ("tottime", "cumulative"):
        s.write(f"==== by {key}\n")
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(45)
    with open(stem + "_cprofile.txt", "w") as f:
        f.write(s.getvalue())
    print(f"[{args.backend}] {context} tokens: profiled {steps} steps: " + ", ".join(
        f"{k}={v:.4g}" for k, v in got.items()), flush=True)
    got["resume_at"] = len(stamps) + 1  # the first step after this one is not timed from here
    return got


def _emit(args, rec: dict) -> None:
    with open(args.worker_out, "a") as f:
        f.write(json.dumps(rec) + "\n")


# ---------------------------------------------------------------------------------- driver
def records_from(backend: str, lines: list[dict], device: str, command: str, shape: str) -> list[dict]:
    """Benchmark records (project format) from one backend's worker lines."""
    out = []
    base = dict(backend=backend, device=device, command=command, model_shape=shape)

    def rec(metric, n, value, unit, **extra):
        out.append(dict(metric=metric, context_tokens=n, value=value, unit=unit, **base, **extra))

    served = [r["context"] for r in lines if not r.get("error") and "decode_tokens_per_s" in r]
    for r in lines:
        n = r["context"]
        if r.get("error"):
            rec("served", n, 0, "bool", error=r["error"])
            continue
        if "prefill_s" in r:
            rec("prefill_s", n, r["prefill_s"], "s")
        if "decode_tokens_per_s" in r:
            rec("decode_tokens_per_s", n, r["decode_tokens_per_s"], "tokens/s",
                decode_tokens=r["decode_tokens"],
                **{k: r[k] for k in ("decode_step_ms_p50", "decode_step_ms_p90", "decode_step_ms_max",
                                     "decode_step_ms", "decode_graph_replays", "decode_graph_captures",
                                     "mask_cache_queries") if k in r})
        if "gpu_time_per_step_ms" in r:
            rec("decode_step_gpu_ms", n, r["gpu_time_per_step_ms"], "ms",
                kernels_per_step=r["kernels_per_step"], profiled_steps=r["profiled_decode_steps"],
                note="torch.profiler: the GPU's busy time per decode step (the rest of a step is host)")
        if r.get("attn_cache_queries"):
            rec("cache_hit_rate", n, r["attn_cache_hits"] / r["attn_cache_queries"], "fraction",
                cache="attention (GPU page cache, key rows)", queries=r["attn_cache_queries"])
        if r.get("mask_estimation_cache_queries"):
            rec("cache_hit_rate", n, r["mask_estimation_cache_hits"] / r["mask_estimation_cache_queries"],
                "fraction", cache="mask estimation (GPU page cache, key rows pruning read)",
                queries=r["mask_estimation_cache_queries"])
        if r.get("mask_cache_queries"):
            rec("cache_hit_rate", n, r["mask_cache_hits"] / r["mask_cache_queries"], "fraction",
                cache="mask (decode selection reuse)", queries=r["mask_cache_queries"])
        if r.get("kv_gpu_bytes"):
            rec("kv_gpu_bytes", n, r["kv_gpu_bytes"], "bytes",
                fraction_of_dense=r["kv_gpu_bytes"] / r["dense_kv_bytes"],
                dense_kv_bytes=r["dense_kv_bytes"])
    if served:
        rec("max_context_tokens", max(served), max(served), "tokens",
            note="longest context served in this run (not a search for the limit)")
    return out


def plot(records: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    shapes = {r.get("model_shape") for r in records}
    # One line per backend and, when the records mix model shapes, per shape; records of
    # another build or setting carry a "series" (e.g. "eager attention, tenth session") and get
    # a line of their own rather than one drawn through points that are not comparable.
    for b, shape, series in sorted({(r["backend"], r.get("model_shape"), r.get("series")) for r in records}, key=str):
        pts = sorted((r["context_tokens"], r["value"]) for r in records
                     if r["backend"] == b and r.get("model_shape") == shape and r.get("series") == series
                     and r["metric"] == "decode_tokens_per_s")
        if pts:
            label = b if len(shapes) == 1 else f"{b} ({shape})"
            label = f"{label}, {series}" if series else label
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            for x, y in pts:
                ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--backend-contexts", action="append", default=[],
                    help="BACKEND=N1,N2,... (repeat per backend; backends run one after another)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--kv-cache-dtype", default="fp8")
    ap.add_argument("--gpu-cache-tokens", type=int, default=16384,
                    help="INFINITEHIP offload_gpu_cache_tokens (per layer; room for the decode working "
                         "set of a few requests: 1.6%% of the dense KV at 1M tokens)")
    ap.add_argument("--infinitehip", default=None, help="more INFINITEHIP options (JSON)")
    ap.add_argument("--chunk", type=int, default=32768, help="max_num_batched_tokens (prefill chunk)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per backend")
    ap.add_argument("--profile-dir", default=None,
                    help="profile --profile-steps decode steps per context (torch.profiler + cProfile) "
                         "into this folder; those steps are left out of decode tokens/s")
    ap.add_argument("--profile-steps", type=int, default=16)
    ap.add_argument("--profile-after", type=int, default=6, help="decode tokens before the profiled steps")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--merge", nargs="+", default=None,
                    help="combine result files of separate runs (e.g. one per backend) into --out/--plot; "
                         "FILE:NOTE adds NOTE to that file's records, FILE:NOTE|SERIES also draws them "
                         "as a line of their own labelled SERIES")
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--contexts", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workdir = args.workdir or os.path.join(os.environ.get("OUT") or tempfile.mkdtemp(), "offload")
    if args.backend:
        return worker(args)
    if args.merge:
        records = []
        for spec in args.merge:
            # FILE, FILE:NOTE (the NOTE goes into that file's records, e.g. how it was run) or
            # FILE:NOTE|SERIES (also a plot line of their own, see plot())
            path, _, rest = spec.partition(":")
            note, _, series = rest.partition("|")
            for r in json.load(open(path)):
                if note:
                    r["note"] = f"{r['note']}; {note}" if r.get("note") else note
                if series:
                    r["series"] = series
                records.append(r)
        _add_ratios(records)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(records, f, indent=1)
        if args.plot:
            plot(records, args.plot, f"{args.kv_cache_dtype} KV, batch 1, one GPU")
        return 0
    if not args.backend_contexts:
        args.backend_contexts = ["INFINITEHIP=131072,262144", "FLASH_ATTN=131072"]
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    cmd = "python benchmarks/offload.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(args.workdir, exist_ok=True)
    records: list[dict] = []
    for spec in args.backend_contexts:
        backend, contexts = spec.split("=", 1)
        wout = os.path.join(args.workdir, f"offload_{backend}.jsonl")
        if os.path.exists(wout):
            os.remove(wout)
        child = [sys.executable, os.path.abspath(__file__), "--backend", backend, "--contexts", contexts,
                 "--worker-out", wout, "--shape", args.shape, "--decode-tokens", str(args.decode_tokens),
                 "--kv-cache-dtype", args.kv_cache_dtype, "--gpu-cache-tokens", str(args.gpu_cache_tokens),
                 "--chunk", str(args.chunk), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
                 "--workdir", args.workdir]
        if args.infinitehip:
            child += ["--infinitehip", args.infinitehip]
        if args.enforce_eager:
            child.append("--enforce-eager")
        if args.profile_dir:
            child += ["--profile-dir", args.profile_dir, "--profile-steps", str(args.profile_steps),
                      "--profile-after", str(args.profile_after)]
        env = dict(os.environ, VLLM_ALLOW_LONG_MAX_MODEL_LEN="1")
        try:
            rc = subprocess.run(child, env=env, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        lines = [json.loads(x) for x in open(wout)] if os.path.exists(wout) else []
        done = {r["context"] for r in lines}
        for n in (int(x) for x in contexts.split(",")):
            if n not in done:
                lines.append(dict(context=n, error=f"not reached (worker exit: {rc})"))
        records += records_from(backend, lines, dev, cmd, args.shape)
        if args.out:  # after every backend: a timeout later keeps what was measured
            with open(args.out, "w") as f:
                json.dump(records, f, indent=1)
    _add_ratios(records)
    print("\n| backend | context | prefill s | decode tok/s | cache hit rates | KV on GPU |")
    for r in records:
        if r["metric"] == "decode_tokens_per_s":
            n, b = r["context_tokens"], r["backend"]
            get = {x["metric"] + x.get("cache", ""): x for x in records
                   if x["backend"] == b and x["context_tokens"] == n}
            pre = get.get("prefill_s", {}).get("value", float("nan"))
            hit = [f"{x['cache'].split(' (')[0]} {x['value']:.1%}" for k, x in get.items()
                   if k.startswith("cache_hit_rate")]
            kvg = get.get("kv_gpu_bytes", {}).get("fraction_of_dense")
            print(f"| {b} | {n} | {pre:.1f} | {r['value']:.1f} | {', '.join(hit) or '-'} | "
                  + (f"{kvg:.1%} of dense" if kvg else "-") + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    if args.plot and records:
        plot(records, args.plot, f"{args.shape} shape, {args.kv_cache_dtype} KV, batch 1")
    return 0


def _add_ratios(records: list[dict]) -> None:
    """decode tokens/s of each backend relative to FLASH_ATTN of the same model shape: at the
    same context where FLASH_ATTN ran it, and at the longest context FLASH_ATTN served (the
    comparison for contexts it cannot hold)."""
    fa: dict[tuple, float] = {}
    for r in records:
        if r["backend"] == "FLASH_ATTN" and r["metric"] == "decode_tokens_per_s":
            fa[(r.get("model_shape"), r["context_tokens"])] = r["value"]
    for r in records:
        if r["metric"] != "decode_tokens_per_s" or r["backend"] == "FLASH_ATTN":
            continue
        shape = r.get("model_shape")
        if (shape, r["context_tokens"]) in fa:
            r["ratio_vs_flash_attn"] = r["value"] / fa[(shape, r["context_tokens"])]
        longest = max((n for s, n in fa if s == shape), default=None)
        if longest is not None and longest < r["context_tokens"]:
            r["flash_attn_longest_context"] = longest
            r["ratio_vs_flash_attn_longest"] = r["value"] / fa[(shape, longest)]


if __name__ == "__main__":
    sys.exit(main())
