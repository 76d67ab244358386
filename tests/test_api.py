"""infinitehip_attention on plain tensors: implementations agree, exactness, streaming, errors."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vllm_hip_kernels.prune_reference import select_blocks_reference  # noqa: E402
from vllm_hip_kernels.query_blocks import build_query_blocks  # noqa: E402
from vllm_hip import api  # noqa: E402
from vllm_hip.api import infinitehip_attention, required_rope_positions  # noqa: E402
from vllm_hip.config import InfiniteHipConfig  # noqa: E402
from vllm_hip.rope import apply_rope, rope_tables_from_config  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# Small config: sink 16, window 64, k 64 (96 in the first layer), three stages 64 -> 16 -> 8.
SMALL = {
    "sink_tokens": 16,
    "window_tokens": 64,
    "selected_tokens": 64,
    "early_layers": 1,
    "early_selected_tokens": 96,
    "block_size_q": 16,
    "stages": [
        {"chunk_size": 64, "keep_tokens": 256, "query_pool": 2},
        {"chunk_size": 16, "keep_tokens": 128, "query_pool": 2},
        {"chunk_size": 8, "keep_tokens": 64},
    ],
}


def _cfg(**over) -> InfiniteHipConfig:
    d = dict(SMALL)
    d.update(over)
    return InfiniteHipConfig.from_dict(d)


def _qkv(b, t, q_len, hq, hkv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, q_len, hq, d, generator=g).to(DEV, dtype)
    k = torch.randn(b, t, hkv, d, generator=g).to(DEV, dtype)
    v = torch.randn(b, t, hkv, d, generator=g).to(DEV, dtype)
    # A few keys aligned with the queries make pruning choose something other than noise.
    k[:, 200:208] += 2 * q[:, -1:].mean(2, keepdim=True)
    return q, k, v


def _tables(cfg, t, d=64):
    return rope_tables_from_config({"head_dim": d, "rope_theta": 10000.0}, required_rope_positions(cfg, t), DEV)


def _dense(q, k, v, allowed, scale=None):
    """fp32 attention with an explicit [B or 1, q_len, T] boolean mask; GQA by repetition."""
    group = q.shape[2] // k.shape[2]
    kk = k.float().repeat_interleave(group, 2)
    vv = v.float().repeat_interleave(group, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kk) * (scale or q.shape[-1] ** -0.5)
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vv)


def _causal(q_len, t):
    qpos = torch.arange(t - q_len, t, device=DEV)
    return (torch.arange(t, device=DEV)[None, :] <= qpos[:, None])[None]


# ------------------------------------------------------------------ the vectorized path vs the reference
@pytest.mark.parametrize("layer", [0, 1], ids=["early", "late"])
@pytest.mark.parametrize("rope", [False, True], ids=["model", "streaming"])
@pytest.mark.parametrize("shape", [(2, 700, 700, 6, 2), (1, 600, 40, 5, 1), (2, 520, 1, 8, 2)],
                         ids=["prefill-b2-g3", "extend-g5", "decode-g4"])
def test_torch_path_equals_reference(shape, rope, layer):
    b, t, q_len, hq, hkv = shape
    cfg = _cfg()
    q, k, v = _qkv(b, t, q_len, hq, hkv, 64)
    tables = _tables(cfg, t) if rope else None
    out_t, sel_t = infinitehip_attention(q, k, v, cfg, rope=tables, layer_idx=layer, impl="torch",
                                         return_selection=True)
    out_r, sel_r = infinitehip_attention(q, k, v, cfg, rope=tables, layer_idx=layer, impl="reference",
                                         page_size=32, return_selection=True)
    assert not sel_t.exact  # pruning really ran
    assert sel_t.mask_rope == (None if not rope else ("chunk_indexed" if layer == 0 else "relative"))
    assert torch.equal(sel_t.sel_count.cpu(), sel_r.sel_count.cpu())
    assert torch.equal(sel_t.sel_blocks.cpu(), sel_r.sel_blocks.cpu())
    k_layer = cfg.selected_tokens_for_layer(layer)
    assert int(sel_t.sel_count.max()) == k_layer // 8
    torch.testing.assert_close(out_t, out_r, rtol=1e-5, atol=1e-5)


def test_torch_select_float64_matches_reference_exactly():
    """Same rounding points as the reference (fp64 dots): selections identical, bit for bit."""
    cfg = _cfg()
    b, t, hq, hkv = 1, 896, 4, 2
    q, k, _ = _qkv(b, t, t, hq, hkv, 64, seed=3)
    cos, sin = (x.cpu() for x in _tables(cfg, t))  # both paths run on the CPU, also on a GPU machine
    qb = build_query_blocks(torch.tensor([0, t]), torch.tensor([t]), block_size_q=16,
                            sink_tokens=16, window_tokens=64)
    stages = api._layer_stages(cfg, 0)
    for mode in (None, "relative", "chunk_indexed"):
        kw = dict(sink_tokens=16, mask_rope=mode, cos=cos, sin=sin, rope_distance=64)
        s1, c1 = api._torch_select(q[0].cpu(), k.cpu(), qb, qb, stages, score_dtype=torch.float64, **kw)
        key_cache = k.cpu().reshape(t // 32, 32, hkv, 64)
        bt = torch.arange(t // 32, dtype=torch.int32)[None]
        s2, c2, _ = select_blocks_reference(q[0].cpu(), key_cache, bt, torch.tensor([t], dtype=torch.int32),
                                            qb, stages, **kw)
        assert torch.equal(c1, c2) and torch.equal(s1, s2), mode


@pytest.mark.skipif(DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton")
def test_triton_path_equals_reference():
    cfg = _cfg()
    q, k, v = _qkv(1, 300, 20, 4, 2, 64, seed=1)
    tables = _tables(cfg, 300)
    out_k, sel_k = infinitehip_attention(q, k, v, cfg, rope=tables, layer_idx=1, impl="triton",
                                         page_size=16, return_selection=True)
    out_r, sel_r = infinitehip_attention(q, k, v, cfg, rope=tables, layer_idx=1, impl="reference",
                                         page_size=16, return_selection=True)
    assert torch.equal(sel_k.sel_blocks.cpu(), sel_r.sel_blocks.cpu())
    torch.testing.assert_close(out_k, out_r, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_split_last_query_changes_only_the_last_block(impl):
    """split_last_query: the last query gets its own selection (as a decode step would); the
    queries before its old block are untouched, and the last query equals a decode step's."""
    cfg, split = _cfg(split_last_query=False), _cfg(split_last_query=True)
    t, q_len = 300, 40  # 40 queries at 260..299: blocks 256..271, 272..287, 288..299
    q, k, v = _qkv(1, t, q_len, 4, 2, 64, seed=5)
    tables = _tables(cfg, t)
    kw = dict(rope=tables, layer_idx=1, impl=impl, page_size=16, return_selection=True)
    out_a, sel_a = infinitehip_attention(q, k, v, cfg, **kw)
    out_b, sel_b = infinitehip_attention(q, k, v, split, **kw)
    assert sel_b.qblocks.q_len.tolist() == sel_a.qblocks.q_len.tolist()[:-1] + [11, 1]
    # The blocks before the split keep their selection; their outputs are bitwise equal on the
    # CPU, within float noise on CUDA (the torch path's matmuls get other shapes, and cuBLAS
    # other kernels, once the batch holds one more block).
    n_before = len(sel_a.qblocks.q_len) - 1
    assert torch.equal(sel_b.sel_blocks[:n_before].cpu(), sel_a.sel_blocks[:n_before].cpu())
    tol = 0 if DEV == "cpu" else 2e-6
    torch.testing.assert_close(out_b[:, :28], out_a[:, :28], rtol=0, atol=tol)
    decode, sel_d = infinitehip_attention(q[:, -1:], k, v, cfg, **kw)
    assert torch.equal(sel_b.sel_blocks[-1].cpu(), sel_d.sel_blocks[-1].cpu())
    torch.testing.assert_close(out_b[:, -1:], decode, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("rope", [False, True], ids=["model", "streaming"])
def test_exact_when_everything_fits(impl, rope):
    """Contexts <= sink + window + k are attended exactly: equals dense causal attention."""
    cfg = _cfg(selected_tokens=256, early_selected_tokens=256, stages=[
        {"chunk_size": 64, "keep_tokens": 512, "query_pool": 2},
        {"chunk_size": 8, "keep_tokens": 256},
    ])
    t = 16 + 64 + 256
    q, k, v = _qkv(2, t, t, 6, 3, 64, seed=2)
    tables = _tables(cfg, t) if rope else None
    out, sel = infinitehip_attention(q, k, v, cfg, rope=tables, impl=impl, return_selection=True)
    assert sel.exact
    if rope:
        cos, sin = tables
        pos = torch.arange(t, device=DEV)
        q, k = apply_rope(q, pos, cos, sin), apply_rope(k, pos, cos, sin)
    torch.testing.assert_close(out.float(), _dense(q, k, v, _causal(t, t)), rtol=1e-5, atol=1e-5)


def test_pruning_keeps_everything_while_it_fits():
    """With pruning running (late blocks exceed k), the early query blocks, whose candidate region
    is <= k, still attend exactly: pruning dropped nothing it should have kept."""
    cfg = _cfg()
    t = 700
    q, k, v = _qkv(1, t, t, 4, 2, 64, seed=4)
    out, sel = infinitehip_attention(q, k, v, cfg, layer_idx=1, impl="torch", return_selection=True)
    assert not sel.exact
    dense = _dense(q, k, v, _causal(t, t))
    # Blocks with W0 - sink <= k = 64: first query position p0 with p0 - 63 - 16 <= 64.
    w0 = sel.qblocks.window_start.cpu()
    fits = [(int(s), int(s) + int(n)) for s, n, w in zip(sel.qblocks.q_start.cpu(), sel.qblocks.q_len.cpu(), w0)
            if int(w) - 16 <= 64]
    assert len(fits) >= 4
    for a, bnd in fits:
        torch.testing.assert_close(out[0, a:bnd].float(), dense[0, a:bnd], rtol=1e-5, atol=1e-5)
    # ... and later blocks do not (the test can fail: sparse differs from dense there).
    assert (out[0, -16:].float() - dense[0, -16:]).abs().max() > 1e-3


def test_bf16_error_within_twice_torch_own():
    """bf16 inputs: error against an fp32 run of the same selection <= 2 x PyTorch's own bf16 error."""
    from vllm_hip_kernels.sparse_attention_reference import sparse_attention_reference

    cfg = _cfg()
    t = 640
    q, k, v = (x.to(torch.bfloat16) for x in _qkv(1, t, t, 6, 2, 64, seed=5))
    cos, sin = _tables(cfg, t)
    out, sel = infinitehip_attention(q, k, v, cfg, rope=(cos, sin), layer_idx=1, impl="torch",
                                     return_selection=True)
    assert out.dtype == torch.bfloat16 and not sel.exact
    kc, vc = k[0].reshape(t // 32, 32, 2, 64), v[0].reshape(t // 32, 32, 2, 64)
    args = (q[0], kc, vc, torch.arange(t // 32, dtype=torch.int32, device=DEV)[None],
            torch.tensor([t], dtype=torch.int32, device=DEV), sel.qblocks, sel.sel_blocks, sel.sel_count)
    kw = dict(sink_tokens=16, sm_scale=64 ** -0.5, cos=cos, sin=sin)
    ref32 = sparse_attention_reference(*args, **kw)
    ref16 = sparse_attention_reference(*args, compute_dtype=torch.bfloat16, **kw)
    own = (ref16 - ref32).abs().max()
    assert own > 0
    assert (out[0].float() - ref32).abs().max() <= 2 * own


# ------------------------------------------------------------------ streaming baseline (k = 0)
@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("rope", [False, True], ids=["model", "streaming"])
def test_streaming_preset_attends_sink_and_window_only(impl, rope):
    cfg = InfiniteHipConfig.from_dict({"preset": "streaming", "sink_tokens": 16, "window_tokens": 64,
                                       "block_size_q": 16})
    t, q_len = 400, 100
    q, k, v = _qkv(2, t, q_len, 4, 2, 64, seed=6)
    tables = _tables(cfg, t) if rope else None
    out, sel = infinitehip_attention(q, k, v, cfg, rope=tables, impl=impl, return_selection=True)
    assert sel.sel_blocks.shape[1] == 0
    # Masked dense reference: query p of a block with first position p0 sees keys < 16 and
    # [W0, p], W0 = max(16, p0 - 63); with RoPE, window keys at their true positions, sink keys
    # renumbered to end just before W0. Blocks are aligned to multiples of 16 (the first query,
    # at 300, starts a short block up to 304); the last query has a block of its own
    # (split_last_query, the default).
    expect = torch.empty(2, q_len, 4, 64, device=DEV)
    keys = torch.arange(t, device=DEV)
    first = t - q_len
    bounds = [first, *range((first // 16 + 1) * 16, t, 16), t - 1, t]
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = slice(a - first, b - first)
        p = torch.arange(a, b, device=DEV)
        w0 = max(16, int(p[0]) - 63)
        allowed = ((keys[None, :] < 16) | (keys[None, :] >= w0)) & (keys[None, :] <= p[:, None])
        qq, kk = q[:, rows], k
        if rope:
            cos, sin = tables
            kpos = torch.where(keys < 16, w0 - 16 + keys, keys)
            qq, kk = apply_rope(qq, p, cos, sin), apply_rope(k, kpos, cos, sin)
        expect[:, rows] = _dense(qq, kk, v, allowed[None])
    torch.testing.assert_close(out.float(), expect, rtol=1e-5, atol=1e-5)
    # Not a tautology: full causal attention differs.
    assert (out.float() - _dense(q, k, v, _causal(q_len, t))).abs().max() > 1e-2


# ------------------------------------------------------------------ input checking
def _ok():
    return _qkv(1, 64, 8, 4, 2, 64)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, k, v: (q[0], k, v), r"q must be \[batch, seq, heads, head_dim\]"),
        (lambda q, k, v: (q, k.to(torch.float16), v.to(torch.float16)), "share one dtype"),
        (lambda q, k, v: (q.int(), k, v), "q has dtype torch.int32"),
        (lambda q, k, v: (q, k, v[:, :32]), "same shape"),
        (lambda q, k, v: (q[:, :, :3], k, v), r"multiple of k/v heads"),
        (lambda q, k, v: (torch.cat([q] * 9, 1), k, v), "1..k_len queries"),
        (lambda q, k, v: (q[..., :48], k[..., :48], v[..., :48]), "head_dim must be"),
        (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), "k has batch 2"),
    ],
    ids=["q-3d", "dtype-mix", "int", "kv-shape", "gqa", "q-longer", "head-dim", "batch"],
)
def test_bad_inputs_are_refused(mutate, match):
    q, k, v = mutate(*_ok())
    with pytest.raises((ValueError, TypeError), match=match):
        infinitehip_attention(q, k, v, _cfg())


def test_bad_options_are_refused():
    q, k, v = _ok()
    cfg = _cfg()
    cos, sin = _tables(cfg, 64)
    with pytest.raises(ValueError, match="rope tables have 10 positions"):
        infinitehip_attention(q, k, v, cfg, rope=(cos[:10], sin[:10]))
    with pytest.raises(ValueError, match="head_dim/2 = 32"):
        infinitehip_attention(q, k, v, cfg, rope=(cos[:, :16], sin[:, :16]))
    with pytest.raises(ValueError, match="fp32"):
        infinitehip_attention(q, k, v, cfg, rope=(cos.double(), sin.double()))
    with pytest.raises(ValueError, match="rope_mode='model'"):
        infinitehip_attention(q, k, v, cfg.replace(rope_mode="model"), rope=(cos, sin))
    with pytest.raises(ValueError, match="impl="):
        infinitehip_attention(q, k, v, cfg, impl="cuda")
    with pytest.raises(ValueError, match="positions must be the last q_len=8"):
        infinitehip_attention(q, k, v, cfg, positions=torch.arange(8))
    with pytest.raises(ValueError, match="page_size"):
        infinitehip_attention(q, k, v, cfg, page_size=12)
    with pytest.raises(ValueError, match="layer_idx"):
        infinitehip_attention(q, k, v, cfg, layer_idx=-1)
    # The positions argument accepts the right thing.
    out = infinitehip_attention(q, k, v, cfg, positions=torch.arange(56, 64)[None])
    assert out.shape == q.shape


def test_default_config_and_dict_config():
    q, k, v = _qkv(1, 300, 300, 9, 3, 64)
    out = infinitehip_attention(q, k, v)  # 3k preset: 300 tokens are exact
    torch.testing.assert_close(out.float(), _dense(q, k, v, _causal(300, 300)), rtol=1e-5, atol=1e-5)
    out2 = infinitehip_attention(q, k, v, {"window_tokens": 2048})
    torch.testing.assert_close(out, out2)


# ------------------------------------------------------------------ experimental head normalization
def test_head_max_norm_keeps_a_quiet_heads_peak():
    """kv head 0 has large logits everywhere; kv head 1 has one clear peak chunk [272, 336).
    The kernels' rule (raw max over heads) never selects the peak; "head_max" does."""
    cfg = _cfg()
    t, d = 700, 64
    g = torch.Generator().manual_seed(7)
    q = torch.zeros(1, t, 2, d)
    q[..., 0, 0] = 1.0
    q[..., 1, 1] = 1.0
    k = 0.05 * torch.randn(1, t, 2, d, generator=g)
    k[0, :, 0, 0] = 20 + 20 * torch.rand(t, generator=g)
    k[0, 272:336, 0, 0] = 15.0
    k[0, 272:336, 1, 1] = 10.0
    v = torch.randn(1, t, 2, d, generator=g)
    q, k, v = q.to(DEV), k.to(DEV), v.to(DEV)

    def selected(norm):
        _, sel = infinitehip_attention(q, k, v, cfg, layer_idx=1, impl="torch", score_norm=norm,
                                       return_selection=True)
        last = sel.sel_blocks[-1, : int(sel.sel_count[-1])].cpu()
        return ((last >= 272) & (last < 336)).sum().item()

    assert selected("none") == 0
    assert selected("head_max") >= 4
    # The kernels' PyTorch reference implements the same normalization.
    _, ref = infinitehip_attention(q, k, v, cfg, layer_idx=1, impl="reference", score_norm="head_max",
                                   return_selection=True)
    _, tor = infinitehip_attention(q, k, v, cfg, layer_idx=1, impl="torch", score_norm="head_max",
                                   return_selection=True)
    assert torch.equal(ref.sel_blocks.cpu(), tor.sel_blocks.cpu())
    with pytest.raises(ValueError, match="score_norm="):
        infinitehip_attention(q, k, v, cfg, score_norm="softmax")
