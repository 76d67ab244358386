"""Host work of the INFINITEHIP attention op in decode steps, measured on the CPU.

A served decode step of a small model is bound by the host (``profile_decode.py``: ~2 ms of
Python and launch overhead per layer on an H200, where the kernels take tens of µs). This script
runs the backend's real per-step and per-layer code (``build_metadata`` with a row tracker, then
``InfiniteHipImpl.forward`` for every layer) on CPU tensors with the Triton kernels *not executed*:
their launches are counted and skipped, so what is timed is our Python and the torch ops around
the kernels, without Triton's own launch cost (tens of µs per launch on a GPU machine, not
included). Decode steps cover whole refresh cycles (stages rerun every 16/8/4 steps by default).

    python benchmarks/host_overhead.py --out benchmarks/results/host_overhead_cpu.json

Records (device ``cpu``): ``host_us_per_layer`` (attention ops of a step / layers),
``builder_us_per_step`` (medians of ``--repeats`` runs), ``torch_ops_per_layer`` and
``triton_launches_per_layer`` (counted in one more run under a TorchDispatchMode); ``--label``
names the code measured (e.g. a commit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")  # the launchers accept CPU tensors only then

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

LAUNCHES = [0]


def _skip_triton_launches() -> None:
    """Count Triton launches and return without running them (outputs stay uninitialized: the
    host path measured here never reads them)."""
    from triton.runtime import interpreter, jit

    def run(self, *args, **kwargs):
        LAUNCHES[0] += 1

    jit.JITFunction.run = run
    interpreter.InterpretedFunction.run = run


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


class _Layer:
    def __init__(self, idx: int):
        self.layer_name = f"model.layers.{idx}.self_attn.attn"
        self._k_scale = torch.tensor(1.0)
        self._v_scale = torch.tensor(1.0)
        self._k_scale_float = 1.0
        self._v_scale_float = 1.0


def run(args, count: bool = False) -> dict:
    """One fresh engine state: warm-up steps, then the measured ones; with ``count`` the torch
    ops and Triton launches of the measured steps, else their times."""
    from vllm_hip.backend import InfiniteHipImpl, build_metadata
    from vllm_hip.config import InfiniteHipConfig
    from vllm_hip.masks import RowTracker

    _skip_triton_launches()
    cfg = InfiniteHipConfig.from_dict(json.loads(args.infinitehip or "{}"))
    hq, hkv, d, page = args.q_heads, args.kv_heads, args.head_dim, 16
    b, ctx, layers = args.batch, args.context, args.layers
    steps = args.warmup_steps + args.steps
    pages_per_row = -(-(ctx + steps + 1) // page)
    num_pages = b * pages_per_row + 1
    kv_cache = torch.zeros(num_pages, 2, page, hkv, d, dtype=torch.bfloat16)
    block_table = torch.arange(b * pages_per_row, dtype=torch.int32).view(b, pages_per_row) + 1
    hf = SimpleNamespace(model_type="llama", rope_theta=100000.0, head_dim=d, hidden_size=d * hq,
                         num_attention_heads=hq, max_position_embeddings=8192, rope_scaling=None)  # fmt: skip
    impls, fake_layers = [], []
    for i in range(layers):
        impl = InfiniteHipImpl(hq, d, d**-0.5, hkv, kv_cache_dtype="auto")
        impl.hip_config = cfg
        impl._hf_config = hf
        impl._max_positions = ctx + steps + 1
        # as served: the model's rotary embedding is handed over only to an un-rotated cache
        impl.rope_handed_over = cfg.rope_cache == "unrotated"
        impl.layer_idx = i
        impls.append(impl)
        fake_layers.append(_Layer(i))
    tracker = RowTracker(num_pages=num_pages, max_rows=b, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq * d, generator=g).to(torch.bfloat16)
    k = torch.randn(b, hkv * d, generator=g).to(torch.bfloat16)
    v = torch.randn(b, hkv * d, generator=g).to(torch.bfloat16)
    out = torch.empty(b, hq * d, dtype=torch.bfloat16)
    qsl = torch.arange(b + 1, dtype=torch.int32)

    def step(t: int) -> tuple[float, float]:
        seq_lens = torch.full((b,), ctx + t + 1, dtype=torch.int32)
        pos = torch.full((b,), ctx + t, dtype=torch.int64)
        slots = block_table[:, pos[0] // page].long() * page + pos[0] % page
        t0 = time.perf_counter()
        md = build_metadata(
            cfg, query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens,
            seq_lens_cpu=seq_lens.long(), block_table=block_table, slot_mapping=slots, positions=pos,
            is_prefilling_cpu=torch.zeros(b, dtype=torch.bool), max_query_len=1,
            max_seq_len=ctx + t + 1, page_size=page, tracker=tracker, step_id=t + 1,
        )  # fmt: skip
        t1 = time.perf_counter()
        for impl, layer in zip(impls, fake_layers):
            impl.forward(layer, q, k, v, kv_cache, md, out)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    for t in range(args.warmup_steps):
        step(t)
    n = args.steps * layers
    if count:
        LAUNCHES[0] = 0
        counter = _CountOps()
        with counter:
            for t in range(args.warmup_steps, steps):
                step(t)
        return {"torch_ops_per_layer": counter.n / n, "triton_launches_per_layer": LAUNCHES[0] / n}
    builder, attn = zip(*(step(t) for t in range(args.warmup_steps, steps)))
    return {"host_us_per_layer": 1e6 * sum(attn) / n, "builder_us_per_step": 1e6 * sum(builder) / args.steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=6000)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--q-heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps (whole 16-step cycles)")
    ap.add_argument("--warmup-steps", type=int, default=16)
    ap.add_argument("--infinitehip", default="", help="JSON of InfiniteHiP options")
    ap.add_argument("--repeats", type=int, default=3, help="whole runs; times are their median")
    ap.add_argument("--label", default="", help="what code was measured (e.g. a commit)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    runs = [run(args) for _ in range(args.repeats)]
    # Times spread (a shared 2-core machine): their median; counts come from one more run.
    res = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
    res.update(run(args, count=True))
    command = "python benchmarks/host_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    common = {"backend": "INFINITEHIP", "context_tokens": args.context, "device": "cpu", "command": command,
              "batch_size": args.batch, "layers": args.layers, "label": args.label,
              "note": "CPU, Triton kernels counted but not run (their launch cost excluded)"}  # fmt: skip
    units = {"host_us_per_layer": "us", "builder_us_per_step": "us", "torch_ops_per_layer": "count",
             "triton_launches_per_layer": "count"}  # fmt: skip
    records = [{"metric": m, "value": v, "unit": units[m], **common} for m, v in res.items()]
    for r in records:
        print(f"{r['metric']:28s} {r['value']:10.1f} {r['unit']}")
    if args.out:
        old = []
        if os.path.exists(args.out):
            with open(args.out) as f:
                old = [r for r in json.load(f) if r.get("label") != args.label]
        with open(args.out, "w") as f:
            json.dump(old + records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
