"""Rotary position embedding (RoPE) tables and rotations, as the InfiniteHiP kernels expect them.

In ``rope_mode="streaming"`` the kernels receive *unrotated* queries and keys and rotate them at
positions of their own choosing (see ``docs/infinitehip.md`` §5), so the model's RoPE must be
reproduced outside the model: this module builds the ``cos``/``sin`` tables from a Hugging Face
config and provides the neox-style rotation (Llama's ``rotate_half`` convention)::

    x = [x1, x2]  (halves of the rotary dims)
    rot(x, p) = [x1 * cos[p] - x2 * sin[p],  x2 * cos[p] + x1 * sin[p]]

and its inverse (:func:`unrotate`, a rotation by ``-p``), which turns keys that a model already
rotated back into unrotated ones.

Supported ``rope_type``: ``default``, ``linear`` and ``llama3``. Types that change the attention
scale or depend on the sequence length (``yarn``, ``longrope``, ``dynamic``, ...) are refused with
an error naming the type. torch only; no vLLM import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

__all__ = [
    "RopeError",
    "RopeSpec",
    "SUPPORTED_ROPE_TYPES",
    "rope_spec_from_config",
    "inv_freq_from_spec",
    "rope_tables",
    "rope_tables_from_config",
    "apply_rope",
    "unrotate",
]

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class RopeError(ValueError):
    """The model's RoPE variant cannot be reproduced here."""


