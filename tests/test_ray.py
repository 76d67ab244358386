"""Ray: the batch job's wiring, the config travelling to Ray actors, the plugin inside actors and
the missing-plugin check, on a real local Ray cluster (CPU only; the vLLM engine stage is replaced
by a fake that echoes tokens, everything else is Ray Data's real pipeline)."""

import dataclasses
import json
import os
import sys
import textwrap

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data.llm")
pytest.importorskip("vllm")

from ray.llm._internal.batch.stages.base import StatefulStageUDF  # noqa: E402

from vllm_hip import batch  # noqa: E402
from vllm_hip.config import InfiniteHipConfig  # noqa: E402

# The fake engine below lives in this test module, which Ray workers cannot import by name.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

HIP_OPTIONS = {"window_tokens": 2048, "refresh": "fast", "sink_tokens": 128}

WORDS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
WORDS += [f"w{i}" for i in range(64)] + "the of to is what which color capital answer".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A word-level tokenizer with a chat template, and a config.json: all Ray's CPU stages load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_model")
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
    fast.save_pretrained(out)
    LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
    ).save_pretrained(out)  # fmt: skip
    return str(out)


@pytest.fixture(scope="module")
def ray_cluster():
    # A logical GPU lets Ray Data schedule the (fake) engine actor on this CPU machine; logical
    # CPUs beyond the 2 real ones let every stage of the pipeline hold an actor at once.
    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _docs(n):
    return [
        {"id": i, "topic": f"t{i}", "messages": [
            {"role": "system", "content": "w1 w2"},
            {"role": "user", "content": " ".join(f"w{(i * 7 + j) % 64}" for j in range(20 + i)) + " what color"},
        ]}
        for i in range(n)
    ]  # fmt: skip


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _read(path):
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in open(path)]


def _job(tmp_path, model, rows=None, **kw):
    inp = kw.pop("input", None) or _write_jsonl(tmp_path / "in.jsonl", rows or _docs(5))
    base = dict(input=inp, output=str(tmp_path / "out.jsonl"), model=model, max_model_len=65536,
                additional_config={"infinitehip": dict(HIP_OPTIONS)}, batch_size=2,
                cpu_stage_num_cpus=0.25)  # fmt: skip
    base.update(kw)
    return batch.BatchJob(**base)


# ------------------------------------------------------------------ validation (no Ray started)
def test_bad_inputs_and_configs_fail_before_ray_starts(tmp_path, tiny_model, capsys):
    assert not ray.is_initialized()
    good = _write_jsonl(tmp_path / "in.jsonl", _docs(2))
    common = ["--model", tiny_model, "--output", str(tmp_path / "o.jsonl")]

    assert batch.main(["--input", str(tmp_path / "nope.jsonl"), *common]) == 2
    assert "nope.jsonl' does not exist" in capsys.readouterr().err

    bad_cols = _write_jsonl(tmp_path / "cols.jsonl", [{"id": 1, "text": "x"}])
    assert batch.main(["--input", bad_cols, *common]) == 2
    err = capsys.readouterr().err
    assert "neither a 'messages' column" in err and "'text'" in err

    no_id = _write_jsonl(tmp_path / "noid.jsonl", [{"prompt": "x"}])
    assert batch.main(["--input", no_id, *common]) == 2
    assert "no id column 'id'" in capsys.readouterr().err

    assert batch.main(["--input", good, *common, "--infinitehip", '{"window_tokens": 1001}']) == 2
    assert "infinitehip.window_tokens=1001 is invalid" in capsys.readouterr().err

    assert batch.main(["--input", good, *common, "--additional-config", '{"infinitehip": {"nope": 1}}']) == 2
    assert "infinitehip.nope is not an option" in capsys.readouterr().err

    assert batch.main(["--input", good, *common, "--infinitehip", "{not json"]) == 2
    assert "--infinitehip is not valid JSON" in capsys.readouterr().err

    assert batch.main(["--input", good, "--model", tiny_model, "--output", str(tmp_path / "o.csv")]) == 2
    assert "must end in .jsonl or .parquet" in capsys.readouterr().err
    # None of the failures above got as far as starting Ray.
    assert not ray.is_initialized()


