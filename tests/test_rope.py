"""RoPE tables and rotations (vllm_hip.rope) against transformers and against each other."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_hip.rope import (
    RopeError,
    RopeSpec,
    apply_rope,
    inv_freq_from_spec,
    rope_spec_from_config,
    rope_tables,
    rope_tables_from_config,
    unrotate,
)

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _cfg(rope_parameters, **kw):
    base = dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=131072)
    base.update(kw)
    return LlamaConfig(rope_parameters=rope_parameters, **base)


def _bf16_roundtrip_error(x: torch.Tensor, pos: torch.Tensor, cos, sin) -> float:
    """Max |unrotate(rotate(x)) - x| relative to max |x|, with x and every result held in bf16."""
    xb = x.to(torch.bfloat16)
    back = unrotate(apply_rope(xb, pos, cos, sin), pos, cos, sin)
    return ((back.float() - xb.float()).abs().max() / xb.float().abs().max()).item()


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        LLAMA3,
    ],
    ids=["default", "linear", "llama3"],
)
def test_inv_freq_matches_transformers(params):
    cfg = _cfg(dict(params))
    ours = inv_freq_from_spec(rope_spec_from_config(cfg))
    if params["rope_type"] == "default":
        theirs, scale = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        theirs, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, torch.device("cpu"))
    assert scale == 1.0
    assert ours.shape == theirs.shape
    # transformers works in fp32; ours is float64, rounded here for the comparison.
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-6, atol=0)
    if params["rope_type"] == "llama3":
        # The scaling really changed something (low frequencies divided by `factor`).
        plain = inv_freq_from_spec(RopeSpec(head_dim=128, rotary_dim=128, theta=500000.0))
        assert torch.allclose(ours[0], plain[0]) and ours[-1] < plain[-1] / 7.9


@pytest.mark.parametrize("params", [{"rope_type": "default", "rope_theta": 100000.0}, LLAMA3],
                         ids=["default", "llama3"])
def test_rotation_matches_llama_rotary_embedding(params):
    torch.manual_seed(0)
    cfg = _cfg(dict(params))
    emb = LlamaRotaryEmbedding(cfg)
    seq = 64
    pos = torch.tensor([[0, 1, 2, 7, 100, 1000, 4095, 8191] * (seq // 8)])
    x = torch.randn(1, 4, seq, 128)  # HF layout [batch, heads, seq, D]
    cos_hf, sin_hf = emb(x, pos)
    q_hf, k_hf = apply_rotary_pos_emb(x, x, cos_hf, sin_hf)
    cos, sin = rope_tables_from_config(cfg, 8192)
    ours = apply_rope(x, pos, cos, sin, heads_axis=1)
    # transformers rounds p * inv_freq in fp32 (~p * 6e-8 rad); ours rounds the cos/sin once.
    torch.testing.assert_close(ours, q_hf, rtol=0, atol=2e-3)
    # Not a tautology: the unrotated input is far from the rotated one.
    assert (ours - x).abs().max() > 0.5


def test_roundtrip_fp32_and_bf16(capsys):
    torch.manual_seed(0)
    spec = RopeSpec(head_dim=64, rotary_dim=64, theta=100000.0)  # SmolLM2
    cos, sin = rope_tables(spec, 65536)
    pos = torch.randint(0, 65536, (2048,))
    x = torch.randn(2048, 3, 64) * 3.0
    back = unrotate(apply_rope(x, pos, cos, sin), pos, cos, sin)
    err32 = ((back - x).abs().max() / x.abs().max()).item()
    err16 = _bf16_roundtrip_error(x, pos, cos, sin)
    with capsys.disabled():
        print(f"\nRoPE round trip unrotate(rotate(x)): fp32 max rel err {err32:.2e}, "
              f"bf16 max rel err {err16:.2e} (bf16 eps {2**-8:.2e})")
    assert err32 < 1e-6
    # Two bf16 roundings (after rotate, after unrotate): bounded by a few bf16 ulps of max |x|.
    assert err16 < 3 * 2**-8
    assert err16 > 2**-12  # the bf16 path really rounds (the measurement is not vacuous)
    # Rotation by a position and then by another is rotation by their sum (a real rotation).
    a, b = torch.full((2048,), 123), torch.full((2048,), 4000)
    two = apply_rope(apply_rope(x, a, cos, sin), b, cos, sin)
    torch.testing.assert_close(two, apply_rope(x, a + b, cos, sin), rtol=0, atol=2e-5)


def test_partial_rotary_leaves_tail():
    cfg = {"head_dim": 64, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    spec = rope_spec_from_config(cfg)
    assert spec.rotary_dim == 32
    cos, sin = rope_tables(spec, 16)
    x = torch.randn(5, 2, 64)
    y = apply_rope(x, torch.arange(5) + 3, cos, sin)
    assert torch.equal(y[..., 32:], x[..., 32:])
    assert not torch.allclose(y[..., :32], x[..., :32])


@pytest.mark.parametrize("kind", ["yarn", "longrope", "dynamic"])
def test_unsupported_types_are_refused(kind):
    with pytest.raises(RopeError, match=repr(kind)):
        rope_spec_from_config({"head_dim": 64, "rope_parameters": {"rope_type": kind, "rope_theta": 1e4, "factor": 2.0}})


def test_old_config_layout_and_bad_inputs():
    spec = rope_spec_from_config({"hidden_size": 256, "num_attention_heads": 4, "rope_theta": 5e5,
                                  "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (spec.head_dim, spec.rope_type, spec.factor, spec.theta) == (64, "linear", 2.0, 5e5)
    cos, sin = rope_tables(spec, 8)
    with pytest.raises(ValueError, match="tables have 8 positions"):
        apply_rope(torch.randn(3, 1, 64), torch.tensor([0, 1, 8]), cos, sin)
    with pytest.raises(ValueError, match="integers"):
        apply_rope(torch.randn(3, 1, 64), torch.tensor([0.0, 1.0, 2.0]), cos, sin)
    with pytest.raises(RopeError, match="per layer type"):
        rope_spec_from_config({"head_dim": 64, "rope_parameters": {"full_attention": {"rope_theta": 1e4}}})


def test_tables_are_accurate_far_out():
    spec = RopeSpec(head_dim=64, rotary_dim=64, theta=100000.0)
    cos, sin = rope_tables(spec, 1 << 20)
    p = (1 << 20) - 1
    exact = math.cos(p * 1.0)  # inv_freq[0] = 1
    assert abs(cos[p, 0].item() - exact) < 1e-6
    assert cos.dtype == torch.float32 and cos.shape == (1 << 20, 32)
