"""Ray Data batch job vs ``vllm.LLM`` on long documents (issue 7): same outputs, throughput.

Builds ``--num-docs`` documents of ``--doc-tokens`` tokens or more (counted with the model's
tokenizer after its chat template; filler prose, a "secret code" line at a fixed depth and a
question about it at the end), then runs ``python -m vllm_hip.batch`` twice in fresh processes:
on Ray Data (a local Ray cluster) and with ``--direct`` (``vllm.LLM``), greedy, same engine kwargs.
It compares the generated token ids per document and writes records in the project's format.

    source /root/devkit/env.sh && pip install --no-build-isolation --no-deps -e . \\
      && python benchmarks/ray_batch.py --model $SMOLLM2                      # INFINITEHIP
    python benchmarks/ray_batch.py --model $SMOLLM2 --backend FLASH_ATTN      # dense baseline

Records (merged into ``--out``, default ``benchmarks/results/ray_batch_<gpu>.json``, and copied to
``$OUT`` when set), per backend and mode (``ray``/``direct``): ``docs_per_s``,
``input_tokens_per_s`` and ``decode_tokens_per_s`` (over the generation span, engine start-up
excluded; prefill dominates it), ``wall_s`` (whole run incl. start-up), ``needle_hits``; per
backend: ``output_mismatches`` and ``prompt_mismatches`` (Ray vs direct, by document id).

SmolLM2 is trained to 8K: FLASH_ATTN needs VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 for 32K (set here for
the child processes) and its outputs there are not meaningful; INFINITEHIP's plugin sets it itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vllm_hip.batch import prompt_token_ids  # noqa: E402

NOUNS = ("river garden engine library harbor mountain signal lantern market orchard bridge tower "
         "letter forest window village ledger compass kettle meadow").split()  # fmt: skip
VERBS = "watched carried painted measured followed repaired described counted opened traded".split()
ADJS = "quiet amber distant narrow patient silver early crowded gentle hollow".split()
PLACES = "the old mill|the northern gate|a small island|the eastern road|the lower valley".split("|")


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_slug(name: str) -> str:
    m = re.search(r"(h100|h200|b200|a100|l40s|l4|a10g)", name.lower())
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


def _sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the "
            f"{rng.choice(NOUNS)} near {rng.choice(PLACES)} in year {rng.randint(1700, 1999)}.")  # fmt: skip


def build_documents(tokenizer, num_docs: int, doc_tokens: int, seed: int = 0, depth: float = 0.35):
    """Rows ``{id, messages|prompt, code}`` whose prompts hold at least ``doc_tokens`` tokens."""
    chat = getattr(tokenizer, "chat_template", None) is not None
    rows, lengths = [], []
    for i in range(num_docs):
        rng = random.Random(seed * 1000 + i)
        code = f"{rng.randint(10000, 99999)}"
        question = f"\n\nWhat is the secret code of document {i}? Answer with the number only."
        needle = f" The secret code of document {i} is {code}. Remember it."
        sentences: list[str] = []
        est = 0
        while est < doc_tokens:
            chunk = [_sentence(rng) for _ in range(32)]
            sentences += chunk
            est += sum(len(t) for t in tokenizer(chunk, add_special_tokens=False)["input_ids"])
        while True:
            at = int(len(sentences) * depth)
            body = " ".join(sentences[:at]) + needle + " " + " ".join(sentences[at:])
            text = f"Document {i}. " + body + question
            row = {"id": i, "code": code}
            row.update({"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text})
            req = {"messages": row["messages"]} if chat else {"prompt": text}
            n = len(prompt_token_ids(req, tokenizer))
            if n >= doc_tokens:
                break
            sentences += [_sentence(rng) for _ in range(8)]
        rows.append(row)
        lengths.append(n)
    return rows, lengths, chat


def run_mode(mode: str, args, docs_path: str, work: str, max_model_len: int) -> tuple[dict, str, float]:
    out = os.path.join(work, f"{args.backend.lower()}_{mode}.jsonl")
    stats = os.path.join(work, f"{args.backend.lower()}_{mode}_stats.json")
    log = os.path.join(work, f"{args.backend.lower()}_{mode}.log")
    engine_kwargs = {"enable_prefix_caching": False}
    if args.kv_cache_memory_bytes:
        engine_kwargs["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    cmd = [
        sys.executable, "-m", "vllm_hip.batch", "--input", docs_path, "--output", out,
        "--model", args.model, "--backend", args.backend, "--max-model-len", str(max_model_len),
        "--max-tokens", str(args.max_tokens), "--batch-size", str(args.num_docs),
        "--gpu-memory-utilization", str(args.gpu_memory_utilization),
        "--engine-kwargs", json.dumps(engine_kwargs),
        "--keep-columns", "code", "--progress-every", "4", "--stats-json", stats,
    ]  # fmt: skip
    if args.infinitehip:
        cmd += ["--infinitehip", args.infinitehip]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    if mode == "direct":
        cmd.append("--direct")
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if args.backend.upper() != "INFINITEHIP":
        env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"  # dense baseline beyond the trained 8K
    print(f"\n[{mode}] $ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = open(log).read()[-6000:]
        raise RuntimeError(f"{mode} run failed with exit code {proc.returncode}; log {log}:\n{tail}")
    print(f"[{mode}] done in {wall:.0f}s (log {log})", flush=True)
    return json.load(open(stats)), out, wall


def _load(path: str) -> dict:
    return {r["id"]: r for r in map(json.loads, open(path))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("SMOLLM2"), required=os.environ.get("SMOLLM2") is None)
    ap.add_argument("--backend", default="INFINITEHIP", help="INFINITEHIP or FLASH_ATTN")
    ap.add_argument("--infinitehip", default=None, help="INFINITEHIP options (JSON)")
    ap.add_argument("--num-docs", type=int, default=16)
    ap.add_argument("--doc-tokens", type=int, default=32768)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=None, help="default: longest prompt + max-tokens, rounded up")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=0,
                    help="fixed KV cache size (skips vLLM's memory profiling; see passkey.py)")
    ap.add_argument("--modes", default="ray,direct")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per run")
    ap.add_argument("--parallel", action="store_true",
                    help="run the modes at the same time (outputs compared as usual; throughputs "
                         "then share the GPU)")
    ap.add_argument("--workdir", default=None, help="documents, outputs, logs (default $OUT/ray_batch or a temp dir)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/ray_batch_<gpu>.json)")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    device = gpu_name()
    out_path = args.out or os.path.join(ROOT, "benchmarks", "results", f"ray_batch_{gpu_slug(device)}.json")
    work = args.workdir or (os.path.join(os.environ["OUT"], "ray_batch") if os.environ.get("OUT") else tempfile.mkdtemp())
    os.makedirs(work, exist_ok=True)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    t = time.perf_counter()
    rows, lengths, chat = build_documents(tok, args.num_docs, args.doc_tokens)
    print(f"{len(rows)} documents, prompt tokens min {min(lengths)} mean {sum(lengths) / len(lengths):.0f} "
          f"max {max(lengths)} ({'chat template' if chat else 'raw prompt'}), built in {time.perf_counter() - t:.1f}s")  # fmt: skip
    docs_path = os.path.join(work, "docs.jsonl")
    with open(docs_path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    max_model_len = args.max_model_len or -(-(max(lengths) + args.max_tokens) // 1024) * 1024

    modes = [m for m in args.modes.split(",") if m]
    if args.parallel and len(modes) > 1:
        # Each run is its own engine (own --gpu-memory-utilization share); generate_s and the
        # throughputs then include contention between the two, wall_s too.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(modes)) as pool:
            futs = {m: pool.submit(run_mode, m, args, docs_path, work, max_model_len) for m in modes}
            results = {m: f.result() for m, f in futs.items()}
    else:
        results = {m: run_mode(m, args, docs_path, work, max_model_len) for m in modes}

    cmd = "python benchmarks/ray_batch.py " + " ".join(argv if argv is not None else sys.argv[1:])
    base = {"backend": args.backend.upper(), "context_tokens": args.doc_tokens, "device": device, "command": cmd,
            "num_docs": args.num_docs, "max_tokens": args.max_tokens, "max_model_len": max_model_len,
            "mean_prompt_tokens": round(sum(lengths) / len(lengths)), "model": os.path.basename(args.model.rstrip("/")),
            "infinitehip": json.loads(args.infinitehip) if args.infinitehip else {},
            "modes_in_parallel": bool(args.parallel)}  # fmt: skip
    records = []
    codes = {r["id"]: r["code"] for r in rows}
    outputs = {}
    for mode, (stats, path, wall) in results.items():
        outputs[mode] = _load(path)
        hits = sum(codes[i] in r["generated_text"] for i, r in outputs[mode].items())
        for metric, value, unit in (
            ("docs_per_s", stats["docs_per_s"], "docs/s"),
            ("input_tokens_per_s", stats["input_tokens_per_s"], "tokens/s"),
            ("decode_tokens_per_s", stats["output_tokens_per_s"], "tokens/s"),
            ("generate_s", stats["generate_s"], "s"),
            ("wall_s", wall, "s"),
            ("needle_hits", hits, "count"),
        ):
            records.append({"metric": metric, **base, "value": value, "unit": unit, "mode": mode,
                            "rows": stats["rows"], "input_tokens": stats["input_tokens"],
                            "output_tokens": stats["output_tokens"]})  # fmt: skip

    if "ray" in outputs and "direct" in outputs:
        ray_out, direct_out = outputs["ray"], outputs["direct"]
        ids = sorted(set(ray_out) | set(direct_out))
        missing = [i for i in ids if i not in ray_out or i not in direct_out]
        both = [i for i in ids if i in ray_out and i in direct_out]
        prompt_mism = [i for i in both if ray_out[i]["prompt_sha1"] != direct_out[i]["prompt_sha1"]]
        out_mism = [i for i in both if ray_out[i]["generated_token_ids"] != direct_out[i]["generated_token_ids"]]
        for metric, value in (("output_mismatches", len(out_mism) + len(missing)), ("prompt_mismatches", len(prompt_mism))):
            records.append({"metric": metric, **base, "value": value, "unit": "count", "mode": "ray_vs_direct",
                            "missing_rows": len(missing)})  # fmt: skip
        print("\nRay vs direct: %d/%d outputs differ, %d prompts differ, %d rows missing"
              % (len(out_mism), len(both), len(prompt_mism), len(missing)))
        for i in out_mism[:5]:
            a, b = ray_out[i]["generated_token_ids"], direct_out[i]["generated_token_ids"]
            first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"  doc {i}: first difference at token {first}: ray={ray_out[i]['generated_text']!r} "
                  f"direct={direct_out[i]['generated_text']!r}")  # fmt: skip

    existing = []
    if os.path.exists(out_path):
        existing = [r for r in json.load(open(out_path)) if r.get("backend") != base["backend"]]
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(existing + records, f, indent=1)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], os.path.basename(out_path)), "w") as f:
            json.dump(existing + records, f, indent=1)

    print(f"\n== {args.backend.upper()} on {device}: {args.num_docs} docs x >= {args.doc_tokens} tokens, "
          f"max_tokens {args.max_tokens}, max_model_len {max_model_len}")  # fmt: skip
    print(f"{'mode':<8} {'docs/s':>8} {'in tok/s':>10} {'out tok/s':>10} {'gen s':>7} {'wall s':>7} {'needle':>7}")
    for mode, (stats, _, wall) in results.items():
        hits = next(r["value"] for r in records if r["metric"] == "needle_hits" and r["mode"] == mode)
        print(f"{mode:<8} {stats['docs_per_s']:>8.2f} {stats['input_tokens_per_s']:>10.0f} "
              f"{stats['output_tokens_per_s']:>10.1f} {stats['generate_s']:>7.1f} {wall:>7.0f} "
              f"{hits:>4}/{args.num_docs}")  # fmt: skip
    for mode in outputs:
        sample = outputs[mode][min(outputs[mode])]
        print(f"sample {mode}: doc {min(outputs[mode])} (code {codes[min(outputs[mode])]}) -> {sample['generated_text']!r}")
    print(f"records: {out_path} (total {time.perf_counter() - t_start:.0f}s)")
    mism = [r["value"] for r in records if r["metric"] in ("output_mismatches", "prompt_mismatches")]
    return 0 if all(v == 0 for v in mism) else 1


if __name__ == "__main__":
    sys.exit(main())
