"""Every config field: accepted values, refused values, exact messages."""

import json

import pytest

from vllm_hip.config import ConfigError, InfiniteHipConfig, PruningStage


def test_defaults_are_the_paper_3k_preset():
    c = InfiniteHipConfig()
    assert (c.sink_tokens, c.window_tokens, c.selected_tokens) == (256, 1024, 2048)
    assert [s.chunk_size for s in c.stages] == [256, 32, 8]
    assert [s.keep_tokens for s in c.stages] == [32768, 8192, 2048]
    assert [s.refresh_interval for s in c.stages] == [16, 8, 4]
    assert c.selected_tokens_for_layer(0) == 4096 and c.selected_tokens_for_layer(3) == 2048
    assert c.exact_context_tokens(5) == 256 + 1024 + 2048


@pytest.mark.parametrize("refresh,expect", [("paper", [16, 8, 4]), ("fast", [32, 16, 8]), ("flash", [96, 24, 8])])
def test_refresh_presets(refresh, expect):
    c = InfiniteHipConfig.from_dict({"refresh": refresh})
    assert [s.refresh_interval for s in c.stages] == expect


def test_streaming_preset_has_no_selection():
    c = InfiniteHipConfig.from_dict({"preset": "streaming"})
    assert c.selected_tokens == 0 and c.stages == () and c.max_selected_tokens == 0


def test_k_zero_turns_pruning_off():
    c = InfiniteHipConfig.from_dict({"selected_tokens": 0})
    assert c.stages == () and c.max_selected_tokens == 0
    with pytest.raises(ConfigError, match=r"^infinitehip.stages has 0 stages"):
        InfiniteHipConfig.from_dict({"selected_tokens": 0, "early_selected_tokens": 512})


def test_changing_k_alone_adapts_last_stage():
    c = InfiniteHipConfig.from_dict({"selected_tokens": 1024})
    assert c.stages[-1].keep_tokens == 1024


def test_from_additional_config_json_string_and_dict():
    raw = json.dumps({"infinitehip": {"window_tokens": 2048}, "other_plugin": {"x": 1}})
    assert InfiniteHipConfig.from_vllm_additional_config(raw).window_tokens == 2048
    assert InfiniteHipConfig.from_vllm_additional_config({}).window_tokens == 1024
    assert InfiniteHipConfig.from_vllm_additional_config(None) == InfiniteHipConfig()


def test_round_trip_to_dict():
    c = InfiniteHipConfig.from_dict({"refresh": "fast", "sink_tokens": 128})
    assert InfiniteHipConfig.from_dict(c.to_dict()) == c


BAD = [
    ({"sink_tokens": -8}, "infinitehip.sink_tokens=-8 is invalid: must be an integer in [0, 16777216] and a multiple of 8"),
    ({"sink_tokens": 12}, "infinitehip.sink_tokens=12 is invalid: must be an integer in [0, 16777216] and a multiple of 8"),
    ({"sink_tokens": "256"}, "infinitehip.sink_tokens='256' is invalid: must be an integer in [0, 16777216] and a multiple of 8"),
    ({"window_tokens": 0}, "infinitehip.window_tokens=0 is invalid: must be an integer in [8, 16777216] and a multiple of 8"),
    ({"window_tokens": True}, "infinitehip.window_tokens=True is invalid: must be an integer in [8, 16777216] and a multiple of 8"),
    ({"selected_tokens": 100}, "infinitehip.selected_tokens=100 is invalid: must be an integer in [0, 16777216] and a multiple of 8"),
    ({"early_selected_tokens": -1}, "infinitehip.early_selected_tokens=-1 is invalid: must be an integer in [0, 16777216] and a multiple of 8"),
    ({"early_layers": -1}, "infinitehip.early_layers=-1 is invalid: must be an integer in [0, 1024]"),
    ({"block_size_q": 48}, "infinitehip.block_size_q=48 is invalid: must be a power of two in [16, 128]"),
    ({"block_size_q": 256}, "infinitehip.block_size_q=256 is invalid: must be an integer in [16, 128]"),
    ({"block_size_k": 4}, "infinitehip.block_size_k=4 is invalid: must be an integer in [8, 64]"),
    ({"block_size_k": 24}, "infinitehip.block_size_k=24 is invalid: must be a power of two in [8, 64]"),
    ({"refresh": "slow"}, "infinitehip.refresh='slow' is invalid: must be one of 'paper', 'fast', 'flash'"),
    ({"preset": "5k"}, "infinitehip.preset='5k' is invalid: must be one of '3k', 'streaming'"),
    ({"score_norm": "l2"}, "infinitehip.score_norm='l2' is invalid: must be one of 'head_max', 'none'"),
    ({"rope_mode": "yarn"}, "infinitehip.rope_mode='yarn' is invalid: must be one of 'streaming', 'model'"),
    ({"rope_cache": "none"}, "infinitehip.rope_cache='none' is invalid: must be one of 'rotated', 'unrotated'"),
    ({"allow_long_context": "yes"}, "infinitehip.allow_long_context='yes' is invalid: must be true or false"),
    ({"offload": 1}, "infinitehip.offload=1 is invalid: must be true or false"),
    ({"export_metrics": "on"}, "infinitehip.export_metrics='on' is invalid: must be true or false"),
    ({"split_last_query": 0}, "infinitehip.split_last_query=0 is invalid: must be true or false"),
    ({"align_prefill_chunks": "no"}, "infinitehip.align_prefill_chunks='no' is invalid: must be true or false"),
    ({"decode_splits": 1000}, "infinitehip.decode_splits=1000 is invalid: must be an integer in [0, 256]"),
    ({"offload_gpu_cache_tokens": 7}, "infinitehip.offload_gpu_cache_tokens=7 is invalid: must be an integer in [8, 16777216] and a multiple of 8"),
    ({"offload": True, "offload_gpu_cache_tokens": 4096}, "infinitehip.offload_gpu_cache_tokens=4096 is invalid: the GPU cache must hold sink + window + k = 5376 tokens or more"),
    ({"window_size": 5}, "infinitehip.window_size is not an option; known options: preset, sink_tokens, window_tokens, selected_tokens, early_layers, early_selected_tokens, block_size_q, split_last_query, align_prefill_chunks, block_size_k, refresh, stagger_refresh, decode_graphs, stages, score_norm, rope_mode, rope_cache, allow_long_context, export_metrics, decode_splits, offload, offload_gpu_cache_tokens, offload_prefill_staging"),
    ({"selected_tokens": 16384}, "infinitehip.stages[1].keep_tokens=8192 is invalid: must be at least the largest k (16384)"),
    ({"preset": "streaming", "stages": [{"chunk_size": 8, "keep_tokens": 8}]}, "infinitehip.stages is invalid: must be empty when selected_tokens and early_selected_tokens are 0 (nothing to select)"),
]