@dataclass(frozen=True)
class RopeSpec:
    """What defines a model's RoPE tables, read from its config."""

    head_dim: int
    """Dimension of one attention head."""
    rotary_dim: int
    """Leading dims of a head that rotate (``head_dim * partial_rotary_factor``, even)."""
    theta: float
    """Base of the frequencies (``rope_theta``)."""
    rope_type: str = "default"
    """One of :data:`SUPPORTED_ROPE_TYPES`."""
    factor: float = 1.0
    """``linear`` and ``llama3``: how much the context was stretched."""
    low_freq_factor: float = 1.0
    """``llama3`` only."""
    high_freq_factor: float = 4.0
    """``llama3`` only."""
    original_max_position_embeddings: int = 8192
    """``llama3`` only: the context length before the frequency scaling."""


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def rope_spec_from_config(config: Any) -> RopeSpec:
    """Read the RoPE parameters of a Hugging Face config (object or dict).

    Understands both the transformers >= 5 layout (``config.rope_parameters`` with ``rope_type``
    and ``rope_theta``) and the older one (``config.rope_theta`` plus ``config.rope_scaling``).

    Raises
    ------
    RopeError
        For a ``rope_type`` outside :data:`SUPPORTED_ROPE_TYPES`, per-layer-type parameters, or
        an odd rotary dimension.
    """
    head_dim = _get(config, "head_dim")
    if not head_dim:
        hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
        if not hidden or not heads:
            raise RopeError("config has neither head_dim nor hidden_size/num_attention_heads")
        head_dim = hidden // heads
    params = _get(config, "rope_parameters")
    scaling = _get(config, "rope_scaling")
    if isinstance(params, Mapping) and params and "rope_theta" not in params and "rope_type" not in params:
        raise RopeError(
            "config.rope_parameters holds one set per layer type "
            f"({', '.join(map(str, params))}); only one RoPE for all layers is supported"
        )
    merged: dict[str, Any] = {}
    if isinstance(scaling, Mapping):
        merged.update(scaling)
    if isinstance(params, Mapping):
        merged.update(params)
    theta = merged.get("rope_theta", _get(config, "rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise RopeError(
            f"rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
            f"{rope_type!r} scales the attention or depends on the sequence length, which the "
            "streaming positions of InfiniteHiP do not reproduce. Use rope_mode='model' instead."
        )
    partial = merged.get("partial_rotary_factor", _get(config, "partial_rotary_factor", 1.0)) or 1.0
    rotary_dim = int(head_dim * partial)
    if rotary_dim <= 0 or rotary_dim % 2:
        raise RopeError(f"rotary dimension {rotary_dim} (head_dim {head_dim} x {partial}) must be even and > 0")
    kwargs: dict[str, Any] = {}
    if rope_type in ("linear", "llama3"):
        kwargs["factor"] = float(merged["factor"])
    if rope_type == "llama3":
        kwargs["low_freq_factor"] = float(merged["low_freq_factor"])
        kwargs["high_freq_factor"] = float(merged["high_freq_factor"])
        kwargs["original_max_position_embeddings"] = int(merged["original_max_position_embeddings"])
    return RopeSpec(
        head_dim=int(head_dim), rotary_dim=rotary_dim, theta=float(theta), rope_type=rope_type, **kwargs
    )


def inv_freq_from_spec(spec: RopeSpec) -> torch.Tensor:
    """Inverse frequencies [rotary_dim / 2] in float64, after the spec's scaling."""
    dim = spec.rotary_dim
    inv = 1.0 / (spec.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if spec.rope_type == "linear":
        inv = inv / spec.factor
    elif spec.rope_type == "llama3":
        # Long wavelengths are stretched by `factor`, short ones kept, the band between blended.
        old = spec.original_max_position_embeddings
        low_wavelen = old / spec.low_freq_factor
        high_wavelen = old / spec.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / spec.factor, inv)
        smooth = (old / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
        blended = (1 - smooth) * scaled / spec.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, blended, scaled)
    return inv


def rope_tables(
    spec: RopeSpec, max_positions: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` fp32 [max_positions, rotary_dim / 2] for positions ``0 .. max_positions-1``.

    Angles are computed in float64 and rounded once to fp32, so the tables stay accurate at
    positions far beyond the trained length (an fp32 product ``p * inv_freq`` loses ~1e-3 rad at
    p = 16K).
    """
    if max_positions < 1:
        raise ValueError(f"max_positions={max_positions} must be >= 1")
    inv = inv_freq_from_spec(spec)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv[None, :]
    cos = angles.cos().to(torch.float32)
    sin = angles.sin().to(torch.float32)
    if device is not None:
        cos, sin = cos.to(device), sin.to(device)
    return cos.contiguous(), sin.contiguous()


def rope_tables_from_config(
    config: Any, max_positions: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shortcut for ``rope_tables(rope_spec_from_config(config), max_positions, device)``."""
    return rope_tables(rope_spec_from_config(config), max_positions, device)


def _rotate(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            heads_axis: int | None, sign: float) -> torch.Tensor:
    if cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(f"cos/sin must both be [max_positions, rotary_dim/2], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    half = cos.shape[1]
    rot = 2 * half
    if rot > x.shape[-1]:
        raise ValueError(f"cos/sin rotate {rot} dims but x has only {x.shape[-1]}")
    positions = torch.as_tensor(positions, device=x.device)
    if positions.dtype.is_floating_point:
        raise ValueError(f"positions must be integers, got {positions.dtype}")
    # The range check reads the positions on the host: done on the CPU only, so the serving path
    # never syncs (there the tables cover max_model_len, which vLLM enforces).
    if not positions.is_cuda and positions.numel() and (
        int(positions.min()) < 0 or int(positions.max()) >= cos.shape[0]
    ):
        raise ValueError(
            f"positions span [{int(positions.min())}, {int(positions.max())}] but the tables have "
            f"{cos.shape[0]} positions"
        )
    c = cos.to(x.device)[positions.long()]
    s = sin.to(x.device)[positions.long()] * sign
    if heads_axis is not None:
        c, s = c.unsqueeze(heads_axis), s.unsqueeze(heads_axis)
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:rot]
    parts = [x1 * c - x2 * s, x2 * c + x1 * s]
    if rot < x.shape[-1]:
        parts.append(xf[..., rot:])
    return torch.cat(parts, dim=-1).to(x.dtype)


def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    heads_axis: int | None = -2,
) -> torch.Tensor:
    """Rotate ``x`` (neox style) at ``positions``; fp32 inside, returns ``x.dtype``.

    Parameters
    ----------
    x : torch.Tensor
        [..., D]. With the default ``heads_axis=-2`` the layout is [..., tokens, heads, D]; use
        ``heads_axis=1`` for Hugging Face's [batch, heads, seq, D].
    positions : torch.Tensor
        Integer positions of the tokens, broadcastable to ``x.shape`` without the heads and last
        axes (e.g. [seq] or [batch, seq]); every value in ``[0, cos.shape[0])``.
    cos, sin : torch.Tensor
        fp32 [max_positions, R/2] from :func:`rope_tables`; the first R dims of ``x`` rotate,
        the rest pass through (partial rotary).
    heads_axis : int or None
        Axis of ``x`` that holds heads (gets the same rotation); None when ``positions`` already
        has one entry per ``x.shape[:-1]``.

    Returns
    -------
    torch.Tensor
        Rotated copy of ``x``, same shape and dtype.

    Examples
    --------
    >>> cos, sin = rope_tables(RopeSpec(head_dim=64, rotary_dim=64, theta=1e4), 128)
    >>> q = torch.randn(10, 4, 64)                      # [tokens, heads, D]
    >>> q_rot = apply_rope(q, torch.arange(10), cos, sin)
    >>> torch.allclose(unrotate(q_rot, torch.arange(10), cos, sin), q, atol=1e-5)
    True
    """
    return _rotate(x, positions, cos, sin, heads_axis, 1.0)


def unrotate(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    heads_axis: int | None = -2,
) -> torch.Tensor:
    """Inverse of :func:`apply_rope` (rotation by ``-positions``); same arguments and layout."""
    return _rotate(x, positions, cos, sin, heads_axis, -1.0)
