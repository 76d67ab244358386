"""Long-context batch inference on Ray Data with the INFINITEHIP backend.

``python -m vllm_hip.batch`` reads a JSONL or Parquet dataset of long documents, runs it through
Ray Data's LLM API (``ray.data.llm.build_processor`` with a ``vLLMEngineProcessorConfig``) and
writes one result row per input row. ``--direct`` runs the same prompts through ``vllm.LLM`` in this
process instead (the reference the Ray run must match). ``--check-cluster`` only checks that every
Ray node can load the plugin (for ``vllm serve --distributed-executor-backend ray`` users).

How the backend and its options reach the engine: the processor's ``engine_kwargs`` become
``vllm.AsyncEngineArgs(**engine_kwargs)`` inside a Ray actor. They carry

* ``attention_backend="INFINITEHIP"``: a plain string, resolved to ``AttentionBackendEnum.CUSTOM``
  in ``create_engine_config``, i.e. *after* ``EngineArgs.__post_init__`` has loaded the general
  plugins in that actor. (``attention_config={"backend": "INFINITEHIP"}`` does not work: vLLM
  parses that dict *before* it loads plugins, so a fresh Ray actor rejects the name.)
* ``additional_config={"infinitehip": {...}}``: a plain dict (pickles anywhere), validated here
  with :class:`~vllm_hip.config.InfiniteHipConfig` before Ray starts, and again by the backend in
  every worker.

Input rows need an id column (``id``) and either ``messages`` (OpenAI chat list: the model's chat
template is applied) or ``prompt`` (text, sent as is; ``--chat`` wraps it as one user message).
Output rows: ``id``, ``generated_text``, ``generated_token_ids``, ``num_input_tokens``,
``num_generated_tokens``, ``prompt_sha1`` (of the prompt token ids: equal inputs across runs) and
any ``--keep-columns``. Ray Data does not keep row order; match rows by id.

Example::

    python -m vllm_hip.batch --input docs.jsonl --output out.jsonl --model $MODEL \\
        --max-model-len 65536 --infinitehip '{"window_tokens": 2048}' --batch-size 16
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Mapping, Sequence

from vllm_hip.config import ADDITIONAL_CONFIG_KEY, ConfigError, InfiniteHipConfig

__all__ = [
    "BatchError",
    "BatchJob",
    "BatchStats",
    "PluginMissingError",
    "build_engine_kwargs",
    "build_processor",
    "check_ray_workers_have_plugin",
    "main",
    "prepare",
    "prompt_token_ids",
    "run_direct",
    "run_ray",
]

logger = logging.getLogger("vllm_hip.batch")

BACKEND_NAME = "INFINITEHIP"
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "infinitehip"
PLUGIN_VALUE = "vllm_hip.plugin:register"
DIST_NAME = "vllm-hip"

INPUT_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
OUTPUT_SUFFIXES = (".jsonl", ".parquet")

#: Engine kwargs that have their own option: setting them in ``engine_kwargs`` too would be
#: ambiguous, so it is refused.
_DEDICATED_ENGINE_KEYS = {
    "model": "model",
    "attention_backend": "backend",
    "additional_config": "additional_config / infinitehip",
    "max_model_len": "max_model_len",
    "tensor_parallel_size": "tensor_parallel_size",
    "pipeline_parallel_size": "pipeline_parallel_size",
    "distributed_executor_backend": "distributed_executor_backend",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "max_num_seqs": "max_num_seqs",
}

# Columns the postprocess adds for the driver's statistics; stripped before writing.
_T_LLM = "_vllm_hip_time_taken_llm"
_T_DONE = "_vllm_hip_done_at"


class BatchError(ValueError):
    """The job cannot start: a missing input, a bad column, a bad option. Raised before Ray starts."""


class PluginMissingError(RuntimeError):
    """vllm-hip (or its vLLM entry point) is missing on at least one Ray node."""


# ------------------------------------------------------------------------------------------ job
@dataclass
class BatchJob:
    """Everything one batch run needs. CLI flags and ``--config FILE`` keys use these names."""

    input: str = ""
    """JSONL (``.jsonl``/``.json``, one object per line) or Parquet file, or a folder of them."""
    output: str = ""
    """``.jsonl`` or ``.parquet`` file; written to ``<output>.tmp`` and renamed when complete."""
    model: str = ""
    """Model path or id, as ``vllm serve`` takes it; must be readable on every node."""
    backend: str = BACKEND_NAME
    """Attention backend name (``INFINITEHIP``, ``FLASH_ATTN``, ...)."""
    additional_config: dict[str, Any] = field(default_factory=dict)
    """vLLM ``additional_config``; INFINITEHIP's options sit under ``"infinitehip"``."""
    max_model_len: int | None = None
    max_tokens: int = 16
    temperature: float = 0.0
    sampling_params: dict[str, Any] = field(default_factory=dict)
    """Extra ``vllm.SamplingParams`` fields (JSON-serialisable)."""
    batch_size: int = 16
    """Rows per Ray Data batch sent to one engine."""
    concurrency: int = 1
    """Engine replicas (data parallel), each with tensor_parallel_size x pipeline_parallel_size GPUs."""
    max_concurrent_batches: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    """None: ``uni`` for one GPU per engine, ``ray`` (vLLM's Ray executor) for more."""
    gpu_memory_utilization: float | None = None
    max_num_batched_tokens: int | None = 16384
    """Tokens per engine step (prefill chunk). Set explicitly because vLLM's default depends on
    how the engine is created: ``vllm.LLM`` gets 16384 on an H100, the ``AsyncEngineArgs`` that
    Ray Data builds get 2048, and different chunking means different numerics. None: vLLM's."""
    max_num_seqs: int | None = 256
    """Requests per engine step; pinned for the same reason (LLM: 1024 on H100, Ray: 128)."""
    enforce_eager: bool = False
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Further ``vllm.EngineArgs`` fields (e.g. ``enable_prefix_caching``)."""
    id_column: str = "id"
    prompt_column: str = "prompt"
    messages_column: str = "messages"
    chat: bool = False
    """Send a ``prompt`` column through the chat template as a single user message."""
    keep_columns: list[str] = field(default_factory=list)
    """Input columns copied to the output rows."""
    runtime_env: dict[str, Any] | None = None
    """Ray runtime_env for every stage (e.g. ``{"pip": ["vllm-hip==0.1.0"]}``)."""
    address: str | None = None
    """Ray cluster address (None: ``RAY_ADDRESS`` or a new local cluster)."""
    accelerator_type: str | None = None
    cpu_stage_num_cpus: float | None = None
    """CPUs reserved per worker of the CPU stages (chat template, tokenize, detokenize, pre/post)."""
    progress_every: int = 100
    """Log a progress line every this many rows."""
    preflight: bool = True
    """Before starting engines: probe every Ray node for the plugin (INFINITEHIP only) and check
    that the cluster has the GPUs one engine needs (else Ray Data waits for them forever)."""
    direct: bool = False
    """Run through ``vllm.LLM`` in this process instead of Ray Data."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @property
    def uses_infinitehip(self) -> bool:
        return self.backend.upper() in (BACKEND_NAME, "CUSTOM")

    def hip_options(self) -> dict[str, Any]:
        options = self.additional_config.get(ADDITIONAL_CONFIG_KEY)
        return dict(options) if isinstance(options, Mapping) else {}

    def sampling_dict(self) -> dict[str, Any]:
        """SamplingParams of every request. ``detokenize`` is off: both modes decode with the HF
        tokenizer (Ray's detokenize stage), so texts compare equal when token ids do."""
        params = {"temperature": float(self.temperature), "max_tokens": int(self.max_tokens)}
        params.update(self.sampling_params)
        params["detokenize"] = False
        return params


