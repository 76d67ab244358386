"""Where each batch row's prefill ends, for the INFINITEHIP metadata builder.

``split_last_query`` gives the query that predicts the first generated token a selection of its
own. That query is the last one of the chunk that *ends* the prefill; the last query of a
mid-prompt chunk predicts nothing, and splitting it off there would make the query blocks (and so
the outputs) depend on where vLLM's scheduler cut the prompt, which depends on what else was in
the batch. vLLM's ``CommonAttentionMetadata`` has the step's query and sequence lengths but not
the prompt's; the model runner has it. :func:`install` wraps the two places where the runners
build attention metadata so that, while they do, :func:`current` returns the rows' prefill
lengths (host int64). Elsewhere (tests, other runners) it returns None and the builder falls back
to splitting the last query of every chunk.

- Model runner V2 (vLLM's default for dense decoders): ``DefaultModelState.prepare_attn`` with
  ``input_batch.prefill_len_np`` (prompt + already generated tokens for a request resumed after
  preemption: its recompute ends where the next token is sampled).
- Model runner V1: ``GPUModelRunner._build_attention_metadata`` with the prompt lengths.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from typing import Any, Callable, Iterator

import torch

logger = logging.getLogger("vllm_hip")

__all__ = ["current", "publishing", "install", "split_rows"]

# Per thread: a runner building two micro-batches' metadata at once must not mix them up.
_local = threading.local()


def current() -> torch.Tensor | None:
    """The prefill lengths of the rows whose metadata is being built, or None outside."""
    return getattr(_local, "lens", None)


@contextlib.contextmanager
def publishing(prefill_lens: Any) -> Iterator[None]:
    """Make ``prefill_lens`` (per row, array-like) :func:`current` for the duration."""
    previous = current()
    _local.lens = torch.as_tensor(prefill_lens).to("cpu", torch.int64).clone()
    try:
        yield
    finally:
        _local.lens = previous


def split_rows(seq_lens_cpu: torch.Tensor, enabled: bool) -> torch.Tensor | bool:
    """The rows whose chunk ends the prefill (``seq_len >= prefill_len``), as the
    ``split_last`` argument of ``build_query_blocks``; the bool ``enabled`` when unknown."""
    lens = current()
    if not enabled or lens is None:
        return enabled
    n = int(seq_lens_cpu.shape[0])
    out = torch.zeros(n, dtype=torch.bool)
    m = min(n, int(lens.shape[0]))
    out[:m] = seq_lens_cpu[:m].to(torch.int64) >= lens[:m]
    return out


def _wrap(owner: type, name: str, lens_of: Callable[..., Any]) -> None:
    original = getattr(owner, name, None)
    if original is None or getattr(original, "_vllm_hip", False):
        return

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        try:
            lens = lens_of(self, *args, **kwargs)
        except Exception:  # a vLLM layout we do not know: fall back, never break the step
            lens = None
        if lens is None:
            return original(self, *args, **kwargs)
        with publishing(lens):
            return original(self, *args, **kwargs)

    wrapper._vllm_hip = True  # type: ignore[attr-defined]
    setattr(owner, name, wrapper)


def _v2_lens(self, input_batch, *args, **kwargs):
    return input_batch.prefill_len_np[: input_batch.num_reqs]


def _v1_lens(self, *args, **kwargs):
    batch = self.input_batch
    return batch.num_prompt_tokens_cpu_tensor[: batch.num_reqs]


def install() -> None:
    """Wrap the runners' metadata builders (idempotent; in the worker process)."""
    try:
        from vllm.v1.worker.gpu.model_states.default import DefaultModelState

        _wrap(DefaultModelState, "prepare_attn", _v2_lens)
    except ImportError:  # pragma: no cover - other vLLM layouts
        logger.debug("vllm-hip: no V2 model state to hook")
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        _wrap(GPUModelRunner, "_build_attention_metadata", _v1_lens)
    except ImportError:  # pragma: no cover
        logger.debug("vllm-hip: no V1 model runner to hook")
