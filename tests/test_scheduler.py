"""Prefill chunks cut at query-block boundaries (vllm_hip.scheduler), on vLLM's real scheduler."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm_hip import plugin  # noqa: E402
from vllm_hip.scheduler import (  # noqa: E402
    AlignedAsyncScheduler,
    AlignedScheduler,
    aligned_chunk_tokens,
    scheduler_class_for,
)


@pytest.mark.parametrize(
    "start,n,end,want",
    [
        (0, 300, 1000, 256),  # cut down to the boundary
        (0, 1000, 1000, 1000),  # the last chunk ends where the prompt does
        (704, 296, 1000, 296),
        (40, 20, 1000, 0),  # cannot reach the next boundary: wait for a fuller budget
        (48, 100, 1000, 80),  # a prefix-cache hit mid-block: realigned at the next boundary
        (0, 63, 1000, 0),
    ],
)
def test_aligned_chunk_tokens(start, n, end, want):
    assert aligned_chunk_tokens(start, n, end, 64) == want
    assert aligned_chunk_tokens(start, n, end, 1) == n  # alignment off


@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory):
    from transformers import LlamaConfig
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig

    model = tmp_path_factory.mktemp("sched_model")
    LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
    ).save_pretrained(model)  # fmt: skip

    def make(budget=300, rows=4, hip=None, async_scheduling=False, threshold=0, prefix_caching=False):
        mc = ModelConfig(model=str(model), skip_tokenizer_init=True, max_model_len=8192)
        sc = SchedulerConfig(
            max_num_seqs=rows, max_num_batched_tokens=budget, max_model_len=8192,
            enable_chunked_prefill=True, async_scheduling=async_scheduling, is_encoder_decoder=False,
            long_prefill_token_threshold=threshold,
        )  # fmt: skip
        cc = CacheConfig(block_size=16, enable_prefix_caching=prefix_caching)
        cc.num_gpu_blocks = 2000
        return VllmConfig(
            device_config=DeviceConfig(device="cpu"), model_config=mc, scheduler_config=sc,
            cache_config=cc, additional_config={"infinitehip": hip or {}},
        )  # fmt: skip

    return make


def _scheduler(cls, vllm_config):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    spec = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=2000, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l"], spec)])
    return cls(vllm_config=vllm_config, kv_cache_config=kv, block_size=16,
               structured_output_manager=StructuredOutputManager(vllm_config))  # fmt: skip


def _request(rid: str, tokens: list[int], hasher=None):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(rid, tokens, SamplingParams(max_tokens=4), None, block_hasher=hasher)


def _chunks(cls, vllm_config, prompts):
    """Schedule ``prompts`` (token counts) until every prefill is done; the chunk ends of each."""
    s = _scheduler(cls, vllm_config)
    for i, n in enumerate(prompts):
        s.add_request(_request(str(i), list(range(n))))
    done = {str(i): 0 for i in range(len(prompts))}
    ends: dict[str, list[int]] = {k: [] for k in done}
    for _ in range(50):
        out = s.schedule()
        for rid, n in out.num_scheduled_tokens.items():
            if done[rid] < prompts[int(rid)]:
                done[rid] += n
                ends[rid].append(done[rid])
        if all(done[k] >= prompts[int(k)] for k in done):
            return ends
    raise AssertionError(f"prefills did not finish: {done}")


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_aligned_scheduler_cuts_prompts_only_at_block_boundaries(vllm_config, async_scheduling):
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    prompts = [50, 1000, 70, 333]
    base, aligned = (AsyncScheduler, AlignedAsyncScheduler) if async_scheduling else (Scheduler, AlignedScheduler)
    cfg = vllm_config(async_scheduling=async_scheduling)
    plain = _chunks(base, cfg, prompts)
    ours = _chunks(aligned, cfg, prompts)
    # vLLM's own cuts fall mid-block (the test would not show anything otherwise)
    assert any(e % 64 for k, es in plain.items() for e in es[:-1]), plain
    for k, es in ours.items():
        assert es[-1] == prompts[int(k)]
        assert all(e % 64 == 0 for e in es[:-1]), (k, es)


def test_aligned_scheduler_follows_block_size_q_and_can_be_turned_off(vllm_config):
    ends = _chunks(AlignedScheduler, vllm_config(hip={"block_size_q": 16}), [50, 1000])
    assert all(e % 16 == 0 for e in ends["1"][:-1]) and any(e % 64 for e in ends["1"][:-1])
    off = _chunks(AlignedScheduler, vllm_config(hip={"align_prefill_chunks": False}), [50, 1000])
    assert any(e % 16 for e in off["1"][:-1])
    # A budget or a long-prefill cap that could not always reach the next boundary: not aligned
    # (a prompt must never stall).
    small = _chunks(AlignedScheduler, vllm_config(budget=100, rows=40), [50, 1000])
    assert any(e % 64 for e in small["1"][:-1])
    capped = _chunks(AlignedScheduler, vllm_config(threshold=40), [50, 1000])
    assert capped["1"][:3] == [40, 80, 120]
    # a cap of a block or more keeps the alignment
    assert all(e % 64 == 0 for e in _chunks(AlignedScheduler, vllm_config(threshold=100), [50, 1000])["1"][:-1])


def test_a_prefix_cache_hit_mid_block_is_realigned_at_the_next_boundary(vllm_config):
    """A hit ends on a KV page (16 tokens here): the next chunk ends on a query-block boundary
    again (with --block-size 64, as batch-invariant mode sets, hits are aligned themselves)."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    sha = get_hash_fn_by_name("sha256")
    init_none_hash(sha)
    hasher = get_request_block_hasher(16, sha)
    s = _scheduler(AlignedScheduler, vllm_config(prefix_caching=True))
    first = list(range(1000))
    s.add_request(_request("a", first, hasher))
    for _ in range(4):
        s.schedule()  # a's prefill: its full pages enter the prefix cache
    s.add_request(_request("b", first[:700] + [7] * 300, hasher))
    out = s.schedule()
    (new,) = out.scheduled_new_reqs
    hit = new.num_computed_tokens
    assert hit % 16 == 0 and hit % 64 and 0 < hit <= 700  # a page boundary inside a query block
    end = hit + out.num_scheduled_tokens["b"]
    assert end % 64 == 0 or end == 1000, (hit, end)


