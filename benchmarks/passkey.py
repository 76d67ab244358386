"""Passkey retrieval and next-token agreement through vLLM: INFINITEHIP vs FLASH_ATTN.

SmolLM2-135M-Instruct ($SMOLLM2) was trained to 8K tokens. For each backend (one vLLM engine per
backend, in its own process) this asks for a 5-digit passkey hidden at depths 10%..90% in prompts
of 4K..128K tokens (2 keys per depth), greedy; with the "multikey" task (RULER's multi-key needle
in a haystack, :func:`vllm_hip.passkey.make_multikey_prompt`) it also asks for one of 4 "special
magic numbers" keyed by distinct words, the queried one at the same depths, the 3 distractors
spread over the rest of the context. It also records the teacher-forced top-1 next
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
TASKS = ("passkey", "multikey")
TASK_METRICS = {"passkey": "passkey_accuracy", "multikey": "multikey_accuracy"}
"""Summary metric of each task's accuracy records."""


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


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def worker(args) -> int:
    """One backend in this process: writes raw results to args.worker_out."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_hip.passkey import (
        benchmark_passkey,
        make_multikey_prompt,
        make_passkey_prompt,
        multikey_correct,
        passkey_correct,
    )

    tok = AutoTokenizer.from_pretrained(args.model)
    lengths = [int(x) for x in args.lengths.split(",")]
    max_len = max(lengths + [args.text_tokens]) + 64
    kw = dict(model=args.model, attention_backend=args.backend, max_model_len=max_len,
              gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False,
              max_num_seqs=16)
    if args.enforce_eager:
        kw["enforce_eager"] = True
    if args.kv_cache_memory_bytes:
        kw["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    if args.additional_config:
        kw["additional_config"] = json.loads(args.additional_config)
    llm = LLM(**kw)
    sp = SamplingParams(temperature=0, max_tokens=12)
    results = {"backend": args.label or args.backend, "passkey": [], "top1": {}, "device": device_name()}

    def save() -> None:
        # Rewritten after every length: a run cut off by its time budget keeps what it finished.
        tmp = args.worker_out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f)
        os.replace(tmp, args.worker_out)

    # First (cheap, and the within-trained-length check): teacher-forced top-1 next token over ordinary text.
    ids = tok(english_text(args.text_tokens * 6)).input_ids
    for n in (int(x) for x in args.text_lengths.split(",") if x):
        p = ids[:n]
        out = llm.generate([{"prompt_token_ids": p}],
                           SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
        top1 = [None if lp is None else max(lp.items(), key=lambda kv: kv[1].logprob)[0]
                for lp in out[0].prompt_logprobs]
        results["top1"][str(n)] = top1
    save()
    tasks = _parse_tasks(args.tasks)
    for n in lengths:
        for task in tasks:
            prompts = []
            for d in DEPTHS:
                for rep in range(args.keys):
                    if task == "passkey":
                        key = benchmark_passkey(n, d, rep)
                        prompts.append(make_passkey_prompt(tok, n, d, key))
                    else:
                        prompts.append(make_multikey_prompt(tok, n, d, seed=hash((n, d, rep, 1)) % (2**31)))
            correct = passkey_correct if task == "passkey" else multikey_correct
            t0 = time.time()
            try:
                outs = llm.generate([{"prompt_token_ids": p.input_ids} for p in prompts], sp, use_tqdm=False)
                texts = [o.outputs[0].text for o in outs]
                err = None
            except Exception as e:  # noqa: BLE001 - a backend that breaks at a length scores 0 there
                texts, err = [""] * len(prompts), f"{type(e).__name__}: {e}"[:300]
            for p, t in zip(prompts, texts):
                rec = dict(task=task, length=n, tokens=p.n_tokens, depth=p.depth, key=p.key,
                           answer=t, correct=correct(t, p.key), error=err)
                if task == "multikey":
                    rec.update(query=p.query, distractors=list(p.distractors),
                               distractor_depths=list(p.distractor_depths))
                results["passkey"].append(rec)
            acc = sum(correct(t, p.key) for p, t in zip(prompts, texts)) / len(prompts)
            print(f"[{args.backend}] {n:>7} tokens: {task} {acc:.0%} ({time.time() - t0:.1f}s)"
                  + (f" ERROR {err}" if err else ""), flush=True)
            save()
    return 0


def _parse_tasks(text: str) -> list[str]:
    tasks = [t for t in text.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks {text!r}: choose from {','.join(TASKS)}")
    return tasks


def accuracy_records(raw: dict, *, device: str, command: str) -> list[dict]:
    """Summary records of the workers' raw retrieval results (``{backend: worker results}``):
    per backend, task and length, the fraction correct as metric ``passkey_accuracy`` (task
    passkey) or ``multikey_accuracy`` (task multikey). A cell where generation raised (the engine
    died, say) has no accuracy: it gets a ``server_errors`` record with the errors instead, so a
    crash never reads as "0% retrieved". Raw records without a ``task`` (written before the
    multikey task existed) are passkey records."""
    records = []
    for b, res in raw.items():
        rows_all = res["passkey"]
        for task in dict.fromkeys(r.get("task", "passkey") for r in rows_all):
            task_rows = [r for r in rows_all if r.get("task", "passkey") == task]
            for n in sorted({r["length"] for r in task_rows}):
                rows = [r for r in task_rows if r["length"] == n]
                errors = sorted({r["error"] for r in rows if r["error"]})
                common = dict(task=task, backend=b, context_tokens=n, device=device, command=command,
                              model="SmolLM2-135M-Instruct", trials=len(rows),
                              depths=sorted({r["depth"] for r in rows}), errors=errors)
                if errors:
                    records.append(dict(metric="server_errors", value=sum(bool(r["error"]) for r in rows),
                                        unit="count", **common))
                    continue
                acc = sum(r["correct"] for r in rows) / len(rows)
                records.append(dict(metric=TASK_METRICS[task], value=acc, unit="fraction", **common))
    return records


def plot_tasks(records: list[dict], path: str, trained: int, title: str) -> None:
    """PNG with one subplot per task: accuracy vs prompt length (log2), one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [r for r in records if r["metric"] in TASK_METRICS.values()]
    tasks = list(dict.fromkeys(r["task"] for r in acc))
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in acc if r["task"] == task]
        for backend in dict.fromkeys(r["backend"] for r in rows):
            pts = sorted((r["context_tokens"], r["value"]) for r in rows if r["backend"] == backend)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=backend)
        ax.axvline(trained, color="gray", ls="--", lw=1)
        ax.text(trained, 50, f" trained length ({trained // 1024}K)", color="gray")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(f"{task} accuracy (%)")
        ax.set_ylim(-5, 105)
        ax.set_title(task)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("SMOLLM2"))
    ap.add_argument("--backends", default="INFINITEHIP,FLASH_ATTN")
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--keys", type=int, default=2, help="keys per depth")
    ap.add_argument("--tasks", default="passkey,multikey", help=f"subset of {','.join(TASKS)}")
    ap.add_argument("--text-tokens", type=int, default=6144)
    ap.add_argument("--text-lengths", default="3000,6144")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=0,
                    help="fixed KV cache size (skips vLLM's memory profiling, whose free-memory "
                         "check fails when other processes on the GPU free memory meanwhile)")
    ap.add_argument("--parallel", action="store_true",
                    help="run the backends' engines at the same time (each takes "
                         "--gpu-memory-utilization of the GPU)")
    ap.add_argument("--additional-config", default=None)
    ap.add_argument("--label", default=None,
                    help="name of the INFINITEHIP run in the records, e.g. 'INFINITEHIP[bq16]' for a "
                         "configuration passed with --additional-config")
    ap.add_argument("--time-budget", type=float, default=0,
                    help="seconds; then stop the workers and report the lengths they finished "
                         "(0: no limit)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--from-raw", default=None, metavar="FILES",
                    help="comma-separated worker files (passkey_raw_<BACKEND>.json, saved in $OUT by "
                         "a run): rebuild the records and plot from them, running nothing")
    ap.add_argument("--device", default=None, help="device name for the records (default: this machine's)")
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cmd = "python benchmarks/passkey.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.from_raw:
        raw = {}
        for path in args.from_raw.split(","):
            res = json.load(open(path))
            raw[res["backend"]] = res
        lengths = sorted({r["length"] for res in raw.values() for r in res["passkey"]})
        args.lengths = ",".join(map(str, lengths))
        devices = {res.get("device") for res in raw.values()} - {None}
        dev = args.device or (devices.pop() if len(devices) == 1 else "unknown")
        return report(raw, args, dev, cmd)
    if not args.model:
        ap.error("--model or $SMOLLM2 is required")
    try:
        _parse_tasks(args.tasks)
    except ValueError as e:
        ap.error(str(e))
    if args.backend:
        return worker(args)

    dev = args.device or device_name()
    raw = {}
    tmp = os.environ.get("OUT", "/tmp")
    children = []
    for b in args.backends.split(","):
        name = args.label if args.label and b == "INFINITEHIP" else b
        out = os.path.join(tmp, f"passkey_raw_{name}.json")
        if os.path.exists(out):  # a worker that dies early must not report an older run's file
            os.remove(out)
        env = dict(os.environ)
        if b != "INFINITEHIP":
            env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        child = [sys.executable, __file__, "--backend", b, "--worker-out", out, "--model", args.model,
                 "--lengths", args.lengths, "--keys", str(args.keys), "--text-tokens", str(args.text_tokens),
                 "--text-lengths", args.text_lengths, "--tasks", args.tasks,
                 "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        if args.enforce_eager:
            child.append("--enforce-eager")
        if args.kv_cache_memory_bytes:
            child += ["--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes)]
        if args.additional_config and b == "INFINITEHIP":
            child += ["--additional-config", args.additional_config]
        if args.label and b == "INFINITEHIP":
            child += ["--label", args.label]
        proc = subprocess.Popen(child, env=env)
        if not args.parallel:
            proc.wait()
        children.append((name, out, proc))
    deadline = time.time() + args.time_budget if args.time_budget > 0 else None
    for b, out, proc in children:
        try:
            rc = proc.wait(None if deadline is None else max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            rc = proc.wait()
            print(f"{b}: stopped at the time budget ({args.time_budget:.0f}s); reporting the "
                  "lengths it finished")
        if os.path.exists(out):
            raw[b] = json.load(open(out))
        if rc != 0:
            print(f"{b}: worker exit code {rc}")
    return report(raw, args, dev, cmd)


def report(raw: dict, args, dev: str, cmd: str) -> int:
    """Records, table, JSON and plot from the workers' raw results."""
    records = accuracy_records(raw, device=dev, command=cmd)
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
    print("\n| task | backend | " + " | ".join(str(n) for n in args.lengths.split(",")) + " |")
    for task in _parse_tasks(args.tasks):
        for b in raw:
            got = {r["context_tokens"]: f"{r['value']:.0%}" for r in records
                   if r["backend"] == b and r["metric"] == TASK_METRICS[task]}
            got.update({r["context_tokens"]: "error" for r in records
                        if r["backend"] == b and r["metric"] == "server_errors" and r["task"] == task})
            row = [got.get(int(n), "not run") for n in args.lengths.split(",")]
            print(f"| {task} | {b} | " + " | ".join(row) + " |")
    for r in records:
        if r["metric"] == "top1_agreement_vs_flash_attn":
            print(f"top-1 agreement {r['backend']} vs FLASH_ATTN at {r['context_tokens']} tokens: {r['value']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    if args.plot and records:
        plot_tasks(records, args.plot, trained=8192,
                   title="SmolLM2-135M-Instruct retrieval through vLLM")
    return 0


if __name__ == "__main__":
    sys.exit(main())
