"""Top-k recall of the pruning stages on real queries and keys (SmolLM2, real text).

Captures post-RoPE queries and keys of every layer of SmolLM2-135M-Instruct ($SMOLLM2, a Hugging
Face folder) over ``--tokens`` tokens of real text (Python standard-library sources, which every
machine has), then for the last ``--queries`` positions compares the key blocks our pruning selects
(``mask_rope=None``: keys carry the model's own rotation) with the blocks holding the largest exact
attention mass (softmax probabilities summed over the layer's heads) in the same candidate region
[sink, W0). Reports block recall (|ours ∩ best| / |best|) and mass recall (attention mass our
blocks hold / mass the best k blocks hold).

    python benchmarks/recall.py --out benchmarks/results/recall_h100.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import sysconfig

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vllm_hip_kernels.prune import select_blocks  # noqa: E402
from vllm_hip_kernels.query_blocks import build_query_blocks  # noqa: E402
from vllm_hip.config import InfiniteHipConfig  # noqa: E402


def real_text(min_chars: int) -> str:
    parts, n = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="ignore") as f:
            parts.append(f.read())
        n += len(parts[-1])
        if n >= min_chars:
            break
    return "\n".join(parts)


def capture_qk(model_dir: str, tokens: int, device: str):
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(real_text(tokens * 6), return_tensors="pt").input_ids[:, :tokens].to(device)
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def recording(module, query, key, value, attention_mask, **kw):
        captured.append((query[0, :, -64:].transpose(0, 1).contiguous(), key[0].transpose(0, 1).contiguous()))
        return sdpa(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("recording", recording)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.bfloat16, attn_implementation="recording"
    ).to(device)
    with torch.inference_mode():
        model(ids)
    return captured, ids.shape[1]


def measure_recall(cfg: InfiniteHipConfig, dev: str, cmd: str, *, tokens: int = 8192,
                   queries: int = 8, model_dir: str | None = None) -> list[dict]:
    model_dir = model_dir or os.environ.get("SMOLLM2")
    if not model_dir:
        print("recall: $SMOLLM2 not set, skipped")
        return []
    device = "cuda"
    captured, T = capture_qk(model_dir, tokens, device)
    page = 16
    block = cfg.block_size_k
    recalls, mass_recalls = [], []
    for layer, (q_all, k) in enumerate(captured):
        hq, hkv, d = q_all.shape[1], k.shape[1], k.shape[2]
        g = hq // hkv
        pages = -(-T // page)
        kc = torch.zeros(pages * page, hkv, d, device=device, dtype=k.dtype)
        kc[:T] = k
        kc = kc.view(pages, page, hkv, d)
        bt = torch.arange(pages, device=device, dtype=torch.int32)[None]
        k_tokens = cfg.selected_tokens_for_layer(layer)
        stages = [type("S", (), dict(chunk_size=s.chunk_size, keep_tokens=cfg.stage_keep_tokens(i, layer),
                                     query_pool=s.query_pool)) for i, s in enumerate(cfg.stages)]
        for j in range(queries):
            pos = T - queries + j
            qb = build_query_blocks(torch.tensor([0, 1]), torch.tensor([pos + 1]),
                                    block_size_q=cfg.block_size_q, sink_tokens=cfg.sink_tokens,
                                    window_tokens=cfg.window_tokens, device=device)
            w0 = int(qb.window_start[0])
            nblocks = -(-(w0 - cfg.sink_tokens) // block)  # the last block may straddle W0
            if nblocks <= k_tokens // block:
                continue
            q = q_all[64 - queries + j][None]  # [1, Hq, D]
            sel, cnt, _ = select_blocks(q, kc, bt, torch.tensor([pos + 1], device=device, dtype=torch.int32),
                                        qb, stages, sink_tokens=cfg.sink_tokens)
            # Exact attention mass per block over the causal context, summed over heads.
            kk = k[: pos + 1].float().repeat_interleave(g, dim=1)  # [t, Hq, D]
            logits = torch.einsum("hd,thd->ht", q[0].float(), kk) / d**0.5
            probs = torch.softmax(logits, dim=-1).sum(0)  # [t]
            mass = torch.zeros(nblocks * block, device=device)
            mass[: w0 - cfg.sink_tokens] = probs[cfg.sink_tokens: w0]
            region = mass.view(nblocks, block).sum(1)
            kb = k_tokens // block
            best = torch.topk(region, kb).indices
            ours = (sel[0, : int(cnt[0])].long() - cfg.sink_tokens) // block
            inter = len(set(best.tolist()) & set(ours.tolist()))
            recalls.append(inter / kb)
            mass_recalls.append(float(region[ours].sum() / region[best].sum()))
    if not recalls:
        return []
    r = sum(recalls) / len(recalls)
    m = sum(mass_recalls) / len(mass_recalls)
    print(f"recall over {len(recalls)} (layer, query) pairs at {T} tokens: block recall {r:.3f}, "
          f"attention-mass recall {m:.3f}", flush=True)
    base = dict(backend="INFINITEHIP", context_tokens=T, device=dev, command=cmd,
                model="SmolLM2-135M-Instruct", samples=len(recalls), text="python stdlib sources")
    return [dict(metric="topk_recall", value=r, unit="fraction", **base),
            dict(metric="attention_mass_recall", value=m, unit="fraction", **base)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--config", default="{}")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cfg = InfiniteHipConfig.from_dict(json.loads(args.config))
    cmd = "python benchmarks/recall.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rec = measure_recall(cfg, torch.cuda.get_device_name(0), cmd, tokens=args.tokens, queries=args.queries)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rec, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
