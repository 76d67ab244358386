"""vLLM general plugin: makes ``--attention-backend INFINITEHIP`` resolve in every vLLM process.

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) in the API server, the
engine core, every worker and every Ray actor, before an attention backend is resolved. The backend
enum is closed, so INFINITEHIP is registered as an *alias* of ``AttentionBackendEnum.CUSTOM``: an
enum member pickles by value, and CUSTOM's value (None) exists in every process, so a config pickled
in the API server unpickles in a freshly spawned engine core even before this plugin ran there.
The class behind CUSTOM is then set by :func:`register` in that process.

Registration is idempotent and touches nothing but CUSTOM and the alias.
"""

from __future__ import annotations

import functools
import logging
import os
import threading

logger = logging.getLogger("vllm_hip")

BACKEND_NAME = "INFINITEHIP"
BACKEND_CLASS = "vllm_hip.backend.InfiniteHipBackend"

_lock = threading.Lock()
_registered = False


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group (safe to call any number of times)."""
    global _registered
    with _lock:
        if _registered:
            return
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        existing = AttentionBackendEnum.__members__.get(BACKEND_NAME)
        if existing is not None and existing is not AttentionBackendEnum.CUSTOM:
            raise RuntimeError(
                f"AttentionBackendEnum.{BACKEND_NAME} already names {existing!r}; vllm-hip "
                "registers it as an alias of CUSTOM and cannot share the name"
            )
        register_backend(AttentionBackendEnum.CUSTOM, BACKEND_CLASS)
        # EnumMeta.__getitem__ reads _member_map_, which is where Enum keeps aliases too.
        AttentionBackendEnum._member_map_[BACKEND_NAME] = AttentionBackendEnum.CUSTOM
        _wrap_create_engine_config()
        _patch_get_rope()
        _registered = True
        logger.debug("vllm-hip: registered %s as AttentionBackendEnum.CUSTOM", BACKEND_NAME)


def is_infinitehip(backend: object) -> bool:
    """True if ``backend`` (enum member, string or None) selects our backend."""
    if backend is None:
        return False
    name = getattr(backend, "name", backend)
    return isinstance(name, str) and name.upper() in (BACKEND_NAME, "CUSTOM")


def batch_invariant_requested() -> bool:
    """vLLM's batch-invariant mode (``VLLM_BATCH_INVARIANT=1``): no request's output may depend
    on what else is in its batch."""
    try:
        from vllm import envs

        return bool(envs.VLLM_BATCH_INVARIANT)
    except (ImportError, AttributeError):  # pragma: no cover - older vLLM
        return False


def _prepare_engine_args(engine_args: object) -> None:
    """What selecting INFINITEHIP implies for the engine, done before vLLM builds its config.

    - The options are validated here, in the process the user started, so a bad value stops
      start-up with the field's name before any model is loaded.
    - vLLM refuses ``--max-model-len`` beyond the model's trained length unless
      VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, because dense RoPE breaks there. Our streaming RoPE keeps
      every relative distance inside the trained range, so the user should not need to know the
      variable (``allow_long_context`` with ``rope_mode="streaming"``).
    - ``export_metrics`` adds the stats-only KV connector that carries worker counters to
      ``/metrics``.
    - Batch-invariant mode: KV pages of ``block_size_q`` tokens unless the user chose a size, so
      that prefix-cache hits (whole pages) end on query-block boundaries too.
    """
    backend = getattr(engine_args, "attention_backend", None)
    attn_cfg = getattr(engine_args, "attention_config", None)
    if backend is None and attn_cfg is not None:
        backend = getattr(attn_cfg, "backend", None)
    if not is_infinitehip(backend):
        return
    from vllm_hip.config import InfiniteHipConfig

    cfg = InfiniteHipConfig.from_vllm_additional_config(
        getattr(engine_args, "additional_config", None)
    )
    if cfg.export_metrics:
        from vllm_hip import metrics

        metrics.enable_stats_connector(engine_args)
    if batch_invariant_requested():
        _align_pages_to_query_blocks(engine_args, cfg.block_size_q)
    if "VLLM_ALLOW_LONG_MAX_MODEL_LEN" in os.environ:
        return
    if cfg.rope_mode == "streaming" and cfg.allow_long_context:
        os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        logger.info(
            "vllm-hip: INFINITEHIP with streaming RoPE serves contexts beyond the model's "
            "trained length; allowing --max-model-len above max_position_embeddings"
        )


def _align_pages_to_query_blocks(engine_args: object, block_size_q: int) -> None:
    # A prefix-cache hit ends on a page boundary; a page size that is a multiple of block_size_q
    # keeps the first recomputed query block whole, as in a run without the hit.
    size = getattr(engine_args, "block_size", None)
    if size is None:
        engine_args.block_size = block_size_q  # type: ignore[attr-defined]
        logger.info("vllm-hip: batch-invariant mode: KV pages of %d tokens (block_size_q)", block_size_q)
    elif size % block_size_q:
        logger.warning(
            "vllm-hip: batch-invariant mode with --block-size %d, not a multiple of block_size_q="
            "%d: a prefix-cache hit can split a query block, and outputs can then depend on what "
            "the cache held", size, block_size_q,
        )


def _choose_scheduler(vllm_config: object) -> None:
    """With INFINITEHIP, vLLM's scheduler cutting prefill chunks at query-block boundaries
    (``vllm_hip.scheduler``), chosen once vLLM has decided on async scheduling. A scheduler class
    the user named is kept."""
    attn = getattr(vllm_config, "attention_config", None)
    sc = getattr(vllm_config, "scheduler_config", None)
    if sc is None or not is_infinitehip(getattr(attn, "backend", None)):
        return
    from vllm_hip.config import InfiniteHipConfig

    cfg = InfiniteHipConfig.from_vllm_additional_config(getattr(vllm_config, "additional_config", None))
    if not cfg.align_prefill_chunks:
        return
    if sc.scheduler_cls is not None:
        logger.warning(
            "vllm-hip: --scheduler-cls %s is kept; prefill chunks are not aligned to query blocks "
            "(align_prefill_chunks needs vLLM's own scheduler)", sc.scheduler_cls,
        )
        return
    from vllm_hip.scheduler import scheduler_class_for

    sc.scheduler_cls = scheduler_class_for(bool(sc.async_scheduling))


def _wrap_create_engine_config() -> None:
    # `vllm serve`, LLM(...) and AsyncEngineArgs all build the VllmConfig here: wrap it once.
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_vllm_hip_wrapped", False):
        return

    def create_engine_config(self, *args, **kwargs):
        _prepare_engine_args(self)
        vllm_config = original(self, *args, **kwargs)
        _choose_scheduler(vllm_config)
        return vllm_config

    create_engine_config._vllm_hip_wrapped = True  # type: ignore[attr-defined]
    create_engine_config.__wrapped__ = original  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]


# ------------------------------------------------------------------------------ RoPE hand-over
_rope_handed_over = False


def rope_handed_over() -> bool:
    """True once a model layer in this process was built with the identity rotary embedding."""
    return _rope_handed_over


def _selected_config():
    """(our config, vLLM's config) while a model is built for INFINITEHIP, else None."""
    from vllm.config import get_current_vllm_config_or_none

    vc = get_current_vllm_config_or_none()
    if vc is None or not is_infinitehip(getattr(vc.attention_config, "backend", None)):
        return None
    from vllm_hip.config import InfiniteHipConfig

    try:
        cfg = InfiniteHipConfig.from_vllm_additional_config(vc.additional_config)
    except ValueError:
        return None  # reported by the backend with the field's name
    if getattr(vc, "model_config", None) is None:
        return None
    return cfg, vc


def _streaming_rope_selected() -> bool:
    sel = _selected_config()
    if sel is None:
        return False
    cfg, vc = sel
    if cfg.rope_mode != "streaming" or cfg.rope_cache != "unrotated":
        return False
    from vllm_hip.backend import streaming_rope_supported

    return streaming_rope_supported(vc.model_config.hf_config)


def _rotated_positions_needed() -> int:
    """Positions the model's own rotary embedding must cover when it rotates for INFINITEHIP
    (0: no change). vLLM sizes its cos/sin cache by ``max_position_embeddings``; positions
    beyond it (``--max-model-len`` above the trained length) would read past the cache. The
    kernels only use differences of the model's rotations, so rotating every position up to
    ``max_model_len`` is what the rotated cache needs."""
    sel = _selected_config()
    if sel is None:
        return 0
    return int(getattr(sel[1].model_config, "max_model_len", 0) or 0)


def _with_max_position(args: tuple, kwargs: dict, need: int) -> tuple[tuple, dict]:
    """``get_rope`` arguments with ``max_position`` raised to at least ``need``."""
    if "max_position" in kwargs:
        kwargs = {**kwargs, "max_position": max(int(kwargs["max_position"]), need)}
    elif len(args) >= 2:
        args = (args[0], max(int(args[1]), need), *args[2:])
    return args, kwargs


def _patch_get_rope() -> None:
    """Take RoPE over from the model when INFINITEHIP streams positions into un-rotated keys.

    With ``rope_mode="streaming"`` and ``rope_cache="unrotated"`` the kernels rotate un-rotated
    queries and keys at positions they assign, so the model's own rotation would only have to be
    undone (in bf16: a second rounding of every key in the cache). Models build their rotary
    embedding through ``get_rope`` while the VllmConfig is current; when our backend is selected
    the model gets an embedding that leaves q and k as they are, and the backend sees them
    un-rotated. With keys cached rotated the model keeps vLLM's embedding, sized for
    ``max_model_len`` positions (:func:`_rotated_positions_needed`). Every other backend gets
    vLLM's own, unchanged.
    """
    from vllm.model_executor.layers import rotary_embedding as re

    original = re.get_rope
    if getattr(original, "_vllm_hip_wrapped", False):
        return

    def get_rope(*args, **kwargs):
        if not _streaming_rope_selected():
            need = _rotated_positions_needed()
            if need:
                args, kwargs = _with_max_position(args, kwargs, need)
            return original(*args, **kwargs)
        rope = original(*args, **kwargs)
        global _rope_handed_over
        _rope_handed_over = True
        return _IdentityRope(rope)

    get_rope._vllm_hip_wrapped = True  # type: ignore[attr-defined]
    get_rope.__wrapped__ = original  # type: ignore[attr-defined]
    re.get_rope = get_rope


@functools.lru_cache(maxsize=None)
def _identity_rope_class():
    import torch

    class IdentityRope(torch.nn.Module):
        """Stands in for the model's rotary embedding: q and k pass through un-rotated."""

        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            # Kept (not registered as a submodule) for introspection: head_size, rotary_dim, ...
            self.__dict__["inner"] = inner
            self.head_size = getattr(inner, "head_size", None)
            self.rotary_dim = getattr(inner, "rotary_dim", None)
            self.is_neox_style = getattr(inner, "is_neox_style", True)

        def forward(self, positions, query, key=None, *args, **kwargs):
            return query, key

    return IdentityRope


def _IdentityRope(inner):  # noqa: N802 - a class built lazily so this module needs no torch
    return _identity_rope_class()(inner)
