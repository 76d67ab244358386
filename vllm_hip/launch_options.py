"""Kernel launch options of batch-invariant mode (``VLLM_BATCH_INVARIANT=1``).

Apart from the backend (which needs vLLM) so that the kernel tests and ``benchmarks/kernels.py``
launch exactly what the backend launches on a machine without vLLM.
"""

from __future__ import annotations

from vllm_hip.config import InfiniteHipConfig

#: Split-K partitions of one-query blocks in batch-invariant mode when decode_splits is 0.
INVARIANT_DECODE_SPLITS = 8


def invariant_launch_options(cfg: InfiniteHipConfig, single_query: bool) -> dict[str, int]:
    """Launch options of one kind of query block in batch-invariant mode: one-query blocks get
    decode tiles and ``decode_splits`` (8 if 0) partitions, longer ones tiles for
    ``block_size_q`` queries and one partition. Fixed per kind, so a block's arithmetic does not
    depend on what else the step holds."""
    if single_query:
        return {"tile_q_len": 1, "num_splits": cfg.decode_splits or INVARIANT_DECODE_SPLITS}
    return {"tile_q_len": cfg.block_size_q, "num_splits": 1}