def test_engine_kwargs_carry_backend_and_options(tmp_path, tiny_model):
    job = _job(tmp_path, tiny_model, engine_kwargs={"enable_prefix_caching": False})
    plan = batch.prepare(job)
    kw = plan.engine_kwargs
    assert kw["attention_backend"] == "INFINITEHIP" and "attention_config" not in kw
    assert kw["additional_config"] == {"infinitehip": HIP_OPTIONS}
    assert kw["max_model_len"] == 65536 and kw["enable_prefix_caching"] is False
    assert kw["distributed_executor_backend"] == "uni"
    # Pinned, so Ray's AsyncEngineArgs and vllm.LLM schedule (and chunk prefill) alike.
    assert kw["max_num_batched_tokens"] == 16384 and kw["max_num_seqs"] == 256
    assert plan.hip_config == InfiniteHipConfig.from_dict(HIP_OPTIONS)
    assert plan.kind == "messages" and plan.num_rows == 5
    # Two GPUs per engine go through vLLM's Ray executor.
    assert batch.build_engine_kwargs(_job(tmp_path, tiny_model, tensor_parallel_size=2))[
        "distributed_executor_backend"
    ] == "ray"
    with pytest.raises(batch.BatchError, match="attention_config.*before it loads plugins"):
        batch.build_engine_kwargs(_job(tmp_path, tiny_model, engine_kwargs={"attention_config": {"backend": "INFINITEHIP"}}))
    with pytest.raises(batch.BatchError, match="use the 'max_model_len' option"):
        batch.build_engine_kwargs(_job(tmp_path, tiny_model, engine_kwargs={"max_model_len": 5}))


def test_cli_and_config_file_build_the_same_job(tmp_path, tiny_model):
    inp = _write_jsonl(tmp_path / "in.jsonl", _docs(1))
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps({"input": inp, "model": tiny_model, "output": str(tmp_path / "o.parquet"),
                               "infinitehip": {"window_tokens": 4096}, "batch_size": 8}))  # fmt: skip
    job, _ = batch.job_from_args(["--config", str(cfg), "--batch-size", "4"])
    assert job.batch_size == 4 and job.input == inp  # flags override the file
    assert job.additional_config == {"infinitehip": {"window_tokens": 4096}}
    hip = tmp_path / "hip.json"
    hip.write_text(json.dumps(HIP_OPTIONS))
    job, _ = batch.job_from_args(["--config", str(cfg), "--infinitehip", f"@{hip}"])
    assert job.additional_config == {"infinitehip": HIP_OPTIONS}
    cfg.write_text(json.dumps({"input": inp, "bogus": 1}))
    with pytest.raises(batch.BatchError, match="'bogus' is not an option"):
        batch.job_from_args(["--config", str(cfg)])


# ----------------------------------------------------------------------------- Ray pipeline
def test_processor_stages_and_engine_stage_kwargs(ray_cluster, tmp_path, tiny_model):
    proc = batch.build_processor(_job(tmp_path, tiny_model))
    assert proc.list_stage_names() == ["ChatTemplateStage", "TokenizeStage", "vLLMEngineStage", "DetokenizeStage"]
    stage = proc.get_stage_by_name("vLLMEngineStage")
    kw = stage.fn_constructor_kwargs["engine_kwargs"]
    assert kw["attention_backend"] == "INFINITEHIP"
    assert kw["additional_config"] == {"infinitehip": HIP_OPTIONS}
    assert kw["max_model_len"] == 65536 and kw["distributed_executor_backend"] == "uni"
    assert stage.map_batches_kwargs["num_gpus"] == 1
    # vLLM's Ray metric wrappers raise in the engine actor without ray.serve: metrics off then.
    assert stage.fn_constructor_kwargs["log_engine_metrics"] == batch.ray_engine_metrics_available()
    # Raw prompts skip the chat template; --chat puts it back.
    rows = [{"id": 0, "prompt": "w1 w2 what"}]
    inp = _write_jsonl(tmp_path / "p.jsonl", rows)
    assert "ChatTemplateStage" not in batch.build_processor(_job(tmp_path, tiny_model, input=inp)).stages
    assert "ChatTemplateStage" in batch.build_processor(_job(tmp_path, tiny_model, input=inp, chat=True)).stages


@pytest.mark.parametrize("available", [True, False])
def test_engine_metrics_follow_what_ray_can_export(ray_cluster, tmp_path, tiny_model, monkeypatch, available):
    monkeypatch.setattr(batch, "ray_engine_metrics_available", lambda: available)
    stage = batch.build_processor(_job(tmp_path, tiny_model)).get_stage_by_name("vLLMEngineStage")
    assert stage.fn_constructor_kwargs["log_engine_metrics"] is available


class FakeEngineUDF(StatefulStageUDF):
    """Stands in for Ray's vLLMEngineStageUDF: same constructor kwargs, same output columns.

    It rebuilds the InfiniteHipConfig from the engine kwargs it received inside its Ray actor and
    "generates" the last four prompt tokens in reverse.
    """

    def __init__(self, data_column, expected_input_keys, engine_kwargs, **_):
        super().__init__(data_column, expected_input_keys)
        cfg = InfiniteHipConfig.from_vllm_additional_config(engine_kwargs["additional_config"])
        self.seen = json.dumps({"backend": engine_kwargs["attention_backend"], "config": cfg.to_dict(),
                                "pid": os.getpid()})  # fmt: skip

    async def udf(self, rows):
        for row in rows:
            ids = [int(t) for t in row["tokenized_prompt"]]
            yield {
                self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN],
                "prompt_token_ids": ids, "num_input_tokens": len(ids),
                "generated_tokens": ids[-4:][::-1], "num_generated_tokens": 4,
                "time_taken_llm": 0.01, "engine_seen": self.seen,
            }  # fmt: skip


