"""Where a serving decode step's time goes: decode throughput of a batch through ``vllm.LLM``,
per backend, with a Python profile (cProfile) and a kernel profile (torch.profiler) of the same
steps.

The kernel benchmarks (``kernels.py``) time attention alone; a served step also pays the
backend's host work (metadata, launch planning, cache bookkeeping) once per layer, which this
script exposes. Each backend runs in its own process with the engine in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the profilers see the model runner and the backend.

    python benchmarks/profile_decode.py --model $SMOLLM2 --backends INFINITEHIP,FLASH_ATTN \\
        --batch 4 --prompt-tokens 6000 --decode-tokens 64 --enforce-eager \\
        --out benchmarks/results/profile_decode_h200.json --profile-dir /tmp/profile

Records: ``decode_tokens_per_s`` (all rows of the batch, steady decode steps) and
``decode_step_ms`` per backend, with ``ratio_vs_flash_attn``; with ``--profile-dir``,
``decode_step_gpu_ms`` (the GPU's busy time per decode step, torch.profiler, with
``kernels_per_step``: what is left of ``decode_step_ms`` is host work) and the files
``<backend>_cprofile.txt`` (top functions by own and by cumulative time, prefill included) and
``<backend>_kernels.txt`` (torch.profiler's tables by device and by CPU time, decode steps only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _steps(engine, requests: list[tuple[str, list[int]]], sp) -> list[tuple[float, int]]:
    """Adds the requests and steps the engine to the end; (time, tokens produced) per step."""
    for rid, ids in requests:
        engine.add_request(rid, {"prompt_token_ids": ids}, sp)
    out = []
    while engine.has_unfinished_requests():
        n = sum(len(o.outputs[0].token_ids) for o in engine.step())
        out.append((time.perf_counter(), n))
    return out


def _decode_rate(stamps: list[tuple[float, int]], batch: int) -> tuple[float, float, int]:
    """Tokens per second and ms per step over the steps where every row decodes (the first steps
    that produce tokens also finish prefills)."""
    produced, start = 0, None
    for i, (_, n) in enumerate(stamps):
        produced += n
        if produced >= 2 * batch:  # every row past its first token (DELTA outputs)
            start = i
            break
    if start is None or len(stamps) - start < 3:
        return float("nan"), float("nan"), 0
    steady = stamps[start:]
    toks = sum(n for _, n in steady[1:])
    dt = steady[-1][0] - steady[0][0]
    return toks / dt, 1e3 * dt / (len(steady) - 1), toks


def worker(args) -> int:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import cProfile
    import io
    import pstats

    import torch
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kw = dict(model=args.model, attention_backend=args.backend, max_model_len=args.max_model_len,
              enable_prefix_caching=False, gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager, max_num_seqs=max(args.batch, 8))  # fmt: skip
    if args.kv_cache_memory_bytes:
        kw["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    if args.backend == "INFINITEHIP" and args.infinitehip:
        kw["additional_config"] = {"infinitehip": json.loads(args.infinitehip)}
    llm = LLM(**kw)
    engine = llm.llm_engine
    g = torch.Generator().manual_seed(0)

    def batch(tag: str) -> list[tuple[str, list[int]]]:
        return [(f"{tag}{i}", torch.randint(1000, 40000, (args.prompt_tokens,), generator=g).tolist())
                for i in range(args.batch)]  # fmt: skip

    sp = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True,
                        output_kind=RequestOutputKind.DELTA)  # fmt: skip
    _steps(engine, batch("warm"), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                 output_kind=RequestOutputKind.DELTA))  # fmt: skip
    torch.cuda.synchronize()
    rate, step_ms, toks = _decode_rate(_steps(engine, batch("t"), sp), args.batch)
    rec = {"backend": args.backend, "decode_tokens_per_s": rate, "decode_step_ms": step_ms,
           "decode_tokens": toks}  # fmt: skip
    print(f"[{args.backend}] batch {args.batch} x {args.prompt_tokens} tokens: "
          f"{rate:.1f} tok/s, {step_ms:.2f} ms/step", flush=True)  # fmt: skip
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)
        prof = cProfile.Profile()
        reqs = batch("p")
        prof.enable()
        stamps = _steps(engine, reqs, sp)
        prof.disable()
        rec["profiled_decode_tokens_per_s"] = _decode_rate(stamps, args.batch)[0]
        s = io.StringIO()
        for key in ("tottime", "cumulative"):
            s.write(f"==== by {key}\n")
            pstats.Stats(prof, stream=s).sort_stats(key).print_stats(args.top)
        with open(os.path.join(args.profile_dir, f"{args.backend}_cprofile.txt"), "w") as f:
            f.write(s.getvalue())
        # Kernel profile of decode steps only: prefill first, then the profiler.
        for rid, ids in batch("k"):
            engine.add_request(rid, {"prompt_token_ids": ids}, sp)
        produced = 0
        while produced < args.batch and engine.has_unfinished_requests():
            produced += sum(len(o.outputs[0].token_ids) for o in engine.step())
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        steps = 0
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=acts) as tp:
            while steps < args.profile_steps and engine.has_unfinished_requests():
                engine.step()
                steps += 1
            torch.cuda.synchronize()
        if hasattr(engine, "abort_request"):  # the rest of these requests is not needed
            engine.abort_request([f"k{i}" for i in range(args.batch)])
        ka = tp.key_averages()
        kernels = [e for e in ka if e.device_type == torch.autograd.DeviceType.CUDA]
        dev_us = sum(e.self_device_time_total for e in kernels)
        rec.update(profiled_decode_steps=steps,
                   gpu_time_per_step_ms=dev_us / 1e3 / max(steps, 1),
                   kernels_per_step=sum(e.count for e in kernels) / max(steps, 1))  # fmt: skip
        with open(os.path.join(args.profile_dir, f"{args.backend}_kernels.txt"), "w") as f:
            f.write(f"{steps} decode steps; GPU busy {rec['gpu_time_per_step_ms']:.2f} ms and "
                    f"{rec['kernels_per_step']:.0f} kernels per step\n")
            f.write("==== by device time\n" + ka.table(sort_by="self_device_time_total", row_limit=args.top))
            f.write("\n==== by CPU time\n" + ka.table(sort_by="self_cpu_time_total", row_limit=args.top))
    with open(args.worker_out, "w") as f:
        json.dump(rec, f)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--backends", default="INFINITEHIP,FLASH_ATTN")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=6000)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=0)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--infinitehip", default="", help="JSON of InfiniteHiP options for INFINITEHIP")
    ap.add_argument("--profile-dir", default="")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--profile-steps", type=int, default=16, help="decode steps under torch.profiler")
    ap.add_argument("--timeout", type=float, default=400, help="seconds per backend")
    ap.add_argument("--out", required=True)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.backend:
        return worker(args)

    from load_test import device_name, write_json  # sibling script

    command = "python benchmarks/profile_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    device = device_name()
    records = []
    for b in args.backends.split(","):
        wout = f"{args.out}.{b}.worker.json"
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
               "--backend", b, "--worker-out", wout]  # fmt: skip
        try:
            rc = subprocess.run(cmd, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc != 0 or not os.path.exists(wout):
            print(f"[{b}] worker failed: {rc}", flush=True)
            continue
        with open(wout) as f:
            r = json.load(f)
        os.remove(wout)
        common = {"backend": b, "context_tokens": args.prompt_tokens, "device": device, "command": command,
                  "batch_size": args.batch, "enforce_eager": args.enforce_eager}  # fmt: skip
        records.append({"metric": "decode_tokens_per_s", "value": r["decode_tokens_per_s"], "unit": "tok/s",
                        "decode_tokens": r["decode_tokens"], **common})  # fmt: skip
        records.append({"metric": "decode_step_ms", "value": r["decode_step_ms"], "unit": "ms", **common})
        if "gpu_time_per_step_ms" in r:
            # GPU busy time of a decode step (torch.profiler): the rest of decode_step_ms is host
            # work the GPU waited for.
            records.append({"metric": "decode_step_gpu_ms", "value": r["gpu_time_per_step_ms"], "unit": "ms",
                            "kernels_per_step": r["kernels_per_step"], **common})  # fmt: skip
    ref = {r["metric"]: r["value"] for r in records if r["backend"] == "FLASH_ATTN"}
    for r in records:
        if r["metric"] in ref and ref[r["metric"]]:
            r["ratio_vs_flash_attn"] = r["value"] / ref[r["metric"]]
    write_json(args.out, records)
    for r in records:
        print(f"{r['backend']:14s} {r['metric']:22s} {r['value']:10.2f} {r['unit']:6s} "
              f"x{r.get('ratio_vs_flash_attn', float('nan')):.3f} vs FLASH_ATTN")  # fmt: skip
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
