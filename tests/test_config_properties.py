"""Property tests over the whole option space of ``InfiniteHipConfig.from_dict``, and start-up refusal.

(a) any option dict drawn from the valid ranges builds and round-trips (dict, JSON, additional_config);
(b) any single field of a valid dict set to an invalid value raises ConfigError naming that field
    (``infinitehip.<field>`` or ``infinitehip.stages[i].<field>``);
(c) the derived invariants hold for every config that builds, including configs assembled from
    presets and defaults by arbitrary (junk-laden) partial dicts, which must never raise anything
    but ConfigError;
(d) ``vllm serve`` refuses a bad ``--additional-config`` in the API server, before the model loads.
"""

from __future__ import annotations

import json
import os
import re
import string
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vllm_hip.config import (
    ADDITIONAL_CONFIG_KEY,
    MAX_TOKENS,
    PRESETS,
    REFRESH_PRESETS,
    ConfigError,
    InfiniteHipConfig,
    PruningStage,
)

FIELDS = InfiniteHipConfig.field_names()
STAGE_FIELDS = ("chunk_size", "keep_tokens", "query_pool", "refresh_interval")
MAX_CHUNK = 1 << 16
MAX_REFRESH = 4096

# No example database: the repository stays clean; a failure prints its reproducing example.
PROPS = settings(
    max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def _pow2s(lo: int, hi: int) -> list[int]:
    return [1 << e for e in range(lo.bit_length() - 1, hi.bit_length()) if lo <= 1 << e <= hi]


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _multiples(m: int, lo: int, hi: int):
    """Multiples of m in [lo, hi]."""
    return st.integers(-(-lo // m), hi // m).map(lambda n: n * m)


# ------------------------------------------------------------------------------------ valid dicts
@st.composite
def valid_options(draw, selection: bool | None = None) -> dict:
    """A complete option dict, every field explicit, from the ranges the docstrings promise.

    ``selection``: force selected_tokens > 0 (and so pruning stages) on or off; None draws it.
    """
    bk = draw(st.sampled_from(_pow2s(8, 64)))
    bq = draw(st.sampled_from(_pow2s(16, 128)))
    early_layers = draw(st.integers(0, 1024))
    if selection if selection is not None else draw(st.booleans()):
        # The last stage keeps selected_tokens and keeps at least one chunk of block_size_k.
        selected = draw(_multiples(bk, bk, MAX_TOKENS))
        early_selected = draw(_multiples(bk, 0, MAX_TOKENS))
    else:
        selected = 0
        if draw(st.booleans()):
            early_layers, early_selected = 0, draw(_multiples(bk, 0, MAX_TOKENS))
        else:
            early_selected = 0
    max_sel = max(selected, early_selected if early_layers else 0)
    window = draw(_multiples(bk, bk, MAX_TOKENS))
    stages: list[dict] = []
    if max_sel:
        exps = list(range(bk.bit_length(), MAX_CHUNK.bit_length()))  # chunk exponents above bk
        coarser = draw(st.lists(st.sampled_from(exps), unique=True, max_size=7))
        chunks = sorted((1 << e for e in coarser), reverse=True) + [bk]
        refresh = [draw(st.integers(1, min(MAX_REFRESH, window)))]
        for _ in chunks[1:]:
            refresh.append(draw(st.integers(1, refresh[-1])))
        keeps = [selected]
        for c in reversed(chunks[:-1]):
            lo = -(-max(keeps[0], max_sel) // c) * c
            keeps.insert(0, draw(_multiples(c, lo, MAX_TOKENS)))
        for c, keep, r in zip(chunks, keeps, refresh):
            pool = draw(st.sampled_from(_pow2s(1, bq)))
            stages.append(
                {"chunk_size": c, "keep_tokens": keep, "query_pool": pool, "refresh_interval": r}
            )
    sink = draw(_multiples(bk, 0, MAX_TOKENS))
    need = sink + window + max_sel
    offload = draw(st.booleans()) if need <= MAX_TOKENS else False
    cache = draw(_multiples(bk, max(need, bk) if offload else bk, MAX_TOKENS))
    return {
        "preset": draw(st.sampled_from(sorted(PRESETS))),
        "sink_tokens": sink,
        "window_tokens": window,
        "selected_tokens": selected,
        "early_layers": early_layers,
        "early_selected_tokens": early_selected,
        "block_size_q": bq,
        "split_last_query": draw(st.booleans()),
        "align_prefill_chunks": draw(st.booleans()),
        "block_size_k": bk,
        "refresh": draw(st.sampled_from(sorted(REFRESH_PRESETS))),
        "stagger_refresh": draw(st.booleans()),
        "decode_graphs": draw(st.booleans()),
        "stages": stages,
        "rope_mode": draw(st.sampled_from(["streaming", "model"])),
        "rope_cache": draw(st.sampled_from(["rotated", "unrotated"])),
        "score_norm": draw(st.sampled_from(["head_max", "none"])),
        "allow_long_context": draw(st.booleans()),
        "export_metrics": draw(st.booleans()),
        "decode_splits": draw(st.integers(0, 256)),
        "offload": offload,
        "offload_gpu_cache_tokens": cache,
        "offload_prefill_staging": draw(st.booleans()),
    }


def check_invariants(c: InfiniteHipConfig) -> None:
    """What the kernels and the scheduler rely on, for any config that validated."""
    bk = c.block_size_k
    assert _is_pow2(bk) and 8 <= bk <= 64 and _is_pow2(c.block_size_q) and 16 <= c.block_size_q <= 128
    for name in ("sink_tokens", "window_tokens", "selected_tokens", "early_selected_tokens",
                 "offload_gpu_cache_tokens"):  # fmt: skip
        v = getattr(c, name)
        assert type(v) is int and v % bk == 0 and 0 <= v <= MAX_TOKENS, (name, v)
    assert c.window_tokens >= bk
    layers = sorted({0, max(c.early_layers - 1, 0), c.early_layers, c.early_layers + 7})
    ks = {layer: c.selected_tokens_for_layer(layer) for layer in layers}
    for layer, k in ks.items():
        assert k == (c.early_selected_tokens if layer < c.early_layers else c.selected_tokens)
        assert c.exact_context_tokens(layer) == c.sink_tokens + c.window_tokens + k
        assert k <= c.max_selected_tokens
    assert max(ks.values()) == c.max_selected_tokens
    if c.offload:
        assert all(c.offload_gpu_cache_tokens >= c.exact_context_tokens(l) for l in layers)
    if c.max_selected_tokens == 0:
        assert c.stages == ()
        return
    assert 1 <= len(c.stages) <= 8
    chunks = [s.chunk_size for s in c.stages]
    assert chunks[-1] == bk
    assert all(_is_pow2(x) and x <= MAX_CHUNK for x in chunks)
    assert all(a > b and a % b == 0 for a, b in zip(chunks, chunks[1:]))
    assert all(s.keep_tokens % s.chunk_size == 0 and s.keep_tokens >= s.chunk_size for s in c.stages)
    refresh = [s.refresh_interval for s in c.stages]
    # Tokens generated between two refreshes of any stage are still inside the window.
    assert all(a >= b for a, b in zip(refresh, refresh[1:])) and 1 <= refresh[0] <= c.window_tokens
    # A layer's refresh phase shifts its schedule by less than one longest interval.
    for layer in (0, 1, 7, 100):
        phase = c.refresh_phase(layer)
        assert phase == 0 if not c.stagger_refresh else 0 <= phase < refresh[0]
    assert all(_is_pow2(s.query_pool) and s.query_pool <= c.block_size_q for s in c.stages)
    for layer in layers:
        keep = [c.stage_keep_tokens(i, layer) for i in range(len(c.stages))]
        assert all(a >= b for a, b in zip(keep, keep[1:])), (layer, keep)
        assert keep[-1] == ks[layer]


def test_strategies_cover_every_option():
    # A new config field must get junk values here too (valid_options is checked field by field
    # in the round trip below).
    assert set(FIELD_VALUES) == set(FIELDS)


@PROPS
@given(valid_options())
def test_valid_dicts_build_and_round_trip(options):
    c = InfiniteHipConfig.from_dict(options)
    expect = dict(options, stages=tuple(PruningStage(**s) for s in options["stages"]))
    assert {f: getattr(c, f) for f in FIELDS} == expect
    assert c.to_dict() == options
    assert InfiniteHipConfig.from_dict(c.to_dict()) == c
    wire = json.dumps({ADDITIONAL_CONFIG_KEY: c.to_dict(), "other_plugin": {"x": 1}})
    assert InfiniteHipConfig.from_vllm_additional_config(wire) == c
    check_invariants(c)


# ------------------------------------------------------------------------------ invalid one field
NOT_INT = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.text(max_size=4),
    st.lists(st.integers(0, 9), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(0, 9), max_size=1),
)
NOT_BOOL = st.one_of(
    st.none(), st.integers(), st.floats(), st.text(max_size=5), st.lists(st.booleans(), max_size=1)
)
NAME = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12)


def bad_int(lo: int, hi: int, multiple: int = 1, pow2: bool = False):
    cases = [NOT_INT, st.integers(max_value=lo - 1), st.integers(min_value=hi + 1)]
    if multiple > 1:
        cases.append(st.integers(lo, hi).filter(lambda x: x % multiple != 0))
    if pow2:
        cases.append(st.integers(lo, hi).filter(lambda x: not _is_pow2(x)))
    return st.one_of(cases)


def bad_choice(choices):
    return st.one_of(st.text(max_size=8).filter(lambda s: s not in choices), NOT_BOOL)


@st.composite
def one_bad_field(draw):
    """(options, field label, bad value or None): a valid dict with exactly one field made invalid.

    Only values that break the field's own rule, or a rule whose message names this field, are
    drawn (raising selected_tokens past a stage's keep_tokens legitimately names the stage).
    """
    target_stage = draw(st.booleans())
    o = draw(valid_options(selection=True if target_stage else None))
    bk, bq, window = o["block_size_k"], o["block_size_q"], o["window_tokens"]
    stages = o["stages"]
    if target_stage:
        choices = ["stage_field"] * 4 + ["stage_unknown", "stage_missing", "stage_not_object", "stages"]
    else:
        choices = ["preset", "refresh", "sink_tokens", "window_tokens", "selected_tokens",
                   "early_selected_tokens", "early_layers", "decode_splits", "block_size_q",
                   "block_size_k", "rope_mode", "rope_cache", "score_norm", "allow_long_context", "export_metrics", "offload",
                   "split_last_query", "align_prefill_chunks", "offload_prefill_staging",
                   "stagger_refresh", "decode_graphs", "offload_gpu_cache_tokens", "unknown",
                   "stages"]  # fmt: skip
    kind = draw(st.sampled_from(choices))
    simple = {
        "preset": bad_choice(tuple(PRESETS)),
        "refresh": bad_choice(tuple(REFRESH_PRESETS)),
        "rope_mode": bad_choice(("streaming", "model")),
        "rope_cache": bad_choice(("rotated", "unrotated")),
        "score_norm": bad_choice(("head_max", "none")),
        "sink_tokens": bad_int(0, MAX_TOKENS, bk),
        "window_tokens": bad_int(bk, MAX_TOKENS, bk),
        "selected_tokens": bad_int(0, MAX_TOKENS, bk),
        "early_selected_tokens": bad_int(0, MAX_TOKENS, bk),
        "early_layers": bad_int(0, 1024),
        "decode_splits": bad_int(0, 256),
        "block_size_q": bad_int(16, 128, pow2=True),
        "block_size_k": bad_int(8, 64, pow2=True),
        "allow_long_context": NOT_BOOL,
        "export_metrics": NOT_BOOL,
        "offload": NOT_BOOL,
        "split_last_query": NOT_BOOL,
        "align_prefill_chunks": NOT_BOOL,
        "offload_prefill_staging": NOT_BOOL,
        "stagger_refresh": NOT_BOOL,
        "decode_graphs": NOT_BOOL,
    }
    if kind in simple:
        value = draw(simple[kind])
        return dict(o, **{kind: value}), kind, value
    if kind == "offload_gpu_cache_tokens":
        cases = [bad_int(bk, MAX_TOKENS, bk)]
        early = o["early_selected_tokens"] if o["early_layers"] else 0
        need = o["sink_tokens"] + window + max(o["selected_tokens"], early)
        if o["offload"] and need > bk:
            # too small to hold sink + window + k, one block short in particular
            cases += [st.just(need - bk), _multiples(bk, bk, need - bk)]
        value = draw(st.one_of(cases))
        return dict(o, offload_gpu_cache_tokens=value), kind, value
    if kind == "unknown":
        key = draw(NAME.filter(lambda k: k not in FIELDS))
        return dict(o, **{key: draw(st.integers())}), key, None
    if kind == "stages":
        if stages:
            cases = [st.just([]), st.just([stages[-1]] * 9)]  # count outside [1, 8]
        else:
            cases = [st.just([{"chunk_size": bk, "keep_tokens": bk}])]  # nothing to select
        cases.append(st.one_of(st.text(max_size=6), st.integers(), st.none(),
                               st.dictionaries(NAME, st.integers(), max_size=2)))  # fmt: skip
        value = draw(st.one_of(cases))
        return dict(o, stages=value), "stages", (value if not isinstance(value, list) else None)

    i = draw(st.integers(0, len(stages) - 1))
    last = i == len(stages) - 1
    st_i = dict(stages[i])
    new_stages = [dict(s) for s in stages]
    if kind == "stage_not_object":
        value = draw(st.one_of(st.integers(), st.text(max_size=4), st.none(),
                               st.lists(st.integers(), max_size=2)))  # fmt: skip
        new_stages[i] = value
        return dict(o, stages=new_stages), f"stages[{i}]", value
    if kind == "stage_unknown":
        key = draw(NAME.filter(lambda k: k not in STAGE_FIELDS))
        new_stages[i][key] = 1
        return dict(o, stages=new_stages), f"stages[{i}].{key}", None
    if kind == "stage_missing":
        key = draw(st.sampled_from(["chunk_size", "keep_tokens"]))
        del new_stages[i][key]
        return dict(o, stages=new_stages), f"stages[{i}].{key}", None

    field = draw(st.sampled_from(STAGE_FIELDS))
    chunk = st_i["chunk_size"]
    if field == "chunk_size":
        cases = [bad_int(bk, MAX_CHUNK, pow2=True)]
        if i > 0:  # not finer than the previous stage (equal, in particular)
            prev = stages[i - 1]["chunk_size"]
            cases += [st.just(prev), st.sampled_from(_pow2s(prev, MAX_CHUNK))]
        if last and i > 0:  # the last stage must use block_size_k (keep_tokens stays a multiple)
            finer = [c for c in _pow2s(2 * bk, stages[i - 1]["chunk_size"] // 2) if o["selected_tokens"] % c == 0]
            if finer:
                cases.append(st.sampled_from(finer))
    elif field == "keep_tokens":
        cases = [bad_int(chunk, MAX_TOKENS, chunk)]
        if last:  # must equal selected_tokens
            cases.append(_multiples(chunk, chunk, MAX_TOKENS).filter(lambda k: k != o["selected_tokens"]))
        else:  # at least the largest k
            max_sel = max(o["selected_tokens"], o["early_selected_tokens"] if o["early_layers"] else 0)
            if max_sel > chunk:
                cases += [st.just((max_sel - 1) // chunk * chunk), _multiples(chunk, chunk, max_sel - 1)]
    elif field == "query_pool":
        cases = [bad_int(1, bq, pow2=True)]
    else:
        cases = [bad_int(1, MAX_REFRESH)]
        prev = stages[i - 1]["refresh_interval"] if i > 0 else MAX_REFRESH
        if prev < MAX_REFRESH:
            cases += [st.just(prev + 1), st.integers(prev + 1, MAX_REFRESH)]
        if window < MAX_REFRESH:
            cases += [st.just(window + 1), st.integers(window + 1, MAX_REFRESH)]
    value = draw(st.one_of(cases))
    new_stages[i][field] = value
    return dict(o, stages=new_stages), f"stages[{i}].{field}", value


def _default_with(stage_changes: dict | None = None, **changes) -> dict:
    o = dict(InfiniteHipConfig().to_dict(), **changes)
    for (i, key), v in (stage_changes or {}).items():
        o["stages"][i][key] = v
    return o


# Boundaries one step past what is allowed (defaults: need = 256 + 1024 + 4096 = 5376).
@example((_default_with(offload=True, offload_gpu_cache_tokens=5368), "offload_gpu_cache_tokens", 5368))
@example((_default_with({(1, "chunk_size"): 256}), "stages[1].chunk_size", 256))
@example((_default_with({(1, "refresh_interval"): 17}), "stages[1].refresh_interval", 17))
@example((_default_with({(0, "refresh_interval"): 1025}, refresh="paper"), "stages[0].refresh_interval", 1025))
@example((_default_with({(1, "keep_tokens"): 4064}), "stages[1].keep_tokens", 4064))
@example((_default_with(early_layers=1025), "early_layers", 1025))
@example((_default_with(early_layers=True), "early_layers", True))  # bool is an int subclass
@example((_default_with(sink_tokens=False), "sink_tokens", False))
@example((_default_with(window_tokens=MAX_TOKENS + 8), "window_tokens", MAX_TOKENS + 8))
@PROPS
@given(one_bad_field())
def test_one_bad_field_is_named(case):
    options, label, value = case
    with pytest.raises(ConfigError) as e:
        InfiniteHipConfig.from_dict(options)
    msg = str(e.value)
    assert re.match(rf"infinitehip\.{re.escape(label)}[= ]", msg), (label, msg)
    if value is not None:  # the offending value is quoted back
        assert msg.startswith(f"infinitehip.{label}={value!r} "), msg
    # The same refusal through the path vLLM uses (a JSON string), where the value is JSON-able.
    try:
        wire = json.dumps({ADDITIONAL_CONFIG_KEY: options})
    except (TypeError, ValueError):
        return
    if json.loads(wire)[ADDITIONAL_CONFIG_KEY] == options:
        with pytest.raises(ConfigError) as e2:
            InfiniteHipConfig.from_vllm_additional_config(wire)
        assert str(e2.value) == msg


# ------------------------------------------------------------------ partial dicts and junk values
GOOD_TOKENS = st.one_of(
    st.sampled_from([0, 8, 16, 64, 96, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, MAX_TOKENS]),
    _multiples(8, 0, 1 << 15),
)
BAD_TOKENS = st.one_of(st.integers(-16, 1 << 17), NOT_INT)
STAGE = st.fixed_dictionaries(
    {"chunk_size": st.sampled_from([8, 16, 32, 64, 256, 1024]), "keep_tokens": GOOD_TOKENS},
    optional={"query_pool": st.sampled_from([1, 2, 4, 16]), "refresh_interval": st.integers(1, 200)},
)
BAD_STAGE = st.one_of(
    st.fixed_dictionaries(
        {"chunk_size": st.sampled_from([12, 0, 1 << 17]), "keep_tokens": BAD_TOKENS},
        optional={"query_pool": st.sampled_from([3, 0, 256]), "refresh_interval": st.integers(-1, 5000)},
    ),
    st.dictionaries(NAME, st.integers(0, 64), max_size=3),
    NOT_INT,
)
# (mostly good values, junk): each drawn field is junk about one time in eight.
FIELD_VALUES = {
    "preset": (st.sampled_from(sorted(PRESETS)), NOT_BOOL),
    "refresh": (st.sampled_from(sorted(REFRESH_PRESETS)), st.text(max_size=5)),
    "sink_tokens": (GOOD_TOKENS, BAD_TOKENS),
    "window_tokens": (GOOD_TOKENS, BAD_TOKENS),
    "selected_tokens": (GOOD_TOKENS, BAD_TOKENS),
    "early_selected_tokens": (GOOD_TOKENS, BAD_TOKENS),
    "early_layers": (st.integers(0, 40), st.one_of(st.integers(-2, -1), NOT_INT)),
    "block_size_q": (st.sampled_from([16, 32, 64, 128]), st.one_of(st.integers(-1, 300), NOT_INT)),
    "block_size_k": (st.sampled_from([8, 16, 32, 64]), st.one_of(st.integers(-1, 100), NOT_INT)),
    "rope_mode": (st.sampled_from(["streaming", "model"]), NOT_BOOL),
    "rope_cache": (st.sampled_from(["rotated", "unrotated"]), NOT_BOOL),
    "score_norm": (st.sampled_from(["head_max", "none"]), NOT_BOOL),
    "allow_long_context": (st.booleans(), NOT_BOOL),
    "export_metrics": (st.booleans(), NOT_BOOL),
    "decode_splits": (st.integers(0, 256), st.one_of(st.integers(-2, 300), NOT_INT)),
    "offload": (st.booleans(), NOT_BOOL),
    "split_last_query": (st.booleans(), NOT_BOOL),
    "align_prefill_chunks": (st.booleans(), NOT_BOOL),
    "offload_prefill_staging": (st.booleans(), NOT_BOOL),
    "stagger_refresh": (st.booleans(), NOT_BOOL),
    "decode_graphs": (st.booleans(), NOT_BOOL),
    "offload_gpu_cache_tokens": (GOOD_TOKENS, BAD_TOKENS),
    "stages": (
        st.lists(STAGE, max_size=4).map(lambda l: sorted(l, key=lambda s: -s["chunk_size"])),
        st.one_of(st.lists(st.one_of(STAGE, BAD_STAGE), max_size=9), NOT_INT),
    ),
}
MESSAGE = re.compile(
    r"infinitehip(=|\[.+\] is not an option|\.(?P<name>\w+)(\[\d+\](\.(?P<sub>\w+)|\[.+\] is not an option)?)?[= ;])"
)


@st.composite
def partial_options(draw) -> dict:
    keys = draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=6))
    options = {}
    for k in keys:
        good, junk = FIELD_VALUES[k]
        options[k] = draw(junk if draw(st.integers(0, 7)) == 7 else good)
    if draw(st.integers(0, 15)) == 15:
        options[draw(NAME)] = 1
    return options


@settings(PROPS, max_examples=600)
@given(partial_options())
@example({"stages": [{"": 0}]})  # found by CI: an empty key printed as "stages[0]. is not an option"
def test_partial_dicts_build_a_sound_config_or_raise_config_error(options):
    """Defaults, presets and the stage adaptation never produce a config that breaks an invariant,
    and junk never escapes as anything but a ConfigError naming an option."""
    try:
        c = InfiniteHipConfig.from_dict(options)
    except ConfigError as e:
        m = MESSAGE.match(str(e))
        assert m, str(e)
        name, sub = m.group("name"), m.group("sub")
        if name is not None:
            assert name in FIELDS or name in options, str(e)
            if sub is not None:
                assert name == "stages" and (sub in STAGE_FIELDS or "is not an option" in str(e)), str(e)
        return
    check_invariants(c)
    for k, v in options.items():
        if k not in ("stages",):
            assert getattr(c, k) == v
    assert InfiniteHipConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("k", [8, 1024, 2048, 4096, 8192])
def test_changing_k_alone_keeps_invariants(k):
    c = InfiniteHipConfig.from_dict({"selected_tokens": k, "early_selected_tokens": k})
    check_invariants(c)
    assert c.stages[-1].keep_tokens == k and c.exact_context_tokens(10) == 256 + 1024 + k


def test_k_past_a_default_stage_names_that_stage():
    with pytest.raises(ConfigError, match=r"^infinitehip\.stages\[1\]\.keep_tokens=8192 "):
        InfiniteHipConfig.from_dict({"selected_tokens": 8192 + 8})


def test_check_invariants_can_fail():
    # A config that skipped validation (object.__setattr__ on the frozen dataclass) is caught.
    c = InfiniteHipConfig()
    object.__setattr__(c, "stages", (PruningStage(8, 2048, 1, 4), PruningStage(8, 2048, 1, 4)))
    with pytest.raises(AssertionError):
        check_invariants(c)
    c = InfiniteHipConfig()
    object.__setattr__(c, "window_tokens", 12)
    with pytest.raises(AssertionError):
        check_invariants(c)


# ----------------------------------------------------------------------------- refusal at start-up
# vLLM cannot infer a device on a machine without a GPU; the config path under test does not need
# one, so the child pins the CPU platform there (on a GPU machine it runs unchanged).
_CHILD_PRELUDE = """
import sys
import torch
if not torch.cuda.is_available():
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform
    platforms._current_platform = CpuPlatform()
"""
BAD = {ADDITIONAL_CONFIG_KEY: {"window_tokens": -1}}
BAD_MESSAGE = "infinitehip.window_tokens=-1 is invalid: must be an integer in [8, 16777216] and a multiple of 8"


def _child(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "VLLM_ALLOW_LONG_MAX_MODEL_LEN"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CHILD_PRELUDE) + textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=300, env=full_env,
    )  # fmt: skip


@pytest.mark.slow
def test_vllm_serve_refuses_bad_additional_config_before_loading_the_model():
    pytest.importorskip("vllm")
    proc = _child(
        """
        from vllm.entrypoints.cli.main import main
        sys.argv = ["vllm", *sys.argv[1:]]
        main()
        """,
        "serve", "/nonexistent/model", "--attention-backend", "INFINITEHIP",
        "--additional-config", json.dumps(BAD),
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"ConfigError: {BAD_MESSAGE}" in out, out[-3000:]
    # Refused in the API server before vLLM looked for the model (which does not exist) or
    # spawned an engine core.
    assert "Repo id must use" not in out and "EngineCore" not in out, out[-3000:]


# One child, several EngineArgs.create_engine_config() calls: (label, env to set, EngineArgs kwargs).
ENGINE_ARGS_CASES = [
    # `--attention-config '{"backend": "INFINITEHIP"}'` selects the backend too.
    ("attention_config", {}, {"attention_config": {"backend": "INFINITEHIP"}}),
    # The plugin once skipped validation when the user had set this variable.
    ("long_len_env", {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}, {"attention_backend": "INFINITEHIP"}),
    # Another backend: our options are not ours to check; vLLM goes on to look for the model.
    ("other_backend", {}, {"attention_backend": "FLASH_ATTN"}),
]
_ENGINE_ARGS_CHILD = """
import json, os
from vllm.engine.arg_utils import EngineArgs
from vllm.plugins import load_general_plugins
load_general_plugins()  # as `vllm serve` does while building its argument parser
extra = json.loads(sys.argv[1])
for label, env, kwargs in json.loads(sys.argv[2]):
    os.environ.update(env)
    try:
        EngineArgs(model="/nonexistent/model", additional_config=extra, **kwargs).create_engine_config()
        print("@@", label, "built")
    except Exception as e:
        print("@@", label, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    for k in env:
        del os.environ[k]
"""


@pytest.fixture(scope="module")
def engine_args_outcomes() -> dict[str, str]:
    pytest.importorskip("vllm")
    proc = _child(_ENGINE_ARGS_CHILD, json.dumps(BAD), json.dumps(ENGINE_ARGS_CASES))
    got = dict(l[3:].split(" ", 1) for l in proc.stdout.splitlines() if l.startswith("@@ "))
    assert set(got) == {c[0] for c in ENGINE_ARGS_CASES}, proc.stderr[-3000:]
    return got


@pytest.mark.slow
@pytest.mark.parametrize("label", ["attention_config", "long_len_env"])
def test_engine_config_refuses_bad_options(engine_args_outcomes, label):
    assert engine_args_outcomes[label] == f"ConfigError {BAD_MESSAGE}"


@pytest.mark.slow
def test_engine_config_ignores_our_options_for_another_backend(engine_args_outcomes):
    assert not engine_args_outcomes["other_backend"].startswith("ConfigError")
    assert engine_args_outcomes["other_backend"] != "built"  # the model does not exist
