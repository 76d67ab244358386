"""CPU tests of benchmarks/load_test.py and benchmarks/fault_test.py against a fake server.

The fake speaks the part of vLLM's OpenAI-compatible API the tools use (``/health``, ``/v1/models``,
``/tokenize``, ``/v1/completions`` plain and streaming, ``/metrics``), answers deterministically
(one whitespace word = one token) and injects faults on demand, counting what it injected, so the
tests can check that the tools count exactly that. Run as a script
(``python tests/test_load_tools.py MODEL --port P ...``) it serves on its own: that is how the
tools' ``--launch`` mode is tested.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import shlex
import socket
import sys
import threading
from dataclasses import dataclass, field

import pytest
from aiohttp import web

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
import fault_test  # noqa: E402
import load_test  # noqa: E402
from load_test import Result, percentile, summarize  # noqa: E402

VOCAB = 50_000
RECORD_KEYS = {"metric", "backend", "context_tokens", "value", "unit", "device", "command"}


# ------------------------------------------------------------------------------------ fake server
@dataclass
class Faults:
    fail_every: int = 0
    """Every k-th valid completion answers 500."""
    truncate_every: int = 0
    """Every k-th valid stream ends after its first chunk, without [DONE]."""
    drift: bool = False
    """Outputs change while another completion is in flight (a batch-dependent server)."""
    leak_on_disconnect: bool = False
    """A request whose client left stays counted as running forever."""
    too_long_status: int = 400
    die_on_empty: bool = False
    """An empty prompt kills the server: /health 503, every completion 500."""
    token_delay: float = 0.0
    capacity_tokens: int = 10**9
    """KV capacity: a request admitted beyond it counts as a preemption."""


@dataclass
class Injected:
    completions: int = 0
    http_500: int = 0
    truncated: int = 0
    drifted: int = 0
    """Drifted responses delivered in full."""
    running: int = 0
    resident: int = 0
    preemptions: int = 0
    ignore_eos: int = 0
    """Requests that asked to generate past EOS."""
    dead: bool = False
    prompt_lens: list[int] = field(default_factory=list)


def _err(status: int, message: str) -> web.Response:
    err = {"message": message, "type": "BadRequestError", "code": status}
    return web.json_response({"error": err}, status=status)


class FakeServer:
    def __init__(self, faults: Faults | None = None, max_model_len: int = 512, model: str = "fake-model",
                 hip_counters: dict[str, int] | None = None):  # fmt: skip
        self.faults = faults or Faults()
        self.hip_counters = hip_counters or {}
        """INFINITEHIP counters its /metrics exports (name without prefix and _total: value)."""
        self.max_model_len = max_model_len
        self.model = model
        self.n = Injected()
        self.port = 0

    # -- API
    async def health(self, _req):
        return web.Response(status=503 if self.n.dead else 200)

    async def models(self, _req):
        card = {"id": self.model, "max_model_len": self.max_model_len}
        return web.json_response({"object": "list", "data": [card]})

    async def tokenize(self, req):
        body = await req.json()
        toks = body["prompt"].split()
        return web.json_response(
            {"count": len(toks), "max_model_len": self.max_model_len, "tokens": list(range(len(toks)))}
        )

    async def metrics(self, _req):
        return web.Response(text=(
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{self.model}"}} {self.n.running}\n'
            f'vllm:num_requests_waiting{{model_name="{self.model}"}} 0\n'
            f'vllm:num_preemptions_total{{model_name="{self.model}"}} {self.n.preemptions}\n'
            + "".join(f"# TYPE vllm:infinitehip_{k}_total counter\n"
                      f'vllm:infinitehip_{k}_total{{model_name="{self.model}",engine="0"}} {v}\n'
                      for k, v in self.hip_counters.items())
        ))  # fmt: skip

    def output(self, prompt, n: int, drift: bool) -> list[str]:
        h = hashlib.sha256(json.dumps(prompt).encode()).digest()
        toks = [f" w{(h[i % 32] + 7 * i) % 97}" for i in range(n)]
        if drift:
            toks[0] = " DRIFT"
        return toks

    async def completions(self, req: web.Request):
        f = self.faults
        if self.n.dead:
            return _err(500, "engine dead")
        try:
            body = json.loads(await req.text())
        except ValueError:
            return _err(400, "JSON decode error")
        if not isinstance(body, dict):
            return _err(400, "body must be an object")
        if body.get("model") != self.model:
            return _err(404, f"The model `{body.get('model')}` does not exist.")
        for key, bad in (("temperature", lambda v: v < 0), ("top_p", lambda v: not 0 < v <= 1),
                         ("max_tokens", lambda v: v < 1), ("n", lambda v: v < 1)):  # fmt: skip
            if key in body and bad(body[key]):
                return _err(400, f"{key} is invalid")
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            if any(t < 0 for t in prompt):
                return _err(400, "token ids must be >= 0")
            if any(t >= VOCAB for t in prompt):
                return _err(400, f"Token id {max(prompt)} is out of vocabulary")
            plen = len(prompt)
        else:
            plen = len(str(prompt).split())
        if plen == 0:
            if f.die_on_empty:
                self.n.dead = True
                return _err(500, "engine died")
            return _err(400, "The decoder prompt cannot be empty")
        if plen > self.max_model_len:
            return _err(f.too_long_status, f"The decoder prompt (length {plen}) is longer than the "
                        f"maximum model length of {self.max_model_len}.")  # fmt: skip
        self.n.completions += 1
        if f.fail_every and self.n.completions % f.fail_every == 0:
            self.n.http_500 += 1
            return _err(500, "injected failure")
        self.n.prompt_lens.append(plen)
        self.n.ignore_eos += bool(body.get("ignore_eos"))
        n = max(min(body.get("max_tokens", 16), self.max_model_len - plen), 1)
        drift = f.drift and self.n.running > 0
        toks = self.output(prompt, n, drift)
        self.n.running += 1
        self.n.resident += plen + n
        if self.n.resident > f.capacity_tokens:
            self.n.preemptions += 1
        leaked = False
        try:
            if body.get("stream"):
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await resp.prepare(req)
                truncate = f.truncate_every and self.n.completions % f.truncate_every == 0
                try:
                    for i, t in enumerate(toks):
                        await asyncio.sleep(f.token_delay)
                        last = i == len(toks) - 1
                        choice = {"index": 0, "text": t, "finish_reason": "length" if last else None}
                        chunk = {"choices": [choice]}
                        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        if truncate:
                            self.n.truncated += 1
                            return resp
                    if (body.get("stream_options") or {}).get("include_usage"):
                        usage = {"prompt_tokens": plen, "completion_tokens": n, "total_tokens": plen + n}
                        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
                    await resp.write(b"data: [DONE]\n\n")
                except (ConnectionError, RuntimeError):
                    leaked = f.leak_on_disconnect
                    raise
                self.n.drifted += int(drift)
                return resp
            await asyncio.sleep(f.token_delay * n)
            if req.transport is None or req.transport.is_closing():
                leaked = f.leak_on_disconnect
            self.n.drifted += int(drift)
            return web.json_response({
                "choices": [{"index": 0, "text": "".join(toks), "finish_reason": "length"}],
                "usage": {"prompt_tokens": plen, "completion_tokens": n, "total_tokens": plen + n},
            })  # fmt: skip
        finally:
            self.n.resident -= plen + n
            if not leaked:
                self.n.running -= 1

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([
            web.get("/health", self.health), web.get("/v1/models", self.models),
            web.post("/tokenize", self.tokenize), web.get("/metrics", self.metrics),
            web.post("/v1/completions", self.completions),
        ])  # fmt: skip
        return app

    # -- in a thread of the test process
    def __enter__(self) -> "FakeServer":
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.runner = web.AppRunner(self.app(), access_log=None)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = self.runner.addresses[0][1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _serve_main(argv: list[str]) -> None:
    # `python tests/test_load_tools.py MODEL --host H --port P [vllm serve flags...]`
    port = int(argv[argv.index("--port") + 1])
    print("fake serve", shlex.join(argv), "VLLM_BATCH_INVARIANT=" + os.environ.get("VLLM_BATCH_INVARIANT", ""),
          flush=True)  # fmt: skip
    fake = FakeServer(Faults(token_delay=0.001, die_on_empty="--fake-die-on-empty" in argv), model=argv[0])
    web.run_app(fake.app(), host="127.0.0.1", port=port, access_log=None, print=None)


# ------------------------------------------------------------------------------------ helpers
def _load_args(url: str, out: str, *extra: str) -> list[str]:
    return ["--base-url", url, "--backend", "FAKE", "--duration", "1.5", "--concurrency", "8",
            "--min-prompt-tokens", "20", "--max-prompt-tokens", "300", "--min-output-tokens", "4",
            "--max-output-tokens", "8", "--distinct-prompts", "6", "--progress-interval", "0.5",
            "--device", "test-cpu", "--warmup", "0", "--out", out, *extra]  # fmt: skip


def _records(path: str) -> dict[tuple[str, str], dict]:
    with open(path) as f:
        recs = json.load(f)
    assert isinstance(recs, list) and recs
    for r in recs:
        assert RECORD_KEYS <= set(r), r
        assert isinstance(r["value"], (int, float)) and isinstance(r["context_tokens"], int)
        assert r["command"].startswith("python benchmarks/")
    return {(r["backend"], r["metric"] + ("/" + r["fault"] if "fault" in r else "")): r for r in recs}


# ------------------------------------------------------------------------------------ statistics
def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 101, 1000):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
            assert math.isclose(percentile(xs, q), float(np.percentile(xs, q)), rel_tol=1e-12, abs_tol=1e-15)
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0], 50) == 1.5


def _r(pid, kind, text="", stream=False, latency=1.0, ttft=None, tokens=0, **kw) -> Result:
    r = Result(pid, stream, None, latency_s=latency, ttft_s=ttft, text=text, output_tokens=tokens)
    if kind == "ok":
        r.status, r.complete = 200, True
    elif kind == "cancelled":
        r.status, r.cancelled = 200, True
    elif kind == "truncated":
        r.status, r.error = 200, "stream ended without [DONE]"
    elif kind == "event":
        r.status, r.error, r.complete = 200, "stream error event: boom", False
    elif kind == "reset":
        r.error = "ClientOSError: reset"
    else:
        r.status, r.error = int(kind), "nope"
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_summary_counts_every_kind_of_failure():
    solo = {0: _r(0, "ok", "abc"), 1: _r(1, "ok", "xyz"), 2: _r(2, "500")}
    results = [
        _r(0, "ok", "abc", latency=1.0, tokens=3),
        _r(0, "ok", "abc", stream=True, latency=2.0, ttft=0.1, tokens=3),
        _r(0, "ok", "abX", latency=3.0, tokens=3),  # mismatch
        _r(1, "ok", "xyz", stream=True, latency=4.0, ttft=0.3, tokens=3),
        _r(1, "cancelled", "xy", stream=True),  # a prefix of the solo output: fine
        _r(1, "cancelled", "q", stream=True),  # not a prefix: partial mismatch
        _r(2, "ok", "zzz", latency=5.0, tokens=3),  # no reference (solo failed): unverified
        _r(0, "500"), _r(0, "503"), _r(1, "reset"), _r(1, "truncated", stream=True),
        _r(1, "event", stream=True), _r(0, "400"), _r(0, "404"),
        _r(1, "cancelled", "", stream=True, error="ClientOSError: reset"),  # error before hanging up
    ]  # fmt: skip
    s = summarize(results, solo, elapsed_s=10.0)
    assert (s["ok"], s["cancelled"], s["client_errors"]) == (5, 2, 2)
    assert s["server_errors"] == 6 + 1 and s["solo_errors"] == 1  # 5 in the load + 1 reset-cancel, + solo
    assert (s["full_mismatches"], s["partial_mismatches"], s["output_mismatches"]) == (1, 1, 2)
    assert s["mismatched_prompts"] == 2 and s["verified_requests"] == 4 and s["verified_prompts"] == 2
    assert s["requests_per_s"] == 0.5 and s["output_tokens_per_s"] == 1.5
    assert s["p50_latency_s"] == 3.0 and math.isclose(s["p99_latency_s"], 4.96)
    assert math.isclose(s["p50_ttft_s"], 0.2) and math.isclose(s["p99_ttft_s"], 0.298)
    assert len(s["error_examples"]) == 7 and "HTTP 500" in s["error_examples"][0]


def test_records_have_the_project_format():
    s = summarize([_r(0, "ok", "a", latency=0.5, tokens=1)], {0: _r(0, "ok", "a")}, 1.0)
    s["host_rss_growth_mib"] = 3.5
    recs = load_test.make_records(s, backend="B", context_tokens=100, device="d", command="python benchmarks/x",
                                  extra={"concurrency": 2})  # fmt: skip
    metrics = [r["metric"] for r in recs]
    # TTFT needs streams and GPU memory needs nvidia-smi: absent values leave their records out.
    assert metrics == ["server_errors", "output_mismatches", "client_errors", "requests_per_s",
                       "output_tokens_per_s", "p50_latency_s", "p99_latency_s", "host_rss_growth_mib"]  # fmt: skip
    assert all(RECORD_KEYS <= set(r) and r["backend"] == "B" and r["concurrency"] == 2 for r in recs)
    json.dumps(recs)


def test_memory_growth_tells_a_leak_from_warm_up():
    # Warm-up: a step early on, then flat under load (and a step when the batch shrinks at the end).
    warm = load_test.memory_growth("gpu_memory", [100.0, 140.0, 140.0, 140.0, 140.0, 140.0], 150.0, 150.0)
    assert warm["gpu_memory_growth_mib"] == 50.0 and warm["gpu_memory_growth_second_half_mib"] == 0.0
    assert warm["gpu_memory_mib"]["after_solo"] == 150.0 and warm["gpu_memory_mib"]["max"] == 150.0
    leak = load_test.memory_growth("host_rss", [100.0, 110.0, 120.0, 130.0, 140.0, 150.0], 155.0, None)
    assert leak["host_rss_growth_second_half_mib"] == 150.0 - 130.0
    assert "host_rss_growth_second_half_mib" not in load_test.memory_growth("host_rss", [1.0, 2.0], 3.0, 3.0)
    assert load_test.memory_growth("host_rss", [], 3.0, 3.0) == {}
    assert load_test.memory_growth("host_rss", [1.0], None, None) == {}


# ------------------------------------------------------------------------------------ load tool
def test_load_against_a_clean_server(tmp_path):
    out = str(tmp_path / "load.json")
    with FakeServer(Faults(token_delay=0.001)) as fake:
        args = _load_args(fake.url, out, "--cancel-fraction", "0.4", "--details", str(tmp_path / "d.json"))
        rc = load_test.main(args)
    recs = _records(out)
    assert rc == 0
    assert recs[("FAKE", "server_errors")]["value"] == 0
    assert recs[("FAKE", "output_mismatches")]["value"] == 0
    assert recs[("FAKE", "client_errors")]["value"] == 0
    se = recs[("FAKE", "server_errors")]
    assert se["verified_requests"] > 0 and se["cancelled"] > 0 and se["ok"] > 6  # prompts repeat
    assert recs[("FAKE", "requests_per_s")]["value"] > 0 and recs[("FAKE", "p50_ttft_s")]["value"] > 0
    assert recs[("FAKE", "p50_latency_s")]["value"] <= recs[("FAKE", "p99_latency_s")]["value"]
    # Prompts span the requested range and never exceed what the server accepts.
    assert max(fake.n.prompt_lens) <= 300 and min(fake.n.prompt_lens) <= 40
    assert recs[("FAKE", "server_errors")]["context_tokens"] == max(fake.n.prompt_lens)
    details = json.load(open(tmp_path / "d_FAKE.json"))
    assert len(details) == se["requests"] + se["verified_prompts"]
    assert fake.n.running == 0  # cancelled streams were closed, not left open


def test_load_records_how_much_decode_replayed_graphs(tmp_path, capsys):
    out = str(tmp_path / "load.json")
    counters = {"decode_graph_replays": 300, "decode_graph_captures": 12, "mask_cache_queries": 400}
    with FakeServer(Faults(token_delay=0.001), hip_counters=counters) as fake:
        assert load_test.main(_load_args(fake.url, out)) == 0
    # also printed when the load phase ends, before the solo re-sends (a cut-off run keeps it)
    assert "decode graphs: 300 of 400 decode layer steps replayed, 12 captures" in capsys.readouterr().out
    rec = _records(out)[("FAKE", "decode_graph_replay_fraction")]
    assert rec["value"] == 0.75 and (rec["replays"], rec["captures"], rec["decode_layer_steps"]) == (300, 12, 400)
    assert RECORD_KEYS <= set(rec)
    with FakeServer(Faults(token_delay=0.001)) as fake:  # another backend: no record
        assert load_test.main(_load_args(fake.url, out)) == 0
    assert ("FAKE", "decode_graph_replay_fraction") not in _records(out)


def test_a_deadline_stops_the_solo_resends_and_still_writes_records(tmp_path, capsys):
    out = str(tmp_path / "load.json")
    with FakeServer(Faults(token_delay=0.001)) as fake:
        # a deadline already past when the load ends: nothing is re-sent alone
        assert load_test.main(_load_args(fake.url, out, "--deadline", "0.5")) == 0
    rec = _records(out)[("FAKE", "server_errors")]
    assert rec["verified_prompts"] == 0 and rec["verified_requests"] == 0
    assert rec["unverified_prompts"] > 0 and rec["ok"] > 0
    assert "prompts not re-sent alone (--deadline)" in capsys.readouterr().out


def test_load_counts_injected_server_errors_exactly(tmp_path):
    out = str(tmp_path / "load.json")
    with FakeServer(Faults(fail_every=5, truncate_every=4, token_delay=0.001)) as fake:
        rc = load_test.main(_load_args(fake.url, out, "--cancel-fraction", "0"))
    recs = _records(out)
    injected = fake.n.http_500 + fake.n.truncated
    assert fake.n.http_500 > 0 and fake.n.truncated > 0
    assert recs[("FAKE", "server_errors")]["value"] == injected
    assert recs[("FAKE", "server_errors")]["examples"]
    assert recs[("FAKE", "output_mismatches")]["value"] == 0
    assert rc == 1


def test_load_counts_batch_dependent_outputs_as_mismatches(tmp_path):
    out = str(tmp_path / "load.json")
    with FakeServer(Faults(drift=True, token_delay=0.002)) as fake:
        rc = load_test.main(_load_args(fake.url, out, "--cancel-fraction", "0"))
    recs = _records(out)
    m = recs[("FAKE", "output_mismatches")]
    assert fake.n.drifted > 0 and m["value"] == fake.n.drifted
    assert m["examples"][0]["loaded"].startswith(" DRIFT") and not m["examples"][0]["solo"].startswith(" DRIFT")
    assert recs[("FAKE", "server_errors")]["value"] == 0
    assert rc == 2


def test_load_counts_a_dead_server(tmp_path):
    # Nothing listens on the port: one failure record, no crash.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "load.json")
    rc = load_test.main(_load_args(f"http://127.0.0.1:{port}", out))
    assert rc == 1 and _records(out)[("FAKE", "server_errors")]["value"] == 1


def test_launch_mode_serves_each_backend_in_turn(tmp_path):
    out = str(tmp_path / "load.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = f"{shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(__file__))}"
    args = _load_args("", out, "--launch", "--serve-cmd", serve, "--model", "fake-model",
                      "--backends", "A,B", "--port", str(port), "--server-args", "--max-model-len 512",
                      "--log-dir", str(tmp_path), "--startup-timeout", "60", "--duration", "1",
                      "--batch-invariant")  # fmt: skip
    assert load_test.main(args) == 0
    recs = _records(out)
    for b in ("A", "B"):
        assert recs[(b, "server_errors")]["value"] == 0 and recs[(b, "requests_per_s")]["value"] > 0
        log = open(tmp_path / f"load_serve_{b}.log").read()
        assert f"--attention-backend {b} --max-model-len 512" in log
        assert "VLLM_BATCH_INVARIANT=1" in log and recs[(b, "server_errors")]["batch_invariant"] is True
        assert (b, "host_rss_growth_mib") in recs  # the launched process tree was sampled
    assert load_test.http_status(f"http://127.0.0.1:{port}/health", 2) is None  # stopped


# ------------------------------------------------------------------------------------ fault tool
def _fault_args(url: str, out: str, *extra: str) -> list[str]:
    return ["--base-url", url, "--backend", "FAKE", "--device", "test-cpu", "--drain-timeout", "2",
            "--pressure-requests", "12", "--pressure-prompt-tokens", "120", "--pressure-new-tokens", "32",
            "--out", out, *extra]  # fmt: skip


def test_faults_all_pass_on_a_well_behaved_server(tmp_path):
    out = str(tmp_path / "faults.json")
    with FakeServer(Faults(token_delay=0.002, capacity_tokens=600)) as fake:
        rc = fault_test.main(_fault_args(fake.url, out))
    recs = _records(out)
    passed = {k[1].split("/", 1)[1]: r for k, r in recs.items() if k[1].startswith("fault_passed/")}
    assert set(passed) == set(fault_test.FAULTS)
    observed = {k: r["observed"] for k, r in passed.items()}
    assert all(r["value"] == 1 and r["alive"] for r in passed.values()), observed
    assert recs[("FAKE", "faults_failed")]["value"] == 0 and rc == 0
    assert recs[("FAKE", "server_errors")]["value"] == 0
    assert observed["too_long_prompt"].startswith("400: ") and "longer than" in observed["too_long_prompt"]
    assert fake.n.preemptions > 0 and "preemptions 0" not in passed["kv_pressure"]["observed"]
    # the burst and its solo re-sends grow in decode (past EOS): that is what preempts in vLLM
    assert fake.n.ignore_eos == 12 + 6  # the 12 of the burst and 6 solo re-sends
    assert fake.n.running == 0


@pytest.mark.parametrize("invariant", [False, True])
def test_kv_pressure_outputs_must_equal_alone_only_in_batch_invariant_mode(tmp_path, invariant):
    """A batch-dependent server (outputs change while other requests run): outside
    batch-invariant mode the burst's differing outputs are reported, as vLLM promises no more;
    with --batch-invariant they fail the fault."""
    out = str(tmp_path / "faults.json")
    extra = ["--faults", "kv_pressure"] + (["--batch-invariant"] if invariant else [])
    with FakeServer(Faults(drift=True, token_delay=0.002, capacity_tokens=600)) as fake:
        rc = fault_test.main(_fault_args(fake.url, out, *extra))
    recs = _records(out)
    kv = recs[("FAKE", "fault_passed/kv_pressure")]
    assert recs[("FAKE", "output_mismatches")]["value"] > 0 and fake.n.preemptions > 0
    assert kv["value"] == (0 if invariant else 1) and rc == (1 if invariant else 0)
    assert ("not batch-invariant: expected" in kv["observed"]) == (not invariant)


def test_faults_detect_a_5xx_refusal_and_a_leaked_request(tmp_path):
    out = str(tmp_path / "faults.json")
    with FakeServer(Faults(too_long_status=500, leak_on_disconnect=True, token_delay=0.005)) as fake:
        rc = fault_test.main(_fault_args(fake.url, out, "--faults",
                                         "too_long_prompt,bad_sampling_params,disconnect_mid_stream"))  # fmt: skip
    recs = _records(out)
    assert rc == 1
    assert recs[("FAKE", "fault_passed/too_long_prompt")]["value"] == 0
    assert recs[("FAKE", "fault_passed/too_long_prompt")]["observed"].startswith("500")
    assert recs[("FAKE", "fault_passed/bad_sampling_params")]["value"] == 1
    leak = recs[("FAKE", "fault_passed/disconnect_mid_stream")]
    assert leak["value"] == 0 and "still running" in leak["observed"] and fake.n.running > 0
    assert recs[("FAKE", "faults_failed")]["value"] == 2 and recs[("FAKE", "server_errors")]["value"] >= 1


def test_faults_stop_when_the_server_dies(tmp_path):
    out = str(tmp_path / "faults.json")
    with FakeServer(Faults(die_on_empty=True)) as fake:
        faults = "one_token_prompt,empty_prompt,bad_token_ids"
        rc = fault_test.main(_fault_args(fake.url, out, "--faults", faults))
    recs = _records(out)
    assert rc == 1
    assert recs[("FAKE", "fault_passed/one_token_prompt")]["value"] == 1
    dead = recs[("FAKE", "fault_passed/empty_prompt")]
    assert dead["value"] == 0 and not dead["alive"] and "/health 503" in dead["alive_detail"]
    after = recs[("FAKE", "fault_passed/bad_token_ids")]
    assert after["value"] == 0 and after["observed"] == "not run: server down"


def test_fault_launch_mode_restarts_a_server_that_died(tmp_path):
    out = str(tmp_path / "faults.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = f"{shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(__file__))}"
    rc = fault_test.main([
        "--launch", "--serve-cmd", serve, "--model", "fake-model", "--backends", "X", "--port", str(port),
        "--server-args", "--max-model-len 512 --fake-die-on-empty", "--log-dir", str(tmp_path),
        "--faults", "empty_prompt,one_token_prompt", "--device", "test-cpu", "--out", out,
    ])  # fmt: skip
    recs = _records(out)
    assert rc == 1
    assert recs[("X", "fault_passed/empty_prompt")]["value"] == 0
    assert recs[("X", "fault_passed/one_token_prompt")]["value"] == 1  # on a fresh server
    assert any("restarted" in n for n in recs[("X", "faults_failed")]["notes"])
    assert os.path.exists(tmp_path / "fault_serve_X_2.log")
    assert load_test.http_status(f"http://127.0.0.1:{port}/health", 2) is None


if __name__ == "__main__":
    _serve_main(sys.argv[1:])
