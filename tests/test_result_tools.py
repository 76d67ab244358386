"""The scripts that turn saved GPU-run artifacts into benchmark records (no GPU, no server)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import compare_outputs, metrics_records  # noqa: E402

SCRAPE = """\
# HELP vllm:infinitehip_mask_cache_queries_total Decode query blocks that looked up the mask cache.
# TYPE vllm:infinitehip_mask_cache_queries_total counter
vllm:infinitehip_mask_cache_queries_total{engine="0",model_name="m"} 80.0
vllm:infinitehip_mask_cache_queries_total{engine="1",model_name="m"} 20.0
vllm:infinitehip_mask_cache_queries_created{engine="0",model_name="m"} 1.7e+09
# HELP vllm:infinitehip_mask_cache_hits_total Hits.
# TYPE vllm:infinitehip_mask_cache_hits_total counter
vllm:infinitehip_mask_cache_hits_total{engine="0",model_name="m"} 60.0
vllm:infinitehip_mask_cache_hits_total{engine="1",model_name="m"} 15.0
# HELP vllm:infinitehip_attn_cache_queries_total Rows read.
# TYPE vllm:infinitehip_attn_cache_queries_total counter
vllm:infinitehip_attn_cache_queries_total{engine="0",model_name="m"} 0.0
# HELP vllm:infinitehip_h2d_bytes_total Bytes.
# TYPE vllm:infinitehip_h2d_bytes_total counter
vllm:infinitehip_h2d_bytes_total{engine="0",model_name="m"} 4096.0
# HELP vllm:num_requests_running Running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
"""


def test_metrics_records_divide_summed_counter_pairs():
    recs = metrics_records.records_from_scrape(SCRAPE, backend="B", device="D", command="c")
    by = {(r["metric"], r.get("cache")): r for r in recs}
    mask = by[("cache_hit_rate", "mask")]
    assert mask["value"] == 0.75 and mask["hits"] == 75 and mask["queries"] == 100  # both engines
    assert ("cache_hit_rate", "attention") not in by  # never queried: no rate, not 0%
    assert by[("h2d_bytes", None)]["value"] == 4096
    for r in recs:
        assert {"metric", "backend", "context_tokens", "value", "unit", "device", "command"} <= set(r)


def test_compare_outputs_counts_every_pair_and_keeps_irreproducible_runs(tmp_path, capsys):
    a = {"A": {"x": "1", "y": "2"}, "B": {"x": "1", "y": "3"}}
    b = {"A": {"x": "1", "y": "2"}, "C": {"x": "9"}}
    c = {"A": {"x": "0", "y": "2"}}  # A again, with different outputs
    paths = []
    for i, d in enumerate((a, b, c)):
        p = tmp_path / f"o{i}.json"
        p.write_text(json.dumps(d))
        paths.append(str(p))
    out = tmp_path / "pairs.json"
    assert compare_outputs.main([*paths, "--device", "D", "--out", str(out)]) == 0
    recs = {(r["reference_backend"], r["backend"]): r["value"] for r in json.loads(out.read_text())}
    assert recs[("A", "B")] == 1
    assert recs[("A", "C")] == 2  # y missing on one side counts too
    assert recs[("A", "A#2")] == 1
    assert len(recs) == 6  # 4 runs, every pair once
    assert "A#2" in capsys.readouterr().out


def test_offload_records_rates_ratios_and_plot(tmp_path):
    from benchmarks import offload

    hip = [
        dict(context=131072, prefill_s=40.0, decode_tokens_per_s=30.0, decode_tokens=48,
             attn_cache_queries=1000, attn_cache_hits=990, mask_cache_queries=100, mask_cache_hits=75,
             mask_estimation_cache_queries=400, mask_estimation_cache_hits=100,
             kv_gpu_bytes=1 << 30, dense_kv_bytes=8 << 30),
        dict(context=1048576, error="not reached (worker exit: timeout)"),
        dict(context=2097152, prefill_s=90.0, decode_tokens_per_s=10.0, decode_tokens=48,
             decode_step_ms_p50=90.0, decode_step_ms_p90=150.0, decode_step_ms_max=170.0,
             dense_kv_bytes=128 << 30),
    ]
    fa = [dict(context=131072, prefill_s=20.0, decode_tokens_per_s=20.0, decode_tokens=48,
               dense_kv_bytes=8 << 30),
          dict(context=262144, prefill_s=50.0, decode_tokens_per_s=5.0, decode_tokens=48,
               dense_kv_bytes=16 << 30)]
    recs = offload.records_from("INFINITEHIP", hip, "D", "c", "llama-3.1-8b")
    recs += offload.records_from("FLASH_ATTN", fa, "D", "c", "llama-3.1-8b")
    offload._add_ratios(recs)
    by = {(r["backend"], r["metric"], r.get("cache", "")[:4], r["context_tokens"]): r for r in recs}
    assert by[("INFINITEHIP", "cache_hit_rate", "atte", 131072)]["value"] == 0.99
    assert by[("INFINITEHIP", "cache_hit_rate", "mask", 131072)]["value"] in (0.75, 0.25)
    rates = sorted(r["value"] for r in recs if r["metric"] == "cache_hit_rate")
    assert rates == [0.25, 0.75, 0.99]
    assert by[("INFINITEHIP", "kv_gpu_bytes", "", 131072)]["fraction_of_dense"] == 0.125
    assert by[("INFINITEHIP", "decode_tokens_per_s", "", 131072)]["ratio_vs_flash_attn"] == 1.5
    assert by[("INFINITEHIP", "served", "", 1048576)]["value"] == 0  # a failure is not a number
    assert by[("INFINITEHIP", "max_context_tokens", "", 2097152)]["value"] == 2097152
    # beyond FLASH_ATTN's longest context: the ratio against that one, named
    at_2m = by[("INFINITEHIP", "decode_tokens_per_s", "", 2097152)]
    assert at_2m["flash_attn_longest_context"] == 262144 and at_2m["ratio_vs_flash_attn_longest"] == 2.0
    assert "ratio_vs_flash_attn" not in at_2m and at_2m["decode_step_ms_p90"] == 150.0
    png = tmp_path / "o.png"
    offload.plot(recs, str(png), "t")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_offload_merge_adds_notes_and_series(tmp_path, monkeypatch):
    from benchmarks import offload

    rec = dict(metric="decode_tokens_per_s", backend="INFINITEHIP", context_tokens=1 << 20, value=20.0,
               unit="tokens/s", device="D", command="c", model_shape="llama-3.1-8b")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([dict(rec, note="alone")]))
    b.write_text(json.dumps([dict(rec, value=50.0)]))
    lines = []
    monkeypatch.setattr(offload, "plot", lambda records, path, title: lines.extend(
        sorted({(r["backend"], r.get("series")) for r in records}, key=str)))
    out = tmp_path / "m.json"
    assert offload.main(["--merge", f"{a}:before: eager|eager", f"{b}:graphs", "--out", str(out),
                         "--plot", str(tmp_path / "m.png")]) == 0
    got = json.loads(out.read_text())
    assert [r["note"] for r in got] == ["alone; before: eager", "graphs"]  # a colon stays in the note
    assert [r.get("series") for r in got] == ["eager", None]
    assert lines == [("INFINITEHIP", "eager"), ("INFINITEHIP", None)]  # a line per series


def test_serve_equivalence_run_args_reach_only_their_run(tmp_path, monkeypatch, capsys):
    import pytest

    from benchmarks import serve_equivalence as se

    launched = {}

    def fake_launch(model, backend, port, extra, log_path):
        launched[os.path.basename(log_path)] = extra
        return object()

    def not_healthy(port, proc, timeout):
        raise RuntimeError("no server in this test")

    monkeypatch.setattr(se, "launch", fake_launch)
    monkeypatch.setattr(se, "wait_healthy", not_healthy)
    monkeypatch.setattr(se, "stop", lambda proc: None)
    out = tmp_path / "eq.json"
    se.main(["--model", "m", "--backends", "FLASH_ATTN", "--extra", "--max-model-len 64",
             "--label", "INFINITEHIP=INFINITEHIP[ray]:{}",
             "--run-args", "INFINITEHIP[ray]=--distributed-executor-backend ray",
             "--log-dir", str(tmp_path), "--out", str(out)])
    assert launched["serve_FLASH_ATTN.log"] == ["--max-model-len", "64"]
    assert launched["serve_INFINITEHIP[ray].log"] == [
        "--max-model-len", "64", "--additional-config", "{}", "--distributed-executor-backend", "ray"]
    # Runs that never answered count every request as a server error.
    errors = {r["backend"]: r["value"] for r in json.loads(out.read_text()) if r["metric"] == "server_errors"}
    assert errors == {"FLASH_ATTN": 40, "INFINITEHIP[ray]": 40}
    with pytest.raises(SystemExit):
        se.main(["--model", "m", "--run-args", "NOPE=--x", "--log-dir", str(tmp_path)])
    assert "names no run" in capsys.readouterr().err


def test_passkey_sweep_probe_and_records_count_only_prompts_every_config_answered():
    from types import SimpleNamespace

    import torch

    from benchmarks import passkey_sweep

    def sel(starts, w0, exact=False):
        return SimpleNamespace(
            qblocks=SimpleNamespace(pos=torch.tensor([0, 64]), window_start=torch.tensor([256, w0])),
            sel_blocks=torch.tensor([[-1] * 3, starts + [-1] * (3 - len(starts))]),
            sel_count=torch.tensor([0, len(starts)]), exact=exact)

    probe = passkey_sweep.NeedleProbe(needle_start=1000, sink_tokens=256, block_size_k=8)
    probe(0, sel([992], 5000))   # block 992..999 ends before the needle: missed
    probe(1, sel([1008], 5000))  # inside the needle's 16 tokens: seen
    probe(2, sel([], 900))       # needle inside the window: seen
    probe(0, sel([], 5000, exact=True))  # next pass (decode): exact attention sees everything
    assert probe.summary() == {"prefill_layers_seeing_needle": 2, "decode1_layers_seeing_needle": 1}

    rows = [dict(config=c, length=n, depth=d, key="1", correct=ok, prefill_layers_seeing_needle=3)
            for c, n, d, ok in [("a", 100, 0.1, True), ("b", 100, 0.1, False), ("a", 100, 0.5, True)]]
    recs = passkey_sweep.accuracy_records(rows, {"a": {}, "b": {"block_size_q": 16}}, {"device": "x"})
    # depth 0.5 was answered by "a" only: left out, so both configurations cover the same prompt
    assert [(r["backend"], r["value"], r["trials"]) for r in recs] == [
        ("INFINITEHIP[a]", 1.0, 1), ("INFINITEHIP[b]", 0.0, 1)]
    assert recs[1]["options"] == {"block_size_q": 16} and recs[0]["mean_layers_seeing_needle"] == 3


def test_mask_estimation_read_study_counts_and_caches(tmp_path):
    """benchmarks/mask_estimation_reads.py on random keys: every refresh after the first is
    counted, a larger cache never hits less, a cache of every key row misses only first reads."""
    import torch
    from types import SimpleNamespace

    from benchmarks import mask_estimation_reads as mer

    g = torch.Generator().manual_seed(0)
    steps, context = 12, 2304
    keys = torch.randn(1, context + steps, 1, 64, generator=g).to(torch.bfloat16)
    queries = torch.randn(1, steps, 2, 64, generator=g).to(torch.bfloat16)
    hf = SimpleNamespace(model_type="llama", rope_theta=10000.0, head_dim=64, rope_scaling=None)
    stats, ws = mer.simulate(keys, queries, hf, context, [0.01, 0.2, 1.0], progress=False)
    assert ws and 0 < ws[0] < 1
    totals = {c: (sum(stats[(s, c)][0] for s in range(3)), sum(stats[(s, c)][1] for s in range(3)))
              for c in (0.01, 0.2, 1.0)}  # fmt: skip
    assert len({q for _, q in totals.values()}) == 1 and totals[1.0][1] > 0  # same reads for every size
    assert totals[0.01][0] <= totals[0.2][0] <= totals[1.0][0] <= totals[1.0][1]
    assert totals[1.0][0] > 0  # reads repeat between refreshes
    args = SimpleNamespace(context=context, decode_steps=steps, like_context=None)
    recs = mer.records(stats, ws, args, device="cpu")
    assert {r["metric"] for r in recs} == {"cache_hit_rate", "mask_estimation_working_set"}
    assert all({"metric", "backend", "context_tokens", "value", "unit", "device", "command"} <= set(r) for r in recs)
    mer.plot(recs, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0