@dataclass
class Plan:
    """What :func:`prepare` found out about a job (all checked before Ray starts)."""

    kind: str
    """``"messages"`` (chat template applied) or ``"prompt"`` (text as is)."""
    num_rows: int
    hip_config: InfiniteHipConfig | None
    engine_kwargs: dict[str, Any]


@dataclass
class BatchStats:
    """Counts and timings of one run (``--stats-json``).

    ``generate_s`` is the span during which engines were producing this job's outputs: for
    ``direct``, the time inside ``LLM.generate``; for ``ray``, from the earliest request start to
    the latest finish (per-row ``time_taken_llm`` and finish stamps), so engine start-up is left
    out. ``wall_s`` includes everything (Ray start, engine start-up, I/O).
    """

    mode: str
    backend: str
    rows: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    generate_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        gen = self.generate_s or float("nan")
        d["docs_per_s"] = self.rows / gen
        d["input_tokens_per_s"] = self.input_tokens / gen
        d["output_tokens_per_s"] = self.output_tokens / gen
        d["wall_docs_per_s"] = self.rows / (self.wall_s or float("nan"))
        return d


# --------------------------------------------------------------------------------- validation
def _input_files(path: str) -> list[str]:
    if not os.path.exists(path):
        raise BatchError(f"input {path!r} does not exist")
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path) if os.path.splitext(f)[1] in INPUT_SUFFIXES
        )
        if not files:
            raise BatchError(f"input folder {path!r} holds no .jsonl, .json or .parquet file")
    else:
        files = [path]
    kinds = {INPUT_SUFFIXES.get(os.path.splitext(f)[1]) for f in files}
    if None in kinds:
        raise BatchError(f"input {path!r}: unsupported file type (use .jsonl, .json or .parquet)")
    if len(kinds) > 1:
        raise BatchError(f"input folder {path!r} mixes JSONL and Parquet files")
    return files


def _input_format(files: Sequence[str]) -> str:
    return INPUT_SUFFIXES[os.path.splitext(files[0])[1]]


