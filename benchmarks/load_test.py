"""Load an OpenAI-compatible server and check it keeps answering, and answering the same (issue 9).

N concurrent clients send greedy ``/v1/completions`` requests for D seconds: prompts of mixed length
(about ``--min-prompt-tokens`` to ``--max-prompt-tokens``), streaming and not, a fraction of streams
hung up on mid-way. Prompts come from a seeded pool, each with a unique id, so every prompt is sent
many times under load. Afterwards every distinct prompt (or ``--verify-sample`` of them) is sent
again *alone* and the loaded outputs are compared with those (greedy decoding must not depend on what
else is in the batch). vLLM guarantees that only in its batch-invariant mode (``--batch-invariant``:
``VLLM_BATCH_INVARIANT=1``, which INFINITEHIP supports); without it both backends' outputs can
differ by floating-point rounding.

    # against a running server
    python benchmarks/load_test.py --base-url http://127.0.0.1:8000 --backend INFINITEHIP \\
        --concurrency 64 --duration 300 --out benchmarks/results/load.json
    # start `vllm serve MODEL --attention-backend B` for each backend in turn
    python benchmarks/load_test.py --launch --model $SMOLLM2 --backends INFINITEHIP,FLASH_ATTN \\
        --duration 120 --out benchmarks/results/load_h100.json

Metrics (records in the project format, one per backend and metric): ``server_errors`` (HTTP 5xx,
connection errors and timeouts, streams that end without ``[DONE]`` or carry an error event, including
the solo re-sends), ``output_mismatches`` (loaded outputs that differ from the solo output of the same
prompt, plus cancelled streams whose partial text is not a prefix of it), ``client_errors`` (4xx),
``requests_per_s``, ``output_tokens_per_s``, ``p50/p99_latency_s``, ``p50/p99_ttft_s`` (streams) and,
where the server's process is known, ``host_rss_growth_mib`` (from after the warm-up requests),
``gpu_memory_growth_mib`` (to the load's end) and ``*_growth_second_half_mib`` (between the
middle and the last 10-s sample under full load: a leak, not warm-up, grows there; the raw samples
ride along in ``memory_mib``).

Exit status: 0 clean, 1 server errors, 2 output mismatches only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import aiohttp

# Common short English words: about one token each in BPE vocabularies, so word counts estimate
# token counts before the server's tokenizer refines them.
WORDS = (
    "the of and to in is was for on that with as by at from his it an were are which this be or "
    "has had not but first one their its new after who they have her she two been other when there "
    "all during into school time may years more most only over city some world would where later up "
    "such used many can state about national out known university united then made team most "
    "river house life part work book film day water small group game music back line people name "
    "high old year long red blue green light road king war town land sea field south north"
).split()

DEFAULT_SERVE_CMD = f"{shlex.quote(sys.executable)} -m vllm.entrypoints.cli.main serve"


# ------------------------------------------------------------------------------------ prompts
@dataclass(frozen=True)
class Prompt:
    id: int
    text: str
    max_tokens: int
    tokens: int | None = None
    """Exact prompt length from the server's ``/tokenize``, when it has one."""


def prompt_text(pid: int, n_words: int, seed: int) -> str:
    """Deterministic filler with a unique header and a question whose answer sits at the start."""
    rng = random.Random(seed * 7919 + pid)
    code = rng.randrange(10000, 99999)
    words = []
    for i in range(max(n_words, 0)):
        w = rng.choice(WORDS)
        words.append(w.capitalize() + " " if i % 12 == 0 else w + (". " if i % 12 == 11 else " "))
    return (
        f"Document #{pid:05d}. The code of this document is {code}.\n"
        + "".join(words).rstrip()
        + f"\nQuestion: what is the code of document #{pid:05d}? Answer: The code is"
    )


