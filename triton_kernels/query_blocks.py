"""Query blocks: the unit that shares one selection of key blocks.

A batch mixes decode rows (one new query) and prefill chunks (many). Both pruning and sparse
attention work per *query block*: up to ``block_size_q`` consecutive queries of one sequence. A
decode row is one block of one query. Each block has one window start ``W0``::

    sequence s:  |0 ....... sink|....... candidates [sink, W0) .......|W0 ...... p0 .. p0+n-1|
                                                                        └ window ┘ └ queries ┘
    W0 = max(sink, p0 - window + 1)   (p0: position of the block's first query)

Every query p of the block attends to sink keys ``[0, min(sink, p + 1))``, the selected tokens
(all ``< W0``) and the window keys ``[W0, p]``: disjoint parts, so nothing is counted twice.
Later queries of a prefill block see a window up to ``block_size_q - 1`` tokens longer; that keeps
one selection valid for the whole block.

Blocks are aligned to absolute positions (multiples of ``block_size_q``), not to the first new
query: a chunk that starts mid-block gets a short first block up to the next boundary. So where
vLLM's scheduler cuts a prompt into chunks (which depends on what else is in the batch) changes
only the block that straddles the cut, not every block after it, and a prompt prefilled in
chunks selects (nearly) what it selects in one pass.

With ``split_last`` the last new query of a sequence is cut off into a block of its own: it
predicts the next token, and alone it gets a selection made for it, as a decode query does. The
backend asks for it only where a chunk ends the prefill (``split_last`` per sequence): a split at a
mid-prompt cut would make the blocks depend on where the scheduler cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["QueryBlocks", "build_query_blocks"]


@dataclass
class QueryBlocks:
    """Descriptors of ``num_blocks`` query blocks (all int32, on the kernels' device).

    The ``*_cpu`` fields are host copies, filled when the blocks are built, so launchers can size
    grids and buffers without a device sync (a requirement of CUDA-graph capture).
    """

    seq: torch.Tensor
    """[NB] index of the block's sequence (row of ``block_table`` / ``seq_lens``)."""
    q_start: torch.Tensor
    """[NB] row in the packed ``q`` of the block's first query."""
    q_len: torch.Tensor
    """[NB] queries in the block, 1..block_size_q."""
    pos: torch.Tensor
    """[NB] absolute position of the block's first query in its sequence."""
    window_start: torch.Tensor
    """[NB] W0 = max(sink, pos - window + 1): first window key; selection lies in [sink, W0)."""
    max_q_len: int
    """Largest ``q_len`` (1 for a decode-only batch)."""
    max_window_start: int
    """Largest W0 over blocks: bounds the candidate count of the first pruning stage."""
    max_seq_len: int
    """Largest sequence length in the batch."""

    @property
    def num_blocks(self) -> int:
        return int(self.seq.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return self.max_q_len == 1

    def to(self, device: torch.device | str) -> "QueryBlocks":
        """The blocks on ``device``: host blocks reach a GPU in one copy that does not wait for
        the GPU's queued work (``host_copy``)."""
        from vllm_hip_kernels.host_copy import to_device_rows

        names = ("seq", "q_start", "q_len", "pos", "window_start")
        tensors = [getattr(self, n) for n in names]
        same = all(t.device.type == "cpu" and t.dtype == torch.int32 for t in tensors)
        moved = to_device_rows(tensors, device) if same else [t.to(device) for t in tensors]
        return QueryBlocks(
            **dict(zip(names, moved)),
            max_q_len=self.max_q_len,
            max_window_start=self.max_window_start,
            max_seq_len=self.max_seq_len,
        )


def build_query_blocks(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    block_size_q: int,
    sink_tokens: int,
    window_tokens: int,
    device: torch.device | str | None = None,
    split_last: bool | torch.Tensor = False,
) -> QueryBlocks:
    """Cut each sequence's new queries into blocks of at most ``block_size_q``.

    Parameters
    ----------
    query_start_loc : torch.Tensor
        [num_seqs + 1] int, cumulative query counts (vLLM's ``query_start_loc``), on the host.
    seq_lens : torch.Tensor
        [num_seqs] int, tokens in the cache per sequence *including* the new queries, on the host.
    block_size_q, sink_tokens, window_tokens : int
        From :class:`vllm_hip.config.InfiniteHipConfig`.
    device : optional
        Where the int32 descriptors go (default: the host).
    split_last : bool or torch.Tensor
        Give the last new query of each sequence (or of the sequences where a [num_seqs] bool
        host tensor is True) a block of its own: it predicts the next token; alone, it gets a
        selection of its own, as a decode query does, instead of sharing one with up to
        ``block_size_q - 1`` queries before it.

    Returns
    -------
    QueryBlocks
        Blocks in sequence order, then query order. Sequences with no new queries get no block.
    """
    # numpy, as vLLM's own metadata builders: this runs once per step on a handful of rows, where
    # each torch call costs more than its work (and releases the GIL, which another engine thread
    # may then hold for a switch interval).
    qsl = query_start_loc.detach().to("cpu", torch.int64).numpy()
    lens = seq_lens.detach().to("cpu", torch.int64).numpy()
    num_seqs = lens.shape[0]
    if qsl.shape[0] != num_seqs + 1:
        raise ValueError(
            f"query_start_loc has {qsl.shape[0]} entries, expected num_seqs + 1 = {num_seqs + 1}"
        )
    q_lens = qsl[1:] - qsl[:-1]
    if (q_lens > lens).any():
        raise ValueError("a sequence has more new queries than tokens (q_len > seq_len)")
    first_pos = lens - q_lens
    # A short head block up to the next multiple of block_size_q, then aligned blocks.
    head = np.minimum((-first_pos) % block_size_q, q_lens)
    has_head = (head > 0).astype(np.int64)
    blocks_per_seq = has_head + (q_lens - head + block_size_q - 1) // block_size_q
    nb = int(blocks_per_seq.sum())
    seq = np.repeat(np.arange(num_seqs), blocks_per_seq)
    # index of each block within its sequence
    first_block = np.cumsum(blocks_per_seq) - blocks_per_seq
    local = np.arange(nb) - first_block[seq]
    is_head = (local == 0) & (has_head[seq] > 0)
    offset = np.where(is_head, 0, head[seq] + (local - has_head[seq]) * block_size_q)
    q_start = qsl[:-1][seq] + offset
    q_len = np.where(is_head, head[seq], np.minimum(q_lens[seq] - offset, block_size_q))
    pos = first_pos[seq] + offset
    if isinstance(split_last, torch.Tensor):
        split_seq = split_last.detach().to("cpu", torch.bool).numpy()
        if split_seq.shape != (num_seqs,):
            raise ValueError(f"split_last must be a bool per sequence [{num_seqs}]")
    else:
        split_seq = np.full(num_seqs, bool(split_last))
    if nb and split_seq.any():
        has_blocks = blocks_per_seq > 0
        last = (np.cumsum(blocks_per_seq) - 1)[has_blocks & split_seq]
        split = last[q_len[last] > 1]
        if split.size:
            q_len = q_len.copy()
            q_len[split] -= 1
            # the new one-query blocks go right after the blocks they were cut from
            order = np.argsort(np.concatenate([np.arange(nb) * 2, split * 2 + 1]), kind="stable")
            seq = np.concatenate([seq, seq[split]])[order]
            q_start = np.concatenate([q_start, q_start[split] + q_len[split]])[order]
            pos = np.concatenate([pos, pos[split] + q_len[split]])[order]
            q_len = np.concatenate([q_len, np.ones_like(split)])[order]
            nb += int(split.size)
    window_start = np.maximum(pos - window_tokens + 1, sink_tokens)
    dev = torch.device("cpu") if device is None else torch.device(device)

    def i32(t: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(t, dtype=np.int32)).to(dev, non_blocking=True)

    return QueryBlocks(
        seq=i32(seq),
        q_start=i32(q_start),
        q_len=i32(q_len),
        pos=i32(pos),
        window_start=i32(window_start),
        max_q_len=int(q_len.max()) if nb else 0,
        max_window_start=int(window_start.max()) if nb else 0,
        max_seq_len=int(lens.max()) if num_seqs else 0,
    )