@pytest.mark.parametrize("fmt", ["jsonl_to_parquet", "parquet_prompts_to_jsonl"])
def test_pipeline_runs_end_to_end_with_a_fake_engine(ray_cluster, tmp_path, tiny_model, fmt, monkeypatch):
    from transformers import AutoTokenizer

    docs = _docs(5)
    if fmt == "jsonl_to_parquet":
        job = _job(tmp_path, tiny_model, rows=docs, output=str(tmp_path / "out.parquet"),
                   keep_columns=["topic"], progress_every=2)  # fmt: skip
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        docs = [{"id": f"d{d['id']}", "topic": d["topic"], "prompt": d["messages"][1]["content"]} for d in docs]
        pq.write_table(pa.Table.from_pylist(docs), tmp_path / "in.parquet")
        job = _job(tmp_path, tiny_model, input=str(tmp_path / "in.parquet"), keep_columns=["topic"])
    plan = batch.prepare(job)
    job.keep_columns.append("engine_seen")  # the fake engine's report column rides along
    proc = batch.build_processor(job, plan)
    real = proc.stages["vLLMEngineStage"]
    proc.stages["vLLMEngineStage"] = real.model_copy(update={"fn": FakeEngineUDF})
    stats = batch.run_ray(job, plan, processor=proc)

    out = _read(job.output)
    assert not os.path.exists(job.output + ".tmp")
    assert sorted(r["id"] for r in out) == sorted(d["id"] for d in docs)
    assert stats.rows == 5 and stats.output_tokens == 20

    # The Ray stages tokenized exactly what direct mode would feed vllm.LLM.
    tok = AutoTokenizer.from_pretrained(tiny_model)
    pre = batch.Preprocess(job, plan.kind)
    by_id = {d["id"]: d for d in docs}
    for r in out:
        ids = batch.prompt_token_ids(pre(by_id[r["id"]]), tok)
        assert r["num_input_tokens"] == len(ids) and r["prompt_sha1"] == batch._sha1_tokens(ids)
        assert tok.unk_token_id not in ids
        assert r["generated_token_ids"] == ids[-4:][::-1]
        assert r["generated_text"] == tok.decode(ids[-4:][::-1], skip_special_tokens=True)
        assert r["topic"] == by_id[r["id"]]["topic"]
        seen = json.loads(r["engine_seen"])
        assert seen["backend"] == "INFINITEHIP" and seen["pid"] != os.getpid()
        assert InfiniteHipConfig.from_dict(seen["config"]) == InfiniteHipConfig.from_dict(HIP_OPTIONS)
    if plan.kind == "messages":
        assert all(r["num_input_tokens"] > 20 for r in out)

    # --direct with a vllm.LLM that applies the same rule: the two output files agree row by row.
    import vllm

    class FakeLLM:
        def __init__(self, model, **kwargs):
            assert model == tiny_model and kwargs == plan.engine_kwargs

        def generate(self, prompts, params, use_tqdm=False):
            assert params.temperature == 0.0 and params.max_tokens == 16
            outs = []
            for p in prompts:
                ids = list(p["prompt_token_ids"])
                outs.append(type("Out", (), {"outputs": [type("C", (), {"token_ids": ids[-4:][::-1]})]}))
            return outs

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    direct_out = str(tmp_path / ("direct" + os.path.splitext(job.output)[1]))
    job.keep_columns.remove("engine_seen")
    dstats = batch.run_direct(dataclasses.replace(job, output=direct_out, direct=True), plan)
    assert dstats.rows == 5 and dstats.input_tokens == stats.input_tokens
    direct = {r["id"]: r for r in _read(direct_out)}
    for r in out:
        r.pop("engine_seen")
        assert direct[r["id"]] == r


# --------------------------------------------------------------- config and plugin in actors
def test_config_dict_rebuilds_an_equal_config_in_an_actor(ray_cluster):
    @ray.remote(num_cpus=0)
    class Holder:
        def __init__(self, engine_kwargs):
            self.cfg = InfiniteHipConfig.from_vllm_additional_config(engine_kwargs["additional_config"])

        def config(self):
            return self.cfg.to_dict(), os.getpid()

    for options in (HIP_OPTIONS, {"preset": "streaming"}, {}):
        h = Holder.remote({"additional_config": {"infinitehip": options}})
        d, pid = ray.get(h.config.remote())
        assert pid != os.getpid()
        assert InfiniteHipConfig.from_dict(d) == InfiniteHipConfig.from_dict(options)
        ray.kill(h)


