"""On a GPU machine with vLLM and $SMOLLM2: `vllm serve --attention-backend INFINITEHIP` answers
/v1/completions and /v1/chat/completions with the same greedy outputs as FLASH_ATTN."""

import os
import sys

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.mark.skipif(not os.environ.get("SMOLLM2"), reason="needs $SMOLLM2 (a HF model folder)")
def test_serve_matches_flash_attn(tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.serve_equivalence import main

    out = tmp_path / "eq.json"
    rc = main(["--model", os.environ["SMOLLM2"], "--num-prompts", "20", "--log-dir", str(tmp_path),
               "--out", str(out)])
    assert rc == 0, out.read_text()
