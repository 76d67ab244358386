"""Memory plan of a long-context deployment, before starting one: ``vllm-hip plan``.

For a model and a context length it tells what the KV cache needs densely (what FLASH_ATTN would
need on the GPU), what INFINITEHIP with ``offload: true`` needs instead (the whole cache in pinned
host memory, ``--kv-cache-memory-bytes``; on the GPU the per-layer page caches and the prefill
staging buffer), whether this machine has that, and the ``vllm serve`` command::

    vllm-hip plan meta-llama/Llama-3.1-8B-Instruct --context 1048576 --kv-cache-dtype fp8
    vllm-hip plan ./my-model --context 3000000 --requests 2 --json

The GPU bytes are the ones the worker's start-up check uses (:func:`gpu_buffer_bytes`), so a plan
that fits passes that check on the same free memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from vllm_hip.config import ConfigError, InfiniteHipConfig

__all__ = ["KvShape", "OffloadPlan", "gpu_buffer_bytes", "main", "plan_offload", "staging_pages"]

#: Bytes per stored element of vLLM's ``--kv-cache-dtype`` values.
KV_DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}

#: Tokens a request may grow by after its prompt (decode), as ``benchmarks/offload.py`` sizes it.
DECODE_MARGIN_TOKENS = 4096

#: vLLM's page size for INFINITEHIP (tokens a KV block holds).
PAGE_TOKENS = 16

#: The ``--max-num-batched-tokens`` a plan assumes unless told (a step's token budget).
DEFAULT_BATCHED_TOKENS = 8192


@dataclass(frozen=True)
class KvShape:
    """What sizes a model's KV cache: attention layers, kv heads and head size."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any] | Any) -> "KvShape":
        """From a Hugging Face config (a dict or a ``PretrainedConfig``)."""
        get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
        text = get("text_config")  # multimodal configs keep the language model's apart
        if text is not None:
            return cls.from_hf_config(text)
        layers, heads = get("num_hidden_layers"), get("num_attention_heads")
        if not layers or not heads:
            raise ValueError("the model config has no num_hidden_layers / num_attention_heads")
        kv_heads = get("num_key_value_heads") or heads
        head_dim = get("head_dim") or get("hidden_size") // heads
        return cls(int(layers), int(kv_heads), int(head_dim))

    def bytes_per_token(self, dtype_bytes: int) -> int:
        """KV bytes of one token over all layers (key and value)."""
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype_bytes


