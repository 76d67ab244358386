"""The INFINITEHIP attention backend for vLLM (backend, metadata builder, impl).

Shaped like vLLM's ``v1/attention/backends/triton_attn.py``. Per step the builder cuts the batch
into query blocks (``vllm_hip_kernels.query_blocks``), tracks rows for the decode mask cache
(``vllm_hip.masks``) and plans which pruning stages run. Per layer the impl writes K/V into the
paged cache (keys rotated at their true positions, as every vLLM backend caches them, unless
``rope_cache="unrotated"``), selects key blocks (exactly all of them while the context fits
sink + window + k, else by hierarchical pruning or from the mask cache) and runs block-sparse
attention. Steps whose rows all fit sink + window + k run FLASH_ATTN's own kernel instead where it
can (``vllm_hip.flash_delegate``).

KV cache layout: ``[num_pages, 2, page_size, num_kv_heads, head_size]`` (keys at index 0 of dim 1).

CUDA graphs: the impl keeps host-side decisions (refresh schedule, mask-cache bookkeeping) per step,
so attention runs eagerly between vLLM's piecewise graphs (``AttentionCGSupport.NEVER``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

from vllm_hip_kernels.query_blocks import QueryBlocks, build_query_blocks
from vllm_hip_kernels.cached_pages import CachedPages
from vllm_hip_kernels.host_copy import to_device
from vllm_hip import decode_graphs, prefill_lens
from vllm_hip import stats as hip_stats
from vllm_hip.config import InfiniteHipConfig
from vllm_hip.flash_delegate import FlashDelegate, flash_forward
from vllm_hip.launch_options import invariant_launch_options
from vllm_hip.offload_plan import staging_pages
from vllm_hip.prefill_staging import staging_tokens
from vllm_hip.masks import LayerMaskCache, MaskStore, RefreshPlan, RowTracker, plan_refresh, subset_blocks
from vllm_hip.page_cache import (
    DecodePages,
    DevicePageCache,
    PageCacheStack,
    StepKeyPages,
    key_list_pages,
    shared_counters,
)

logger = logging.getLogger("vllm_hip")

#: Model families whose RoPE is the neox style with full rotary dim that ``rope_mode="streaming"``
#: re-implements. Others may run with ``rope_mode="model"`` (no context extension).
STREAMING_ROPE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo", "olmo2")


def load_config(vllm_config: VllmConfig | None) -> InfiniteHipConfig:
    additional = getattr(vllm_config, "additional_config", None) if vllm_config else None
    return InfiniteHipConfig.from_vllm_additional_config(additional)


# ---------------------------------------------------------------------------------------- metadata
@dataclass
class InfiniteHipMetadata:
    """Per-step attention metadata shared by all layers.

    ::

        |------------- context -------------|--- new queries ---|
        |------------------------ seq_len ----------------------|
        query block (≤ block_size_q queries of one row): shares one selection
    """

    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor
    max_seq_len: int
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    positions: torch.Tensor
    """[num_actual_tokens] int64 position of every query (for RoPE)."""
    qblocks: QueryBlocks
    """Query blocks on the device."""
    qblocks_cpu: QueryBlocks
    """The same on the host (for sizing launches without a sync)."""
    is_decode_row: torch.Tensor
    """[num_reqs] bool on the host."""
    src_row: torch.Tensor | None
    """[num_reqs] int64 (device): last step's row of each row, -1 if unknown (mask cache)."""
    step_id: int
    plans: dict[tuple[int, int], tuple[RefreshPlan, Any]] = field(default_factory=dict)
    """(k, refresh phase) -> the step's refresh plan and its device copy, made by the first layer
    that needs it."""
    device_plans: dict[tuple, Any] = field(default_factory=dict)
    """(k, the plan's ``first`` as a tuple) -> the device copy (``_DevicePlan``) shared by plans
    that agree."""
    all_blocks: tuple[torch.Tensor, torch.Tensor] | None = None
    """Selection of every block in [sink, W0), shared by the layers that attend exactly."""
    launch_classes: list["_LaunchClass"] | None = None
    """The step's query blocks by kernel launch (filled by the first layer; see
    ``InfiniteHipImpl._launch_classes``)."""
    decode_blocks: torch.Tensor | None = None
    """Offload: device indices of the query blocks of decode rows (filled by the first layer)."""
    decode_key_pages: Any = None
    """Offload: their sink and window pages (``page_cache.StepKeyPages``, with decode_blocks)."""
    prefill_window_pages: torch.Tensor | None = None
    """Offload: sink and window pages of the prefill rows' query blocks (filled by the first
    layer; the same for all)."""
    seq_lens_cpu: torch.Tensor | None = None
    """[num_reqs] int64 on the host."""
    staged_rows: torch.Tensor | None = None
    """Offload, prefill steps: [num_reqs] bool (host), rows whose pages go to the staging buffer
    (``prefill_staging.staged_rows``; filled by the first layer)."""
    staged_pages: torch.Tensor | None = None
    """Their pages, row after row (``prefill_staging.stage_layout``; filled by the first layer)."""
    staged_block_table: torch.Tensor | None = None
    """The staging buffer's block table for them (``prefill_staging.stage_layout``)."""
    mask_store: MaskStore | None = None
    """The layers' decode mask caches (the row tracker's), permuted once per step."""
    flash: Any = None
    """FLASH_ATTN's metadata for the step, when its kernel attends exactly for the layers whose
    k covers every row (``vllm_hip.flash_delegate``)."""
    graph_ok: bool | None = None
    """Whether the step's layers may replay decode graphs (decided by the first layer)."""
    graph_statics: Any = None
    """The step's metadata in static buffers (``decode_graphs.StepStatics``; first layer)."""


