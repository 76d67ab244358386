"""Passkey retrieval and next-token agreement through vLLM: INFINITEHIP vs FLASH_ATTN.

SmolLM2-135M-Instruct ($SMOLLM2) was trained to 8K tokens. For each backend (one vLLM engine per
backend, in its own process) this asks for a 5-digit passkey hidden at depths 10%..90% in prompts
of 4K..128K tokens (2 keys per depth), greedy, and also records the teacher-forced top-1 next
token over ordinary English text (docstrings of Python's standard library) at two lengths, to
report agreement with FLASH_ATTN inside the trained length.

    python benchmarks/passkey.py --out benchmarks/results/passkey_h100.json --plot benchmarks/results/passkey_h100.png

FLASH_ATTN beyond 8K runs with VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 (what a user would have to set).
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def english_text(min_chars: int) -> str:
    """Docstrings of the standard library: ordinary English prose, present on every machine."""
    parts, n = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        try:
            tree = ast.parse(open(path, encoding="utf-8", errors="ignore").read())
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    parts.append(doc)
                    n += len(doc)
        if n >= min_chars:
            break
    return "\n\n".join(parts)


def worker(args) -> int:
    """One backend in this process: writes raw results to args.worker_out."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_hip.passkey import make_passkey_prompt, passkey_correct, random_passkey

    tok = AutoTokenizer.from_pretrained(args.model)
    lengths = [int(x) for x in args.lengths.split(",")]
    max_len = max(lengths + [args.text_tokens]) + 64
    kw = dict(model=args.model, attention_backend=args.backend, max_model_len=max_len,
              gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False,
              max_num_seqs=16)
    if args.enforce_eager:
        kw["enforce_eager"] = True
    if args.additional_config:
        kw["additional_config"] = json.loads(args.additional_config)
    llm = LLM(**kw)
    sp = SamplingParams(temperature=0, max_tokens=12)
    results = {"backend": args.backend, "passkey": [], "top1": {}}
    for n in lengths:
        prompts = []
        for d in DEPTHS:
            for rep in range(args.keys):
                key = random_passkey(seed=hash((n, d, rep)) % (2**31))
                prompts.append(make_passkey_prompt(tok, n, d, key))
        t0 = time.time()
        try:
            outs = llm.generate([{"prompt_token_ids": p.input_ids} for p in prompts], sp, use_tqdm=False)
            texts = [o.outputs[0].text for o in outs]
            err = None
        except Exception as e:  # noqa: BLE001 - a backend that breaks at a length scores 0 there
            texts, err = [""] * len(prompts), f"{type(e).__name__}: {e}"[:300]
        for p, t in zip(prompts, texts):
            results["passkey"].append(dict(length=n, tokens=p.n_tokens, depth=p.depth, key=p.key,
                                           answer=t, correct=passkey_correct(t, p.key), error=err))
        acc = sum(passkey_correct(t, p.key) for p, t in zip(prompts, texts)) / len(prompts)
        print(f"[{args.backend}] {n:>7} tokens: passkey {acc:.0%} ({time.time() - t0:.1f}s)"
              + (f" ERROR {err}" if err else ""), flush=True)
    # Teacher-forced top-1 next token over ordinary text.
    ids = tok(english_text(args.text_tokens * 6)).input_ids
    for n in (int(x) for x in args.text_lengths.split(",")):
        p = ids[:n]
        out = llm.generate([{"prompt_token_ids": p}],
                           SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
        top1 = [None if lp is None else max(lp.items(), key=lambda kv: kv[1].logprob)[0]
                for lp in out[0].prompt_logprobs]
        results["top1"][str(n)] = top1
    with open(args.worker_out, "w") as f:
        json.dump(results, f)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("SMOLLM2"))
    ap.add_argument("--backends", default="INFINITEHIP,FLASH_ATTN")
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--keys", type=int, default=2, help="keys per depth")
    ap.add_argument("--text-tokens", type=int, default=6144)
    ap.add_argument("--text-lengths", default="3000,6144")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--additional-config", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.model:
        ap.error("--model or $SMOLLM2 is required")
    if args.backend:
        return worker(args)

    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    cmd = "python benchmarks/passkey.py " + " ".join(argv if argv is not None else sys.argv[1:])
    raw = {}
    tmp = os.environ.get("OUT", "/tmp")
    for b in args.backends.split(","):
        out = os.path.join(tmp, f"passkey_raw_{b}.json")
        env = dict(os.environ)
        if b != "INFINITEHIP":
            env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        child = [sys.executable, __file__, "--backend", b, "--worker-out", out, "--model", args.model,
                 "--lengths", args.lengths, "--keys", str(args.keys), "--text-tokens", str(args.text_tokens),
                 "--text-lengths", args.text_lengths,
                 "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        if args.enforce_eager:
            child.append("--enforce-eager")
        if args.additional_config and b == "INFINITEHIP":
            child += ["--additional-config", args.additional_config]
        rc = subprocess.call(child, env=env)
        if rc == 0 and os.path.exists(out):
            raw[b] = json.load(open(out))
        else:
            print(f"{b}: worker failed with exit code {rc}")
    records = []
    for b, res in raw.items():
        for n in sorted({r["length"] for r in res["passkey"]}):
            rows = [r for r in res["passkey"] if r["length"] == n]
            acc = sum(r["correct"] for r in rows) / len(rows)
            records.append(dict(metric="passkey_accuracy", backend=b, context_tokens=n, value=acc,
                                unit="fraction", device=dev, command=cmd, model="SmolLM2-135M-Instruct",
                                trials=len(rows), depths=list(DEPTHS),
                                errors=sorted({r["error"] for r in rows if r["error"]})))
    if "FLASH_ATTN" in raw:
        ref = raw["FLASH_ATTN"]["top1"]
        for b, res in raw.items():
            if b == "FLASH_ATTN":
                continue
            for n, top in res["top1"].items():
                pairs = [(a, c) for a, c in zip(top, ref.get(n, [])) if a is not None and c is not None]
                if pairs:
                    agree = sum(a == c for a, c in pairs) / len(pairs)
                    records.append(dict(metric="top1_agreement_vs_flash_attn", backend=b,
                                        context_tokens=int(n), value=agree, unit="fraction", device=dev,
                                        command=cmd, positions=len(pairs),
                                        text="python stdlib docstrings (teacher-forced)"))
    print("\n| backend | " + " | ".join(str(n) for n in args.lengths.split(",")) + " |")
    for b in raw:
        row = [f"{r['value']:.0%}" for r in records if r["backend"] == b and r["metric"] == "passkey_accuracy"]
        print(f"| {b} | " + " | ".join(row) + " |")
    for r in records:
        if r["metric"] == "top1_agreement_vs_flash_attn":
            print(f"top-1 agreement {r['backend']} vs FLASH_ATTN at {r['context_tokens']} tokens: {r['value']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    if args.plot and records:
        from vllm_hip.demo import plot_passkey

        plot_passkey(records, args.plot, trained=8192,
                     title="SmolLM2-135M-Instruct passkey retrieval through vLLM")
    return 0


if __name__ == "__main__":
    sys.exit(main())
