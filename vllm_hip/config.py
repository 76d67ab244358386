"""The one configuration object of vllm-hip.

Every option of the INFINITEHIP backend lives in :class:`InfiniteHipConfig`. It reaches every vLLM
process through ``--additional-config '{"infinitehip": {...}}'`` and is validated when the backend is
built, so that a bad value stops start-up with a message naming the field and what it accepts, never
a CUDA error in the middle of a request.

This module imports nothing from vLLM or torch: it is safe everywhere, including ``setup.py`` and
tests on machines without a GPU.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

__all__ = [
    "ConfigError",
    "PruningStage",
    "InfiniteHipConfig",
    "PRESETS",
    "REFRESH_PRESETS",
    "ADDITIONAL_CONFIG_KEY",
]

#: Key under which the options sit in vLLM's ``--additional-config`` JSON.
ADDITIONAL_CONFIG_KEY = "infinitehip"

#: Largest token count any length field accepts (2**24 = 16M tokens). Bounds int32 arithmetic in
#: the kernels' position math with a wide margin.
MAX_TOKENS = 1 << 24


class ConfigError(ValueError):
    """A configuration value is outside what the backend supports.

    The message always starts with ``infinitehip.<field>`` so an operator can find the culprit in a
    long ``--additional-config`` string.
    """


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _check_int(name: str, value: Any, lo: int, hi: int, multiple_of: int = 1) -> None:
    rule = f"an integer in [{lo}, {hi}]"
    if multiple_of > 1:
        rule += f" and a multiple of {multiple_of}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"infinitehip.{name}={value!r} is invalid: must be {rule}")
    if not lo <= value <= hi or value % multiple_of:
        raise ConfigError(f"infinitehip.{name}={value!r} is invalid: must be {rule}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"infinitehip.{name}={value!r} is invalid: must be one of {allowed}")


@dataclass(frozen=True)
class PruningStage:
    """One stage of the hierarchical pruning (``../docs``: "multi-stage pruning").

    A stage splits its candidate region into chunks of ``chunk_size`` tokens, scores each chunk by a
    binary search for its representative token, and keeps the best ``keep_tokens // chunk_size``
    chunks. The last stage's chunks are the 8-token blocks that sparse attention reads.
    """

    chunk_size: int
    """Tokens per chunk. A power of two; each stage's chunk divides the previous stage's."""

    keep_tokens: int
    """Tokens kept after this stage (a multiple of ``chunk_size``). The last stage keeps
    ``selected_tokens`` (``early_selected_tokens`` in early layers); its own value must equal
    ``selected_tokens``."""

    query_pool: int = 1
    """Mean-pool groups of this many consecutive queries of a query block before scoring
    (1 = no pooling). Pooling cuts the scoring work of prefill; decode has one query and ignores it."""

    refresh_interval: int = 1
    """Decode steps between reruns of this stage (mask caching). Must not increase from one stage to
    the next: a later stage reruns whenever an earlier one does."""

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _stages_3k(refresh: tuple[int, int, int]) -> tuple[PruningStage, ...]:
    return (
        PruningStage(chunk_size=256, keep_tokens=32768, query_pool=4, refresh_interval=refresh[0]),
        PruningStage(chunk_size=32, keep_tokens=8192, query_pool=4, refresh_interval=refresh[1]),
        PruningStage(chunk_size=8, keep_tokens=2048, query_pool=1, refresh_interval=refresh[2]),
    )


#: Decode refresh intervals of stages 1-3 (paper: default 16/8/4, "fast", "flash").
REFRESH_PRESETS: dict[str, tuple[int, int, int]] = {
    "paper": (16, 8, 4),
    "fast": (32, 16, 8),
    "flash": (96, 24, 8),
}

#: Named starting points; explicit fields in the user's dict override them.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's "3K" preset: sink 256, window 1024, k 2048 (4096 in the first 3 layers).
    "3k": {},
    # StreamingLLM-style baseline: sink + sliding window, no selected tokens, no pruning.
    "streaming": {"selected_tokens": 0, "early_selected_tokens": 0, "stages": ()},
}


@dataclass(frozen=True)
class InfiniteHipConfig:
    """Validated options of the INFINITEHIP attention backend.

    Build it with :meth:`from_dict` (what vLLM's ``--additional-config`` carries) or directly;
    construction validates every field and raises :class:`ConfigError` naming the field.

    What one query attends to (positions increase to the right)::

        |<- sink ->|.......... candidates for selection ..........|<--- window --->|q
        0     sink_tokens                                    window start         pos
                    └─ selected_tokens chosen as 8-token blocks by the pruning stages
    """

    preset: str = "3k"
    """Named defaults applied before the other fields: ``"3k"`` (paper default) or ``"streaming"``
    (sink + window only, k = 0)."""

    sink_tokens: int = 256
    """First tokens of the sequence every query attends to (multiple of ``block_size_k``)."""

    window_tokens: int = 1024
    """Most recent tokens every query attends to (multiple of ``block_size_k``, at least the largest
    stage refresh interval, so tokens generated between mask refreshes are always seen)."""

    selected_tokens: int = 2048
    """k: tokens chosen by pruning from the region between sink and window (multiple of
    ``block_size_k``; 0 turns pruning off, leaving a sink + window baseline)."""

    early_layers: int = 3
    """Number of first layers that keep ``early_selected_tokens`` and score chunks with
    chunk-indexed RoPE positions."""

    early_selected_tokens: int = 4096
    """k in the early layers (multiple of ``block_size_k``)."""

    block_size_q: int = 64
    """Queries per query block in prefill: a block shares one selection. Power of two in [16, 128].
    64 is the paper's. On SmolLM2 through vLLM (H200, 10 prompts a cell) 16 found the passkey at
    8K/16K/32K/64K/128K in 100/80/50/70/20% of prompts against 80/80/10/40/0% with 64 (multi-key
    50/80/40/10% against 20/30/20/10% at 16K-128K) for 5-15% more prefill time at 64K-128K: the
    prompt's last block then holds the question, not 60 filler tokens with it
    (benchmarks/results/passkey_configs_h200.json). Not yet the default: the CPU demo and test have
    not been measured with it."""

    split_last_query: bool = True
    """Give the last query of the prefill (in the chunk that ends it) a query block of its own.
    That query predicts the first generated token; alone, it gets its own selection (as every
    decode query does) instead of sharing one with up to ``block_size_q - 1`` queries before it.
    Costs one more block per request. Measured when it split the last query of *every* chunk:
    on SmolLM2 through vLLM (H200, 10 prompts a cell) it found the passkey at
    16K/32K/64K/128K in 90/60/50/70% of prompts against 80/10/40/0% without it (multi-key at
    16K-64K 40/60/20% against 20/30/20%; benchmarks/results/passkey_configs_h200.json)."""

    align_prefill_chunks: bool = True
    """Cut prompts into prefill chunks only at multiples of ``block_size_q`` (and at the prompt's
    end), so that no query block is split by a chunk boundary: a prompt then selects the same
    blocks however vLLM's scheduler chunks it, which depends on what else is in the batch. Costs
    at most ``block_size_q - 1`` tokens of a step's budget per prefilling request
    (``vllm_hip.scheduler``; off when the user names a ``--scheduler-cls`` of their own)."""

    block_size_k: int = 8
    """Tokens per selected key block. Power of two in [8, 64]; must divide the KV page size."""

    refresh: str = "paper"
    """Decode refresh schedule preset for the stages: ``"paper"`` (16/8/4), ``"fast"`` (32/16/8),
    ``"flash"`` (96/24/8). Ignored when ``stages`` is given explicitly."""

    stagger_refresh: bool = True
    """Shift each layer's decode refresh schedule (:meth:`refresh_phase`) so that the first
    stage reruns in one group of layers at a time (paper intervals 16/8/4: a quarter of the
    layers on every 4th step) instead of in every layer on one step in 16. Each layer refreshes
    as often as before. At long contexts the first stage reads a sample of keys from the whole
    context (from host memory under offload): run in every layer at once it made one step cost
    several."""

    decode_graphs: bool = True
    """Replay each layer's attention as a CUDA graph on decode steps: the KV write, the
    page-cache write-through, the selection gathers and the sparse attention launch as one
    graph replay, captured per layer and batch size on first use (``vllm_hip.decode_graphs``).
    Rows that refresh their selection on the step run pruning eagerly before the replay.
    Attention runs between vLLM's CUDA graphs, so without this each layer pays the host cost
    of those launches on every step. Prefill and mixed steps, and steps whose rows all attend
    exactly, run eagerly."""

    stages: tuple[PruningStage, ...] = field(default_factory=lambda: _stages_3k(REFRESH_PRESETS["paper"]))
    """Pruning stages, coarse to fine. Default: the paper's 3K preset (256 → 32 → 8)."""

    score_norm: str = "head_max"
    """How per-kv-head chunk scores combine into one ranking. ``"head_max"``: each head's scores
    minus that head's best over the block's candidates, then the max over heads. ``"none"``: the
    raw max over heads, as the paper describes. On SmolLM2 the raw rule let one kv head with large
    logits everywhere push a retrieval head's top block (the passkey) out of the top k: passkey
    1/3 at 4K and 0/3 at 16K versus 3/3 and 2/3 with ``"head_max"`` (benchmarks/results/
    passkey_cpu.json)."""

    rope_mode: str = "streaming"
    """``"streaming"``: keys are cached without RoPE and the kernels assign positions (sparse
    attention: query at its position, selected tokens renumbered just before the window, sink before
    them; mask estimation: chunk-indexed in early layers, relative elsewhere). This is what lets a
    model serve contexts beyond its trained length. ``"model"``: keys keep the model's own rotation
    (true positions); no context extension."""

    rope_cache: str = "rotated"
    """How ``rope_mode="streaming"`` caches keys (vLLM backend). ``"rotated"``: the model rotates
    q and k at their true positions, as under every other backend, the cache holds them so, and
    the kernels turn each key (and, for mask estimation, each query) by its assigned minus its
    true position. Contexts within sink + window + k then run vLLM's own FlashAttention kernel
    (where it is available, outside offload and batch-invariant mode): the same greedy output as
    ``--attention-backend FLASH_ATTN``. ``"unrotated"``: the model's rotary embedding is replaced
    by an identity and keys are cached without RoPE (one bf16 rounding fewer per key; exact
    attention by our own kernel)."""

    allow_long_context: bool = True
    """With ``rope_mode="streaming"``, let vLLM accept ``--max-model-len`` above the model's
    ``max_position_embeddings`` (sets ``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`` for the user)."""

    export_metrics: bool = True
    """Export InfiniteHiP figures on vLLM's ``/metrics`` (adds a KV connector that moves no KV and
    only carries the workers' counters to the API server; see docs/metrics.md)."""

    decode_splits: int = 0
    """Split-K partitions of decode attention (0 = chosen per batch by a fixed heuristic; under
    ``VLLM_BATCH_INVARIANT=1``, where the count may not follow the batch, 0 means 8)."""

    offload: bool = False
    """Keep the full KV cache in pinned host memory and a cache of hot blocks on the GPU."""

    offload_gpu_cache_tokens: int = 65536
    """Tokens per layer held in the GPU cache when ``offload`` is on. Must hold at least
    sink + window + the largest k."""

    offload_prefill_staging: bool = True
    """With ``offload``: on a step with prefill rows, copy each layer's KV pages of those rows
    into one GPU buffer (shared by the layers; one layer's pages of ``--max-model-len`` plus
    ``--max-num-batched-tokens`` tokens, e.g. 2 GiB for 1M tokens of Llama-3.1-8B in fp8) and
    attend there. Every query block of a chunk samples keys of every chunk before it (stage
    1), which read across PCIe costs far more than one bulk copy per layer. Off: prefill reads
    host memory through the page cache."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> "InfiniteHipConfig":
        """Build from a plain dict (the value of ``additional_config["infinitehip"]``).

        ``preset`` and ``refresh`` fill defaults first; every other key overrides them. ``stages``
        may be a list of dicts with the :class:`PruningStage` fields.
        """
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise ConfigError(
                f"infinitehip={options!r} is invalid: must be a JSON object of options, e.g. "
                '{"window_tokens": 2048}'
            )
        names = cls.field_names()
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ConfigError(
                f"{_option_path('infinitehip', unknown[0])} is not an option; known options: "
                f"{', '.join(names)}"
            )
        preset = options.get("preset", "3k")
        _check_choice("preset", preset, tuple(PRESETS))
        refresh = options.get("refresh", "paper")
        _check_choice("refresh", refresh, tuple(REFRESH_PRESETS))
        values: dict[str, Any] = {"stages": _stages_3k(REFRESH_PRESETS[refresh])}
        values.update(PRESETS[preset])
        values.update(options)
        if "stages" in options:
            values["stages"] = _parse_stages(options["stages"])
        elif values.get("selected_tokens") == 0:
            # k = 0 turns pruning off (a sink + window baseline), in early layers too unless
            # they are given their own k (which then needs explicit stages).
            values["stages"] = ()
            if "early_selected_tokens" not in options:
                values["early_selected_tokens"] = 0
        elif values["stages"] and isinstance(values.get("selected_tokens"), int):
            # Changing k alone should not require spelling out the stages: the last stage keeps k.
            last = dataclasses.replace(values["stages"][-1], keep_tokens=values["selected_tokens"])
            values["stages"] = values["stages"][:-1] + (last,)
        return cls(**values)

    @classmethod
    def from_vllm_additional_config(cls, additional_config: Any) -> "InfiniteHipConfig":
        """Read the ``infinitehip`` entry of vLLM's ``additional_config`` (dict or JSON string)."""
        if additional_config is None:
            return cls()
        if isinstance(additional_config, str):
            try:
                additional_config = json.loads(additional_config)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--additional-config is not valid JSON: {e}") from e
        if not isinstance(additional_config, Mapping):
            return cls()
        return cls.from_dict(additional_config.get(ADDITIONAL_CONFIG_KEY))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stages"] = [s.to_dict() for s in self.stages]
        return d

    def replace(self, **changes: Any) -> "InfiniteHipConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        _check_choice("preset", self.preset, tuple(PRESETS))
        _check_choice("refresh", self.refresh, tuple(REFRESH_PRESETS))
        for name in ("block_size_q", "block_size_k"):
            value = getattr(self, name)
            lo, hi = (16, 128) if name == "block_size_q" else (8, 64)
            _check_int(name, value, lo, hi)
            if not _is_pow2(value):
                raise ConfigError(
                    f"infinitehip.{name}={value!r} is invalid: must be a power of two in [{lo}, {hi}]"
                )
        bk = self.block_size_k
        _check_int("sink_tokens", self.sink_tokens, 0, MAX_TOKENS, bk)
        _check_int("window_tokens", self.window_tokens, bk, MAX_TOKENS, bk)
        _check_int("selected_tokens", self.selected_tokens, 0, MAX_TOKENS, bk)
        _check_int("early_selected_tokens", self.early_selected_tokens, 0, MAX_TOKENS, bk)
        _check_int("early_layers", self.early_layers, 0, 1024)
        _check_int("decode_splits", self.decode_splits, 0, 256)
        _check_choice("rope_mode", self.rope_mode, ("streaming", "model"))
        _check_choice("rope_cache", self.rope_cache, ("rotated", "unrotated"))
        _check_choice("score_norm", self.score_norm, ("head_max", "none"))
        for name in ("allow_long_context", "export_metrics", "offload", "split_last_query",
                     "align_prefill_chunks", "offload_prefill_staging", "stagger_refresh",
                     "decode_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"infinitehip.{name}={getattr(self, name)!r} is invalid: must be true or false"
                )
        self._validate_stages()
        _check_int("offload_gpu_cache_tokens", self.offload_gpu_cache_tokens, bk, MAX_TOKENS, bk)
        need = self.sink_tokens + self.window_tokens + self.max_selected_tokens
        if self.offload and self.offload_gpu_cache_tokens < need:
            raise ConfigError(
                f"infinitehip.offload_gpu_cache_tokens={self.offload_gpu_cache_tokens} is invalid: "
                f"the GPU cache must hold sink + window + k = {need} tokens or more"
            )

    def _validate_stages(self) -> None:
        stages = self.stages
        if not isinstance(stages, tuple) or not all(isinstance(s, PruningStage) for s in stages):
            raise ConfigError(
                f"infinitehip.stages={stages!r} is invalid: must be a list of stages "
                "({chunk_size, keep_tokens, query_pool, refresh_interval})"
            )
        if self.max_selected_tokens == 0:
            if stages:
                raise ConfigError(
                    "infinitehip.stages is invalid: must be empty when selected_tokens and "
                    "early_selected_tokens are 0 (nothing to select)"
                )
            return
        if not 1 <= len(stages) <= 8:
            raise ConfigError(
                f"infinitehip.stages has {len(stages)} stages: must have between 1 and 8 when "
                "selected_tokens > 0 (the 'streaming' preset has none: give stages or use '3k')"
            )
        prev_chunk = None
        prev_refresh = None
        for i, s in enumerate(stages):
            p = f"stages[{i}]"
            _check_int(f"{p}.chunk_size", s.chunk_size, self.block_size_k, 1 << 16)
            if not _is_pow2(s.chunk_size):
                raise ConfigError(
                    f"infinitehip.{p}.chunk_size={s.chunk_size} is invalid: must be a power of two "
                    f"in [{self.block_size_k}, 65536]"
                )
            if prev_chunk is not None and s.chunk_size >= prev_chunk:
                raise ConfigError(
                    f"infinitehip.{p}.chunk_size={s.chunk_size} is invalid: must be smaller than "
                    f"the previous stage's chunk_size ({prev_chunk})"
                )
            _check_int(f"{p}.keep_tokens", s.keep_tokens, s.chunk_size, MAX_TOKENS, s.chunk_size)
            _check_int(f"{p}.query_pool", s.query_pool, 1, self.block_size_q)
            if not _is_pow2(s.query_pool):
                raise ConfigError(
                    f"infinitehip.{p}.query_pool={s.query_pool} is invalid: must be a power of two "
                    f"in [1, {self.block_size_q}]"
                )
            _check_int(f"{p}.refresh_interval", s.refresh_interval, 1, 4096)
            if prev_refresh is not None and s.refresh_interval > prev_refresh:
                raise ConfigError(
                    f"infinitehip.{p}.refresh_interval={s.refresh_interval} is invalid: must not "
                    f"exceed the previous stage's ({prev_refresh})"
                )
            if s.refresh_interval > self.window_tokens:
                raise ConfigError(
                    f"infinitehip.{p}.refresh_interval={s.refresh_interval} is invalid: must not "
                    f"exceed window_tokens ({self.window_tokens}), or new tokens would go unseen"
                )
            prev_chunk, prev_refresh = s.chunk_size, s.refresh_interval
        last = stages[-1]
        if last.chunk_size != self.block_size_k:
            raise ConfigError(
                f"infinitehip.stages[{len(stages) - 1}].chunk_size={last.chunk_size} is invalid: "
                f"the last stage must use block_size_k ({self.block_size_k})"
            )
        if last.keep_tokens != self.selected_tokens:
            raise ConfigError(
                f"infinitehip.stages[{len(stages) - 1}].keep_tokens={last.keep_tokens} is invalid: "
                f"the last stage keeps selected_tokens ({self.selected_tokens})"
            )
        for i, s in enumerate(stages[:-1]):
            if s.keep_tokens < self.max_selected_tokens:
                raise ConfigError(
                    f"infinitehip.stages[{i}].keep_tokens={s.keep_tokens} is invalid: must be at "
                    f"least the largest k ({self.max_selected_tokens})"
                )
            if s.keep_tokens < stages[i + 1].keep_tokens:
                raise ConfigError(
                    f"infinitehip.stages[{i}].keep_tokens={s.keep_tokens} is invalid: must not be "
                    f"smaller than the next stage's ({stages[i + 1].keep_tokens})"
                )

    # ------------------------------------------------------------------ derived values
    @property
    def max_selected_tokens(self) -> int:
        early = self.early_selected_tokens if self.early_layers > 0 else 0
        return max(self.selected_tokens, early)

    def selected_tokens_for_layer(self, layer: int) -> int:
        """k for the given layer index (early layers may keep more)."""
        return self.early_selected_tokens if layer < self.early_layers else self.selected_tokens

    def refresh_phase(self, layer: int) -> int:
        """What ``layer`` adds to a decode position before testing it against the stages'
        refresh intervals (``stagger_refresh``; 0 when off).

        A multiple of the last stage's interval below the first's: the layers' first stages
        rerun on different steps (one group of layers per last-stage period), while every layer
        still refreshes on the same steps as before (each last-stage period), so the steps that
        reuse every selection, and admit nothing, stay as they were."""
        if not self.stagger_refresh or not self.stages:
            return 0
        first, last = self.stages[0].refresh_interval, self.stages[-1].refresh_interval
        return (layer % (first // last)) * last  # intervals never grow: first >= last

    def attends_exactly(self, max_window_start: int, k_tokens: int) -> bool:
        """Whether k tokens cover every key between the sink and the window of every query block
        (the longest such region is ``max_window_start - sink``): then attention is exact."""
        return max_window_start - self.sink_tokens <= k_tokens

    def stage_keep_tokens(self, stage: int, layer: int) -> int:
        """Tokens kept by ``stage`` in ``layer``: the last stage keeps the layer's k."""
        if stage == len(self.stages) - 1:
            return self.selected_tokens_for_layer(layer)
        return self.stages[stage].keep_tokens

    def exact_context_tokens(self, layer: int = 0) -> int:
        """Contexts up to this length are attended exactly (everything fits sink + window + k)."""
        return self.sink_tokens + self.window_tokens + self.selected_tokens_for_layer(layer)


def _option_path(prefix: str, key: Any) -> str:
    """``prefix.key`` for a plain name; ``prefix[<repr>]`` for an empty or odd key, which would
    otherwise print as nothing ("infinitehip.stages[0]. is not an option")."""
    if isinstance(key, str) and key.isidentifier():
        return f"{prefix}.{key}"
    return f"{prefix}[{key!r}]"


def _parse_stages(raw: Any) -> tuple[PruningStage, ...]:
    if isinstance(raw, tuple) and all(isinstance(s, PruningStage) for s in raw):
        return raw
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(
            f"infinitehip.stages={raw!r} is invalid: must be a list of stages "
            "({chunk_size, keep_tokens, query_pool, refresh_interval})"
        )
    allowed = tuple(f.name for f in fields(PruningStage))
    out = []
    for i, s in enumerate(raw):
        if isinstance(s, PruningStage):
            out.append(s)
            continue
        if not isinstance(s, Mapping):
            raise ConfigError(
                f"infinitehip.stages[{i}]={s!r} is invalid: must be an object with "
                f"{', '.join(allowed)}"
            )
        unknown = sorted(set(s) - set(allowed))
        if unknown:
            raise ConfigError(
                f"{_option_path(f'infinitehip.stages[{i}]', unknown[0])} is not an option; "
                f"known: {', '.join(allowed)}"
            )
        for req in ("chunk_size", "keep_tokens"):
            if req not in s:
                raise ConfigError(f"infinitehip.stages[{i}].{req} is missing")
        out.append(PruningStage(**s))
    return tuple(out)