def test_plugin_registers_inside_a_ray_actor(ray_cluster, tmp_path, tiny_model):
    kwargs = batch.build_engine_kwargs(_job(tmp_path, tiny_model))

    @ray.remote(num_cpus=0)
    def in_actor(engine_kwargs, model):
        import vllm.plugins
        from vllm_hip import plugin

        os.environ.pop("VLLM_ALLOW_LONG_MAX_MODEL_LEN", None)
        before = plugin._registered
        vllm.plugins.load_general_plugins()
        from vllm.config.attention import AttentionConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        b = AttentionBackendEnum["INFINITEHIP"]
        # What Ray's vLLM stage does with the engine kwargs (minus the GPU-only engine start).
        args = AsyncEngineArgs(model=model, **engine_kwargs)
        resolved = AttentionConfig.validate_backend_before(args.attention_backend)
        try:
            args.create_engine_config()  # stops at device detection on a CPU machine
        except Exception:  # noqa: BLE001 - only the plugin's hook, which runs first, matters here
            pass
        return (before, b.name, b.get_path(), resolved is AttentionBackendEnum.CUSTOM,
                os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN"), args.additional_config)  # fmt: skip

    before, name, path, resolved, allow_long, additional = ray.get(
        in_actor.options(runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING"}}).remote(kwargs, tiny_model)
    )
    assert before is False  # a fresh worker process: nothing registered until vLLM loads plugins
    assert (name, path, resolved) == ("CUSTOM", "vllm_hip.backend.InfiniteHipBackend", True)
    assert allow_long == "1"  # the plugin's create_engine_config hook ran in the actor
    assert additional == {"infinitehip": HIP_OPTIONS}


# ------------------------------------------------------------------------ missing-plugin check
def test_check_passes_on_a_healthy_cluster(ray_cluster, capsys):
    reports = batch.check_ray_workers_have_plugin()
    assert len(reports) == 1 and reports[0]["problems"] == []
    assert reports[0]["version"] == "0.1.0"
    assert batch.main(["--check-cluster"]) == 0
    assert "vllm-hip found on all 1 Ray node(s)" in capsys.readouterr().out
    # Two GPUs per engine on a one-GPU cluster: refused instead of waiting forever.
    with pytest.raises(batch.BatchError, match="has 1 GPU"):
        batch._preflight(batch.BatchJob(tensor_parallel_size=2))


HIDER = textwrap.dedent(
    """
    # Makes this Python look like a node without vllm-hip (import and/or entry point).
    import importlib.abc, importlib.metadata as md, os, sys

    what = os.environ.get("HIDE_VLLM_HIP", "")
    if "import" in what:
        class _Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "vllm_hip" or name.startswith("vllm_hip."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, _Hide())
    if "entry_point" in what:
        _eps = md.entry_points
        md.entry_points = lambda **kw: md.EntryPoints(e for e in _eps(**kw) if not e.value.startswith("vllm_hip"))
    """
)


@pytest.mark.parametrize(
    "hide, expect",
    [
        ("import,entry_point", "cannot import vllm_hip (ModuleNotFoundError"),
        ("entry_point", "the 'vllm.general_plugins' entry point 'infinitehip' is missing"),
    ],
)
def test_check_names_the_node_when_the_plugin_is_missing(ray_cluster, tmp_path, hide, expect):
    (tmp_path / "sitecustomize.py").write_text(HIDER)
    env = {"env_vars": {"PYTHONPATH": str(tmp_path), "HIDE_VLLM_HIP": hide}}
    with pytest.raises(batch.PluginMissingError) as info:
        batch.check_ray_workers_have_plugin(env, timeout_s=120)
    msg = str(info.value)
    node_ip = ray.nodes()[0]["NodeManagerAddress"]
    assert msg.startswith(f"vllm-hip is not installed on Ray node {node_ip}")
    assert expect in msg
    assert "pip install vllm-hip==0.1.0 on every node" in msg and "runtime_env={'pip'" in msg
    assert isinstance(info.value, RuntimeError)


def test_batch_job_refuses_to_start_engines_without_the_plugin(ray_cluster, tmp_path, tiny_model, capsys):
    (tmp_path / "sitecustomize.py").write_text(HIDER)
    env = {"env_vars": {"PYTHONPATH": str(tmp_path), "HIDE_VLLM_HIP": "import,entry_point"}}
    inp = _write_jsonl(tmp_path / "in.jsonl", _docs(1))
    rc = batch.main(["--input", inp, "--output", str(tmp_path / "o.jsonl"), "--model", tiny_model,
                     "--runtime-env", json.dumps(env)])  # fmt: skip
    assert rc == 1
    assert "vllm-hip is not installed on Ray node" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.jsonl")