def read_input_columns(path: str) -> list[str]:
    """Column names of the input (Parquet schema, or the keys of the first JSONL object)."""
    files = _input_files(path)
    if _input_format(files) == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(files[0]).names)
        except Exception as e:  # noqa: BLE001 - reported with the file name
            raise BatchError(f"input {files[0]!r} is not a readable Parquet file: {e}") from e
    with open(files[0], encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BatchError(f"input {files[0]!r} line {lineno} is not valid JSON: {e}") from e
            if not isinstance(obj, dict):
                raise BatchError(f"input {files[0]!r} line {lineno} is not a JSON object")
            return list(obj)
    raise BatchError(f"input {files[0]!r} is empty")


def count_input_rows(path: str) -> int:
    files = _input_files(path)
    if _input_format(files) == "parquet":
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    n = 0
    for name in files:
        with open(name, encoding="utf-8") as f:
            n += sum(1 for line in f if line.strip())
    return n


def iter_input_rows(path: str) -> Iterator[dict[str, Any]]:
    """Rows of the input in file order (direct mode)."""
    files = _input_files(path)
    if _input_format(files) == "parquet":
        import pyarrow.parquet as pq

        for name in files:
            for batch in pq.ParquetFile(name).iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        return
    for name in files:
        with open(name, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def _input_kind(job: BatchJob, columns: Sequence[str]) -> str:
    have = ", ".join(repr(c) for c in columns)
    if job.id_column not in columns:
        raise BatchError(
            f"input {job.input!r} has no id column {job.id_column!r} (columns: {have}); "
            "pass --id-column NAME"
        )
    missing = [c for c in job.keep_columns if c not in columns]
    if missing:
        raise BatchError(f"--keep-columns {missing[0]!r} is not a column of the input (columns: {have})")
    if job.messages_column in columns:
        return "messages"
    if job.prompt_column in columns:
        return "prompt"
    raise BatchError(
        f"input {job.input!r} has neither a {job.messages_column!r} column (OpenAI chat messages) "
        f"nor a {job.prompt_column!r} column (text) (columns: {have}); pass --messages-column or "
        "--prompt-column"
    )


def _check_backend_name(name: str) -> None:
    if name.upper() in (BACKEND_NAME, "AUTO"):
        return
    try:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
    except Exception:  # noqa: BLE001 - vLLM checks it again in the engine
        return
    if name.upper() not in AttentionBackendEnum.__members__:
        known = ", ".join([BACKEND_NAME, *AttentionBackendEnum.__members__])
        raise BatchError(f"--backend {name!r} is not an attention backend; known: {known}")


def build_engine_kwargs(job: BatchJob) -> dict[str, Any]:
    """``vllm.EngineArgs`` keyword arguments of one engine (what Ray passes to ``AsyncEngineArgs``).

    The backend goes in as the string ``attention_backend`` (see the module docstring for why not
    ``attention_config``) and the options as the plain dict ``additional_config``.
    """
    extra = dict(job.engine_kwargs)
    for key, option in _DEDICATED_ENGINE_KEYS.items():
        if key in extra:
            raise BatchError(f"engine_kwargs[{key!r}]: use the {option!r} option instead")
    attn = extra.get("attention_config")
    if isinstance(attn, Mapping) and attn.get("backend") is not None:
        raise BatchError(
            "engine_kwargs['attention_config']['backend']: use the 'backend' option instead (vLLM "
            "parses attention_config before it loads plugins, so INFINITEHIP would not resolve)"
        )
    kwargs: dict[str, Any] = extra
    kwargs["attention_backend"] = job.backend.upper()
    kwargs["additional_config"] = json.loads(json.dumps(job.additional_config))
    if job.max_model_len is not None:
        kwargs["max_model_len"] = int(job.max_model_len)
    kwargs["tensor_parallel_size"] = int(job.tensor_parallel_size)
    kwargs["pipeline_parallel_size"] = int(job.pipeline_parallel_size)
    gpus = job.tensor_parallel_size * job.pipeline_parallel_size
    kwargs["distributed_executor_backend"] = job.distributed_executor_backend or (
        "uni" if gpus == 1 else "ray"
    )
    if job.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = float(job.gpu_memory_utilization)
    for name in ("max_num_batched_tokens", "max_num_seqs"):
        if getattr(job, name) is not None:
            kwargs[name] = int(getattr(job, name))
    if job.enforce_eager:
        kwargs["enforce_eager"] = True
    return kwargs


def prepare(job: BatchJob) -> Plan:
    """Check everything that can be checked without Ray or a GPU; raise :class:`BatchError` or
    :class:`~vllm_hip.config.ConfigError` with a message naming the culprit."""
    if not job.input:
        raise BatchError("--input is required")
    if not job.model:
        raise BatchError("--model is required")
    if not job.output:
        raise BatchError("--output is required")
    if os.path.splitext(job.output)[1] not in OUTPUT_SUFFIXES:
        raise BatchError(f"--output {job.output!r} must end in .jsonl or .parquet")
    out_dir = os.path.dirname(os.path.abspath(job.output))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise BatchError(f"--output folder {out_dir!r} cannot be created: {e}") from e
    if not os.access(out_dir, os.W_OK):
        raise BatchError(f"--output folder {out_dir!r} is not writable")
    for name in ("batch_size", "concurrency", "max_tokens", "tensor_parallel_size",
                 "pipeline_parallel_size", "progress_every"):  # fmt: skip
        value = getattr(job, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BatchError(f"--{name.replace('_', '-')}={value!r} must be a positive integer")
    if job.max_model_len is not None and (not isinstance(job.max_model_len, int) or job.max_model_len < 1):
        raise BatchError(f"--max-model-len={job.max_model_len!r} must be a positive integer")
    if not isinstance(job.additional_config, Mapping):
        raise BatchError("additional_config must be a JSON object")
    _check_backend_name(job.backend)

    hip_config = None
    if job.uses_infinitehip or ADDITIONAL_CONFIG_KEY in job.additional_config:
        # Raises ConfigError("infinitehip.<field>=... is invalid: ...").
        hip_config = InfiniteHipConfig.from_vllm_additional_config(job.additional_config)
        if not job.uses_infinitehip:
            logger.warning("infinitehip options are given but --backend is %s: they are unused", job.backend)

    kind = _input_kind(job, read_input_columns(job.input))
    if kind == "prompt" and job.chat:
        kind = "messages"
    engine_kwargs = build_engine_kwargs(job)
    return Plan(kind=kind, num_rows=count_input_rows(job.input), hip_config=hip_config,
                engine_kwargs=engine_kwargs)  # fmt: skip


# ------------------------------------------------------------------------ row transformations
def _plain(value: Any) -> Any:
    """numpy / Arrow scalars and arrays (what Ray Data hands to row functions) to Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _messages(value: Any, row_id: Any, column: str) -> list[dict[str, str]]:
    value = _plain(value)
    if not isinstance(value, list) or not value:
        raise ValueError(f"row {row_id!r}: column {column!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(
            m.get("content"), str
        ):
            raise ValueError(
                f"row {row_id!r}: {column}[{i}] must be an object with string 'role' and 'content'"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


class Preprocess:
    """Input row -> what the Ray LLM stages read (``messages`` or ``prompt``, ``sampling_params``)."""

    def __init__(self, job: BatchJob, kind: str):
        self.kind = kind
        self.id_column = job.id_column
        self.prompt_column = job.prompt_column
        self.messages_column = job.messages_column
        self.sampling = job.sampling_dict()

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        row_id = _plain(row.get(self.id_column))
        out: dict[str, Any] = {"sampling_params": dict(self.sampling)}
        if self.messages_column in row and row.get(self.messages_column) is not None:
            out["messages"] = _messages(row[self.messages_column], row_id, self.messages_column)
            return out
        text = row.get(self.prompt_column)
        if not isinstance(text, str) or not text:
            raise ValueError(f"row {row_id!r}: column {self.prompt_column!r} must be a non-empty string")
        if self.kind == "messages":
            out["messages"] = [{"role": "user", "content": text}]
        else:
            out["prompt"] = text
        return out


def _sha1_tokens(ids: Sequence[int]) -> str:
    return hashlib.sha1(json.dumps([int(i) for i in ids]).encode()).hexdigest()


class Postprocess:
    """Ray LLM output row -> the result row (plus two timing columns the driver strips)."""

    def __init__(self, job: BatchJob):
        self.id_column = job.id_column
        self.keep_columns = list(job.keep_columns)

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        generated = [int(t) for t in _plain(row.get("generated_tokens")) or []]
        prompt_ids = _plain(row.get("prompt_token_ids")) or []
        out = {
            self.id_column: _plain(row.get(self.id_column)),
            "generated_text": row.get("generated_text") or "",
            "generated_token_ids": generated,
            "num_input_tokens": int(_plain(row.get("num_input_tokens", len(prompt_ids)))),
            "num_generated_tokens": len(generated),
            "prompt_sha1": _sha1_tokens(prompt_ids),
        }
        for c in self.keep_columns:
            out[c] = _plain(row.get(c))
        out[_T_LLM] = float(_plain(row.get("time_taken_llm", 0.0)) or 0.0)
        out[_T_DONE] = time.time()
        return out


def prompt_token_ids(request: Mapping[str, Any], tokenizer: Any, processor: Any = None,
                     chat_template_kwargs: Mapping[str, Any] | None = None) -> list[int]:  # fmt: skip
    """Token ids of one preprocessed request, computed exactly as Ray's stages compute them.

    Ray's chat-template stage renders ``messages`` with ``AutoProcessor.apply_chat_template``
    (generation prompt added when the last message is the user's, else the last message is
    continued), and its tokenize stage calls the HF tokenizer on the text with its defaults
    (special tokens added). Direct mode feeds these ids to ``vllm.LLM``, so both runs see the
    same tokens.

    Parameters
    ----------
    request : mapping
        A :class:`Preprocess` output: ``messages`` (list of dicts) or ``prompt`` (str).
    tokenizer : transformers tokenizer
    processor : transformers processor or tokenizer, optional
        Renders the chat template (defaults to ``tokenizer``).

    Returns
    -------
    list[int]
        ``[num_prompt_tokens]`` token ids.
    """
    if "messages" in request:
        messages = request["messages"]
        add_generation_prompt = messages[-1]["role"] == "user"
        text = (processor or tokenizer).apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
            **dict(chat_template_kwargs or {}),
        )
    else:
        text = request["prompt"]
    return list(tokenizer([text])["input_ids"][0])


# ------------------------------------------------------------------------------ output writing
class _Writer:
    """Writes result rows to ``<path>.tmp`` and renames it to ``path`` when closed cleanly."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = path + ".tmp"
        self.parquet = path.endswith(".parquet")
        self._file = None if self.parquet else open(self.tmp, "w", encoding="utf-8")
        self._pq = None
        self._schema = None

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if not self.parquet:
            for r in rows:
                self._file.write(json.dumps(r, ensure_ascii=False) + "\n")
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._pq is None:
            inferred = pa.Table.from_pylist(rows).schema
            known = {"generated_text": pa.string(), "generated_token_ids": pa.list_(pa.int64()),
                     "num_input_tokens": pa.int64(), "num_generated_tokens": pa.int64(),
                     "prompt_sha1": pa.string()}  # fmt: skip
            # Fixed types, so a first batch of empty outputs does not pin list<null>.
            self._schema = pa.schema([pa.field(f.name, known.get(f.name, f.type)) for f in inferred])
            self._pq = pq.ParquetWriter(self.tmp, self._schema)
        self._pq.write_table(pa.Table.from_pylist(rows, schema=self._schema))

    def close(self, ok: bool) -> None:
        if self._file is not None:
            self._file.close()
        if self._pq is not None:
            self._pq.close()
        if self.parquet and self._pq is None and ok:
            open(self.tmp, "wb").close()  # no rows: an empty file rather than none
        if ok:
            os.replace(self.tmp, self.path)


class _Progress:
    def __init__(self, label: str, total: int, every: int):
        self.label, self.total, self.every = label, total, every
        self.t0 = time.perf_counter()
        self.rows = 0
        self.tokens = 0
        self._next = every

    def update(self, rows: int, input_tokens: int) -> None:
        self.rows += rows
        self.tokens += input_tokens
        if self.rows >= self._next or self.rows >= self.total:
            self._next = (self.rows // self.every + 1) * self.every
            self.log()

    def log(self) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        pct = 100.0 * self.rows / self.total if self.total else 100.0
        rate = self.rows / dt
        eta = (self.total - self.rows) / rate if rate > 0 else float("inf")
        logger.info(
            "[%s] %d/%d rows (%.1f%%), %.2f rows/s, %.0f input tokens/s, elapsed %.0fs, eta %.0fs",
            self.label, self.rows, self.total, pct, rate, self.tokens / dt, dt, eta,
        )  # fmt: skip


# ----------------------------------------------------------------------------- plugin check
def _make_plugin_probe():
    # Defined inside a function so that cloudpickle ships the code by value: a module-level
    # function of vllm_hip would be pickled by reference and fail to unpickle on exactly the
    # nodes this probe is meant to diagnose. It must reference no module globals.
    def probe(group: str, name: str, value: str, dist: str) -> dict:
        import importlib
        import importlib.metadata
        import importlib.util
        import socket
        import sys

        report = {"host": socket.gethostname(), "python": sys.executable, "problems": []}
        try:
            import ray

            report["ip"] = ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001 - informational
            report["ip"] = "?"
        try:
            importlib.import_module("vllm_hip.plugin")
        except Exception as e:  # noqa: BLE001 - reported
            report["problems"].append(f"cannot import vllm_hip ({type(e).__name__}: {e})")
        eps = [e for e in importlib.metadata.entry_points(group=group) if e.name == name]
        if not eps:
            report["problems"].append(
                f"the {group!r} entry point {name!r} is missing (vLLM would not load the plugin)"
            )
        elif eps[0].value != value:
            report["problems"].append(f"entry point {name!r} is {eps[0].value!r}, expected {value!r}")
        for key, pkg in (("version", dist), ("vllm_version", "vllm")):
            try:
                report[key] = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                report[key] = None
        if importlib.util.find_spec("vllm") is None:
            report["problems"].append("vllm is not installed")
        return report

    return probe


def _install_hint() -> str:
    try:
        import importlib.metadata

        pin = f"{DIST_NAME}=={importlib.metadata.version(DIST_NAME)}"
    except Exception:  # noqa: BLE001 - hint only
        pin = DIST_NAME
    return (
        f"pip install {pin} on every node (or bake it into the cluster image), or ship it with the "
        f"job: runtime_env={{'pip': ['{pin}']}} (a package folder in runtime_env py_modules is "
        "not enough: it lacks the entry point vLLM loads plugins from)"
    )


def check_ray_workers_have_plugin(
    runtime_env: Mapping[str, Any] | None = None,
    *,
    timeout_s: float = 600.0,
    gpu_nodes_only: bool = False,
) -> list[dict[str, Any]]:
    """Probe every alive node of the connected Ray cluster for vllm-hip.

    Runs a tiny task pinned to each node (``num_cpus=0``, so busy nodes answer too) that imports
    ``vllm_hip.plugin`` and looks for the ``vllm.general_plugins`` entry point ``infinitehip``, the
    two things vLLM's workers and Ray actors need to resolve ``INFINITEHIP``. Without this, a
    missing install surfaces much later as an unpickling trace or ``Backend CUSTOM must be
    registered before use`` deep inside an engine.

    Parameters
    ----------
    runtime_env : mapping, optional
        The runtime_env the job's actors use (a ``pip`` entry installing vllm-hip counts).
    timeout_s : float
        How long to wait for all probes (runtime_env installs can take minutes).
    gpu_nodes_only : bool
        Probe only nodes with a GPU resource.

    Returns
    -------
    list[dict]
        One report per node: ``node_id``, ``ip``, ``host``, ``version``, ``vllm_version``,
        ``problems`` (empty when fine).

    Raises
    ------
    PluginMissingError
        Naming each failing node and how to install the plugin there.
    RuntimeError
        If Ray is not initialised.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        raise RuntimeError("check_ray_workers_have_plugin() needs ray.init() first")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if gpu_nodes_only:
        nodes = [n for n in nodes if n.get("Resources", {}).get("GPU", 0) > 0]
    probe = ray.remote(num_cpus=0, max_retries=0)(_make_plugin_probe())
    refs = []
    for n in nodes:
        opts: dict[str, Any] = {
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
        }
        if runtime_env:
            opts["runtime_env"] = dict(runtime_env)
        refs.append(probe.options(**opts).remote(PLUGIN_GROUP, PLUGIN_NAME, PLUGIN_VALUE, DIST_NAME))
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    ready_set = set(ready)
    reports, failures = [], []
    for n, ref in zip(nodes, refs):
        where = f"Ray node {n.get('NodeManagerAddress', '?')} (node id {n['NodeID'][:12]})"
        if ref not in ready_set:
            ray.cancel(ref, force=True)
            report = {"problems": [f"the probe did not finish within {timeout_s:.0f}s"]}
        else:
            try:
                report = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - e.g. runtime_env setup failed on that node
                first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                report = {"problems": [f"the probe could not run there ({first})"]}
        report.update(node_id=n["NodeID"], ip=report.get("ip") or n.get("NodeManagerAddress", "?"))
        reports.append(report)
        if report["problems"]:
            host = f", host {report['host']}" if report.get("host") else ""
            failures.append((where + host, "; ".join(report["problems"])))
    if failures:
        more = f" and {len(failures) - 1} more node(s)" if len(failures) > 1 else ""
        details = "\n  ".join(f"{where}: {why}" for where, why in failures)
        raise PluginMissingError(
            f"vllm-hip is not installed on {failures[0][0]}{more}.\n  {details}\n"
            f"Fix: {_install_hint()}"
        )
    return reports


# ---------------------------------------------------------------------------------- Ray path
def _init_ray(job: BatchJob) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=job.address, runtime_env=job.runtime_env)
    except ConnectionError as e:
        raise BatchError(f"cannot connect to a Ray cluster at {job.address!r}: {e}") from e


def _preflight(job: BatchJob, gpu_nodes_only: bool = False) -> None:
    import ray

    need = job.tensor_parallel_size * job.pipeline_parallel_size
    have = ray.cluster_resources().get("GPU", 0)
    if have < need:
        raise BatchError(
            f"the Ray cluster has {have:g} GPU(s) but one engine needs {need}; Ray Data would wait "
            "for them forever (pass --no-preflight if an autoscaler will add GPU nodes)"
        )
    if job.uses_infinitehip:
        reports = check_ray_workers_have_plugin(job.runtime_env, gpu_nodes_only=gpu_nodes_only)
        logger.info("vllm-hip found on %d Ray node(s)", len(reports))


def ray_engine_metrics_available() -> bool:
    """Whether vLLM can export engine metrics through Ray (its wrappers import ``ray.serve``)."""
    try:
        from vllm.v1.metrics import ray_wrappers
    except ImportError:
        return False
    return getattr(ray_wrappers, "ray_metrics", None) is not None


def build_processor(job: BatchJob, plan: Plan | None = None):
    """The Ray Data LLM processor of a job (chat template → tokenize → vLLM → detokenize).

    Returns
    -------
    ray.llm._internal.batch.processor.Processor
        Call it on a ``ray.data.Dataset`` of input rows.
    """
    from ray.data.llm import vLLMEngineProcessorConfig
    from ray.data.llm import build_processor as ray_build_processor

    plan = plan or prepare(job)
    cpu = {"num_cpus": job.cpu_stage_num_cpus} if job.cpu_stage_num_cpus is not None else {}
    extra: dict[str, Any] = {}
    if job.max_concurrent_batches is not None:
        extra["max_concurrent_batches"] = job.max_concurrent_batches
    if not ray_engine_metrics_available():
        # Ray Data's default (log_engine_metrics=True) builds vLLM's Ray metric wrappers, which
        # raise ImportError in the engine actor when ray.serve is not importable: the actor dies
        # before the first batch (seen on the GPU machine with plain `ray`).
        logger.warning(
            "vLLM engine metrics through Ray are off: ray.serve / ray.util.metrics do not import "
            "here (pip install 'ray[serve]' to export them)"
        )
        extra["log_engine_metrics"] = False
    config = vLLMEngineProcessorConfig(
        model_source=job.model,
        engine_kwargs=dict(plan.engine_kwargs),
        batch_size=job.batch_size,
        concurrency=job.concurrency,
        runtime_env=job.runtime_env,
        accelerator_type=job.accelerator_type,
        chat_template_stage={"enabled": plan.kind == "messages", **cpu},
        tokenize_stage={"enabled": True, **cpu},
        detokenize_stage={"enabled": True, **cpu},
        **extra,
    )
    return ray_build_processor(
        config,
        preprocess=Preprocess(job, plan.kind),
        postprocess=Postprocess(job),
        preprocess_map_kwargs=dict(cpu),
        postprocess_map_kwargs=dict(cpu),
    )


def _read_dataset(job: BatchJob):
    import ray.data

    files = _input_files(job.input)
    if _input_format(files) == "parquet":
        return ray.data.read_parquet(job.input)
    return ray.data.read_json(job.input, lines=True)


def run_ray(job: BatchJob, plan: Plan | None = None, processor: Any = None) -> BatchStats:
    """Run a job on Ray Data and write its output file.

    Parameters
    ----------
    job : BatchJob
    plan : Plan, optional
        From :func:`prepare` (computed if omitted).
    processor : optional
        A processor from :func:`build_processor` (built if omitted).

    Returns
    -------
    BatchStats
    """
    plan = plan or prepare(job)
    t0 = time.perf_counter()
    _init_ray(job)
    if job.preflight:
        _preflight(job)
    processor = processor or build_processor(job, plan)
    out = processor(_read_dataset(job))

    stats = BatchStats(mode="ray", backend=job.backend.upper())
    progress = _Progress("ray", plan.num_rows, job.progress_every)
    first_start, last_done = float("inf"), float("-inf")
    writer = _Writer(job.output)
    ok = False
    try:
        for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
            rows = batch.to_pylist()
            for r in rows:
                t_llm, t_done = r.pop(_T_LLM, 0.0), r.pop(_T_DONE, 0.0)
                first_start = min(first_start, t_done - t_llm)
                last_done = max(last_done, t_done)
                stats.input_tokens += r["num_input_tokens"]
                stats.output_tokens += r["num_generated_tokens"]
            writer.write(rows)
            stats.rows += len(rows)
            progress.update(len(rows), sum(r["num_input_tokens"] for r in rows))
        ok = True
    finally:
        writer.close(ok)
    stats.wall_s = time.perf_counter() - t0
    stats.generate_s = max(last_done - first_start, 0.0) if stats.rows else 0.0
    if stats.rows != plan.num_rows:
        logger.warning("wrote %d rows but the input has %d", stats.rows, plan.num_rows)
    return stats


# ------------------------------------------------------------------------------- direct path
def run_direct(job: BatchJob, plan: Plan | None = None, chunk_rows: int = 1024) -> BatchStats:
    """Run a job through ``vllm.LLM`` in this process (same prompts, tokens and engine kwargs as
    the Ray path) and write its output file."""
    plan = plan or prepare(job)
    t0 = time.perf_counter()
    kwargs = dict(plan.engine_kwargs)
    if job.preflight and job.uses_infinitehip:
        local = _make_plugin_probe()(PLUGIN_GROUP, PLUGIN_NAME, PLUGIN_VALUE, DIST_NAME)
        if local["problems"]:
            raise PluginMissingError(
                f"vllm-hip is not installed in this Python ({sys.executable}): "
                + "; ".join(local["problems"]) + f". Fix: {_install_hint()}"
            )
    if kwargs.get("distributed_executor_backend") == "ray":
        # vLLM's Ray executor creates worker actors on the cluster: check them first.
        _init_ray(job)
        if job.preflight:
            _preflight(job, gpu_nodes_only=True)
    from transformers import AutoProcessor, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    trust = bool(kwargs.get("trust_remote_code", False))
    tokenizer = AutoTokenizer.from_pretrained(job.model, trust_remote_code=trust)
    chat = AutoProcessor.from_pretrained(job.model, trust_remote_code=trust) if plan.kind == "messages" else None
    llm = LLM(model=job.model, **kwargs)
    params = SamplingParams(**job.sampling_dict())
    pre = Preprocess(job, plan.kind)

    stats = BatchStats(mode="direct", backend=job.backend.upper())
    progress = _Progress("direct", plan.num_rows, job.progress_every)
    writer = _Writer(job.output)
    ok = False

    def flush(chunk: list[dict[str, Any]]) -> None:
        ids = [prompt_token_ids(pre(r), tokenizer, chat) for r in chunk]
        t = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
        stats.generate_s += time.perf_counter() - t
        gen = [list(o.outputs[0].token_ids) for o in outs]
        texts = tokenizer.batch_decode(gen, skip_special_tokens=True)
        rows = []
        for r, p, g, text in zip(chunk, ids, gen, texts):
            row = {
                job.id_column: r[job.id_column],
                "generated_text": text,
                "generated_token_ids": g,
                "num_input_tokens": len(p),
                "num_generated_tokens": len(g),
                "prompt_sha1": _sha1_tokens(p),
            }
            row.update({c: r.get(c) for c in job.keep_columns})
            rows.append(row)
        writer.write(rows)
        stats.rows += len(rows)
        stats.input_tokens += sum(map(len, ids))
        stats.output_tokens += sum(map(len, gen))
        progress.update(len(rows), sum(map(len, ids)))

    try:
        chunk: list[dict[str, Any]] = []
        for row in iter_input_rows(job.input):
            chunk.append(row)
            if len(chunk) == chunk_rows:
                flush(chunk)
                chunk = []
        if chunk:
            flush(chunk)
        ok = True
    finally:
        writer.close(ok)
    stats.wall_s = time.perf_counter() - t0
    return stats


# ----------------------------------------------------------------------------------------- CLI
def _json_arg(text: str, what: str) -> Any:
    """A JSON value given inline, as ``@file`` or as a path to a .json file."""
    src = text
    path = text[1:] if text.startswith("@") else text
    if text.startswith("@") or (not text.lstrip().startswith(("{", "[")) and os.path.isfile(path)):
        try:
            with open(path, encoding="utf-8") as f:
                src = f.read()
        except OSError as e:
            raise BatchError(f"{what}: cannot read {path!r}: {e}") from e
    try:
        return json.loads(src)
    except json.JSONDecodeError as e:
        raise BatchError(f"{what} is not valid JSON ({e}): {text[:200]!r}") from e


def _load_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise BatchError(f"--config: cannot read {path!r}: {e}") from e
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BatchError(f"--config {path!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise BatchError(f"--config {path!r} must hold an object of job options")
    names = BatchJob.field_names() + ("infinitehip",)
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise BatchError(f"--config {path!r}: {unknown[0]!r} is not an option; known: {', '.join(names)}")
    return data


def _merge_infinitehip(additional: dict[str, Any], options: Any, source: str) -> None:
    if options is None:
        return
    if ADDITIONAL_CONFIG_KEY in additional and additional[ADDITIONAL_CONFIG_KEY] != options:
        raise BatchError(f"infinitehip options given twice ({source} and additional_config)")
    additional[ADDITIONAL_CONFIG_KEY] = options


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m vllm_hip.batch",
        description="Long-context batch inference on Ray Data with the INFINITEHIP backend.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "JSON options take inline JSON, @FILE or a .json path. Exit codes: 0 ok, 1 run failed "
            "(e.g. plugin missing on a node), 2 bad input or options."
        ),
    )
    S = argparse.SUPPRESS  # unset flags do not override --config
    ap.add_argument("--config", help="JSON/YAML file of job options (keys as the flags, with _)")
    ap.add_argument("--input", default=S, help="JSONL/Parquet file or folder")
    ap.add_argument("--output", default=S, help="result file (.jsonl or .parquet)")
    ap.add_argument("--model", default=S)
    ap.add_argument("--backend", default=S, help="attention backend (default INFINITEHIP)")
    ap.add_argument("--infinitehip", default=S, help="INFINITEHIP options, e.g. '{\"window_tokens\": 2048}'")
    ap.add_argument("--additional-config", default=S, help="vLLM additional_config (JSON)")
    ap.add_argument("--max-model-len", type=int, default=S)
    ap.add_argument("--max-tokens", type=int, default=S)
    ap.add_argument("--temperature", type=float, default=S)
    ap.add_argument("--sampling-params", default=S, help="extra SamplingParams fields (JSON)")
    ap.add_argument("--batch-size", type=int, default=S)
    ap.add_argument("--concurrency", type=int, default=S, help="engine replicas")
    ap.add_argument("--max-concurrent-batches", type=int, default=S)
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=S)
    ap.add_argument("--pipeline-parallel-size", "-pp", type=int, default=S)
    ap.add_argument("--distributed-executor-backend", choices=["uni", "mp", "ray"], default=S)
    ap.add_argument("--gpu-memory-utilization", type=float, default=S)
    ap.add_argument("--max-num-batched-tokens", type=int, default=S, help="default 16384")
    ap.add_argument("--max-num-seqs", type=int, default=S, help="default 256")
    ap.add_argument("--enforce-eager", action="store_true", default=S)
    ap.add_argument("--engine-kwargs", default=S, help="further vllm.EngineArgs fields (JSON)")
    ap.add_argument("--id-column", default=S)
    ap.add_argument("--prompt-column", default=S)
    ap.add_argument("--messages-column", default=S)
    ap.add_argument("--chat", action="store_true", default=S, help="apply the chat template to prompts")
    ap.add_argument("--keep-columns", default=S, help="comma-separated input columns to copy")
    ap.add_argument("--runtime-env", default=S, help="Ray runtime_env (JSON)")
    ap.add_argument("--address", default=S, help="Ray cluster address (e.g. auto)")
    ap.add_argument("--accelerator-type", default=S)
    ap.add_argument("--cpu-stage-num-cpus", type=float, default=S)
    ap.add_argument("--progress-every", type=int, default=S)
    ap.add_argument("--no-preflight", dest="preflight", action="store_false", default=S,
                    help="skip the plugin and GPU checks (e.g. autoscaling clusters)")
    ap.add_argument("--direct", action="store_true", default=S, help="run through vllm.LLM, not Ray")
    ap.add_argument("--check-cluster", action="store_true",
                    help="only check that every Ray node has vllm-hip, then exit")  # fmt: skip
    ap.add_argument("--stats-json", help="also write the run's BatchStats here")
    return ap


def job_from_args(argv: Sequence[str] | None = None) -> tuple[BatchJob, argparse.Namespace]:
    """Parse the CLI (``--config`` file first, flags override it) into a :class:`BatchJob`."""
    args = _parser().parse_args(argv)
    data: dict[str, Any] = _load_config_file(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "check_cluster", "stats_json")}
    json_flags = {"additional_config": "--additional-config", "engine_kwargs": "--engine-kwargs",
                  "sampling_params": "--sampling-params", "runtime_env": "--runtime-env",
                  "infinitehip": "--infinitehip"}  # fmt: skip
    for key, flag in json_flags.items():
        if key in flags:
            flags[key] = _json_arg(flags[key], flag)
    if "keep_columns" in flags:
        flags["keep_columns"] = [c for c in flags["keep_columns"].split(",") if c]
    hip_file = data.pop("infinitehip", None)
    hip_flag = flags.pop("infinitehip", None)
    data.update(flags)
    additional = dict(data.get("additional_config") or {})
    _merge_infinitehip(additional, hip_file, "--config infinitehip")
    if hip_flag is not None:
        additional[ADDITIONAL_CONFIG_KEY] = hip_flag  # the flag overrides the file
    data["additional_config"] = additional
    return BatchJob(**data), args


def _print_reports(reports: list[dict[str, Any]]) -> None:
    print(f"vllm-hip found on all {len(reports)} Ray node(s):")
    for r in reports:
        print(f"  {r.get('ip', '?'):>15}  {r.get('host', '?')}  vllm-hip {r.get('version')}  "
              f"vllm {r.get('vllm_version')}  ({r['node_id'][:12]})")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        job, args = job_from_args(argv)
        if args.check_cluster:
            if job.address is None and not os.environ.get("RAY_ADDRESS"):
                job.address = "auto"
            _init_ray(job)
            _print_reports(check_ray_workers_have_plugin(job.runtime_env))
            return 0
        plan = prepare(job)
    except (BatchError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PluginMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if plan.hip_config is not None and job.uses_infinitehip:
        logger.info("INFINITEHIP options: %s", json.dumps(job.hip_options()) if job.hip_options() else "defaults")
    logger.info("%d rows (%s), backend %s, engine kwargs %s", plan.num_rows, plan.kind,
                job.backend.upper(), json.dumps(plan.engine_kwargs, default=str))  # fmt: skip
    try:
        stats = run_direct(job, plan) if job.direct else run_ray(job, plan)
    except (BatchError, ConfigError, PluginMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, PluginMissingError) else 1
    summary = stats.to_dict()
    logger.info("done: %s", json.dumps(summary))
    if args.stats_json:
        with open(args.stats_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
