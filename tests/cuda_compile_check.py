"""Compile every Triton kernel variant the launchers use for an H100/H200 (sm_90), on a CPU.

The interpreter (``TRITON_INTERPRET=1``) that the CPU tests run the kernels in is Python: it
accepts code that Triton's compiler refuses (a value defined in one branch only, a type that
changes across a loop, an op the GPU lowering lacks), and such a kernel then fails on the first
GPU request. Triton compiles ahead of time for a CUDA target without a GPU (its wheel ships
``ptxas``), so this script drives the real launchers over small CPU inputs, takes each launch
(kernel, argument types, constexprs, launch options) instead of running it, and compiles it to a
cubin for ``sm_90``. ``IEEE`` is set as the GPU would set it (the launchers pick the fp32 dot for
every CPU tensor; on a GPU only fp32 inputs take it). The inputs cover each code path once
(RoPE modes, rotated keys, fp8, split-K, softcap, the offload page cache, both head sizes), not
every combination: 339 variants took 14 minutes here, these about one.

Run in a fresh process (``tests/test_cuda_compile.py`` does): the kernels must be imported
without ``TRITON_INTERPRET`` (so that ``@triton.jit`` makes compilable functions), then the
variable is set so that the launchers accept CPU tensors. Prints one line per compiled variant;
exit status 1 if any failed.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from vllm_hip_kernels import page_copy, prune, sparse_attention  # noqa: E402
from vllm_hip_kernels.cached_pages import CachedPages  # noqa: E402
from vllm_hip_kernels.query_blocks import build_query_blocks  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
    torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
    torch.float8_e4m3fn: "fp8e4nv",
}  # fmt: skip
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
SEEN: dict[tuple, str] = {}
FAILED: list[str] = []


def _arg_type(value) -> str | None:
    """Triton's signature type of a runtime argument (None: pass it as a constexpr)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def _compile(fn: JITFunction, signature: dict, constexprs: dict, options: dict) -> None:
    key = (fn.fn.__name__, tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
           tuple(sorted(signature.items())), tuple(sorted(options.items())))  # fmt: skip
    if key in SEEN:
        return
    label = f"{fn.fn.__name__} " + " ".join(f"{k}={v}" for k, v in sorted(constexprs.items()))
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=TARGET, options=options)  # fmt: skip
        assert compiled.asm.get("cubin"), "no cubin"
        SEEN[key] = "ok"
        print("ok     ", label[:200], flush=True)
    except Exception as e:  # noqa: BLE001 - report every failing variant, then fail
        SEEN[key] = "FAILED"
        FAILED.append(f"{label}: {type(e).__name__}: {str(e)[:400]}")
        print("FAILED ", label[:200], "\n   ", str(e)[:400], flush=True)


def _launch(self: JITFunction, *args, grid, warmup=False, **kwargs):
    """Stands in for ``JITFunction.run``: compile what would have been launched."""
    options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
    bound = self.signature.bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs = {}, {}
    for p in self.params:
        value = bound.arguments[p.name]
        t = None if p.is_constexpr else _arg_type(value)
        signature[p.name] = "constexpr" if t is None else t
        if t is None:
            constexprs[p.name] = value
    if "IEEE" in constexprs:  # on a GPU only fp32 inputs take the fp32 dot
        sixteen = any(isinstance(v, torch.Tensor) and v.dtype in (torch.bfloat16, torch.float16)
                      for v in bound.arguments.values())  # fmt: skip
        constexprs["IEEE"] = not sixteen
    _compile(self, signature, constexprs, options)


@triton.jit
def _defined_in_one_branch(X, n):
    """Runs in the interpreter whenever n > 0; Triton's compiler refuses it (``--self-test``)."""
    if n > 0:
        y = tl.load(X)
    tl.store(X, y)


def _blocks(q_lens, seq_lens, *, bq=64, sink=64, window=256):
    qsl = torch.tensor([0] + list(q_lens)).cumsum(0)
    return build_query_blocks(qsl, torch.tensor(seq_lens, dtype=torch.int32), block_size_q=bq,
                              sink_tokens=sink, window_tokens=window, device="cpu")  # fmt: skip


