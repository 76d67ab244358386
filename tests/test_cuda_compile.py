"""Every Triton kernel variant the launchers use compiles for sm_90, on a CPU machine.

The CPU tests run the kernels in Triton's interpreter, which accepts code the compiler refuses;
``tests/cuda_compile_check.py`` compiles what the launchers would launch (a fresh process: the
kernels must be imported without ``TRITON_INTERPRET``). Needs Triton's NVIDIA backend (``ptxas``
ships in the wheel), not a GPU.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")


def _check(*args: str) -> subprocess.CompletedProcess:
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, os.path.join(here, "cuda_compile_check.py"), *args],
                          capture_output=True, text=True, env=env, timeout=1800)  # fmt: skip


def test_the_check_refuses_what_only_the_interpreter_runs():
    proc = _check("--self-test")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "FAILED" in proc.stdout and "_defined_in_one_branch" in proc.stdout


def test_every_kernel_variant_compiles_for_sm90():
    proc = _check()
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    n = int(proc.stdout.strip().splitlines()[-1].split()[0])
    assert n >= 20, tail  # pool/score/top-k/split per RoPE mode, attention, combine, copy
