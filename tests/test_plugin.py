"""The INFINITEHIP name resolves in every process vLLM starts, and registration is harmless."""

import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("vllm")


def _run(code: str, cwd: str | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # vLLM logs to stdout too: keep only what the snippet printed with the marker.
    return "\n".join(l[3:] for l in proc.stdout.splitlines() if l.startswith("@@ "))


def test_entry_point_is_installed_and_registers_in_a_fresh_process():
    out = _run(
        """
        from importlib.metadata import entry_points
        eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "infinitehip"]
        assert len(eps) == 1 and eps[0].value == "vllm_hip.plugin:register", eps
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        b = AttentionBackendEnum["INFINITEHIP"]
        print("@@", b.name, b.get_path())
        """
    )
    assert out.split() == ["CUSTOM", "vllm_hip.backend.InfiniteHipBackend"]


@pytest.mark.parametrize("where", ["elsewhere", "repository root"])
def test_installing_us_leaves_vllms_bundled_triton_kernels_in_place(tmp_path, where):
    """Our kernels folder installs as ``vllm_hip_kernels``: a top-level ``triton_kernels`` would
    be imported by vLLM in place of the OpenAI triton_kernels it bundles (its MXFP4 MoE path).
    In the repository root, where the folder is found by its name, it hands the name over."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = _run(
        """
        import vllm_hip_kernels.prune
        from vllm.utils.import_utils import has_triton_kernels
        assert has_triton_kernels()
        import triton_kernels, triton_kernels.matmul_ogs
        print("@@", triton_kernels.__name__, triton_kernels.__file__)
        """,
        cwd=str(tmp_path) if where == "elsewhere" else root,
    )
    name, path = out.split()
    assert name == "vllm.third_party.triton_kernels" and "vllm_hip" not in path, out


def test_cli_style_lookup_and_backend_class_resolve():
    out = _run(
        """
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from vllm.config.attention import AttentionConfig
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        cfg = AttentionConfig(backend="infinitehip")
        cls = cfg.backend.get_class()
        print("@@", cfg.backend is AttentionBackendEnum.CUSTOM, cls.__name__, cls.get_name())
        # Other backends are untouched.
        print("@@", AttentionBackendEnum["FLASH_ATTN"].get_path())
        """
    )
    lines = out.splitlines()
    assert lines[0] == "True InfiniteHipBackend CUSTOM"
    assert lines[1] == "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend"


def test_register_twice_is_harmless():
    out = _run(
        """
        from vllm_hip import plugin
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        plugin.register(); plugin._registered = False; plugin.register(); plugin.register()
        from vllm.engine.arg_utils import EngineArgs
        f = EngineArgs.create_engine_config
        assert getattr(f, "_vllm_hip_wrapped", False) and not getattr(f.__wrapped__, "_vllm_hip_wrapped", False)
        names = [m.name for m in AttentionBackendEnum]
        assert names.count("CUSTOM") == 1 and "INFINITEHIP" not in names  # alias, not a member
        print("@@", AttentionBackendEnum["INFINITEHIP"] is AttentionBackendEnum.CUSTOM)
        """
    )
    assert out.strip() == "True"


def _child(payload: bytes, queue) -> None:
    # A freshly spawned process: no plugin has run here yet when the config is unpickled.
    from vllm.v1.attention.backends import registry

    backend = pickle.loads(payload)
    before = backend is registry.AttentionBackendEnum.CUSTOM
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    queue.put((before, backend.get_path(), registry.AttentionBackendEnum["INFINITEHIP"].name))


def test_pickled_backend_survives_spawn_before_plugins_load():
    from vllm_hip import plugin
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    payload = pickle.dumps(AttentionBackendEnum["INFINITEHIP"])
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(payload, q))
    p.start()
    p.join(300)
    assert p.exitcode == 0
    assert q.get(timeout=10) == (True, "vllm_hip.backend.InfiniteHipBackend", "CUSTOM")


def test_long_context_is_allowed_only_for_our_backend(monkeypatch):
    from vllm_hip import plugin

    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)

    class Args:
        attention_backend = "FLASH_ATTN"
        attention_config = None
        additional_config = None
        kv_transfer_config = None
        disable_log_stats = False

    plugin._prepare_engine_args(Args())
    import os

    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN" not in os.environ
    Args.additional_config = {"infinitehip": {"rope_mode": "model"}}
    Args.attention_backend = "INFINITEHIP"
    plugin._prepare_engine_args(Args())
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN" not in os.environ
    Args.additional_config = {"infinitehip": {}}
    args = Args()
    plugin._prepare_engine_args(args)
    assert os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] == "1"
    # The stats-only connector is enabled so worker counters reach /metrics.
    assert "InfiniteHipStatsConnector" in str(args.kv_transfer_config)


@pytest.mark.parametrize("invariant,given,want", [("1", None, 32), ("1", 16, 16), ("1", 64, 64), ("0", None, None)])
def test_batch_invariant_mode_pages_hold_whole_query_blocks(monkeypatch, invariant, given, want):
    """VLLM_BATCH_INVARIANT=1: KV pages of block_size_q tokens unless the user chose a size (a
    prefix-cache hit then ends on a query-block boundary); the backend declares invariance."""
    from vllm import envs
    from vllm_hip import plugin
    from vllm_hip.backend import InfiniteHipBackend

    monkeypatch.setenv("VLLM_BATCH_INVARIANT", invariant)
    assert not envs._is_envs_cache_enabled()  # read anew: the variable set here counts
    assert plugin.batch_invariant_requested() is (invariant == "1")

    class Args:
        attention_backend = "INFINITEHIP"
        attention_config = None
        additional_config = {"infinitehip": {"block_size_q": 32, "export_metrics": False}}
        block_size = given

    args = Args()
    plugin._prepare_engine_args(args)
    assert args.block_size == want
    assert InfiniteHipBackend.supports_batch_invariance()


def test_bad_options_stop_engine_args_before_the_model_loads():
    from vllm_hip import plugin
    from vllm_hip.config import ConfigError

    class Args:
        attention_backend = "INFINITEHIP"
        attention_config = None
        additional_config = {"infinitehip": {"window_tokens": -1}}
        kv_transfer_config = None
        disable_log_stats = False

    with pytest.raises(ConfigError, match=r"^infinitehip.window_tokens=-1 is invalid"):
        plugin._prepare_engine_args(Args())


def test_backend_refuses_what_it_cannot_serve():
    from vllm_hip.backend import InfiniteHipBackend, InfiniteHipImpl

    assert not InfiniteHipBackend.supports_attn_type("encoder_decoder")
    assert not InfiniteHipBackend.is_mla()
    assert not InfiniteHipBackend.supports_head_size(96)
    with pytest.raises(NotImplementedError, match="sliding-window layers"):
        InfiniteHipImpl(8, 64, 0.125, 2, sliding_window=4096)
    with pytest.raises(NotImplementedError, match="ALiBi"):
        InfiniteHipImpl(8, 64, 0.125, 2, alibi_slopes=[0.1] * 8)


def test_rope_is_handed_over_only_to_our_streaming_backend():
    """With INFINITEHIP + streaming RoPE into an un-rotated cache, models get an identity rotary
    embedding (q/k reach the backend un-rotated); other backends, the default rotated cache and
    rope_mode="model" keep vLLM's own."""
    import types

    import torch
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.config.attention import AttentionConfig
    from vllm.model_executor.layers import rotary_embedding as re

    from vllm_hip import plugin

    plugin.register()
    hf = types.SimpleNamespace(model_type="llama", rope_theta=1e4, head_dim=64, rope_scaling=None)

    def built(backend, options):
        vc = VllmConfig(device_config=DeviceConfig(device="cpu"),
                        attention_config=AttentionConfig(backend=backend),
                        additional_config={"infinitehip": options})
        object.__setattr__(vc, "model_config", types.SimpleNamespace(hf_config=hf, max_model_len=20000))
        with set_current_vllm_config(vc):
            return re.get_rope(64, 8192, rope_parameters={"rope_theta": 1e4})

    rotated = built("INFINITEHIP", {})  # rope_cache="rotated": vLLM's own, for every position
    assert type(rotated).__name__ == "RotaryEmbedding"
    assert rotated.cos_sin_cache.shape[0] == 20000  # not 8192: --max-model-len is served
    assert built("FLASH_ATTN", {}).cos_sin_cache.shape[0] == 8192
    # positions the trained length covers rotate exactly as under FLASH_ATTN
    assert torch.equal(rotated.cos_sin_cache[:8192], built("FLASH_ATTN", {}).cos_sin_cache)
    ours = built("INFINITEHIP", {"rope_cache": "unrotated"})
    q, k = torch.randn(3, 128), torch.randn(3, 64)
    out_q, out_k = ours(torch.arange(3), q, k)
    assert out_q is q and out_k is k and plugin.rope_handed_over()
    assert type(built("FLASH_ATTN", {})).__name__ == "RotaryEmbedding"
    assert type(built("INFINITEHIP", {"rope_mode": "model"})).__name__ == "RotaryEmbedding"


def test_max_position_is_raised_in_either_calling_form():
    """get_rope(head, max_position, ...) or get_rope(head, max_position=...): raised, never
    lowered (Llama builds it with the keyword)."""
    from vllm_hip.plugin import _with_max_position

    assert _with_max_position((64, 8192), {}, 20000) == ((64, 20000), {})
    assert _with_max_position((64,), {"max_position": 8192, "is_neox_style": True}, 20000) == (
        (64,), {"max_position": 20000, "is_neox_style": True})
    assert _with_max_position((64, 30000), {}, 20000) == ((64, 30000), {})
