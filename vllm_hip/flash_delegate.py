"""Exact attention by vLLM's own FlashAttention kernel, on INFINITEHIP's paged cache.

While every row of a step fits sink + window + k, InfiniteHiP attends exactly. Two exact kernels
round differently in bf16 and so flip near-tied greedy tokens (on an H200, vLLM's TRITON_ATTN
differs from FLASH_ATTN on 11 of 40 short prompts, our own kernel on 15); running FLASH_ATTN's
kernel itself there gives FLASH_ATTN's outputs. That needs keys cached as FLASH_ATTN caches them,
rotated at their true positions (``rope_cache="rotated"``, the default, or ``rope_mode="model"``).

The builder makes FLASH_ATTN's metadata beside ours (:class:`FlashDelegate`, only on steps that
may attend exactly); each layer calls the kernel as ``FlashAttentionImpl.forward`` does
(:func:`flash_forward`), with keys and values as strided views of our
``[pages, 2, page, Hkv, D]`` cache (FLASH_ATTN's own are strided views of a K|V-packed layout).

Not used (our kernels attend exactly instead): under ``VLLM_BATCH_INVARIANT=1`` (FLASH_ATTN is not
batch-invariant here: 19 of 17,357 loaded outputs differed), with offload (the cache lives in
host memory), and where vLLM has no FlashAttention kernel (CPU, other platforms).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger("vllm_hip")

__all__ = ["FlashDelegate", "delegate_unavailable_reason", "flash_forward"]


def delegate_unavailable_reason(cfg: Any, device: torch.device, batch_invariant: bool,
                                kv_cache_dtype: str = "auto") -> str | None:
    """Why exact attention cannot go to FLASH_ATTN's kernel here (None: it can)."""
    if cfg.rope_mode == "streaming" and cfg.rope_cache != "rotated":
        return "keys are cached un-rotated (rope_cache='unrotated')"
    if cfg.offload:
        return "offload keeps the KV cache in host memory"
    if str(kv_cache_dtype).startswith("fp8"):
        # FLASH_ATTN gets queries quantized by the attention layer; ours arrive in 16 bits
        return "fp8 KV cache"
    if batch_invariant:
        return "VLLM_BATCH_INVARIANT=1 (FLASH_ATTN is not batch-invariant)"
    if torch.device(device).type != "cuda":
        return f"no FlashAttention kernel on {torch.device(device).type}"
    from vllm.v1.attention.backends.fa_utils import is_flash_attn_varlen_func_available

    if not is_flash_attn_varlen_func_available():
        return "vLLM's FlashAttention kernel is not available on this platform"
    return None


class FlashDelegate:
    """FLASH_ATTN's metadata builder, fed the same ``CommonAttentionMetadata`` as ours."""

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device):
        from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

        self.builder = FlashAttentionMetadataBuilder(kv_cache_spec, layer_names, vllm_config, device)

    @classmethod
    def create(cls, cfg: Any, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any,
               device, batch_invariant: bool) -> "FlashDelegate | None":
        """The delegate, or None (logged) where it cannot run."""
        cache_dtype = getattr(getattr(vllm_config, "cache_config", None), "cache_dtype", "auto")
        why = delegate_unavailable_reason(cfg, device, batch_invariant, cache_dtype)
        if why is None:
            try:
                return cls(kv_cache_spec, layer_names, vllm_config, device)
            except Exception as e:  # an unsupported head size, dtype, ...: ours attends instead
                why = f"FLASH_ATTN's metadata builder refused this model ({e})"
        logger.info("INFINITEHIP: exact attention by our own kernel: %s", why)
        return None

    def covers(self, cfg: Any, qblocks_cpu: Any) -> bool:
        """Whether some layer attends exactly on this step (then FLASH_ATTN's metadata is made)."""
        return qblocks_cpu.num_blocks > 0 and cfg.attends_exactly(
            qblocks_cpu.max_window_start, cfg.max_selected_tokens
        )

    def build(self, common_attn_metadata: Any) -> Any:
        # No cascade attention: INFINITEHIP refuses it (use_cascade_attention is False).
        return self.builder.build(0, common_attn_metadata)


def _flash_impl(impl: Any) -> Any:
    """A FlashAttentionImpl with the layer's parameters (made on first use)."""
    fa = getattr(impl, "_flash_impl", None)
    if fa is None:
        from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

        fa = FlashAttentionImpl(
            impl.num_heads, impl.head_size, impl.scale, impl.num_kv_heads, None, None,
            impl.kv_cache_dtype, impl.logits_soft_cap or None,
        )  # fmt: skip
        impl._flash_impl = fa
    return fa


def flash_forward(impl: Any, layer: Any, q: torch.Tensor, kv_cache: torch.Tensor,
                  out: torch.Tensor, fa_md: Any) -> None:
    """FLASH_ATTN's kernel on our cache: ``q``/``out`` [n, Hq, D] (n = actual tokens), the call
    ``FlashAttentionImpl.forward`` makes without cascade, context parallelism, sliding window,
    sinks or multimodal masks (none of which INFINITEHIP serves)."""
    from vllm.utils.torch_utils import canonicalize_singleton_dim_strides, is_quantized_kv_cache
    from vllm.v1.attention.backends import flash_attn as fa_backend

    fa = _flash_impl(impl)
    key_cache, value_cache = kv_cache.unbind(1)  # [pages, page, Hkv, D] strided views
    key_cache = canonicalize_singleton_dim_strides(key_cache)
    value_cache = canonicalize_singleton_dim_strides(value_cache)
    if is_quantized_kv_cache(fa.kv_cache_dtype):
        from vllm.platforms import current_platform

        key_cache = key_cache.view(current_platform.fp8_dtype())
        value_cache = value_cache.view(current_platform.fp8_dtype())
    descale_shape = (fa_md.query_start_loc.shape[0] - 1, fa.num_kv_heads)
    window = fa_md.sliding_window if fa_md.sliding_window is not None else fa.sliding_window
    fa_backend.flash_attn_varlen_func(
        q=q,
        k=key_cache,
        v=value_cache,
        out=out,
        cu_seqlens_q=fa_md.query_start_loc,
        max_seqlen_q=fa_md.max_query_len,
        seqused_k=fa_md.seq_lens,
        max_seqlen_k=fa_md.max_seq_len,
        softmax_scale=fa.scale,
        causal=fa_md.causal,
        alibi_slopes=None,
        window_size=list(window) if window is not None else None,
        block_table=fa_md.block_table,
        softcap=fa.logits_soft_cap,
        scheduler_metadata=fa_md.scheduler_metadata,
        fa_version=fa.vllm_flash_attn_version,
        q_descale=layer._q_scale.expand(descale_shape) if fa.supports_quant_query_input else None,
        k_descale=layer._k_scale.expand(descale_shape),
        v_descale=layer._v_scale.expand(descale_shape),
        num_splits=fa_md.max_num_splits,
    )
