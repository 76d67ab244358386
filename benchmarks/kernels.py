"""Attention kernel latency: InfiniteHiP (ours) vs vLLM's FLASH_ATTN (FA3) in the same run.

Per layer, Llama-3.1-8B shapes (32 q heads, 8 kv heads, head dim 128, bf16), batch 1, one paged KV
cache of the full context (page size 16), default config (sink 256, window 1024, k 2048, stages
256/32/8 keeping 32K/8K/2K, refresh 16/8/4):

- ``decode_attention_us``: one decode query. Ours is timed per step kind (masks reused; rerun from
  stage 3; from stage 2; all stages) and averaged over the refresh schedule (1 full + 1 from stage 2
  + 2 from stage 3 + 12 reuses per 16 steps);
- ``prefill_attention_ms``: the last 32K-token chunk of the context (queries at the end), all stages
  + sparse attention vs FA3 causal over the paged cache;
- ``topk_recall`` (optional ``--recall``): selected blocks vs the blocks holding the largest exact
  attention mass, on real queries/keys of SmolLM2 ($SMOLLM2) over real text.

Times are medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``), and eager medians
too. Run on the GPU machine::

    python benchmarks/kernels.py --out benchmarks/results/kernels_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vllm_hip_kernels.prune import select_blocks  # noqa: E402
from vllm_hip_kernels.query_blocks import build_query_blocks  # noqa: E402
from vllm_hip_kernels.sparse_attention import sparse_attention  # noqa: E402
from vllm_hip.config import InfiniteHipConfig  # noqa: E402

HQ, HKV, D = 32, 8, 128
PAGE = 16
ROPE = {"mode": "model"}
"""How keys and queries meet RoPE (``--rope``): ``model`` none in the kernels (keys as cached);
``unrotated``/``rotated``: streaming RoPE on keys cached without / with the model's rotation."""


def rope_kwargs(ctx: int, cfg: InfiniteHipConfig, layer: int) -> tuple[dict, dict]:
    """(pruning, attention) keyword arguments of the ``--rope`` mode (Llama-3.1 theta)."""
    mode = ROPE["mode"]
    if mode == "model":
        return {}, {}
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float64, device="cuda") / D))
    ang = torch.arange(ctx + 1, dtype=torch.float64, device="cuda")[:, None] * inv[None, :]
    cos, sin = ang.cos().float(), ang.sin().float()
    rotated = mode == "rotated"
    prune = dict(mask_rope="chunk_indexed" if layer < cfg.early_layers else "relative", cos=cos,
                 sin=sin, rope_distance=cfg.window_tokens, keys_rotated=rotated)
    return prune, dict(cos=cos, sin=sin, keys_rotated=rotated)


