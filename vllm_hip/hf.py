"""InfiniteHiP inside Hugging Face transformers: ``attn_implementation="infinitehip"``.

Importing this module registers the attention function with transformers' ``AttentionInterface``.
Two ways to use it on a Llama-family model (Llama, SmolLM2, Qwen2, Mistral without sliding window)::

    import vllm_hip.hf as hip_hf

    # 1. recommended: load normally, then switch (swaps the rotary embedding for an identity, so
    #    q/k reach the attention unrotated and our kernels assign streaming positions: exact)
    model = AutoModelForCausalLM.from_pretrained(path)
    hip_hf.enable_infinitehip(model, {"selected_tokens": 2048})
    model.generate(ids, max_new_tokens=8)            # prefill + decode on a DynamicCache
    hip_hf.disable_infinitehip(model)                # back to the model's own attention

    # 2. by name (config read from ``model.config.infinitehip``, a dict, if present): q/k arrive
    #    rotated by the model and are rotated back before use (bf16 round-trip error ~4e-3)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="infinitehip")

Contexts beyond the model's ``max_position_embeddings`` work in both ways with the default
``rope_mode="streaming"``: the largest relative distance a query sees is about
sink + k + window, inside the trained range (docs/infinitehip.md §5).

On SmolLM2-135M the kernels' head-score rule loses passkeys even at 4K tokens (1/3 vs dense 3/3);
``enable_infinitehip(model, score_norm="head_max")`` (CPU/torch path) fixes that: 2/3 at 16K where
dense gets 0/3 (``python -m vllm_hip.demo``).

Limits: batches must be unpadded (every row the same length; left padding is refused with an
error naming ``positions``); decode reruns all pruning stages every step (no mask caching);
inference only (dropout must be 0).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from vllm_hip.api import (
    IMPLEMENTATIONS,
    SCORE_NORMS,
    Selection,
    infinitehip_attention,
    required_rope_positions,
)
from vllm_hip.config import InfiniteHipConfig
from vllm_hip.rope import RopeSpec, rope_spec_from_config, rope_tables, unrotate

__all__ = [
    "ATTN_IMPLEMENTATION",
    "InfiniteHipHFState",
    "register",
    "enable_infinitehip",
    "disable_infinitehip",
    "infinitehip_attention_forward",
    "get_state",
]

logger = logging.getLogger(__name__)

#: Name to pass as ``attn_implementation``.
ATTN_IMPLEMENTATION = "infinitehip"
_TABLE_GRANULE = 8192


class _IdentityRotary(nn.Module):
    """Stand-in for a model's rotary embedding: cos = 1 and sin = 0, so the model's
    ``apply_rotary_pos_emb`` leaves q and k exactly as they are (``q * 1 + rot(q) * 0``)."""

    def __init__(self, original: nn.Module, head_dim: int):
        super().__init__()
        self.original = original
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kwargs: Any):
        shape = tuple(position_ids.shape) + (self.head_dim,)
        ones = torch.ones((), dtype=x.dtype, device=x.device).expand(shape)
        zeros = torch.zeros((), dtype=x.dtype, device=x.device).expand(shape)
        return ones, zeros


@dataclass
class InfiniteHipHFState:
    """Per-model state shared by every attention layer (attached to their modules)."""

    config: InfiniteHipConfig
    """The InfiniteHiP options."""
    rope_spec: RopeSpec | None
    """RoPE of the model (None in ``rope_mode="model"``)."""
    rope_handling: str
    """``"identity"`` (rotary swapped out: q/k arrive unrotated), ``"unrotate"`` (q/k arrive
    rotated and are rotated back here) or ``"model"`` (kept rotated, no position reassignment)."""
    impl: str = "auto"
    """Implementation passed to :func:`vllm_hip.api.infinitehip_attention`."""
    score_norm: str | None = None
    """Head-score combination passed to :func:`vllm_hip.api.infinitehip_attention` (None: the
    config's ``score_norm``)."""
    calls: int = 0
    """Attention calls so far (all layers)."""
    pruned_calls: int = 0
    """Calls whose context outgrew sink + window + k, so pruning really chose blocks."""
    max_context: int = 0
    """Longest key length seen."""
    on_selection: Callable[[int, Selection], None] | None = None
    """Called with ``(layer_idx, selection)`` after every attention call, for analysis (e.g.
    ``benchmarks/passkey_sweep.py`` checks whether the needle's blocks were selected)."""
    _tables: dict = field(default_factory=dict, repr=False)

    def tables(self, device: torch.device, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        need = required_rope_positions(self.config, seq_len)
        have = self._tables.get(device)
        if have is None or have[0].shape[0] < need:
            rows = -(-max(need, 2 * (have[0].shape[0] if have else 0)) // _TABLE_GRANULE) * _TABLE_GRANULE
            have = rope_tables(self.rope_spec, rows, device)
            self._tables[device] = have
        return have


# Models switched on by name only (no enable_infinitehip): one state per model config, keyed by
# id() (configs are unhashable) and dropped when the config is garbage-collected.
_LAZY_STATES: dict[int, InfiniteHipHFState] = {}


def _as_config(config: InfiniteHipConfig | Mapping[str, Any] | None) -> InfiniteHipConfig:
    if config is None:
        return InfiniteHipConfig()
    if isinstance(config, InfiniteHipConfig):
        return config
    if isinstance(config, Mapping):
        return InfiniteHipConfig.from_dict(config)
    raise TypeError(f"config must be an InfiniteHipConfig, a dict or None, got {type(config).__name__}")


def _make_state(model_config: Any, config: InfiniteHipConfig, rope_handling: str, impl: str,
                score_norm: str | None = None) -> InfiniteHipHFState:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r} is invalid: must be one of {IMPLEMENTATIONS}")
    if score_norm is not None and score_norm not in SCORE_NORMS:
        raise ValueError(f"score_norm={score_norm!r} is invalid: must be one of {SCORE_NORMS}")
    spec = None
    if config.rope_mode == "streaming":
        spec = rope_spec_from_config(model_config)
        if spec.rotary_dim != spec.head_dim:
            raise ValueError(
                f"partial rotary embeddings (rotary_dim {spec.rotary_dim} < head_dim {spec.head_dim}) "
                "are not supported with rope_mode='streaming'; use rope_mode='model'"
            )
    else:
        rope_handling = "model"
    return InfiniteHipHFState(config=config, rope_spec=spec, rope_handling=rope_handling, impl=impl,
                              score_norm=score_norm)


def get_state(module_or_model: nn.Module) -> InfiniteHipHFState | None:
    """The state of a model (or of one of its attention modules), if InfiniteHiP is enabled."""
    st = getattr(module_or_model, "_infinitehip_state", None)
    if st is not None:
        return st
    for m in module_or_model.modules():
        st = getattr(m, "_infinitehip_state", None)
        if st is not None:
            return st
    cfg = getattr(module_or_model, "config", None)
    return _LAZY_STATES.get(id(cfg)) if cfg is not None else None


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    if not mods:
        raise ValueError(
            f"{type(model).__name__} has no attention modules with q_proj/layer_idx: only "
            "Llama-family models are supported"
        )
    return mods


def _rotary_slots(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    slots = []
    for parent in model.modules():
        if isinstance(parent, _IdentityRotary):
            continue  # its child is the saved original
        for name, child in parent.named_children():
            if type(child).__name__.endswith("RotaryEmbedding") or isinstance(child, _IdentityRotary):
                slots.append((parent, name, child))
    return slots


def enable_infinitehip(
    model: nn.Module,
    config: InfiniteHipConfig | Mapping[str, Any] | None = None,
    *,
    impl: str = "auto",
    score_norm: str | None = None,
) -> nn.Module:
    """Switch a loaded Llama-family model to InfiniteHiP attention (in place; returns it).

    With ``rope_mode="streaming"`` (default) the model's rotary embedding is replaced by an
    identity, keys are cached unrotated, and the attention applies RoPE at streaming positions
    from tables built from ``model.config``: contexts beyond the trained length work. With
    ``rope_mode="model"`` the rotary embedding stays and nothing is re-rotated.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        E.g. ``AutoModelForCausalLM.from_pretrained(...)``.
    config : InfiniteHipConfig or dict, optional
        InfiniteHiP options (default: the "3k" preset).
    impl : {"auto", "triton", "reference", "torch"}
        See :func:`vllm_hip.api.infinitehip_attention`.
    score_norm : {"none", "head_max"}, optional
        See :func:`vllm_hip.api.infinitehip_attention`; None takes the config's ``score_norm``.

    Returns
    -------
    The same model, whose ``generate()`` now runs InfiniteHiP.
    """
    register()
    cfg = _as_config(config)
    mods = _attention_modules(model)
    state = _make_state(model.config, cfg, "identity", impl, score_norm)
    prev = getattr(model, "_infinitehip_prev_attn", None) or model.config._attn_implementation
    for m in mods:
        m._infinitehip_state = state
    if state.rope_handling == "identity":
        head_dim = state.rope_spec.head_dim
        for parent, name, child in _rotary_slots(model):
            if not isinstance(child, _IdentityRotary):
                setattr(parent, name, _IdentityRotary(child, head_dim))
    else:
        _restore_rotary(model)
    model._infinitehip_state = state
    model._infinitehip_prev_attn = prev
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def _restore_rotary(model: nn.Module) -> None:
    for parent, name, child in _rotary_slots(model):
        if isinstance(child, _IdentityRotary):
            setattr(parent, name, child.original)


def disable_infinitehip(model: nn.Module, attn_implementation: str | None = None) -> nn.Module:
    """Undo :func:`enable_infinitehip`: the model's rotary embedding and previous attention
    (or ``attn_implementation``, e.g. ``"sdpa"``) come back. Caches built with InfiniteHiP hold
    unrotated keys: do not reuse them afterwards."""
    _restore_rotary(model)
    for m in model.modules():
        if hasattr(m, "_infinitehip_state"):
            del m._infinitehip_state
    prev = attn_implementation or getattr(model, "_infinitehip_prev_attn", None) or "sdpa"
    if prev == ATTN_IMPLEMENTATION:
        prev = "sdpa"
    if hasattr(model, "_infinitehip_prev_attn"):
        del model._infinitehip_prev_attn
    model.set_attn_implementation(prev)
    return model


def _lazy_state(module: nn.Module) -> InfiniteHipHFState:
    cfg = module.config
    state = _LAZY_STATES.get(id(cfg))
    if state is None:
        options = getattr(cfg, "infinitehip", None)
        state = _make_state(cfg, _as_config(options), "unrotate", "auto")
        _LAZY_STATES[id(cfg)] = state
        weakref.finalize(cfg, _LAZY_STATES.pop, id(cfg), None)
        if state.rope_handling == "unrotate":
            logger.info(
                "InfiniteHiP selected by name: q/k arrive rotated by the model and are rotated "
                "back in every layer; vllm_hip.hf.enable_infinitehip(model) avoids that round trip"
            )
    return state


def infinitehip_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``AttentionInterface`` signature).

    ``query`` [B, Hq, S, D], ``key``/``value`` [B, Hkv, T, D] (the whole cache, queries at its
    end); returns ``(out [B, S, Hq, D], None)``.
    """
    if dropout and module.training:
        raise ValueError("InfiniteHiP attention is inference-only: dropout must be 0")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        raise ValueError(
            "InfiniteHiP attention got a 4D attention mask (custom masks, packed or padded "
            "batches are not supported)"
        )
    state = getattr(module, "_infinitehip_state", None) or _lazy_state(module)
    q = query.transpose(1, 2)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    b, s = q.shape[:2]
    t = k.shape[1]
    positions = kwargs.get("position_ids")
    rope = None
    if state.rope_handling != "model":
        rope = state.tables(q.device, t)
        if state.rope_handling == "unrotate":
            q_pos = torch.arange(t - s, t, device=q.device)
            q = unrotate(q, q_pos, *rope)
            k = unrotate(k, torch.arange(t, device=q.device), *rope)
    softcap = getattr(module.config, "attn_logit_softcapping", None) or 0.0
    state.calls += 1
    state.max_context = max(state.max_context, t)
    out, sel = infinitehip_attention(
        q, k, v, state.config, positions, rope=rope, layer_idx=int(module.layer_idx),
        sm_scale=scaling, softcap=float(softcap), impl=state.impl, score_norm=state.score_norm,
        return_selection=True,
    )  # fmt: skip
    if not sel.exact:
        state.pruned_calls += 1
    if state.on_selection is not None:
        state.on_selection(int(module.layer_idx), sel)
    return out, None


def register() -> None:
    """Register ``"infinitehip"`` with transformers (idempotent; done at import)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, infinitehip_attention_forward)


register()
