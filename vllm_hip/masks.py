"""Decode mask caching: which pruning stages run this step, and their cached inputs.

During decode the pruning stages are not rerun every step (InfiniteHiP §3): stage ``i`` reruns when
the query position ``p`` satisfies ``p % refresh_interval_i == 0``; the first such stage and all
later ones rerun from the cached input of that stage, and a step with no due stage reuses the last
selection. Tokens generated since are covered by the sliding window.

Where the cache lives. vLLM does not tell an attention backend which request a batch row belongs to,
and rows move between steps. A live request's *tail page* (the KV page holding its newest token) is
its own (prefix caching only shares full pages of prompts, and the last prompt token is always
recomputed into a fresh page), so each step records ``page_to_row[tail page] = row``. Next step a
decode row finds its previous row through the page of its previous token, checked against the row's
recorded page, and every layer's cached rows are permuted once with that map. All of it is device
work: no host sync. The layers' caches of one shape are slices of one stacked cache
(:class:`MaskStore`, owned by the tracker), so that permutation is one set of ops per step, not
one per layer: attention runs eagerly between vLLM's graphs, and every op is a launch. A row with
no valid predecessor (cannot happen for a request that went through prefill, which is every
request, including after preemption) gets an empty selection for the steps until its next
refresh: sink + window only, never garbage indices.

The host side decides *which stage* each row reruns from the host copy of positions, so the number
of launches is known without a sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_hip_kernels.host_copy import to_device
from vllm_hip_kernels.query_blocks import QueryBlocks

__all__ = ["RefreshPlan", "RowTracker", "LayerMaskCache", "MaskStore", "plan_refresh", "subset_blocks"]


@dataclass
class RefreshPlan:
    """Per step and per distinct k: which query blocks run which stages (host data).

    ``groups[s]`` holds the indices of query blocks that run stages ``s..S-1`` this step
    (``s = 0`` includes every prefill block and decode rows due for a full refresh).
    ``reuse`` holds decode blocks that take their selection from the cache unchanged.
    ``store_rows``/``store_blocks``: for each batch row whose state must be saved after this step,
    the block whose stage inputs and selection are saved (the last block of a prefill row, the one
    block of a refreshed decode row).
    """

    groups: list[torch.Tensor]
    reuse: torch.Tensor
    block_rows: torch.Tensor
    """[NB] batch row of every block (host)."""
    is_decode_block: torch.Tensor
    """[NB] bool (host)."""
    first: torch.Tensor
    """[NB] (host): the stage each block reruns from, ``len(stages)`` for reuse (what the
    groups list; plans of equal ``first`` share their device copy)."""


def plan_refresh(
    qb_cpu: QueryBlocks,
    is_decode_row: torch.Tensor,
    refresh_intervals: tuple[int, ...],
    *,
    sink_tokens: int,
    window_tokens: int,
    k_tokens: int,
    phase: int = 0,
) -> RefreshPlan:
    """Decide, on the host, from which stage each query block reruns pruning.

    Parameters
    ----------
    qb_cpu : QueryBlocks
        Host copy of the step's query blocks.
    is_decode_row : torch.Tensor
        [num_reqs] bool (host): row is a decode step (one query, prompt fully processed).
    refresh_intervals : tuple of int
        Stage refresh intervals, coarse to fine.
    sink_tokens, window_tokens, k_tokens : int
        Used to force a full refresh on the step where a row's context first outgrows exact
        attention (before that step no pruning state was kept for it).
    phase : int
        Added to the positions before the interval test (the layer's
        ``InfiniteHipConfig.refresh_phase``: layers refresh on different steps).
    """
    num_stages = len(refresh_intervals)
    rows = qb_cpu.seq.long()
    decode = is_decode_row[rows] & (qb_cpu.q_len == 1)
    pos = qb_cpu.pos.long()
    first = torch.full_like(pos, num_stages)
    shifted = pos + phase
    for s in reversed(range(num_stages)):
        first = torch.where(shifted % refresh_intervals[s] == 0, torch.full_like(pos, s), first)
    # The previous step's window start: if that step was exact, there is no cached state.
    prev_w0 = torch.clamp(pos - 1 - window_tokens + 1, min=sink_tokens)
    was_exact = (prev_w0 - sink_tokens) <= k_tokens
    first = torch.where(decode & ~was_exact, first, torch.zeros_like(first))
    groups = [torch.nonzero(first == s).flatten() for s in range(num_stages)]
    reuse = torch.nonzero(first == num_stages).flatten()
    return RefreshPlan(groups=groups, reuse=reuse, block_rows=rows, is_decode_block=decode, first=first)


def subset_blocks(qb: QueryBlocks, qb_cpu: QueryBlocks, idx_cpu: torch.Tensor) -> QueryBlocks:
    """The query blocks ``idx_cpu`` (host indices) of ``qb``, with host ints recomputed."""
    idx = to_device(idx_cpu, qb.seq.device)
    n = int(idx_cpu.numel())
    return QueryBlocks(
        seq=qb.seq[idx],
        q_start=qb.q_start[idx],
        q_len=qb.q_len[idx],
        pos=qb.pos[idx],
        window_start=qb.window_start[idx],
        max_q_len=int(qb_cpu.q_len[idx_cpu].max()) if n else 0,
        max_window_start=int(qb_cpu.window_start[idx_cpu].max()) if n else 0,
        max_seq_len=qb.max_seq_len,
    )


class RowTracker:
    """Maps this step's batch rows to last step's rows through each request's tail page.

    One per model runner (shared by all layers); :meth:`step` runs once per batch in the metadata
    builder and returns ``src_row`` [num_reqs] (int64, device): last step's row of each row, -1
    where unknown.
    """

    def __init__(self, num_pages: int, max_rows: int, device: torch.device):
        self.page_to_row = torch.full((num_pages,), -1, dtype=torch.int64, device=device)
        self.row_page = torch.full((max_rows,), -1, dtype=torch.int64, device=device)
        self.step_id = 0
        self.mask_store = MaskStore()
        """The layers' mask caches, whose rows follow this tracker's row mapping."""

    def step(self, block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
        n = seq_lens.shape[0]
        last = seq_lens.long() - 1
        bt = block_table.long()
        cur_page = bt.gather(1, (last // page_size).clamp(min=0)[:, None]).squeeze(1)
        prev_page = bt.gather(1, ((last - 1).clamp(min=0) // page_size)[:, None]).squeeze(1)
        prev_page = prev_page.clamp(0, self.page_to_row.shape[0] - 1)
        src = self.page_to_row[prev_page]
        src_c = src.clamp(min=0)
        valid = (src >= 0) & (self.row_page[src_c] == prev_page) & (last >= 1)
        src = torch.where(valid, src, torch.full_like(src, -1))
        if n > self.row_page.shape[0]:  # more rows than the scheduler's max_num_seqs said
            self.row_page = torch.full((n,), -1, dtype=torch.int64, device=self.row_page.device)
        self.row_page.fill_(-1)
        self.row_page[:n] = cur_page
        self.page_to_row.index_put_(
            (cur_page.clamp(0, self.page_to_row.shape[0] - 1),),
            torch.arange(n, device=src.device, dtype=torch.int64),
        )
        self.step_id += 1
        return src


@dataclass
class LayerMaskCache:
    """Cached pruning state of one layer, one entry per batch row.

    ``stage_inputs[s]`` = (starts [max_rows, C_s], count [max_rows]) consumed by stage ``s``
    (``s >= 1``; stage 0's input is implicit: every chunk between sink and window).
    ``sel``/``sel_count``: the last selection of the row.
    """

    stage_inputs: list[tuple[torch.Tensor, torch.Tensor] | None]
    sel: torch.Tensor
    sel_count: torch.Tensor
    step_id: int = -1
    valid: torch.Tensor = field(default=None)  # type: ignore[assignment]

    @classmethod
    def allocate(
        cls, widths: list[int], sel_width: int, max_rows: int, device: torch.device,
        layers: int | None = None,
    ) -> "LayerMaskCache":
        """An empty cache; with ``layers``, a stacked one: every tensor gets a layer dimension
        after the row dimension (``[rows, layers, ...]``, see :meth:`layer`)."""
        lay = () if layers is None else (layers,)
        inputs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None]
        for w in widths[1:]:
            inputs.append(
                (
                    torch.full((max_rows, *lay, w), -1, dtype=torch.int32, device=device),
                    torch.zeros((max_rows, *lay), dtype=torch.int32, device=device),
                )
            )
        return cls(
            stage_inputs=inputs,
            sel=torch.full((max_rows, *lay, sel_width), -1, dtype=torch.int32, device=device),
            sel_count=torch.zeros((max_rows, *lay), dtype=torch.int32, device=device),
            valid=torch.zeros((max_rows, *lay), dtype=torch.bool, device=device),
        )

    def _tensors(self) -> list[tuple[torch.Tensor, int]]:
        """Every tensor with its empty value."""
        out: list[tuple[torch.Tensor, int]] = []
        for entry in self.stage_inputs[1:]:
            assert entry is not None
            out += [(entry[0], -1), (entry[1], 0)]
        return out + [(self.sel, -1), (self.sel_count, 0), (self.valid, 0)]

    def _rebuilt(self, tensors: list[torch.Tensor]) -> "LayerMaskCache":
        it = iter(tensors)
        inputs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None]
        for _ in self.stage_inputs[1:]:
            inputs.append((next(it), next(it)))
        return LayerMaskCache(stage_inputs=inputs, sel=next(it), sel_count=next(it),
                              step_id=self.step_id, valid=next(it))

    def layer(self, slot: int) -> "LayerMaskCache":
        """One layer of a stacked cache: views (writes go to the stack), ``[rows, ...]``."""
        return self._rebuilt([t[:, slot] for t, _ in self._tensors()])

    def with_layers(self, layers: int) -> "LayerMaskCache":
        """A copy of a stacked cache with room for ``layers`` layers (new ones empty)."""
        def pad(t: torch.Tensor, empty: int) -> torch.Tensor:
            out = torch.full((t.shape[0], layers, *t.shape[2:]), empty, dtype=t.dtype, device=t.device)
            out[:, : t.shape[1]] = t
            return out

        return self._rebuilt([pad(t, e) for t, e in self._tensors()])

    @property
    def num_rows(self) -> int:
        return int(self.sel.shape[0])

    def grown(self, max_rows: int) -> "LayerMaskCache":
        """A copy with room for ``max_rows`` rows; existing rows keep their state."""
        n = self.num_rows
        if max_rows <= n:
            return self

        def pad(t: torch.Tensor, empty: int) -> torch.Tensor:
            out = torch.full((max_rows, *t.shape[1:]), empty, dtype=t.dtype, device=t.device)
            out[:n] = t
            return out

        return self._rebuilt([pad(t, e) for t, e in self._tensors()])

    def permute(self, src_row: torch.Tensor, step_id: int) -> None:
        """Move each row's state to its new row (once per step); unknown rows become empty."""
        if self.step_id == step_id:
            return
        self.step_id = step_id
        n = src_row.shape[0]
        ok = src_row >= 0
        idx = src_row.clamp(min=0)

        def move(t: torch.Tensor, empty: int) -> None:
            moved = t[idx]
            mask = ok.view(-1, *([1] * (t.dim() - 1)))
            t[:n] = torch.where(mask, moved, torch.full_like(moved, empty))

        for t, empty in self._tensors():
            move(t, empty)

    def store(
        self,
        rows: torch.Tensor,
        first_stage: int,
        stage_inputs: list,
        sel: torch.Tensor,
        sel_count: torch.Tensor,
    ) -> None:
        """Save refreshed state of ``rows`` (device int64) for stages >= ``first_stage``."""
        for s in range(max(first_stage, 1), len(self.stage_inputs)):
            got = stage_inputs[s]
            dst = self.stage_inputs[s]
            if got is None or dst is None:
                continue
            starts, count = got
            _put_rows(dst[0], rows, starts)
            dst[1][rows] = count
        _put_rows(self.sel, rows, sel)
        self.sel_count[rows] = sel_count
        # index_fill_, not ``valid[rows] = True``: a Python scalar assigned through a device
        # index tensor is first copied to the GPU from pageable memory, a blocking copy (the
        # host then waits for every kernel queued so far, once per layer and refresh).
        self.valid.index_fill_(0, rows, True)


def _put_rows(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[rows]`` = ``src`` cut or -1-padded to ``dst``'s width (one launch when the widths
    match, as they do in steady decode)."""
    w = min(src.shape[1], dst.shape[1])
    if w == dst.shape[1]:
        dst[rows] = src[:, :w]
        return
    dst.index_fill_(0, rows, -1)  # not dst[rows] = -1, which waits for the GPU (see store)
    dst[rows, :w] = src[:, :w]


class MaskStore:
    """The mask caches of all layers whose rows follow one :class:`RowTracker`.

    Layers with the same cache shape (stage widths, selection width, device) get slices of one
    stacked :class:`LayerMaskCache`, so the per-step row permutation runs once for all of them.
    """

    def __init__(self) -> None:
        self._stacks: dict[tuple, LayerMaskCache] = {}
        self._slots: dict[tuple, dict[int, int]] = {}
        self._views: dict[tuple, tuple[LayerMaskCache, LayerMaskCache]] = {}
        """(stack, layer view) per (key, slot): a view stays valid while its stack does (rows
        move in place), and making one costs ~16 tensor views per layer and step."""

    def layer_cache(
        self,
        owner: object,
        widths: list[int],
        sel_width: int,
        rows: int,
        device: torch.device,
        src_row: torch.Tensor | None,
        step_id: int,
    ) -> LayerMaskCache:
        """``owner``'s cache (one per attention layer), with room for ``rows`` rows, its rows
        moved to this step's batch (``src_row``, once per step for the whole stack).

        The returned views stay valid until the next call (which may reallocate the stack):
        take them anew every step."""
        key = (tuple(widths), sel_width, str(device))
        slots = self._slots.setdefault(key, {})
        slot = slots.setdefault(id(owner), len(slots))
        stack = self._stacks.get(key)
        if stack is None:
            stack = LayerMaskCache.allocate(widths, sel_width, rows, device, layers=len(slots))
        elif stack.sel.shape[1] < len(slots):
            # A layer joined (the first step of an engine): room for twice as many.
            stack = stack.with_layers(max(len(slots), 2 * stack.sel.shape[1]))
        if stack.num_rows < rows:
            stack = stack.grown(max(rows, 2 * stack.num_rows))
        self._stacks[key] = stack
        if src_row is not None:
            stack.permute(src_row, step_id)
        cached = self._views.get((key, slot))
        if cached is None or cached[0] is not stack:
            cached = (stack, stack.layer(slot))
            self._views[(key, slot)] = cached
        return cached[1]