def bench(fn, graph: bool) -> float:
    """Median milliseconds."""
    import triton.testing as tt

    fn()
    torch.cuda.synchronize()
    if graph:
        try:
            return float(tt.do_bench_cudagraph(fn, rep=200, return_mode="median"))
        except Exception as e:  # noqa: BLE001 - fall back to eager timing, reported
            print(f"  (graph capture failed: {type(e).__name__}: {e}; eager timing used)")
    return float(tt.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def make_cache(ctx: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    pages = -(-ctx // PAGE)
    kc = torch.randn(pages, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn(pages, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    # Shuffled pages, as a long-running server's allocator leaves them.
    bt = torch.randperm(pages, device="cuda", generator=g).to(torch.int32)[None, :]
    return kc, vc, bt


def fa3_decode(q, kc, vc, bt, ctx, scale):
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    cu_q = torch.tensor([0, q.shape[0]], dtype=torch.int32, device="cuda")
    seqused = torch.tensor([ctx], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)

    def run():
        flash_attn_varlen_func(
            q, kc, vc, max_seqlen_q=q.shape[0], cu_seqlens_q=cu_q, max_seqlen_k=ctx,
            seqused_k=seqused, softmax_scale=scale, causal=True, block_table=bt, out=out,
            fa_version=3,
        )  # fmt: skip

    return run, out


#: Launch options of ``--batch-invariant`` (what the backend passes under VLLM_BATCH_INVARIANT=1)
#: for blocks of many queries and for one-query blocks.
INVARIANT: dict = {}
DECODE_INVARIANT: dict = {}


def ours(q, kc, vc, bt, ctx, cfg: InfiniteHipConfig, layer: int, scale: float):
    """Closures for each kind of step, plus the selection of a full refresh."""
    nq = q.shape[0]
    qsl = torch.tensor([0, nq])
    lens = torch.tensor([ctx])
    qb = build_query_blocks(
        qsl, lens, block_size_q=cfg.block_size_q, sink_tokens=cfg.sink_tokens,
        window_tokens=cfg.window_tokens, device="cuda",
    )  # fmt: skip
    seq_lens = lens.to(device="cuda", dtype=torch.int32)
    stages = [
        type("S", (), dict(chunk_size=s.chunk_size, keep_tokens=cfg.stage_keep_tokens(i, layer),
                           query_pool=s.query_pool))
        for i, s in enumerate(cfg.stages)
    ]  # fmt: skip
    launch = DECODE_INVARIANT if nq == 1 else INVARIANT
    prune_rope, attend_rope = rope_kwargs(ctx, cfg, layer)
    kw = dict(sink_tokens=cfg.sink_tokens, score_norm=cfg.score_norm,
              tile_q_len=launch.get("tile_q_len"), **prune_rope)  # fmt: skip
    sel, cnt, inputs = select_blocks(q, kc, bt, seq_lens, qb, stages, **kw)
    out = torch.empty_like(q)

    def attend(s, c):
        sparse_attention(
            q, kc, vc, bt, seq_lens, qb, s, c, sink_tokens=cfg.sink_tokens,
            block_size_k=cfg.block_size_k, sm_scale=scale, out=out,
            window_tokens=cfg.window_tokens, **launch, **attend_rope,
        )  # fmt: skip

    def from_stage(i):
        def run():
            s, c, _ = select_blocks(
                q, kc, bt, seq_lens, qb, stages, cached_inputs=inputs[i], first_stage=i, **kw
            )
            attend(s, c)

        return run

    steps = {"reuse": lambda: attend(sel, cnt), "full": from_stage(0)}
    for i in range(1, len(stages)):
        steps[f"from_stage{i + 1}"] = from_stage(i)
    return steps, out, (sel, cnt, qb, seq_lens)


def schedule_average(t: dict, cfg: InfiniteHipConfig) -> float:
    """Mean step time over one period of the refresh schedule."""
    n = [s.refresh_interval for s in cfg.stages]
    period = n[0]
    total = 0.0
    for step in range(period):
        first = next((i for i, ni in enumerate(n) if step % ni == 0), None)
        total += t["reuse"] if first is None else (t["full"] if first == 0 else t[f"from_stage{first + 1}"])
    return total / period


def run_decode(ctx: int, cfg: InfiniteHipConfig, dev: str, cmd: str, layer: int) -> list[dict]:
    scale = D**-0.5
    kc, vc, bt = make_cache(ctx)
    q = torch.randn(1, HQ, D, device="cuda", dtype=torch.bfloat16)
    fa_run, fa_out = fa3_decode(q, kc, vc, bt, ctx, scale)
    steps, our_out, _ = ours(q, kc, vc, bt, ctx, cfg, layer, scale)
    rec = []
    t_fa = bench(fa_run, graph=True) * 1e3
    t = {k: bench(f, graph=True) * 1e3 for k, f in steps.items()}
    t_eager = {k: bench(f, graph=False) * 1e3 for k, f in steps.items()}
    avg = schedule_average(t, cfg)
    base = dict(context_tokens=ctx, device=dev, command=cmd, unit="us", batch_size=1,
                num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, dtype="bfloat16", layer=layer,
                batch_invariant=bool(INVARIANT), score_norm=cfg.score_norm, rope=ROPE["mode"])
    rec.append(dict(metric="decode_attention_us", backend="FLASH_ATTN", value=t_fa, **base))
    for k, v in t.items():
        rec.append(dict(metric="decode_attention_us", backend=f"INFINITEHIP[{k}]", value=v,
                        speedup_vs_fa3=t_fa / v, eager_us=t_eager[k], **base))
    rec.append(dict(metric="decode_attention_us", backend="INFINITEHIP[schedule_avg]", value=avg,
                    speedup_vs_fa3=t_fa / avg, refresh=cfg.refresh, **base))
    print(f"decode ctx={ctx:>8}: FA3 {t_fa:8.1f} us | " + " | ".join(
        f"{k} {v:7.1f} us ({t_fa / v:5.1f}x)" for k, v in t.items()) + f" | avg {avg:.1f} us "
        f"({t_fa / avg:.1f}x)", flush=True)
    del kc, vc
    torch.cuda.empty_cache()
    return rec


def run_prefill(ctx: int, chunk: int, cfg: InfiniteHipConfig, dev: str, cmd: str, layer: int) -> list[dict]:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    scale = D**-0.5
    kc, vc, bt = make_cache(ctx, seed=1)
    nq = min(chunk, ctx)
    q = torch.randn(nq, HQ, D, device="cuda", dtype=torch.bfloat16)
    cu_q = torch.tensor([0, nq], dtype=torch.int32, device="cuda")
    seqused = torch.tensor([ctx], dtype=torch.int32, device="cuda")
    fa_out = torch.empty_like(q)

    def fa():
        flash_attn_varlen_func(
            q, kc, vc, max_seqlen_q=nq, cu_seqlens_q=cu_q, max_seqlen_k=ctx, seqused_k=seqused,
            softmax_scale=scale, causal=True, block_table=bt, out=fa_out, fa_version=3,
        )  # fmt: skip

    steps, _, _ = ours(q, kc, vc, bt, ctx, cfg, layer, scale)
    t_fa = bench(fa, graph=False)
    t_ours = bench(steps["full"], graph=False)
    print(f"prefill ctx={ctx:>8} chunk={nq}: FA3 {t_fa:8.2f} ms | ours {t_ours:8.2f} ms "
          f"({t_fa / t_ours:.2f}x)", flush=True)
    base = dict(context_tokens=ctx, device=dev, command=cmd, unit="ms", chunk_tokens=nq,
                num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, dtype="bfloat16", layer=layer,
                batch_invariant=bool(INVARIANT), score_norm=cfg.score_norm, rope=ROPE["mode"])
    del kc, vc
    torch.cuda.empty_cache()
    return [
        dict(metric="prefill_attention_ms", backend="FLASH_ATTN", value=t_fa, **base),
        dict(metric="prefill_attention_ms", backend="INFINITEHIP", value=t_ours,
             speedup_vs_fa3=t_fa / t_ours, **base),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="32768,131072,524288,1048576")
    ap.add_argument("--prefill-chunk", type=int, default=32768)
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--layer", type=int, default=5, help="layer index (< early_layers uses k=4096)")
    ap.add_argument("--config", default="{}", help="infinitehip options as JSON")
    ap.add_argument("--recall", action="store_true", help="also measure top-k recall on SmolLM2")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="launch as under VLLM_BATCH_INVARIANT=1 (tiles for a full query block, one split)")
    ap.add_argument("--rope", choices=("model", "unrotated", "rotated"), default="model",
                    help="RoPE in the kernels: none (keys as cached), or streaming positions on "
                         "keys cached without / with the model's rotation (rope_cache)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ROPE["mode"] = args.rope
    cfg = InfiniteHipConfig.from_dict(json.loads(args.config))
    if args.batch_invariant:
        # what the backend launches for this script's blocks: one-query blocks (decode) and
        # longer blocks (the prefill chunk), each kind with its fixed options
        from vllm_hip.launch_options import invariant_launch_options

        INVARIANT.update(invariant_launch_options(cfg, single_query=False))
        DECODE_INVARIANT.update(invariant_launch_options(cfg, single_query=True))
    dev = torch.cuda.get_device_name(0)
    cmd = "python benchmarks/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    records: list[dict] = []
    t0 = time.time()
    for ctx in [int(c) for c in args.contexts.split(",")]:
        records += run_decode(ctx, cfg, dev, cmd, args.layer)
    if not args.skip_prefill:
        for ctx in [int(c) for c in args.contexts.split(",")]:
            records += run_prefill(ctx, args.prefill_chunk, cfg, dev, cmd, args.layer)
    if args.recall:
        from benchmarks.recall import measure_recall

        try:
            records += measure_recall(cfg, dev, cmd)
        except Exception as e:  # noqa: BLE001 - keep the latency records
            print(f"recall failed: {type(e).__name__}: {e}")
    print(f"done in {time.time() - t0:.0f}s")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
