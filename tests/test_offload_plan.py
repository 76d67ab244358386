"""``vllm-hip plan``: KV memory of a long context, dense vs INFINITEHIP with offload."""

from __future__ import annotations

import json

import pytest

from vllm_hip import cli
from vllm_hip.config import InfiniteHipConfig
from vllm_hip.offload_plan import (
    DECODE_MARGIN_TOKENS,
    KvShape,
    gpu_buffer_bytes,
    max_context_in_host,
    plan_offload,
    report,
)

LLAMA_8B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}
GIB = 1 << 30


def test_kv_shape_from_hf_configs():
    assert KvShape.from_hf_config(LLAMA_8B) == KvShape(32, 8, 128)
    # head_dim given, kv heads defaulting to the attention heads, a nested text config
    assert KvShape.from_hf_config({"num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 64,
                                   "hidden_size": 999}) == KvShape(2, 4, 64)  # fmt: skip
    assert KvShape.from_hf_config({"text_config": LLAMA_8B}) == KvShape(32, 8, 128)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        KvShape.from_hf_config({"hidden_size": 8})


def test_a_million_tokens_of_llama_8b_in_fp8():
    """The numbers of the issue's target: 64 GiB dense in fp8; with offload ~3 GiB of GPU
    (16K-token page caches + one layer's staging), under 5% of dense."""
    cfg = InfiniteHipConfig(offload=True, offload_gpu_cache_tokens=16384)
    plan = plan_offload(KvShape(32, 8, 128), 1 << 20, cfg, kv_dtype_bytes=1)
    assert plan.kv_bytes_per_token == 32 * 2 * 8 * 128
    assert plan.dense_kv_bytes == 64 * GIB
    pages = -(-((1 << 20) + DECODE_MARGIN_TOKENS) // 16)
    assert plan.host_kv_bytes == pages * 16 * 65536
    assert plan.staging_bytes == pages * 16 * 2048  # one layer
    assert plan.page_cache_bytes == gpu_buffer_bytes(layers=32, num_pages=pages, page_tokens=16,
                                                     page_bytes=16 * 2048, config=cfg)["page_caches"]  # fmt: skip
    assert 0.04 < plan.gpu_fraction_of_dense < 0.05
    no_staging = plan_offload(KvShape(32, 8, 128), 1 << 20, cfg.replace(offload_prefill_staging=False), kv_dtype_bytes=1)
    assert no_staging.staging_bytes == 0 and no_staging.gpu_kv_bytes == plan.page_cache_bytes


def test_staging_holds_one_request_however_many_are_planned():
    cfg = InfiniteHipConfig(offload=True, offload_gpu_cache_tokens=16384)
    one = plan_offload(KvShape(32, 8, 128), 1 << 20, cfg, kv_dtype_bytes=1)
    four = plan_offload(KvShape(32, 8, 128), 1 << 20, cfg, kv_dtype_bytes=1, requests=4)
    assert four.host_kv_bytes == 4 * one.host_kv_bytes
    assert four.staging_bytes == -(-((1 << 20) + DECODE_MARGIN_TOKENS + 8192) // 16) * 16 * 2048
    assert four.gpu_fraction_of_dense < one.gpu_fraction_of_dense


def test_longest_context_that_host_memory_holds():
    shape = KvShape(16, 8, 64)  # Llama-3.2-1B: 16 KB a token in fp8
    assert max_context_in_host(shape, 100 * GIB, kv_dtype_bytes=1) == 100 * GIB // 16384 - DECODE_MARGIN_TOKENS
    assert max_context_in_host(shape, 100 * GIB, kv_dtype_bytes=1, requests=2) == 50 * GIB // 16384 - DECODE_MARGIN_TOKENS
    assert max_context_in_host(shape, 1000, kv_dtype_bytes=1) == 0


def test_report_says_what_does_not_fit_and_prints_the_serve_command():
    cfg = InfiniteHipConfig(offload=True, offload_gpu_cache_tokens=16384)
    shape = KvShape(32, 8, 128)
    plan = plan_offload(shape, 1 << 20, cfg, kv_dtype_bytes=1)
    big = {"host_pinnable": 100 * GIB, "gpu_free": 60 * GIB, "gpu_total": 80 * GIB}
    text = report("m", shape, plan, cfg, "fp8", big)
    assert "DOES NOT FIT" not in text and f"--kv-cache-memory-bytes {plan.host_kv_bytes}" in text
    assert '"offload": true' in text and "--kv-cache-dtype fp8" in text
    small = {"host_pinnable": 10 * GIB, "gpu_free": 3 * GIB, "gpu_total": 80 * GIB}
    text = report("m", shape, plan, cfg, "fp8", small)
    assert text.count("DOES NOT FIT") == 2 and "longest context per request: 159,744 tokens" in text


def test_cli_plan_prints_json_and_refuses_bad_options(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    assert cli.main(["plan", str(tmp_path), "--context", "131072", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layers"] == 32 and out["dense_kv_bytes"] == 131072 * 32 * 2 * 8 * 128 * 2
    assert out["gpu_kv_bytes"] == out["page_cache_bytes"] + out["staging_bytes"]
    with pytest.raises(SystemExit):
        cli.main(["plan", str(tmp_path), "--context", "1024", "--additional-config",
                  '{"infinitehip": {"offload_gpu_cache_tokens": -5}}'])  # fmt: skip
    assert "offload_gpu_cache_tokens" in capsys.readouterr().err