def staging_pages(num_pages: int, page_tokens: int, tokens: int | None) -> int:
    """Pages of the prefill staging buffer: ``tokens`` (the longest request plus a step's token
    budget, ``prefill_staging.staging_tokens``), never more than the KV cache's ``num_pages``;
    all of them when ``tokens`` is None."""
    if tokens is None:
        return num_pages
    return max(1, min(num_pages, -(-tokens // page_tokens)))


def gpu_buffer_bytes(
    *, layers: int, num_pages: int, page_tokens: int, page_bytes: int, config: InfiniteHipConfig,
    staging_tokens: int | None = None,
) -> dict[str, int]:
    """GPU bytes the backend allocates beside a host-resident KV cache of ``num_pages`` pages of
    ``page_bytes`` per layer: ``page_caches``, every layer's ``offload_gpu_cache_tokens`` of hot
    pages (plus a scratch page) with its tables (``page_cache.PageCacheStack``), and
    ``staging``, the prefill staging buffer shared by the layers (:func:`staging_pages` pages,
    ``prefill_staging.PrefillStaging``; 0 when ``offload_prefill_staging`` is off)."""
    cached_pages = max(1, config.offload_gpu_cache_tokens // page_tokens) + 1
    # per layer: slot_of_page int32 per page (+1), page_of_slot and last_use int64 per slot
    tables = 4 * (num_pages + 1) + 16 * cached_pages
    page_caches = layers * (cached_pages * page_bytes + tables)
    staging = 0
    if config.offload_prefill_staging:
        staging = staging_pages(num_pages, page_tokens, staging_tokens) * page_bytes
    return {"page_caches": page_caches, "staging": staging}


@dataclass(frozen=True)
class OffloadPlan:
    """Bytes of one deployment (``requests`` concurrent requests of ``context_tokens``)."""

    context_tokens: int
    requests: int
    kv_bytes_per_token: int
    dense_kv_bytes: int
    """The KV cache of the requests, all of it on the GPU (a dense backend)."""
    host_kv_bytes: int
    """``--kv-cache-memory-bytes`` with offload: the requests plus decode room, pinned host memory."""
    page_cache_bytes: int
    staging_bytes: int
    max_num_batched_tokens: int

    @property
    def gpu_kv_bytes(self) -> int:
        """KV bytes INFINITEHIP with offload keeps on the GPU."""
        return self.page_cache_bytes + self.staging_bytes

    @property
    def gpu_fraction_of_dense(self) -> float:
        return self.gpu_kv_bytes / self.dense_kv_bytes


def plan_offload(shape: KvShape, context_tokens: int, config: InfiniteHipConfig, *,
                 kv_dtype_bytes: int = 2, requests: int = 1,
                 max_num_batched_tokens: int = DEFAULT_BATCHED_TOKENS) -> OffloadPlan:  # fmt: skip
    """The plan for ``requests`` requests of ``context_tokens`` each, served with
    ``--max-model-len`` ``context_tokens + DECODE_MARGIN_TOKENS``."""
    if context_tokens < 1 or requests < 1:
        raise ValueError("context_tokens and requests must be >= 1")
    per_token = shape.bytes_per_token(kv_dtype_bytes)
    host_tokens = requests * (context_tokens + DECODE_MARGIN_TOKENS)
    num_pages = -(-host_tokens // PAGE_TOKENS)
    page_bytes = PAGE_TOKENS * per_token // shape.layers
    staging_tokens = context_tokens + DECODE_MARGIN_TOKENS + max_num_batched_tokens
    gpu = gpu_buffer_bytes(layers=shape.layers, num_pages=num_pages, page_tokens=PAGE_TOKENS,
                           page_bytes=page_bytes, config=config, staging_tokens=staging_tokens)  # fmt: skip
    return OffloadPlan(
        context_tokens=context_tokens,
        requests=requests,
        kv_bytes_per_token=per_token,
        dense_kv_bytes=requests * context_tokens * per_token,
        host_kv_bytes=num_pages * PAGE_TOKENS * per_token,
        page_cache_bytes=gpu["page_caches"],
        staging_bytes=gpu["staging"],
        max_num_batched_tokens=max_num_batched_tokens,
    )


def max_context_in_host(shape: KvShape, host_bytes: int, *, kv_dtype_bytes: int = 2,
                        requests: int = 1) -> int:  # fmt: skip
    """The longest context ``requests`` requests can each have in ``host_bytes`` of KV cache."""
    per_request = host_bytes // (requests * shape.bytes_per_token(kv_dtype_bytes))
    return max(0, per_request - DECODE_MARGIN_TOKENS)


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _machine() -> dict[str, int | None]:
    """Host bytes the KV store may pin and free GPU bytes (None: no GPU)."""
    from vllm_hip.offload import available_host_bytes
    from vllm_hip.worker import MAX_HOST_FRACTION

    host = int(MAX_HOST_FRACTION * available_host_bytes())
    gpu_free = gpu_total = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu_free, gpu_total = torch.cuda.mem_get_info()
    except Exception:  # noqa: BLE001 - no usable GPU: the plan says so
        pass
    return {"host_pinnable": host, "gpu_free": gpu_free, "gpu_total": gpu_total}


def report(model: str, shape: KvShape, plan: OffloadPlan, config: InfiniteHipConfig, kv_dtype: str,
           machine: Mapping[str, int | None]) -> str:  # fmt: skip
    """The plan as the text ``vllm-hip plan`` prints."""
    from vllm_hip.worker import GPU_HEADROOM_FRACTION, GPU_HEADROOM_MIN

    lines = [
        f"{model}: {shape.layers} layers x {shape.kv_heads} kv heads x {shape.head_dim}, KV dtype "
        f"{kv_dtype}: {plan.kv_bytes_per_token:,} bytes a token",
        f"{plan.requests} request(s) of {plan.context_tokens:,} tokens",
        f"  dense KV cache (all on the GPU)       {_gib(plan.dense_kv_bytes):>14}",
        f"  INFINITEHIP offload, host (pinned)    {_gib(plan.host_kv_bytes):>14}   "
        f"--kv-cache-memory-bytes {plan.host_kv_bytes}",
        f"                       GPU page caches  {_gib(plan.page_cache_bytes):>14}   "
        f"offload_gpu_cache_tokens={config.offload_gpu_cache_tokens} x {shape.layers} layers",
        f"                       GPU staging      {_gib(plan.staging_bytes):>14}   "
        + ("one request + a step's tokens, one layer (offload_prefill_staging)" if plan.staging_bytes else "off"),
        f"                       GPU total        {_gib(plan.gpu_kv_bytes):>14}   "
        f"{100 * plan.gpu_fraction_of_dense:.1f}% of dense",
    ]
    host = machine.get("host_pinnable")
    fits = True
    if host is not None:
        ok = plan.host_kv_bytes <= host
        fits &= ok
        longest = max_context_in_host(shape, host, kv_dtype_bytes=KV_DTYPE_BYTES[kv_dtype],
                                      requests=plan.requests)  # fmt: skip
        lines.append(f"this machine: host memory it may pin {_gib(host)}: "
                     + ("fits" if ok else "DOES NOT FIT")
                     + f" (longest context per request: {longest:,} tokens)")  # fmt: skip
    free, total = machine.get("gpu_free"), machine.get("gpu_total")
    if free is not None and total is not None:
        room = free - max(GPU_HEADROOM_MIN, int(GPU_HEADROOM_FRACTION * total))
        ok = plan.gpu_kv_bytes <= room
        fits &= ok
        lines.append(f"              GPU free {_gib(free)} (room for offload buffers {_gib(max(room, 0))}, "
                     f"model weights not counted): " + ("fits" if ok else "DOES NOT FIT"))  # fmt: skip
    else:
        lines.append("              no GPU here: its memory is not checked")
    hip = {"offload": True}
    hip.update({k: v for k, v in config.to_dict().items() if k in ("offload_gpu_cache_tokens", "offload_prefill_staging")})
    dtype_arg = "" if kv_dtype == "auto" else f" --kv-cache-dtype {kv_dtype}"
    lines += [
        "",
        f"vllm serve {model} --attention-backend INFINITEHIP --max-model-len "
        f"{plan.context_tokens + DECODE_MARGIN_TOKENS}{dtype_arg} --kv-cache-memory-bytes "
        f"{plan.host_kv_bytes} --max-num-batched-tokens {plan.max_num_batched_tokens} "
        f"--additional-config '{json.dumps({'infinitehip': hip})}'",
    ]
    if not fits:
        lines.append("(does not fit this machine as planned: see above)")
    return "\n".join(lines)


def _load_hf_config(model: str) -> Mapping[str, Any] | Any:
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    from transformers import AutoConfig  # a hub id: needs the network or the HF cache

    return AutoConfig.from_pretrained(model)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vllm-hip plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("model", nargs="?", default=None,
                    help="HF model folder, config.json or hub id (default: the embedded SmolLM2)")
    ap.add_argument("--context", type=int, required=True, help="tokens of each request")
    ap.add_argument("--requests", type=int, default=1, help="requests held at full length at once")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=sorted(KV_DTYPE_BYTES))
    ap.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_BATCHED_TOKENS,
                    help="vLLM's token budget of a step (sizes the prefill staging buffer)")
    ap.add_argument("--additional-config", default=None,
                    help="vLLM's --additional-config JSON (its \"infinitehip\" options)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    if args.context < 1 or args.requests < 1 or args.max_num_batched_tokens < 1:
        ap.error("--context, --requests and --max-num-batched-tokens must be >= 1")
    try:
        raw = json.loads(args.additional_config) if args.additional_config else {}
        config = InfiniteHipConfig.from_vllm_additional_config(raw)
    except (json.JSONDecodeError, ConfigError) as e:
        ap.error(f"--additional-config: {e}")
    model = args.model
    if model is None:
        from vllm_hip.smollm2 import smollm2_path

        model = str(smollm2_path())
    shape = KvShape.from_hf_config(_load_hf_config(model))
    plan = plan_offload(shape, args.context, config, kv_dtype_bytes=KV_DTYPE_BYTES[args.kv_cache_dtype],
                        requests=args.requests, max_num_batched_tokens=args.max_num_batched_tokens)  # fmt: skip
    machine = _machine()
    if args.json:
        out = {"model": model, **asdict(shape), **asdict(plan), "gpu_kv_bytes": plan.gpu_kv_bytes,
               "gpu_fraction_of_dense": plan.gpu_fraction_of_dense, "machine": machine}  # fmt: skip
        print(json.dumps(out, indent=1))
    else:
        print(report(model, shape, plan, config, args.kv_cache_dtype, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