def prompt_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    """Mixed target lengths in [lo, hi]: half log-uniform (many short), half uniform (many long);
    the extremes are always present."""
    rng = random.Random(seed)
    lo, hi = max(lo, 1), max(hi, lo)
    out = []
    for i in range(n):
        if i == 0:
            out.append(lo)
        elif i == 1:
            out.append(hi)
        elif i % 2:
            out.append(int(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        else:
            out.append(rng.randint(lo, hi))
    return out


async def tokenize_count(session: aiohttp.ClientSession, base: str, model: str, text: str) -> int | None:
    try:
        async with session.post(f"{base}/tokenize", json={"model": model, "prompt": text}) as r:
            if r.status != 200:
                return None
            return int((await r.json(content_type=None))["count"])
    except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError, TypeError):
        return None


async def build_prompts(
    session: aiohttp.ClientSession,
    base: str,
    model: str,
    n: int,
    min_tokens: int,
    max_tokens: int,
    out_tokens: tuple[int, int],
    seed: int,
    max_model_len: int | None,
) -> list[Prompt]:
    """``n`` prompts whose lengths (exact where ``/tokenize`` exists) fit ``max_model_len``."""
    rng = random.Random(seed + 1)
    limit = max_tokens
    if max_model_len:
        limit = min(limit, max_model_len - out_tokens[1] - 8)
    lo = min(min_tokens, limit)
    probe = prompt_text(0, 2000, seed)
    probe_tokens = await tokenize_count(session, base, model, probe)
    per_word = probe_tokens / 2000 if probe_tokens else 1.3
    overhead = 40 * per_word
    prompts = []
    for pid, target in enumerate(prompt_lengths(n, lo, limit, seed)):
        n_words = max(int((target - overhead) / per_word), 0)
        text = prompt_text(pid, n_words, seed)
        count = await tokenize_count(session, base, model, text)
        for _ in range(4):  # shrink until it fits: BPE merges make word counts approximate
            if count is None or count <= limit:
                break
            n_words = max(int(n_words * limit / count) - 4, 0)
            text = prompt_text(pid, n_words, seed)
            count = await tokenize_count(session, base, model, text)
        prompts.append(Prompt(pid, text, rng.randint(*out_tokens), count))
    return prompts


# ------------------------------------------------------------------------------------ requests
@dataclass
class Result:
    """One request as the client saw it."""

    prompt_id: int
    stream: bool
    cancel_after: int | None
    """Text chunks after which the client hangs up (None: read the whole response)."""
    start_s: float = 0.0
    status: int | None = None
    error: str = ""
    latency_s: float | None = None
    ttft_s: float | None = None
    text: str = ""
    output_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    complete: bool = False
    """The server finished the response (full body, or ``[DONE]`` after a finish_reason)."""
    cancelled: bool = False
    """The client hung up on purpose, before the end."""
    solo: bool = False

    @property
    def kind(self) -> str:
        """``ok``, ``cancelled``, ``client_error`` (4xx) or ``server_error``."""
        if self.status is not None and self.status >= 500:
            return "server_error"
        if self.status is not None and 400 <= self.status < 500:
            return "client_error"
        if self.error:  # connection reset, timeout, error event in the stream, unreadable body
            return "server_error"
        if self.cancelled:
            return "cancelled"
        return "ok" if self.complete else "server_error"

    def describe(self) -> str:
        what = f"HTTP {self.status}" if self.status is not None else "no response"
        mode = "stream" if self.stream else "plain"
        return f"prompt {self.prompt_id} {mode}: {what} {self.error[:200]}".strip()


async def send(
    session: aiohttp.ClientSession,
    base: str,
    model: str,
    prompt: Prompt,
    *,
    stream: bool,
    cancel_after: int | None = None,
    timeout: float = 600.0,
    t0: float | None = None,
    extra: dict | None = None,
) -> Result:
    """Send one greedy completion and record what came back (never raises for server faults)."""
    t_start = time.perf_counter()
    r = Result(prompt.id, stream, cancel_after, start_s=t_start - (t0 if t0 is not None else t_start))
    body: dict[str, Any] = {
        "model": model, "prompt": prompt.text, "max_tokens": prompt.max_tokens,
        "temperature": 0.0, "stream": stream,
    }  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(extra or {})
    try:
        async with asyncio.timeout(timeout):
            async with session.post(f"{base}/v1/completions", json=body) as resp:
                r.status = resp.status
                if resp.status != 200:
                    r.error = (await resp.text())[:1000]
                elif stream:
                    await _read_stream(resp, r, t_start)
                else:
                    data = await resp.json(content_type=None)
                    choice = data["choices"][0]
                    r.text = choice.get("text") or ""
                    r.finish_reason = choice.get("finish_reason")
                    usage = data.get("usage") or {}
                    r.output_tokens = int(usage.get("completion_tokens") or 0)
                    r.prompt_tokens = usage.get("prompt_tokens")
                    r.complete = True
    except TimeoutError:
        r.error = f"timeout after {timeout:.0f}s"
    except (aiohttp.ClientError, ConnectionError, ValueError, KeyError, IndexError, TypeError) as e:
        r.error = f"{type(e).__name__}: {e}"
    r.latency_s = time.perf_counter() - t_start
    return r


async def _read_stream(resp: aiohttp.ClientResponse, r: Result, t_start: float) -> None:
    chunks = 0
    done = False
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            break
        event = json.loads(payload)
        if "error" in event:  # vLLM reports a failure inside an already-started stream this way
            err = event["error"]
            r.error = "stream error event: " + str(err.get("message") if isinstance(err, dict) else err)[:500]
            continue
        for choice in event.get("choices") or []:
            text = choice.get("text") or ""
            if text and r.ttft_s is None:
                r.ttft_s = time.perf_counter() - t_start
            r.text += text
            chunks += 1
            if choice.get("finish_reason"):
                r.finish_reason = choice["finish_reason"]
        usage = event.get("usage")
        if usage:
            r.output_tokens = int(usage.get("completion_tokens") or 0)
            r.prompt_tokens = usage.get("prompt_tokens")
        if r.cancel_after is not None and chunks >= r.cancel_after and r.finish_reason is None:
            r.cancelled = True
            resp.close()  # drop the connection: the server must notice and abort the request
            return
    if not r.output_tokens:
        r.output_tokens = chunks
    r.complete = done and r.finish_reason is not None
    if not r.complete and not r.error:
        r.error = "stream ended without [DONE]" if not done else "[DONE] without a finish_reason"


# ------------------------------------------------------------------------------------ statistics
def percentile(values: Iterable[float], q: float) -> float | None:
    """``q``-th percentile (0-100) with linear interpolation between order statistics (numpy's
    default); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(results: list[Result], solo: dict[int, Result], elapsed_s: float) -> dict[str, Any]:
    """Counts, rates and percentiles of a run, and the comparison with the solo outputs."""
    kinds = Counter(r.kind for r in results)
    ok = [r for r in results if r.kind == "ok"]
    ref = {pid: s.text for pid, s in solo.items() if s.kind == "ok"}
    full = [r for r in ok if r.prompt_id in ref and r.text != ref[r.prompt_id]]
    partial = [
        r for r in results
        if r.kind == "cancelled" and r.prompt_id in ref and not ref[r.prompt_id].startswith(r.text)
    ]  # fmt: skip
    solo_errors = [s for s in solo.values() if s.kind != "ok"]
    server_errors = [r for r in results if r.kind == "server_error"] + solo_errors
    out_tokens = sum(r.output_tokens for r in ok)
    elapsed_s = max(elapsed_s, 1e-9)
    prompt_tokens = [r.prompt_tokens for r in results if r.prompt_tokens]
    return {
        "requests": len(results),
        "ok": len(ok),
        "cancelled": kinds["cancelled"],
        "client_errors": kinds["client_error"],
        "server_errors": len(server_errors),
        "solo_errors": len(solo_errors),
        "output_mismatches": len(full) + len(partial),
        "full_mismatches": len(full),
        "partial_mismatches": len(partial),
        "mismatched_prompts": len({r.prompt_id for r in full + partial}),
        "verified_requests": sum(1 for r in ok if r.prompt_id in ref),
        "verified_prompts": len(ref),
        "requests_per_s": len(ok) / elapsed_s,
        "output_tokens_per_s": out_tokens / elapsed_s,
        "p50_latency_s": percentile((r.latency_s for r in ok), 50),
        "p99_latency_s": percentile((r.latency_s for r in ok), 99),
        "p50_ttft_s": percentile((r.ttft_s for r in ok if r.stream and r.ttft_s is not None), 50),
        "p99_ttft_s": percentile((r.ttft_s for r in ok if r.stream and r.ttft_s is not None), 99),
        "max_prompt_tokens": max(prompt_tokens, default=None),
        "elapsed_s": elapsed_s,
        "error_examples": [r.describe() for r in server_errors[:8]],
        "client_error_examples": [r.describe() for r in results if r.kind == "client_error"][:4],
        "mismatch_examples": [
            {"prompt_id": r.prompt_id, "stream": r.stream, "cancelled": r.cancelled,
             "loaded": r.text[:300], "solo": ref[r.prompt_id][:300]}
            for r in (full + partial)[:8]
        ],  # fmt: skip
    }


# (metric, unit) of the records written per backend, in this order.
RECORD_METRICS = (
    ("server_errors", "count"),
    ("output_mismatches", "count"),
    ("client_errors", "count"),
    ("requests_per_s", "req/s"),
    ("output_tokens_per_s", "tok/s"),
    ("p50_latency_s", "s"),
    ("p99_latency_s", "s"),
    ("p50_ttft_s", "s"),
    ("p99_ttft_s", "s"),
    ("host_rss_growth_mib", "MiB"),
    ("host_rss_growth_second_half_mib", "MiB"),
    ("gpu_memory_growth_mib", "MiB"),
    ("gpu_memory_growth_second_half_mib", "MiB"),
)


def make_records(
    summary: dict[str, Any], *, backend: str, context_tokens: int, device: str, command: str, extra: dict
) -> list[dict]:
    """Records in the project's benchmark format; metrics without a value are left out."""
    common = {k: summary[k] for k in ("requests", "ok", "cancelled", "verified_requests",
                                      "verified_prompts", "elapsed_s")}  # fmt: skip
    if summary.get("unverified_prompts"):
        common["unverified_prompts"] = summary["unverified_prompts"]  # --deadline cut the re-sends
    records = []
    for metric, unit in RECORD_METRICS:
        value = summary.get(metric)
        if value is None:
            continue
        rec = {
            "metric": metric, "backend": backend, "context_tokens": context_tokens, "value": value,
            "unit": unit, "device": device, "command": command, **extra, **common,
        }  # fmt: skip
        if metric == "server_errors":
            rec["examples"] = summary["error_examples"]
            rec["solo_errors"] = summary["solo_errors"]
        elif metric == "output_mismatches":
            rec["examples"] = summary["mismatch_examples"]
            for k in ("full_mismatches", "partial_mismatches", "mismatched_prompts"):
                rec[k] = summary[k]
        elif metric == "client_errors":
            rec["examples"] = summary["client_error_examples"]
        elif metric.endswith("_growth_mib"):
            rec["memory_mib"] = summary.get(metric.replace("_growth_mib", "_mib"))
        records.append(rec)
    graphs = summary.get("decode_graphs")
    if graphs and graphs["decode_layer_steps"] > 0:
        # how much of the decode work replayed CUDA graphs (layer steps, warm-up included)
        records.append({
            "metric": "decode_graph_replay_fraction", "backend": backend, "context_tokens": context_tokens,
            "value": graphs["replays"] / graphs["decode_layer_steps"], "unit": "fraction", "device": device,
            "command": command, **extra, **common, **graphs,
        })  # fmt: skip
    return records


# ------------------------------------------------------------------------------------ memory
def memory_growth(name: str, samples: list[float], end: float | None, after_solo: float | None) -> dict:
    """``{name}_growth_mib`` from after the warm-up to the load's end, and
    ``{name}_growth_second_half_mib`` between the samples taken under full load at its middle and
    at its last tick. Warm-up (kernels compiled and loaded for new shapes, allocator pools) lands
    early or when the batch shrinks at the end (new, smaller shapes); a leak keeps growing under
    a steady load, which the second half shows. ``{name}_mib`` keeps the raw values."""
    if not samples or end is None:
        return {}
    out: dict[str, Any] = {f"{name}_growth_mib": end - samples[0],
                           f"{name}_mib": {"before": samples[0], "load_end": end, "after_solo": after_solo,
                                           "max": max(samples + [end]), "samples": samples}}  # fmt: skip
    if len(samples) >= 4:
        out[f"{name}_growth_second_half_mib"] = samples[-1] - samples[len(samples) // 2]
    return out


def process_tree(pid: int) -> list[int]:
    try:
        import psutil

        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except Exception:  # noqa: BLE001 - the process may be gone or psutil missing
        return []


def host_rss_mib(pid: int | None) -> float | None:
    """Resident memory of the server process and all its children (engine core, workers)."""
    if not pid:
        return None
    try:
        import psutil

        total = 0
        for p in process_tree(pid):
            try:
                total += psutil.Process(p).memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20 if total else None
    except ImportError:
        return None


def gpu_memory_mib(pid: int | None) -> float | None:
    """GPU memory of the server's processes (nvidia-smi), else of the whole GPU(s); None without
    nvidia-smi."""
    def smi(*query: str) -> list[str] | None:
        try:
            out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip().splitlines() if out.returncode == 0 else None

    pids = set(process_tree(pid)) if pid else set()
    apps = smi("--query-compute-apps=pid,used_memory")
    if apps and pids:
        used = [float(b) for a, b in (l.split(",") for l in apps if "," in l) if int(a) in pids]
        if used:
            return sum(used)
    total = smi("--query-gpu=memory.used")
    return sum(float(x) for x in total) if total else None


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "cpu"


# ------------------------------------------------------------------------------------ server
def launch_server(
    model: str, backend: str, port: int, server_args: list[str], log_path: str,
    serve_cmd: str = DEFAULT_SERVE_CMD, env: dict[str, str] | None = None,
) -> subprocess.Popen:  # fmt: skip
    """Start ``vllm serve MODEL`` (``serve_cmd``) in its own process group, logging to a file;
    ``env`` is added to this process's environment."""
    cmd = [*shlex.split(serve_cmd), model, "--host", "127.0.0.1", "--port", str(port)]
    if backend.upper() not in ("", "DEFAULT"):
        cmd += ["--attention-backend", backend]
    cmd += server_args
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    print("$", prefix, shlex.join(cmd), f"> {log_path}", flush=True)
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})  # fmt: skip