def _paged(seq_lens, hkv, d, dtype, page=16):
    pages = sum(-(-n // page) for n in seq_lens) + 2
    kv = torch.zeros(pages, 2, page, hkv, d).to(dtype)
    width = max(-(-n // page) for n in seq_lens)
    bt = torch.arange(len(seq_lens) * width, dtype=torch.int32).view(len(seq_lens), width) % pages
    return kv, bt


#: (head dim, q heads, kv heads, q dtype, kv dtype, rope, mask_rope, offload page cache)
CASES = [
    (128, 32, 8, torch.bfloat16, torch.bfloat16, "none", None, False),
    (128, 32, 8, torch.bfloat16, torch.float8_e4m3fn, "none", None, False),
    (128, 32, 8, torch.bfloat16, torch.bfloat16, "unrotated", "relative", False),
    (128, 32, 8, torch.bfloat16, torch.bfloat16, "unrotated", "chunk_indexed", False),
    (128, 32, 8, torch.bfloat16, torch.bfloat16, "rotated", "relative", True),
    (128, 32, 8, torch.bfloat16, torch.bfloat16, "rotated", "chunk_indexed", False),
    (64, 9, 3, torch.bfloat16, torch.bfloat16, "rotated", "relative", False),  # SmolLM2
    (64, 8, 2, torch.float32, torch.float32, "unrotated", "relative", False),
]


def main() -> int:
    JITFunction.run = _launch
    os.environ["TRITON_INTERPRET"] = "1"  # the launchers accept CPU tensors only then
    sink, window = 64, 256
    # a first stage and a later one (explicit candidates, split from the first)
    stages = [type("S", (), dict(chunk_size=c, keep_tokens=k, query_pool=p))()
              for c, k, p in ((64, 1024, 2), (8, 128, 1))]  # fmt: skip
    q_lens, seq_lens = [1, 64, 1], [3000, 2000, 900]
    qb = _blocks(q_lens, seq_lens, sink=sink, window=window)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    for i, (d, hq, hkv, q_dtype, kv_dtype, rope, mask_rope, offload) in enumerate(CASES):
        q = torch.zeros(sum(q_lens), hq, d, dtype=q_dtype)
        kv, bt = _paged(seq_lens, hkv, d, kv_dtype)
        kc, vc = kv.unbind(1)
        cos = sin = torch.zeros(max(seq_lens) + 1, d // 2)
        rope_kw = {} if rope == "none" else {"cos": cos, "sin": sin, "keys_rotated": rope == "rotated"}
        page_cache = None
        if offload:
            cache = torch.zeros(4, 2, *kv.shape[2:]).to(kv_dtype)
            page_cache = CachedPages(torch.full((kv.shape[0],), -1, dtype=torch.int32),
                                     cache[:, 0], cache[:, 1], torch.zeros(8, dtype=torch.int64))  # fmt: skip
        prune.select_blocks(q, kc, bt, lens, qb, stages, sink_tokens=sink, mask_rope=mask_rope,
                            score_norm="head_max", page_cache=page_cache, **rope_kw)  # fmt: skip
        sel = torch.full((qb.num_blocks, 16), -1, dtype=torch.int32)
        cnt = torch.zeros(qb.num_blocks, dtype=torch.int32)
        sparse_attention.sparse_attention(
            q, kc, vc, bt, lens, qb, sel, cnt, sink_tokens=sink, sm_scale=0.1,
            softcap=30.0 if offload else 0.0, num_splits=3 if i == 0 else 1,
            page_cache=page_cache, window_tokens=window, return_lse=i == 0, **rope_kw,
        )  # fmt: skip
    src = torch.zeros(6, 2, 16, 3, 64, dtype=torch.bfloat16)
    idx = torch.tensor([0, 2], dtype=torch.int32)
    page_copy.copy_pages(src, torch.zeros_like(src), idx, idx)
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):  # the offload cache's other copies
        whole = torch.zeros(2, 6, 2, 16, 3, 64).to(dtype)
        stack = torch.zeros(2, 4, 2, 16, 3, 64).to(dtype)
        off = torch.tensor(page_copy.layer_offsets(whole[0], [whole[0], whole[1]]))
        page_copy.copy_layer_pages(whole[0], off, stack, torch.tensor([1]), idx[None], idx[None])
        page_copy.mirror_rows(whole[0], stack[0], torch.full((7,), -1, dtype=torch.int32), idx)
    print(f"{len(SEEN)} kernel variants compiled for sm_90, {len(FAILED)} failed")
    for f in FAILED:
        print("FAILED:", f)
    return 1 if FAILED or not SEEN else 0


def self_test() -> int:
    """The check must refuse a kernel the interpreter runs: exit 0 iff it does."""
    _compile(_defined_in_one_branch, {"X": "*fp32", "n": "i32"}, {}, {})
    return 0 if FAILED else 1


if __name__ == "__main__":
    sys.exit(self_test() if "--self-test" in sys.argv else main())