class InfiniteHipMetadataBuilder(AttentionMetadataBuilder[InfiniteHipMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.hip_config = load_config(vllm_config)
        self.page_size = kv_cache_spec.block_size
        if self.page_size % self.hip_config.block_size_k:
            raise ValueError(
                f"INFINITEHIP: KV page size {self.page_size} must be a multiple of "
                f"infinitehip.block_size_k={self.hip_config.block_size_k}"
            )
        self.max_rows = vllm_config.scheduler_config.max_num_seqs
        num_pages = getattr(vllm_config.cache_config, "num_gpu_blocks", None) or 0
        self._num_pages_hint = int(num_pages)
        self._tracker: RowTracker | None = None
        self._step = 0
        prefill_lens.install()
        from vllm_hip.plugin import batch_invariant_requested

        self._flash = FlashDelegate.create(
            self.hip_config, kv_cache_spec, layer_names, vllm_config, device,
            batch_invariant_requested(),
        )  # fmt: skip

    def _row_tracker(self, block_table: torch.Tensor) -> RowTracker:
        if self._tracker is None:
            num_pages = max(self._num_pages_hint, 1) + 1
            self._tracker = RowTracker(num_pages, max(self.max_rows, 1), block_table.device)
        return self._tracker

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> InfiniteHipMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        block_table = cm.block_table_tensor[:num_reqs]
        tracker = None
        if self.hip_config.max_selected_tokens > 0 and num_reqs > 0:
            tracker = self._row_tracker(block_table)
        self._step += 1
        hip_stats.get_stats().record_step()
        md = build_metadata(
            self.hip_config,
            query_start_loc=cm.query_start_loc,
            query_start_loc_cpu=cm.query_start_loc_cpu[: num_reqs + 1],
            seq_lens=cm.seq_lens[:num_reqs],
            seq_lens_cpu=_host_seq_lens(cm)[:num_reqs],
            block_table=block_table,
            slot_mapping=cm.slot_mapping[: cm.num_actual_tokens],
            positions=cm.positions,
            is_prefilling_cpu=cm.is_prefilling,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            page_size=self.page_size,
            tracker=tracker,
            step_id=self._step,
        )
        if self._flash is not None and self._flash.covers(self.hip_config, md.qblocks_cpu):
            md.flash = self._flash.build(cm)
        return md


def build_metadata(
    cfg: InfiniteHipConfig,
    *,
    query_start_loc: torch.Tensor,
    query_start_loc_cpu: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_cpu: torch.Tensor,
    block_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    positions: torch.Tensor | None,
    is_prefilling_cpu: torch.Tensor | None,
    max_query_len: int,
    max_seq_len: int,
    page_size: int,
    tracker: RowTracker | None,
    step_id: int,
) -> InfiniteHipMetadata:
    """Everything the layers of one step share (the builder's work, callable from tests)."""
    device = seq_lens.device
    n_tok = int(slot_mapping.shape[0])
    num_reqs = int(seq_lens.shape[0])
    qsl_cpu = query_start_loc_cpu.long()
    q_lens_cpu = qsl_cpu[1:] - qsl_cpu[:-1]
    qb_cpu = build_query_blocks(
        qsl_cpu,
        seq_lens_cpu,
        block_size_q=cfg.block_size_q,
        sink_tokens=cfg.sink_tokens,
        window_tokens=cfg.window_tokens,
        # where a chunk ends the prefill (known in vLLM's runners), else at every chunk end
        split_last=prefill_lens.split_rows(seq_lens_cpu, cfg.split_last_query),
    )
    if positions is None:
        positions = to_device(_positions_from(qsl_cpu, seq_lens_cpu), device)
    if is_prefilling_cpu is not None:
        is_decode = ~is_prefilling_cpu[:num_reqs].to("cpu", torch.bool) & (q_lens_cpu == 1)
    else:
        is_decode = q_lens_cpu == 1
    src_row = None
    if tracker is not None:
        src_row = tracker.step(block_table, seq_lens, page_size)
    mask_store = tracker.mask_store if tracker is not None else None
    return InfiniteHipMetadata(
        num_actual_tokens=n_tok,
        max_query_len=max_query_len,
        query_start_loc=query_start_loc,
        max_seq_len=max_seq_len,
        seq_lens=seq_lens.to(torch.int32),
        block_table=block_table.to(torch.int32),
        slot_mapping=slot_mapping,
        positions=positions[:n_tok].long(),
        qblocks=qb_cpu.to(device),
        qblocks_cpu=qb_cpu,
        is_decode_row=is_decode,
        src_row=src_row,
        step_id=step_id,
        mask_store=mask_store,
        seq_lens_cpu=seq_lens_cpu.long(),
    )


def _host_lens(md: InfiniteHipMetadata) -> torch.Tensor:
    """The step's sequence lengths on the host (int64)."""
    return md.seq_lens_cpu if md.seq_lens_cpu is not None else md.seq_lens.cpu().long()


def _host_seq_lens(cm: CommonAttentionMetadata) -> torch.Tensor:
    # Host copies that vLLM already has (exact outside speculative decoding, which we refuse);
    # falling back to a device copy costs one sync.
    for name in ("seq_lens_cpu_upper_bound", "_seq_lens_cpu"):
        t = getattr(cm, name, None)
        if t is not None:
            return t.to(torch.int64)
    return cm.seq_lens.to("cpu", torch.int64)


def _positions_from(qsl: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    q_lens = (qsl[1:] - qsl[:-1]).long()
    start = seq_lens.long() - q_lens
    row = torch.repeat_interleave(torch.arange(q_lens.numel()), q_lens)
    return start[row] + torch.arange(int(q_lens.sum())) - qsl[:-1].long()[row]


# ---------------------------------------------------------------------------------------- backend
class InfiniteHipBackend(AttentionBackend):
    """vLLM attention backend registered as ``INFINITEHIP`` (alias of ``CUSTOM``)."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = [
        "auto",
        "float16",
        "bfloat16",
        "fp8",
        "fp8_e4m3",
    ]

    @staticmethod
    def get_name() -> str:
        # CUSTOM resolves in every process, even before our plugin registered the alias.
        return "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @staticmethod
    def get_impl_cls() -> type["InfiniteHipImpl"]:
        return InfiniteHipImpl

    @staticmethod
    def get_builder_cls() -> type[InfiniteHipMetadataBuilder]:
        return InfiniteHipMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = "auto",
    ) -> tuple[int, ...]:
        if block_size % 16 != 0:
            raise ValueError("INFINITEHIP: KV block size must be a multiple of 16")
        return (num_blocks, 2, block_size, num_kv_heads, head_size)

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        # Under VLLM_BATCH_INVARIANT=1 the impl launches one-query and many-query blocks apart,
        # each kind with fixed tiles and split-K (_launch_classes), selection ties break by
        # position, and prefill chunks are cut at query-block boundaries (vllm_hip.scheduler):
        # a request's attention does not depend on its neighbours.
        return True

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [64, 128]

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


# ---------------------------------------------------------------------------------------- impl
class InfiniteHipImpl(AttentionImpl[InfiniteHipMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        unsupported = []
        if alibi_slopes is not None:
            unsupported.append("ALiBi")
        if sliding_window is not None:
            unsupported.append("sliding-window layers")
        if sinks is not None:
            unsupported.append("learned attention sinks")
        if attn_type != AttentionType.DECODER:
            unsupported.append(f"attention type {attn_type}")
        if kv_sharing_target_layer_name is not None:
            unsupported.append("cross-layer KV sharing")
        if unsupported:
            raise NotImplementedError(
                "INFINITEHIP serves decoder self-attention with RoPE only; this model uses "
                + ", ".join(unsupported)
                + ". Serve it with another --attention-backend."
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.logits_soft_cap = float(logits_soft_cap or 0.0)
        vllm_config = get_current_vllm_config_or_none()
        self.hip_config = load_config(vllm_config)
        self._hf_config = (
            vllm_config.model_config.hf_config
            if vllm_config is not None and vllm_config.model_config is not None
            else None
        )
        self._max_positions = (
            vllm_config.model_config.max_model_len
            if vllm_config is not None and vllm_config.model_config is not None
            else 1 << 17
        )
        # Rows the decode mask cache is first sized for. Read here: vLLM's current config is
        # only set while the model is built, not during forward.
        self._max_rows_hint = (
            int(vllm_config.scheduler_config.max_num_seqs)
            if vllm_config is not None and vllm_config.scheduler_config is not None
            else 1
        )
        self._staging_tokens = staging_tokens(vllm_config)
        if self.hip_config.rope_mode == "streaming" and self._hf_config is not None:
            check_streaming_rope_support(self._hf_config, head_size)
        if self.hip_config.offload:
            from vllm_hip import worker

            # Model layers are built before vLLM allocates the KV cache: ask for host memory now.
            worker.request_offload(True, self.hip_config, self._staging_tokens)
            worker.install_allocation_hooks()
        from vllm_hip.plugin import rope_handed_over

        # The model's rotary embedding was replaced by an identity (plugin.py, rope_cache=
        # "unrotated"): q and k arrive un-rotated. Otherwise they arrive rotated and are cached
        # so (rope_cache="rotated"), or rotated back here.
        self.rope_handed_over = rope_handed_over()
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._own_mask_store: MaskStore | None = None
        self._reused_all = False
        """Whether this layer's last selection reused every query block's cached one."""
        self._graphs: decode_graphs.LayerGraphs | None = None
        """This layer's decode graphs (made on its first decode step that may replay)."""
        self._mask_cache: LayerMaskCache | None = None
        """This layer's view of the mask store as of its last step (for tests and debugging)."""
        self._page_cache: DevicePageCache | None = None
        self.layer_idx: int | None = None
        from vllm_hip.plugin import batch_invariant_requested

        self.batch_invariant = batch_invariant_requested()

    # ------------------------------------------------------------------ helpers
    @property
    def keys_rotated(self) -> bool:
        """Whether q and the cached keys carry the model's RoPE at their true positions."""
        cfg = self.hip_config
        return cfg.rope_mode == "model" or (cfg.rope_cache == "rotated" and not self.rope_handed_over)

    def _layer_index(self, layer: Any) -> int:
        if self.layer_idx is None:
            name = getattr(layer, "layer_name", "") or ""
            self.layer_idx = _layer_index_from_name(name)
        return self.layer_idx

    def _rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.hip_config.rope_mode != "streaming":
            return None
        if self._rope is None or self._rope[0].device != device:
            self._rope = _shared_rope_tables(self._hf_config, self._max_positions + 1, device)
        return self._rope

    def _offload_page_cache(self, kv_cache: torch.Tensor) -> DevicePageCache | None:
        """This layer's GPU cache of hot pages (offload only), made on first use."""
        if not self.hip_config.offload:
            return None
        pc = self._page_cache
        if pc is None or pc.main.data_ptr() != kv_cache.data_ptr():
            page_size = int(kv_cache.shape[2])
            capacity = max(1, self.hip_config.offload_gpu_cache_tokens // page_size)
            layers = int(getattr(self._hf_config, "num_hidden_layers", 0) or 1)
            stack = PageCacheStack.shared(kv_cache, capacity, shared_counters(kv_cache.device), layers)
            pc = stack.layer_cache(kv_cache)
            st = hip_stats.get_stats()
            st.gpu_cache_capacity_blocks += capacity
            st.gpu_cache_bytes += pc.nbytes
            self._page_cache = pc
        return pc

    def _decode_pages(
        self, pc: DevicePageCache, md: InfiniteHipMetadata, sel: torch.Tensor, cnt: torch.Tensor
    ) -> DecodePages | None:
        """What the decode rows just read, for the GPU cache to admit (LRU; the stack admits
        every layer's at the end of the step). A prefill row's selected blocks are read once per
        query block and would only flush it."""
        if md.decode_blocks is None:
            md.decode_blocks = _blocks_of_rows(md, decode=True)
            cfg = self.hip_config
            idx = md.decode_blocks
            md.decode_key_pages = StepKeyPages(
                md.block_table, md.seq_lens, md.qblocks.seq[idx], md.qblocks.window_start[idx],
                sink_tokens=cfg.sink_tokens, page_size=pc.page_size,
                max_window_pages=(cfg.window_tokens + cfg.block_size_q) // pc.page_size + 2,
            )  # fmt: skip
        idx = md.decode_blocks
        n = int(idx.numel())
        if n == 0:
            return None
        if n == sel.shape[0]:  # every block decodes (a pure decode step): no gather
            return DecodePages(md.decode_key_pages, sel, cnt)
        return DecodePages(md.decode_key_pages, sel[idx], cnt[idx])

    def _admit_prefill_windows(self, pc: DevicePageCache, md: InfiniteHipMetadata) -> None:
        """Before a prefill step's kernels: bring in the sink and window pages of its prefill
        query blocks. Each of those pages is read by every query block whose window covers it
        (a 16K-token chunk has 256 blocks of 64 queries, each reading ~1K window tokens), so one
        copy now replaces many reads across PCIe; the new tokens are already in host memory.
        The page list is the same for every layer: made by the first, once per step."""
        if md.prefill_window_pages is None:
            idx = _blocks_of_rows(md, decode=False)
            n = idx.numel()
            no_sel = torch.zeros((n, 0), dtype=torch.int32, device=idx.device)
            md.prefill_window_pages = self._key_pages(
                pc.page_size, md, idx, no_sel, torch.zeros(n, dtype=torch.int32, device=idx.device)
            )
        pc.admit(md.prefill_window_pages)

    def _stage_pages(self, kv_cache: torch.Tensor, md: InfiniteHipMetadata) -> torch.Tensor:
        """This layer's pages of the step's prefill rows in the shared GPU staging buffer
        (``vllm_hip.prefill_staging``); counted as host-to-GPU copy bytes. Decode rows are left
        out: their blocks launch apart and read through the page cache (``launch_classes``)."""
        from vllm_hip.prefill_staging import PrefillStaging, stage_layout

        staging, made = PrefillStaging.for_cache(kv_cache, self._staging_pages(kv_cache))
        st = hip_stats.get_stats()
        if made:
            st.gpu_cache_bytes += staging.nbytes
        if md.staged_pages is None:
            lens = torch.where(md.staged_rows, _host_lens(md), 0)
            md.staged_pages, md.staged_block_table = stage_layout(md.block_table, lens, int(kv_cache.shape[2]))
        st.record_h2d(int(md.staged_pages.numel()) * staging.page_bytes)
        return staging.fill(kv_cache, md.staged_pages)

    def _staging_pages(self, kv_cache: torch.Tensor) -> int:
        """Pages of the prefill staging buffer for this KV cache (``offload_plan.staging_pages``)."""
        return staging_pages(int(kv_cache.shape[0]), int(kv_cache.shape[2]), self._staging_tokens)

    def _key_pages(self, page_size: int, md: InfiniteHipMetadata, idx: torch.Tensor,
                   sel: torch.Tensor, cnt: torch.Tensor) -> torch.Tensor:
        """The sink, window and selected pages (``sel``/``cnt``: of these blocks only) of the
        query blocks ``idx``, -1 padded."""
        cfg = self.hip_config
        return key_list_pages(
            md.block_table,
            md.seq_lens,
            md.qblocks.seq[idx],
            md.qblocks.window_start[idx],
            sel,
            cnt,
            sink_tokens=cfg.sink_tokens,
            page_size=page_size,
            max_window_pages=(cfg.window_tokens + cfg.block_size_q) // page_size + 2,
        )

    def _launch_classes(self, md: InfiniteHipMetadata, kv_cache: torch.Tensor | None = None) -> list["_LaunchClass"]:
        """How the step's query blocks are launched (made by the first layer, once per step).

        By default all in one launch, tiles and split-K sized by the batch (fastest). In
        batch-invariant mode a query's reduction order must not depend on its neighbours, so
        tile sizes and split-K counts are fixed per kind of block, and the kinds are launched
        apart: one-query blocks (decode, and a prompt's split-off last query) with decode tiles
        and ``decode_splits`` (8 if 0) partitions, longer blocks with tiles for ``block_size_q``
        queries and one partition. Under offload with prefill staging, a step's prefill rows
        read a GPU copy of their pages and its decode rows the page cache: their blocks launch
        apart too (``kv_cache``, the layer's, sizes the staging buffer: the first call of a step
        must pass it)."""
        if md.launch_classes is None:
            from vllm_hip.prefill_staging import staged_rows

            cfg = self.hip_config
            if cfg.offload and cfg.offload_prefill_staging and not bool(md.is_decode_row.all()):
                # prefill rows while they fit; decode rows read the page cache
                md.staged_rows = staged_rows(~md.is_decode_row, _host_lens(md), int(kv_cache.shape[2]),
                                             self._staging_pages(kv_cache))  # fmt: skip
            md.launch_classes = launch_classes(
                md.qblocks, md.qblocks_cpu, cfg, self.batch_invariant, md.staged_rows
            )
        return md.launch_classes

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: InfiniteHipMetadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("INFINITEHIP does not fuse output quantization")
        if attn_metadata is None:
            # Profiling run: vLLM only measures memory here.
            return output.fill_(0)
        md = attn_metadata
        n = md.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        k = key[:n].view(n, self.num_kv_heads, self.head_size)
        v = value[:n].view(n, self.num_kv_heads, self.head_size)
        rope = self._rope_tables(q.device)
        rotated = self.keys_rotated
        unrotating = rope is not None and not self.rope_handed_over and not rotated
        if unrotating:
            from vllm_hip.rope import unrotate

            # rope_cache="unrotated" but the model rotated q and k (its RoPE was not handed
            # over): both go back to un-rotated form before they are cached.
            q = unrotate(q, md.positions, *rope)
            k = unrotate(k, md.positions, *rope)
        fp8 = self.kv_cache_dtype.startswith("fp8")
        key_cache, value_cache = (_fp8_view(c, fp8) for c in kv_cache.unbind(1))
        k_scale = float(getattr(layer, "_k_scale_float", 1.0))
        v_scale = float(getattr(layer, "_v_scale_float", 1.0))
        layer_idx = self._layer_index(layer)
        if not unrotating and self._replay_decode(layer, layer_idx, q, k, v, kv_cache, key_cache, value_cache,
                                                  md, output, k_scale, v_scale, rope, rotated):  # fmt: skip
            return output
        write_kv_cache(k, v, key_cache, value_cache, md.slot_mapping, self.kv_cache_dtype, layer)
        if md.flash is not None:
            k_tokens = self.hip_config.selected_tokens_for_layer(layer_idx)
            if self.hip_config.attends_exactly(md.qblocks_cpu.max_window_start, k_tokens):
                # Every row fits sink + window + k: FLASH_ATTN's own kernel attends exactly
                # (keys are cached as it caches them), and its outputs are FLASH_ATTN's.
                st = hip_stats.get_stats()
                st.record_attended(n, k_tokens)
                st.record_exact_fallback()
                out = output[:n].view(n, self.num_heads, self.head_size)
                flash_forward(self, layer, q, kv_cache, out, md.flash)
                return output
        classes = self._launch_classes(md, kv_cache)
        # Where each launch class reads keys and values: keyed by _LaunchClass.staged.
        reads = {False: _KeyReads(key_cache, value_cache, None, md.block_table)}
        pc = self._offload_page_cache(kv_cache)
        if pc is not None:
            # Write-through: cached pages that receive new tokens stay equal to host memory.
            pc.mirror_new_tokens(md.slot_mapping)
            if any(kind.staged for kind in classes):
                # The prefill rows' pages, copied to the GPU in bulk: their blocks read them there.
                sk, sv = self._stage_pages(kv_cache, md).unbind(1)
                reads[True] = _KeyReads(_fp8_view(sk, fp8), _fp8_view(sv, fp8), None, md.staged_block_table)
            if not all(kind.staged for kind in classes):
                if not self.hip_config.offload_prefill_staging and not bool(md.is_decode_row.all()):
                    self._admit_prefill_windows(pc, md)
                reads[False] = _KeyReads(key_cache, value_cache, _cached_pages(pc, fp8), md.block_table)

        sel, sel_count = self._select(layer_idx, q, reads, md, k_scale, rope, rotated)
        out = output[:n].view(n, self.num_heads, self.head_size)
        for kind in classes:
            self._attend(
                q, reads[kind.staged], md.seq_lens, kind.blocks,
                sel if kind.idx is None else sel[kind.idx],
                sel_count if kind.idx is None else sel_count[kind.idx],
                k_scale, v_scale, rope, rotated,
                out, kind.options,  # straight into vLLM's output buffer (no copy)
            )  # fmt: skip
        if pc is not None:
            # A step that reused every selection reads the pages admitted when they were made
            # (plus the window's newest tokens, read from host memory until the next refresh):
            # it admits nothing.
            pages = None if self._reused_all else self._decode_pages(pc, md, sel, sel_count)
            pc.stack.end_layer(md, pc.layer, pages)
        return output

    def _attend(self, q, reads: "_KeyReads", seq_lens, blocks, sel, sel_count, k_scale, v_scale, rope,
                rotated, out, options) -> None:  # fmt: skip
        """Sparse attention of ``blocks`` with this layer's settings, into ``out``."""
        from vllm_hip_kernels import sparse_attention as sa

        cfg = self.hip_config
        sa.sparse_attention(
            q, reads.key_cache, reads.value_cache, reads.block_table, seq_lens, blocks, sel, sel_count,
            sink_tokens=cfg.sink_tokens, block_size_k=cfg.block_size_k, sm_scale=self.scale,
            softcap=self.logits_soft_cap, k_scale=k_scale, v_scale=v_scale,
            cos=rope[0] if rope is not None else None, sin=rope[1] if rope is not None else None,
            window_tokens=cfg.window_tokens, keys_rotated=rotated, page_cache=reads.page_cache, out=out,
            **options,
        )  # fmt: skip

    # ------------------------------------------------------------------ selection
    def _select(
        self,
        layer_idx: int,
        q: torch.Tensor,
        reads: dict[bool, "_KeyReads"],
        md: InfiniteHipMetadata,
        k_scale: float,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        keys_rotated: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.hip_config
        self._reused_all = False
        k_tokens = cfg.selected_tokens_for_layer(layer_idx)
        qb, qb_cpu = md.qblocks, md.qblocks_cpu
        st = hip_stats.get_stats()
        st.record_attended(md.num_actual_tokens, k_tokens)
        if k_tokens == 0 or qb_cpu.num_blocks == 0:
            empty = torch.full((qb_cpu.num_blocks, 0), -1, dtype=torch.int32, device=q.device)
            return empty, torch.zeros(qb_cpu.num_blocks, dtype=torch.int32, device=q.device)
        if cfg.attends_exactly(qb_cpu.max_window_start, k_tokens):
            # Every block between sink and window fits in k: attend everything (exact). The mask
            # cache is not permuted on such a step, and need not be: every row of it is exact
            # for this k, a row that outgrows exact attention later gets a full refresh
            # (plan_refresh), and requests absent from this step lose their rows anyway
            # (RowTracker maps only the last step's rows).
            st.record_exact_fallback()
            if md.all_blocks is None:
                md.all_blocks = all_blocks_selection(qb, qb_cpu, cfg.sink_tokens, cfg.block_size_k)
            return md.all_blocks

        from vllm_hip_kernels import prune

        mask_rope = None
        if rope is not None:
            mask_rope = "chunk_indexed" if layer_idx < cfg.early_layers else "relative"
        stages = self._stages(layer_idx)
        common = dict(
            sink_tokens=cfg.sink_tokens,
            k_scale=k_scale,
            mask_rope=mask_rope,
            cos=rope[0] if rope is not None else None,
            sin=rope[1] if rope is not None else None,
            rope_distance=cfg.window_tokens,
            score_norm=cfg.score_norm,
            keys_rotated=keys_rotated,
        )
        plan, dev_plan = self._refresh_plan(layer_idx, k_tokens, md)
        cache = self._layer_mask_cache(stages, md, q.device)

        nb = qb_cpu.num_blocks
        width = k_tokens // cfg.block_size_k
        if plan.reuse.numel() == nb and width <= cache.sel.shape[1]:
            # Every block reuses its row's selection (most decode steps): two gathers.
            r = dev_plan.reuse_rows
            st.record_mask_lookup(True, nb)
            self._reused_all = True
            return cache.sel[r, :width], cache.sel_count[r]
        # One group refreshing every block, in order (a decode batch whose rows all refresh from
        # the same stage): its result is the step's selection, without a scatter into a new one.
        whole = len(dev_plan.groups) == 1 and not plan.reuse.numel() and dev_plan.groups[0][1].size == nb

        def empty() -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.full((nb, width), -1, dtype=torch.int32, device=q.device),
                    torch.zeros(nb, dtype=torch.int32, device=q.device))  # fmt: skip

        sel, sel_count = (None, None) if whole else empty()
        for s, group in dev_plan.groups:
            cached = None
            if s > 0:
                starts, count = cache.stage_inputs[s]  # type: ignore[misc]
                cached = (starts[group.rows], count[group.rows])
            r = reads[group.staged]  # offload: mask estimation reads hot pages from the GPU
            got_sel, got_cnt, stage_inputs = prune.select_blocks(
                q, r.key_cache, r.block_table, md.seq_lens, group.blocks, stages, cached_inputs=cached,
                first_stage=s, tile_q_len=group.tile_q_len, page_cache=r.page_cache, **common,
            )  # fmt: skip
            if whole and got_sel.shape[1] == width:
                sel, sel_count = got_sel, got_cnt
            else:
                if sel is None:  # the one group came back narrower than the selection
                    sel, sel_count = empty()
                w = min(width, got_sel.shape[1])
                sel[group.idx, :w] = got_sel[:, :w]
                sel_count[group.idx] = got_cnt
            st.add_stage_refresh(s, group.size)
            if group.keep is not None:
                k_dev = group.keep
                cache.store(
                    group.keep_rows,
                    s,
                    [None if x is None else (x[0][k_dev], x[1][k_dev]) for x in stage_inputs],
                    got_sel[k_dev],
                    got_cnt[k_dev],
                )
        if plan.reuse.numel():
            idx, r = dev_plan.reuse_idx, dev_plan.reuse_rows
            w = min(width, cache.sel.shape[1])
            sel[idx, :w] = cache.sel[r, :w]
            sel_count[idx] = cache.sel_count[r]
            st.record_mask_lookup(True, int(plan.reuse.numel()))
        n_decode_refresh = int(plan.is_decode_block.sum()) - int(plan.reuse.numel())
        if n_decode_refresh > 0:
            st.record_mask_lookup(False, n_decode_refresh)
        return sel, sel_count

    def _stages(self, layer_idx: int) -> list["_Stage"]:
        cfg = self.hip_config
        return [_Stage(s.chunk_size, cfg.stage_keep_tokens(i, layer_idx), s.query_pool)
                for i, s in enumerate(cfg.stages)]  # fmt: skip

    def _refresh_plan(self, layer_idx: int, k_tokens: int, md: InfiniteHipMetadata) -> tuple[RefreshPlan, Any]:
        """The step's refresh plan for this layer's (k, phase) and its device copy, made once
        per step by the first layer that needs it."""
        cfg = self.hip_config
        key = (k_tokens, cfg.refresh_phase(layer_idx))
        if key not in md.plans:
            plan = plan_refresh(
                md.qblocks_cpu,
                md.is_decode_row,
                tuple(s.refresh_interval for s in cfg.stages),
                sink_tokens=cfg.sink_tokens,
                window_tokens=cfg.window_tokens,
                k_tokens=k_tokens,
                phase=key[1],
            )
            # Layers of other phases often plan alike (a decode batch: most reuse): one device
            # copy per distinct plan.
            same = (k_tokens, tuple(plan.first.tolist()))
            if same not in md.device_plans:
                md.device_plans[same] = _DevicePlan.of(plan, md.qblocks, md.qblocks_cpu, self._launch_classes(md))
            md.plans[key] = (plan, md.device_plans[same])
        return md.plans[key]

    # ------------------------------------------------------------------ decode graphs
    def _graph_step_ok(self, md: InfiniteHipMetadata, kv_cache: torch.Tensor, q: torch.Tensor) -> bool:
        """Whether this step's layers may replay graphs: decode rows only (one query each), one
        launch class reading the paged cache (through the page cache under offload), and no
        graph being captured around us."""
        qb_cpu = md.qblocks_cpu
        if qb_cpu.max_q_len != 1 or qb_cpu.num_blocks != md.num_actual_tokens:
            return False
        if not bool(md.is_decode_row.all()):
            return False
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        classes = self._launch_classes(md, kv_cache)
        return len(classes) == 1 and classes[0].idx is None and not classes[0].staged

    def _replay_decode(self, layer, layer_idx, q, k, v, kv_cache, key_cache, value_cache, md, output,
                       k_scale, v_scale, rope, rotated) -> bool:  # fmt: skip
        """Attention of a decode step as a graph replay (``vllm_hip.decode_graphs``); False
        when the step or layer does not qualify (the caller then runs the eager path).

        Rows that refresh their selection run pruning eagerly first, which stores every decode
        row's selection in the mask cache; the graph then reads every row's selection from
        there, so refresh and reuse steps replay one graph. Pruning reads keys before the
        window only, never this step's new ones, so it may run before the graph writes them."""
        cfg = self.hip_config
        if not cfg.decode_graphs or md.graph_ok is False:
            return False
        if md.graph_ok is None:
            md.graph_ok = self._graph_step_ok(md, kv_cache, q)
            if not md.graph_ok:
                return False
        graphs = self._graphs
        if graphs is None:
            graphs = self._graphs = decode_graphs.LayerGraphs(decode_graphs.runner_for(q.device))
        if not graphs.enabled:
            return False
        qb_cpu = md.qblocks_cpu
        k_tokens = cfg.selected_tokens_for_layer(layer_idx)
        if k_tokens == 0 or cfg.attends_exactly(qb_cpu.max_window_start, k_tokens):
            return False
        plan, _ = self._refresh_plan(layer_idx, k_tokens, md)
        nb, width = qb_cpu.num_blocks, k_tokens // cfg.block_size_k
        cache = self._layer_mask_cache(self._stages(layer_idx), md, q.device)
        if width > cache.sel.shape[1]:
            return False

        fp8 = self.kv_cache_dtype.startswith("fp8")
        pc = self._offload_page_cache(kv_cache)
        cached = _cached_pages(pc, fp8) if pc is not None else None
        st = hip_stats.get_stats()
        reuse_all = plan.reuse.numel() == nb
        if reuse_all:
            st.record_attended(md.num_actual_tokens, k_tokens)
            st.record_mask_lookup(True, nb)
            self._reused_all = True
            sel = sel_count = None
        else:
            # decode rows only: every row's new selection goes to the mask cache (_select)
            eager_reads = {False: _KeyReads(key_cache, value_cache, cached, md.block_table)}
            sel, sel_count = self._select(layer_idx, q, eager_reads, md, k_scale, rope, rotated)
        if md.graph_statics is None:
            md.graph_statics = decode_graphs.step_statics(md.slot_mapping, md.seq_lens, md.block_table, md.qblocks)
        st_in = md.graph_statics
        n = md.num_actual_tokens
        out = output[:n].view(n, self.num_heads, self.head_size)
        io = decode_graphs.layer_statics(q, k, v, out)
        options = self._launch_classes(md)[0].options
        sel_all, count_all = cache.sel, cache.sel_count
        cos, sin = rope if rope is not None else (None, None)
        reads = _KeyReads(key_cache, value_cache, cached, st_in.block_table)

        def body() -> None:
            write_kv_cache(io.k, io.v, key_cache, value_cache, st_in.slot_mapping, self.kv_cache_dtype, layer)
            if pc is not None:
                pc.mirror_new_tokens(st_in.slot_mapping)
            rows = st_in.qblocks.seq.long()  # decode only: block i is row i's one query
            self._attend(io.q, reads, st_in.seq_lens, st_in.qblocks, sel_all[rows, :width], count_all[rows],
                         k_scale, v_scale, rope, rotated, io.out, options)  # fmt: skip

        sig = decode_graphs.signature(
            *st_in.tensors(), io.q, io.k, io.v, io.out, key_cache, value_cache, sel_all, count_all, width,
            cos, sin, k_scale, v_scale, rotated, self.kv_cache_dtype, tuple(sorted(options.items())),
            # the split-K count the launcher picks grows with the context up to sink and window
            min(qb_cpu.max_seq_len, max(cfg.sink_tokens, cfg.window_tokens) + 1),
            *((cached.slot_of_page, cached.key_cache, cached.value_cache, cached.counters) if cached else ()),
        )  # fmt: skip
        done = graphs.run(sig, body, layout=st_in.layout)
        if done != "eager":
            st.record_decode_graph(captured=done == "captured")
        out.copy_(io.out)
        if pc is not None:
            # a reuse step admits nothing (see forward)
            pages = None if reuse_all else self._decode_pages(pc, md, sel, sel_count)
            pc.stack.end_layer(md, pc.layer, pages)
        return True

    def _layer_mask_cache(self, stages: list["_Stage"], md: InfiniteHipMetadata, device) -> LayerMaskCache:
        """This layer's slice of the step's mask store, its rows moved to this step's batch.

        One row per batch row, plus a scratch row. A batch never has more rows than
        max_num_seqs, but the store grows anyway rather than trust the hint (the first batch of
        an engine is often a single request)."""
        store = md.mask_store
        if store is None:  # metadata built without a row tracker (tests): rows never move
            if self._own_mask_store is None:
                self._own_mask_store = MaskStore()
            store = self._own_mask_store
        widths = [0] + [stages[i - 1].keep_tokens // stages[i].chunk_size for i in range(1, len(stages))]
        rows = max(int(md.is_decode_row.numel()) + 1, self._max_rows_hint + 1)
        self._mask_cache = store.layer_cache(
            self, widths, stages[-1].keep_tokens // self.hip_config.block_size_k, rows, device,
            md.src_row, md.step_id,
        )
        return self._mask_cache


def _blocks_of_rows(md: InfiniteHipMetadata, *, decode: bool) -> torch.Tensor:
    """Device indices of the query blocks of the step's decode (or prefill) rows."""
    is_decode = md.is_decode_row[md.qblocks_cpu.seq.long()]
    picked = is_decode if decode else ~is_decode
    return to_device(torch.nonzero(picked).flatten(), md.qblocks.seq.device)


@dataclass(frozen=True)
class _Group:
    """The query blocks that rerun pruning from one stage this step, on the device."""

    blocks: QueryBlocks
    idx: torch.Tensor
    """Their indices among the step's query blocks."""
    rows: torch.Tensor
    """Their batch rows (mask-cache rows)."""
    size: int
    keep: torch.Tensor | None
    """Positions within the group whose state is saved (decode blocks and each prefill row's
    last block), None if none."""
    keep_rows: torch.Tensor | None
    tile_q_len: int | None
    """Fixed tile size of the pruning launches (batch-invariant mode), else None."""
    staged: bool = False
    """Offload: the blocks read the staging buffer (see ``_LaunchClass.staged``)."""


@dataclass(frozen=True)
class _DevicePlan:
    """A :class:`RefreshPlan` moved to the device once per step and k, not once per layer."""

    groups: list[tuple[int, _Group]]
    """(first stage, blocks that rerun pruning from it), one per stage and launch class."""
    reuse_idx: torch.Tensor
    reuse_rows: torch.Tensor

    @classmethod
    def of(cls, plan: RefreshPlan, qb: QueryBlocks, qb_cpu: QueryBlocks,
           classes: list["_LaunchClass"]) -> "_DevicePlan":  # fmt: skip
        dev = qb.seq.device
        rows_dev = qb.seq.long()
        groups: list[tuple[int, _Group]] = []
        for s, stage_idx in enumerate(plan.groups):
            if stage_idx.numel() == 0:
                continue
            # which blocks' state is saved is decided over the whole stage group (a prefill
            # row's last block may sit in another launch class than its other blocks)
            to_store = torch.zeros(stage_idx.numel(), dtype=torch.bool)
            to_store.index_fill_(0, _blocks_to_store(plan, stage_idx), True)
            for kind in classes:
                mine = kind.contains(stage_idx)
                if not bool(mine.any()):
                    continue
                idx_cpu, keep = stage_idx[mine], torch.nonzero(to_store[mine]).flatten()
                idx = to_device(idx_cpu, dev)
                k_dev = to_device(keep, dev) if keep.numel() else None
                groups.append((s, _Group(
                    blocks=subset_blocks(qb, qb_cpu, idx_cpu), idx=idx, rows=rows_dev[idx],
                    size=int(idx_cpu.numel()), keep=k_dev,
                    keep_rows=rows_dev[idx[k_dev]] if k_dev is not None else None,
                    tile_q_len=kind.options.get("tile_q_len"), staged=kind.staged,
                )))  # fmt: skip
        reuse_idx = to_device(plan.reuse, dev)
        return cls(groups=groups, reuse_idx=reuse_idx, reuse_rows=rows_dev[reuse_idx])


@dataclass(frozen=True)
class _KeyReads:
    """Where a launch class's kernels read keys and values: the KV cache (host memory under
    offload), through ``page_cache`` when given; or the staging buffer."""

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    page_cache: CachedPages | None
    block_table: torch.Tensor
    """The step's block table, or the staging buffer's (``prefill_staging.stage_layout``)."""


def _fp8_view(cache: torch.Tensor, fp8: bool) -> torch.Tensor:
    return cache.view(torch.float8_e4m3fn) if fp8 else cache


def _cached_pages(pc: DevicePageCache, fp8: bool) -> CachedPages:
    """How the kernels read a layer's GPU page cache (views taken anew: the stack may grow)."""
    ck, cv = pc.kv.unbind(1)
    return CachedPages(pc.slot_of_page, _fp8_view(ck, fp8), _fp8_view(cv, fp8), pc.counters)


@dataclass(frozen=True)
class _LaunchClass:
    """Query blocks launched together, with their launch options."""

    idx_cpu: torch.Tensor | None
    """Host indices of the blocks among the step's (None: all of them)."""
    idx: torch.Tensor | None
    """The same on the device."""
    blocks: QueryBlocks
    options: dict[str, int]
    """``num_splits`` and, in batch-invariant mode, ``tile_q_len`` of the launches."""
    staged: bool = False
    """Offload: the blocks read the staging buffer (prefill rows), not the page cache."""

    def contains(self, idx_cpu: torch.Tensor) -> torch.Tensor:
        """Which of the blocks ``idx_cpu`` (host indices among the step's) belong here."""
        if self.idx_cpu is None:
            return torch.ones(idx_cpu.numel(), dtype=torch.bool)
        return torch.isin(idx_cpu, self.idx_cpu)


def launch_classes(
    qb: QueryBlocks,
    qb_cpu: QueryBlocks,
    cfg: InfiniteHipConfig,
    batch_invariant: bool,
    staged_rows: torch.Tensor | None = None,
) -> list[_LaunchClass]:
    """The step's query blocks by kernel launch (see ``InfiniteHipImpl._launch_classes``).

    ``staged_rows`` ([num_reqs] bool, host; offload): rows whose pages the step copies to the
    staging buffer. Their blocks launch apart from the others', which read through the page
    cache; None: no row is staged."""
    if batch_invariant:
        single = qb_cpu.q_len == 1
        kinds = [(single, invariant_launch_options(cfg, single_query=True)),
                 (~single, invariant_launch_options(cfg, single_query=False))]  # fmt: skip
    else:
        kinds = [(None, {"num_splits": cfg.decode_splits})]
    n = qb_cpu.num_blocks
    staged = torch.zeros(n, dtype=torch.bool) if staged_rows is None else staged_rows[qb_cpu.seq.long()]
    out = []
    for picked, options in kinds:
        for where, is_staged in ((staged, True), (~staged, False)):
            mask = where if picked is None else picked & where
            if not bool(mask.any()):
                continue
            if bool(mask.all()):  # every block: no gathers
                out.append(_LaunchClass(None, None, qb, options, is_staged))
                continue
            idx_cpu = torch.nonzero(mask).flatten()
            out.append(_LaunchClass(idx_cpu, to_device(idx_cpu, qb.seq.device),
                                    subset_blocks(qb, qb_cpu, idx_cpu), options, is_staged))  # fmt: skip
    return out


@dataclass(frozen=True)
class _Stage:
    chunk_size: int
    keep_tokens: int
    query_pool: int


def _blocks_to_store(plan: RefreshPlan, idx_cpu: torch.Tensor) -> torch.Tensor:
    """Positions within ``idx_cpu`` whose state is saved: decode blocks, and each prefill row's
    last block."""
    rows = plan.block_rows[idx_cpu]
    decode = plan.is_decode_block[idx_cpu]
    last_of_row = torch.ones_like(decode)
    if rows.numel() > 1:
        last_of_row[:-1] = rows[1:] != rows[:-1]
    return torch.nonzero(decode | last_of_row).flatten()


_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _shared_rope_tables(hf_config: Any, max_positions: int, device: torch.device):
    """One pair of cos/sin tables per (RoPE, length, device) for all layers: at a 1M-token
    max_model_len a pair is 512 MiB (head_dim 128), too much to hold once per layer."""
    from vllm_hip.rope import rope_spec_from_config, rope_tables

    spec = rope_spec_from_config(hf_config)
    key = (repr(spec), max_positions, str(device))
    if key not in _ROPE_TABLES:
        _ROPE_TABLES[key] = rope_tables(spec, max_positions, device)
    return _ROPE_TABLES[key]


def all_blocks_selection(
    qb: QueryBlocks, qb_cpu: QueryBlocks, sink_tokens: int, block_size_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select every key block in [sink, W0) of every query block (exact attention)."""
    width = max(0, -(-(qb_cpu.max_window_start - sink_tokens) // block_size_k))
    dev = qb.seq.device
    starts = sink_tokens + block_size_k * torch.arange(width, device=dev, dtype=torch.int32)
    count = torch.clamp(
        (qb.window_start - sink_tokens + block_size_k - 1) // block_size_k, min=0
    ).to(torch.int32)
    sel = starts.unsqueeze(0).expand(qb_cpu.num_blocks, width).clone()
    sel[torch.arange(width, device=dev)[None, :] >= count[:, None]] = -1
    return sel, count


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str,
    layer: Any,
) -> None:
    """Store new keys/values at ``slot_mapping`` (page * page_size + offset; -1 = padding)."""
    if key.is_cuda:
        from vllm.v1.attention.ops.triton_reshape_and_cache_flash import (
            triton_reshape_and_cache_flash,
        )

        triton_reshape_and_cache_flash(
            key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
            layer._k_scale, layer._v_scale,
        )  # fmt: skip
        return
    # Host path (tests, CPU runs): plain indexing.
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    page_size = key_cache.shape[1]
    pages, offs = slots // page_size, slots % page_size
    k_scale = float(getattr(layer, "_k_scale_float", 1.0))
    v_scale = float(getattr(layer, "_v_scale_float", 1.0))
    key_cache[pages, offs] = (key[keep].float() / k_scale).to(key_cache.dtype)
    value_cache[pages, offs] = (value[keep].float() / v_scale).to(value_cache.dtype)


def _layer_index_from_name(name: str) -> int:
    for part in reversed(name.split(".")):
        if part.isdigit():
            return int(part)
    return 0


def streaming_rope_supported(hf_config: Any) -> bool:
    try:
        check_streaming_rope_support(hf_config, 0)
    except ValueError:
        return False
    return True


def check_streaming_rope_support(hf_config: Any, head_size: int) -> None:
    """Refuse, at start-up, models whose RoPE the streaming mode cannot reassign."""
    model_type = getattr(hf_config, "model_type", None)
    text_config = getattr(hf_config, "text_config", None)
    if model_type not in STREAMING_ROPE_MODEL_TYPES and text_config is not None:
        model_type = getattr(text_config, "model_type", model_type)
    if model_type not in STREAMING_ROPE_MODEL_TYPES:
        raise ValueError(
            f"INFINITEHIP: rope_mode='streaming' supports model types "
            f"{', '.join(STREAMING_ROPE_MODEL_TYPES)}; this model is {model_type!r}. Use "
            '--additional-config \'{"infinitehip": {"rope_mode": "model"}}\' (no context '
            "extension) or another backend."
        )
    partial = getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0
    if partial != 1.0:
        raise ValueError(
            f"INFINITEHIP: rope_mode='streaming' needs full-dimension RoPE; this model rotates "
            f"{partial:.0%} of each head. Use rope_mode='model'."
        )
    from vllm_hip.rope import RopeError, rope_spec_from_config

    try:
        rope_spec_from_config(hf_config)
    except RopeError as e:
        raise ValueError(f"INFINITEHIP: {e}") from e