def http_status(url: str, timeout: float = 5.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:  # noqa: BLE001 - down, refused, reset
        return None


def wait_healthy(base: str, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before /health answered")
        if http_status(f"{base}/health", 2) == 200:
            return
        time.sleep(1)
    raise TimeoutError(f"{base}/health not 200 after {timeout:.0f}s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        except ProcessLookupError:
            pass


async def server_model(session: aiohttp.ClientSession, base: str) -> tuple[str, int | None]:
    """(first served model id, its max_model_len) from ``/v1/models``."""
    async with session.get(f"{base}/v1/models") as r:
        data = (await r.json(content_type=None))["data"][0]
    return data["id"], data.get("max_model_len")


# ------------------------------------------------------------------------------------ the run
@dataclass
class LoadOptions:
    base_url: str
    model: str | None = None
    concurrency: int = 64
    duration_s: float = 300.0
    min_prompt_tokens: int = 100
    max_prompt_tokens: int = 6000
    min_output_tokens: int = 16
    max_output_tokens: int = 32
    distinct_prompts: int = 48
    stream_fraction: float = 0.5
    cancel_fraction: float = 0.1
    verify_sample: int = 0
    request_timeout_s: float = 600.0
    progress_interval_s: float = 10.0
    warmup: int = 4
    seed: int = 0
    server_pid: int | None = None
    solo_deadline: float | None = None
    """time.monotonic() after which no more prompts are re-sent alone (the rest stay unverified)."""


async def run_load(opt: LoadOptions) -> dict[str, Any]:
    """Warm up, load, re-send alone; returns the summary plus raw results (``results``, ``solo``)."""
    base = opt.base_url.rstrip("/")
    conn = aiohttp.TCPConnector(limit=opt.concurrency + 4, force_close=False)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as s:
        model, max_len = await server_model(s, base)
        model = opt.model or model
        prompts = await build_prompts(
            s, base, model, opt.distinct_prompts, opt.min_prompt_tokens, opt.max_prompt_tokens,
            (opt.min_output_tokens, opt.max_output_tokens), opt.seed, max_len,
        )  # fmt: skip
        sizes = [p.tokens for p in prompts if p.tokens]
        if sizes:
            print(f"{len(prompts)} prompts, {min(sizes)}..{max(sizes)} tokens "
                  f"(max_model_len {max_len})", flush=True)  # fmt: skip
        for i in range(opt.warmup):
            await send(s, base, model, prompts[i % len(prompts)], stream=False, timeout=opt.request_timeout_s)
        rss0, gpu0 = host_rss_mib(opt.server_pid), gpu_memory_mib(opt.server_pid)
        rss_samples = [rss0] if rss0 is not None else []
        gpu_samples = [gpu0] if gpu0 is not None else []

        results: list[Result] = []
        t0 = time.perf_counter()
        deadline = t0 + opt.duration_s
        in_flight = [0]

        async def client(cid: int) -> None:
            rng = random.Random(opt.seed * 1_000_003 + cid)
            while time.perf_counter() < deadline:
                p = prompts[rng.randrange(len(prompts))]
                stream = rng.random() < opt.stream_fraction
                cancel = None
                if stream and rng.random() < opt.cancel_fraction:
                    cancel = rng.randint(1, max(1, p.max_tokens // 2))
                in_flight[0] += 1
                r = await send(s, base, model, p, stream=stream, cancel_after=cancel,
                               timeout=opt.request_timeout_s, t0=t0)  # fmt: skip
                in_flight[0] -= 1
                results.append(r)
                if r.status is None and not r.cancelled:
                    await asyncio.sleep(0.5)  # the server is down or hung: do not spin

        async def progress() -> None:
            while True:
                await asyncio.sleep(opt.progress_interval_s)
                k = Counter(r.kind for r in results)
                now = time.perf_counter() - t0
                lat = percentile((r.latency_s for r in results if r.kind == "ok"), 50)
                rss, gpu = host_rss_mib(opt.server_pid), gpu_memory_mib(opt.server_pid)
                if rss is not None:
                    rss_samples.append(rss)
                if gpu is not None:
                    gpu_samples.append(gpu)
                print(
                    f"[{now:6.0f}s] done {len(results)} ok {k['ok']} cancelled {k['cancelled']} "
                    f"server_err {k['server_error']} client_err {k['client_error']} "
                    f"in-flight {in_flight[0]} {k['ok'] / max(now, 1e-9):.1f} req/s "
                    f"p50 {lat if lat is None else round(lat, 3)}s"
                    + ("" if rss is None else f" rss {rss:.0f} MiB"),
                    flush=True,
                )

        ticker = asyncio.create_task(progress())
        try:
            await asyncio.gather(*(client(i) for i in range(opt.concurrency)))
        finally:
            ticker.cancel()
        elapsed = time.perf_counter() - t0
        rss1, gpu1 = host_rss_mib(opt.server_pid), gpu_memory_mib(opt.server_pid)
        graphs = await decode_graph_use(s, base)
        # the load phase's numbers now, in case the solo re-sends below are cut off
        interim = summarize(results, {}, elapsed)
        print(f"load phase: ok {interim['ok']}, server errors {interim['server_errors']}, "
              f"{interim['requests_per_s']:.3f} req/s, latency p50 {interim['p50_latency_s']}s "
              f"p99 {interim['p99_latency_s']}s"
              + ("" if not graphs else f"; {graph_use_text(graphs)}"), flush=True)  # fmt: skip

        # Alone, one at a time: the reference each loaded output must equal.
        used = sorted({r.prompt_id for r in results if r.kind in ("ok", "cancelled")})
        if opt.verify_sample and len(used) > opt.verify_sample:
            used = sorted(random.Random(opt.seed + 2).sample(used, opt.verify_sample))
        print(f"re-sending {len(used)} distinct prompts alone ...", flush=True)
        solo = {}
        for pid in used:
            if opt.solo_deadline is not None and time.monotonic() >= opt.solo_deadline:
                print(f"--deadline: {len(used) - len(solo)} of {len(used)} prompts not re-sent (their "
                      "loaded outputs are not checked)", flush=True)  # fmt: skip
                break
            solo[pid] = await send(s, base, model, prompts[pid], stream=False, timeout=opt.request_timeout_s)
            solo[pid].solo = True
        rss2, gpu2 = host_rss_mib(opt.server_pid), gpu_memory_mib(opt.server_pid)

    summary = summarize(results, solo, elapsed)
    summary.update(memory_growth("host_rss", rss_samples, rss1, rss2))
    summary.update(memory_growth("gpu_memory", gpu_samples, gpu1, gpu2))
    summary["prompt_tokens"] = [p.tokens for p in prompts]
    summary["decode_graphs"] = graphs
    summary["unverified_prompts"] = len(used) - len(solo)
    summary["results"] = results
    summary["solo"] = solo
    return summary


async def decode_graph_use(session: aiohttp.ClientSession, base: str) -> dict[str, float] | None:
    """INFINITEHIP's decode-graph counters from ``/metrics`` after the load (warm-up included):
    layer steps replayed, graphs captured, decode layer steps in all; None for other backends
    or without metrics."""
    try:
        async with session.get(f"{base}/metrics", timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status != 200:
                return None
            text = await resp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    from metrics_records import series_sums  # this folder's; prometheus-client comes with vLLM

    sums = series_sums(text)
    if "mask_cache_queries" not in sums:
        return None
    return {"replays": sums.get("decode_graph_replays", 0.0), "captures": sums.get("decode_graph_captures", 0.0),
            "decode_layer_steps": sums["mask_cache_queries"]}  # fmt: skip


def graph_use_text(g: dict[str, float]) -> str:
    return (f"decode graphs: {g['replays']:.0f} of {g['decode_layer_steps']:.0f} decode layer steps "
            f"replayed, {g['captures']:.0f} captures")  # fmt: skip


def print_summary(backend: str, s: dict[str, Any]) -> None:
    def f(x: Any) -> str:
        return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))

    print(f"\n== {backend}: {s['requests']} requests in {s['elapsed_s']:.0f}s: ok {s['ok']}, "
          f"cancelled {s['cancelled']}, server errors {s['server_errors']}, client errors "
          f"{s['client_errors']}, output mismatches {s['output_mismatches']} "
          f"({s['mismatched_prompts']} prompts; {s['verified_requests']} requests verified)")  # fmt: skip
    print(f"   {f(s['requests_per_s'])} req/s, {f(s['output_tokens_per_s'])} output tok/s, latency p50 "
          f"{f(s['p50_latency_s'])}s p99 {f(s['p99_latency_s'])}s, TTFT p50 {f(s['p50_ttft_s'])}s "
          f"p99 {f(s['p99_ttft_s'])}s, host RSS growth {f(s.get('host_rss_growth_mib'))} MiB, "
          f"GPU memory growth {f(s.get('gpu_memory_growth_mib'))} MiB")  # fmt: skip
    if s.get("decode_graphs"):
        print("  ", graph_use_text(s["decode_graphs"]))
    if s.get("unverified_prompts"):
        print(f"   {s['unverified_prompts']} prompts not re-sent alone (--deadline): their outputs are unchecked")
    for e in s["error_examples"][:5]:
        print("   error:", e)
    for m in s["mismatch_examples"][:3]:
        print(f"   mismatch prompt {m['prompt_id']}: loaded {m['loaded'][:80]!r}\n"
              f"{' ' * 22}solo   {m['solo'][:80]!r}")  # fmt: skip


def write_json(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="server to load (without --launch)")
    ap.add_argument("--model", default=os.environ.get("SMOLLM2"),
                    help="--launch: model to serve; otherwise the served name (default: the first of /v1/models)")
    ap.add_argument("--backend", default="server", help="label of the backend in the records (without --launch)")
    ap.add_argument("--launch", action="store_true", help="start `vllm serve` for each of --backends in turn")
    ap.add_argument("--backends", default="INFINITEHIP,FLASH_ATTN")
    ap.add_argument("--server-args", default="--max-model-len 8192 --gpu-memory-utilization 0.7",
                    help="extra `vllm serve` arguments (one string)")
    ap.add_argument("--serve-cmd", default=DEFAULT_SERVE_CMD, help="command that serves MODEL")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--log-dir", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--server-pid", type=int, default=None,
                    help="server pid for memory sampling (without --launch)")  # fmt: skip
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=300)
    ap.add_argument("--min-prompt-tokens", type=int, default=100)
    ap.add_argument("--max-prompt-tokens", type=int, default=6000)
    ap.add_argument("--min-output-tokens", type=int, default=16)
    ap.add_argument("--max-output-tokens", type=int, default=32)
    ap.add_argument("--distinct-prompts", type=int, default=48)
    ap.add_argument("--stream-fraction", type=float, default=0.5)
    ap.add_argument("--cancel-fraction", type=float, default=0.1, help="of streams, hung up on mid-way")
    ap.add_argument("--verify-sample", type=int, default=0, help="distinct prompts re-sent alone (0: all)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds from a backend's start (its server launch) after which no prompt is "
                         "re-sent alone, so its records are written before an outer time limit; prompts "
                         "not re-sent stay unverified and are counted")
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--progress-interval", type=float, default=10)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="device name in the records (default: nvidia-smi)")
    ap.add_argument("--note", default=None, help="note added to every record (e.g. how the GPU was shared)")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="--launch: serve with VLLM_BATCH_INVARIANT=1 (outputs must not depend on the "
                         "batch); otherwise: record that the server runs so")  # fmt: skip
    ap.add_argument("--out", default=None, help="JSON records")
    ap.add_argument("--details", default=None, help="JSON of every request (per backend), for debugging")
    args = ap.parse_args(argv)
    if args.launch and not args.model:
        ap.error("--launch needs --model (or $SMOLLM2)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/load_test.py " + shlex.join(argv)
    device = args.device or device_name()
    backends = args.backends.split(",") if args.launch else [args.backend]
    records: list[dict] = []
    worst = 0
    for backend in backends:
        started = time.monotonic()  # --deadline counts from here, per backend
        proc = None
        base = args.base_url
        try:
            if args.launch:
                base = f"http://127.0.0.1:{args.port}"
                log = os.path.join(args.log_dir, f"load_serve_{backend}.log")
                proc = launch_server(args.model, backend, args.port, shlex.split(args.server_args),
                                     log, args.serve_cmd,
                                     {"VLLM_BATCH_INVARIANT": "1"} if args.batch_invariant else None)  # fmt: skip
                t = time.time()
                wait_healthy(base, proc, args.startup_timeout)
                print(f"{backend}: healthy after {time.time() - t:.0f}s", flush=True)
            opt = LoadOptions(
                base_url=base, model=None if args.launch else args.model,
                concurrency=args.concurrency, duration_s=args.duration,
                min_prompt_tokens=args.min_prompt_tokens, max_prompt_tokens=args.max_prompt_tokens,
                min_output_tokens=args.min_output_tokens, max_output_tokens=args.max_output_tokens,
                distinct_prompts=args.distinct_prompts, stream_fraction=args.stream_fraction,
                cancel_fraction=args.cancel_fraction, verify_sample=args.verify_sample,
                solo_deadline=None if args.deadline is None else started + args.deadline,
                request_timeout_s=args.request_timeout, progress_interval_s=args.progress_interval,
                warmup=args.warmup, seed=args.seed,
                server_pid=proc.pid if proc is not None else args.server_pid,
            )  # fmt: skip
            summary = asyncio.run(run_load(opt))
            alive = http_status(f"{base}/health") == 200
        except Exception as e:  # noqa: BLE001 - no server, or it died before the run could start
            print(f"{backend}: run failed: {type(e).__name__}: {e}", flush=True)
            records.append({"metric": "server_errors", "backend": backend, "context_tokens": 0,
                            "value": 1, "unit": "count", "device": device, "command": command,
                            "examples": [f"run failed: {type(e).__name__}: {e}"]})  # fmt: skip
            worst = 1
            if args.out:
                write_json(args.out, records)
            continue
        finally:
            if proc is not None:
                stop_server(proc)
        print_summary(backend, summary)
        if not alive:
            print("   /health is not 200 after the run: the server is down", flush=True)
            summary["server_errors"] += 1
            summary["error_examples"].insert(0, "/health not 200 after the run")
        extra = {"concurrency": args.concurrency, "duration_s": args.duration,
                 "max_prompt_tokens": args.max_prompt_tokens, "stream_fraction": args.stream_fraction,
                 "cancel_fraction": args.cancel_fraction, "healthy_after": alive,
                 "batch_invariant": args.batch_invariant}  # fmt: skip
        if args.note:
            extra["note"] = args.note
        ctx = summary["max_prompt_tokens"] or max((t for t in summary["prompt_tokens"] if t), default=0)
        records += make_records(summary, backend=backend, context_tokens=int(ctx), device=device,
                                command=command, extra=extra)  # fmt: skip
        if args.details:
            root, ext = os.path.splitext(args.details)
            write_json(f"{root}_{backend}{ext or '.json'}", [
                {**asdict(r), "kind": r.kind} for r in summary["results"] + list(summary["solo"].values())
            ])  # fmt: skip
        if summary["server_errors"]:
            worst = 1
        elif summary["output_mismatches"] and worst == 0:
            worst = 2
        if args.out:  # after every backend, so a crash later keeps what was measured
            write_json(args.out, records)
    return worst


if __name__ == "__main__":
    sys.exit(main())