def _engine_config(backend="INFINITEHIP", hip=None, scheduler_cls=None, async_scheduling=True):
    return SimpleNamespace(
        attention_config=SimpleNamespace(backend=backend),
        additional_config={"infinitehip": hip or {}},
        scheduler_config=SimpleNamespace(scheduler_cls=scheduler_cls, async_scheduling=async_scheduling),
    )


def test_plugin_picks_the_aligned_scheduler_matching_async_scheduling():
    from vllm.utils.import_utils import resolve_obj_by_qualname

    for async_scheduling, cls in ((True, AlignedAsyncScheduler), (False, AlignedScheduler)):
        cfg = _engine_config(async_scheduling=async_scheduling)
        plugin._choose_scheduler(cfg)
        assert cfg.scheduler_config.scheduler_cls == scheduler_class_for(async_scheduling)
        assert resolve_obj_by_qualname(cfg.scheduler_config.scheduler_cls) is cls
    untouched = [
        _engine_config(backend="FLASH_ATTN"),
        _engine_config(hip={"align_prefill_chunks": False}),
        _engine_config(scheduler_cls="my.Scheduler"),  # the user's own class is kept
    ]
    for cfg in untouched:
        before = json.dumps(cfg.scheduler_config.scheduler_cls)
        plugin._choose_scheduler(cfg)
        assert json.dumps(cfg.scheduler_config.scheduler_cls) == before