@pytest.mark.parametrize("options,message", BAD, ids=[next(iter(o)) for o, _ in BAD])
def test_bad_values_name_the_field(options, message):
    with pytest.raises(ConfigError) as e:
        InfiniteHipConfig.from_dict(options)
    assert str(e.value) == message


def _stages(*specs):
    return [dict(zip(("chunk_size", "keep_tokens", "query_pool", "refresh_interval"), s)) for s in specs]


BAD_STAGES = [
    (_stages((256, 32768, 4, 16), (32, 8192, 4, 8), (16, 2048, 1, 4)), "infinitehip.stages[2].chunk_size=16 is invalid: the last stage must use block_size_k (8)"),
    (_stages((256, 32768, 4, 16), (512, 8192, 4, 8), (8, 2048, 1, 4)), "infinitehip.stages[1].chunk_size=512 is invalid: must be smaller than the previous stage's chunk_size (256)"),
    (_stages((96, 32768, 4, 16), (8, 2048, 1, 4)), "infinitehip.stages[0].chunk_size=96 is invalid: must be a power of two in [8, 65536]"),
    (_stages((256, 1000, 4, 16), (8, 2048, 1, 4)), "infinitehip.stages[0].keep_tokens=1000 is invalid: must be an integer in [256, 16777216] and a multiple of 256"),
    (_stages((256, 32768, 3, 16), (8, 2048, 1, 4)), "infinitehip.stages[0].query_pool=3 is invalid: must be a power of two in [1, 64]"),
    (_stages((256, 32768, 4, 4), (8, 2048, 1, 8)), "infinitehip.stages[1].refresh_interval=8 is invalid: must not exceed the previous stage's (4)"),
    (_stages((256, 32768, 4, 2048), (8, 2048, 1, 8)), "infinitehip.stages[0].refresh_interval=2048 is invalid: must not exceed window_tokens (1024), or new tokens would go unseen"),
    (_stages((256, 32768, 4, 16), (8, 1024, 1, 4)), "infinitehip.stages[1].keep_tokens=1024 is invalid: the last stage keeps selected_tokens (2048)"),
    (_stages((256, 2048, 4, 16), (8, 2048, 1, 4)), "infinitehip.stages[0].keep_tokens=2048 is invalid: must be at least the largest k (4096)"),
    ([{"chunk_size": 8}], "infinitehip.stages[0].keep_tokens is missing"),
    ([{"chunk_size": 8, "keep_tokens": 2048, "pool": 2}], "infinitehip.stages[0].pool is not an option; known: chunk_size, keep_tokens, query_pool, refresh_interval"),
    ([{"": 0}], "infinitehip.stages[0][''] is not an option; known: chunk_size, keep_tokens, query_pool, refresh_interval"),
    ("256,32,8", "infinitehip.stages='256,32,8' is invalid: must be a list of stages ({chunk_size, keep_tokens, query_pool, refresh_interval})"),
    ([], "infinitehip.stages has 0 stages: must have between 1 and 8 when selected_tokens > 0 (the 'streaming' preset has none: give stages or use '3k')"),
]


@pytest.mark.parametrize("stages,message", BAD_STAGES)
def test_bad_stages_name_the_field(stages, message):
    with pytest.raises(ConfigError) as e:
        InfiniteHipConfig.from_dict({"stages": stages})
    assert str(e.value) == message


def test_custom_two_stage_config_is_accepted():
    c = InfiniteHipConfig.from_dict(
        {"stages": _stages((64, 8192, 2, 8), (8, 2048, 1, 4)), "early_layers": 0}
    )
    assert c.stages == (PruningStage(64, 8192, 2, 8), PruningStage(8, 2048, 1, 4))
    assert c.stage_keep_tokens(1, 0) == 2048


def test_additional_config_must_be_an_object():
    with pytest.raises(ConfigError, match=r"^infinitehip=\[1\] is invalid"):
        InfiniteHipConfig.from_dict([1])
    with pytest.raises(ConfigError, match="not valid JSON"):
        InfiniteHipConfig.from_vllm_additional_config("{nope")
