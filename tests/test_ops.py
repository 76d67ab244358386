"""KV-offload ops (``vllm_hip._C`` via ``vllm_hip._ops``) against a pure-PyTorch reference.

Every case runs twice: through the compiled op ("ext", skipped when the extension is not built)
and through the pure-PyTorch fallback ("torch"), which must behave the same, errors included.
GPU directions (host->GPU, GPU->host, GPU->GPU) are marked ``gpu``.
"""

from __future__ import annotations

import pytest
import torch

from vllm_hip import _ops

needs_ext = pytest.mark.skipif(
    not _ops.has_ops(),
    reason="vllm_hip._C is not built (pip install -e . without VLLM_HIP_SKIP_EXT=1)",
)
gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
needs_cuda_ext = pytest.mark.skipif(
    not _ops.built_with_cuda(), reason="vllm_hip._C was built without CUDA"
)


@pytest.fixture(params=[pytest.param("ext", marks=needs_ext), "torch"])
def impl(request, monkeypatch):
    monkeypatch.setattr(_ops, "_USE_EXT", request.param == "ext")
    return request.param


def reference_gather(src, dst, src_idx, dst_idx):
    """Block-by-block loop, on CPU copies: independent of any batched indexing."""
    out = dst.detach().cpu().clone()
    host_src = src.detach().cpu()
    for s, d in zip(src_idx.tolist(), dst_idx.tolist()):
        out[d] = host_src[s]
    return out


def random_tensor(shape, dtype, gen):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-100, 100, shape, generator=gen).to(dtype)


def make_case(num_src, num_dst, block, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    src = random_tensor((num_src, *block), dtype, gen)
    dst = random_tensor((num_dst, *block), dtype, gen)
    src_idx = torch.randint(0, num_src, (n,), generator=gen)  # repeated sources are fine
    dst_idx = torch.randperm(num_dst, generator=gen)[:n]
    return src, dst, src_idx, dst_idx


CASES = [
    # (num_src, num_dst, block shape, n, dtype)
    (10, 7, (2, 4, 3), 5, torch.float32),
    (5, 5, (), 5, torch.int64),
    (33, 16, (2, 16, 2, 8), 16, torch.bfloat16),
    (9, 6, (3,), 4, torch.uint8),  # 3-byte blocks: byte-wide copies
    (6, 4, (5, 3), 4, torch.float16),  # 30-byte blocks: 2-byte copies
    (3, 4, (1, 5), 0, torch.float32),  # nothing to copy
]


def _ids(case):
    return f"{case[0]}x{case[2]}->{case[1]}:n{case[3]}:{str(case[4]).split('.')[1]}"


# --------------------------------------------------------------------------- CPU <-> CPU
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_gather_cpu_matches_reference(impl, case):
    src, dst, src_idx, dst_idx = make_case(*case)
    expected = reference_gather(src, dst, src_idx, dst_idx)
    _ops.gather_blocks(src, dst, src_idx, dst_idx)
    assert torch.equal(dst, expected)


def test_gather_strided_views(impl):
    # Keys half of a [pages, 2, page, H, D] store into the values half of a cache: dim 0 strided.
    gen = torch.Generator().manual_seed(1)
    store = torch.randn(12, 2, 4, 2, 8, generator=gen)
    cache = torch.zeros(5, 2, 4, 2, 8)
    src, dst = store[:, 0], cache[:, 1]
    src_idx, dst_idx = torch.tensor([11, 3, 0]), torch.tensor([4, 0, 2])
    expected_cache = cache.clone()
    expected_cache[:, 1] = reference_gather(src, dst, src_idx, dst_idx)
    _ops.gather_blocks(src, dst, src_idx, dst_idx)
    assert torch.equal(cache, expected_cache)  # keys half untouched
    assert not torch.equal(cache[:, 1], torch.zeros_like(cache[:, 1]))


def test_gather_offsets_beyond_int32(impl):
    # 2.5 GiB source, only the touched pages get committed; the block read starts past 2^31 bytes.
    row = 1 << 16
    src = torch.empty((40960, row), dtype=torch.uint8)
    src[40959] = torch.arange(row, dtype=torch.int64).remainder(251).to(torch.uint8)
    src[3] = 7
    dst = torch.zeros((2, row), dtype=torch.uint8)
    _ops.gather_blocks(src, dst, torch.tensor([40959, 3]), torch.tensor([1, 0]))
    assert torch.equal(dst[1], src[40959])
    assert torch.equal(dst[0], src[3])


# --------------------------------------------------------------------------- bad inputs
def _base():
    return torch.zeros(10, 2, 3), torch.zeros(4, 2, 3)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda s, d, si, di: (s, d, si.int(), di), TypeError, "src_idx must be an int64"),
        (lambda s, d, si, di: (s, d, si, di.float()), TypeError, "dst_idx must be an int64"),
        (lambda s, d, si, di: (s, d, torch.tensor([0, 10]), di), IndexError,
         r"src_idx\[1\] = 10 is out of range for src with 10 blocks"),
        (lambda s, d, si, di: (s, d, si, torch.tensor([-1, 2])), IndexError,
         r"dst_idx\[0\] = -1 is out of range"),
        (lambda s, d, si, di: (s, d, si, torch.tensor([1, 4])), IndexError, "dst with 4 blocks"),
        (lambda s, d, si, di: (s, torch.zeros(4, 3, 2), si, di), ValueError, "same shape"),
        (lambda s, d, si, di: (s, torch.zeros(4, 2), si, di), ValueError, "same shape"),
        (lambda s, d, si, di: (s, d.double(), si, di), TypeError, "same dtype"),
        (lambda s, d, si, di: (s, d, si[:1], di), ValueError, "same length"),
        (lambda s, d, si, di: (s, d, si, torch.tensor([2, 2])), ValueError, "repeats"),
        (lambda s, d, si, di: (s, d, si.view(2, 1), di.view(2, 1)), ValueError, "1-D"),
        (lambda s, d, si, di: (s.transpose(1, 2).contiguous().transpose(1, 2), d, si, di),
         ValueError, "must be contiguous"),
        (lambda s, d, si, di: (s, d[:1].expand(4, 2, 3), si, di), ValueError, "overlap"),
        (lambda s, d, si, di: (s, s[5:], si, di), ValueError, "share storage"),
    ],
    ids=[
        "int32-src-idx", "float-dst-idx", "src-out-of-range", "negative-dst", "dst-out-of-range",
        "trailing-shape", "rank", "dtype", "length", "repeated-dst", "2d-idx", "non-contiguous",
        "overlapping-dst", "aliased",
    ],
)
def test_gather_bad_inputs(impl, mutate, exc, match):
    src, dst = _base()
    before = dst.clone()
    args = mutate(src, dst, torch.tensor([0, 9]), torch.tensor([3, 0]))
    with pytest.raises(exc, match=match):
        _ops.gather_blocks(*args)
    assert torch.equal(dst, before)  # checks run before anything is written


# --------------------------------------------------------------------------- alloc / view (CPU)
def test_alloc_pinned_mapped(impl):
    t = _ops.alloc_pinned_mapped([3, 5, 2], torch.bfloat16)
    assert t.shape == (3, 5, 2) and t.dtype == torch.bfloat16 and t.device.type == "cpu"
    assert t.is_contiguous()
    if torch.cuda.device_count() > 0:
        # Pinned and mapped: the device view aliases it. (torch 2.11's Tensor.is_pinned() reported
        # False for this cudaHostAlloc'ed memory on the H100, so it is not the check here.)
        view = _ops.host_device_view(t)
        assert view.is_cuda and view.data_ptr() != 0
    else:
        assert not t.is_pinned()
    t.fill_(1.5)
    assert float(t.float().sum()) == 1.5 * 30
    assert _ops.alloc_pinned_mapped([0, 4], torch.float32).numel() == 0


def test_alloc_errors(impl):
    with pytest.raises(ValueError, match="negative dimension"):
        _ops.alloc_pinned_mapped([2, -1], torch.float32)
    nbytes = 1 << 50  # 1 PiB: no machine has it
    with pytest.raises(torch.OutOfMemoryError, match=f"{nbytes} bytes"):
        _ops.alloc_pinned_mapped([nbytes >> 1], torch.float16)


def test_host_device_view_without_gpu(impl):
    if torch.cuda.device_count() > 0:
        pytest.skip("a GPU is present: the view is a CUDA tensor (see the gpu tests)")
    host = torch.arange(12.0).reshape(3, 4)
    view = _ops.host_device_view(host)
    assert view.device.type == "cpu" and view.data_ptr() == host.data_ptr()
    view[1, 2] = -1.0
    assert host[1, 2] == -1.0


# --------------------------------------------------------------------------- opcheck
OPCHECK_CASES = [CASES[0], CASES[2], CASES[3]]


@needs_ext
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=_ids)
def test_opcheck_gather_cpu(case):
    src, dst, src_idx, dst_idx = make_case(*case)
    torch.library.opcheck(torch.ops.vllm_hip.gather_blocks.default, (src, dst, src_idx, dst_idx))


@needs_ext
@pytest.mark.parametrize("shape, dtype", [([3, 4], torch.float32), ([2, 1, 8], torch.bfloat16)])
def test_opcheck_alloc(shape, dtype):
    # Uninitialized memory: the eager-vs-traced value comparison does not apply.
    torch.library.opcheck(
        torch.ops.vllm_hip.alloc_pinned_mapped.default,
        (shape, dtype),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@needs_ext
@pytest.mark.skipif(
    torch.cuda.device_count() > 0,
    reason="opcheck clones inputs into pageable memory, which the GPU path refuses by design "
    "(test_fake_host_device_view_gpu checks the fake instead)",
)
def test_opcheck_host_device_view():
    host = _ops.alloc_pinned_mapped([4, 6], torch.float32).fill_(2.0)
    # An op with an aliased output cannot be functionalized (test_aot_dispatch_*): it is a
    # setup-time op, called outside torch.compile.
    torch.library.opcheck(
        torch.ops.vllm_hip.host_device_view.default,
        (host,),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


# --------------------------------------------------------------------------- GPU directions
def _pinned(t, how):
    if how == "alloc":
        out = _ops.alloc_pinned_mapped(list(t.shape), t.dtype)
        out.copy_(t)
        return out
    return t.pin_memory()


@pytest.mark.parametrize("how", ["alloc", "pin_memory"])
@pytest.mark.parametrize("direction", ["h2d", "d2h", "d2d"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.usefixtures("impl")
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gather_gpu_matches_reference(case, direction, how):
    if direction == "d2d" and how == "pin_memory":
        pytest.skip("no host memory involved")
    src, dst, src_idx, dst_idx = make_case(*case, seed=3)
    expected = reference_gather(src, dst, src_idx, dst_idx)
    src = src.cuda() if direction in ("d2h", "d2d") else _pinned(src, how)
    dst = dst.cuda() if direction in ("h2d", "d2d") else _pinned(dst, how)
    _ops.gather_blocks(src, dst, src_idx, dst_idx)
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), expected)


@pytest.mark.usefixtures("impl")
@pytest.mark.parametrize("direction", ["h2d", "d2h"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gather_gpu_strided_host_view(direction):
    # Host side is an interior, strided view of a pinned store (storage offset != 0).
    store = _ops.alloc_pinned_mapped([6, 2, 3, 16], torch.bfloat16)
    store.copy_(torch.randn(6, 2, 3, 16).to(torch.bfloat16))
    host = store[:, 1]
    gpu_t = torch.randn(4, 3, 16, device="cuda").to(torch.bfloat16)
    if direction == "h2d":
        src, dst, si, di = host, gpu_t, torch.tensor([5, 1]), torch.tensor([0, 3])
    else:
        src, dst, si, di = gpu_t, host, torch.tensor([2, 0]), torch.tensor([4, 1])
    expected = reference_gather(src, dst, si, di)
    _ops.gather_blocks(src, dst, si, di)
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), expected)


@pytest.mark.usefixtures("impl")
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gather_gpu_bad_inputs():
    host = torch.zeros(4, 8)  # pageable
    dev = torch.zeros(4, 8, device="cuda")
    idx = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="pageable"):
        _ops.gather_blocks(host, dev, idx, idx)
    with pytest.raises(ValueError, match="pageable"):
        _ops.gather_blocks(dev, host, idx, idx)
    with pytest.raises(ValueError, match="CPU tensor"):
        _ops.gather_blocks(host.pin_memory(), dev, idx.cuda(), idx)
    with pytest.raises(IndexError, match="out of range"):
        _ops.gather_blocks(host.pin_memory(), dev, torch.tensor([0, 4]), idx)


@pytest.mark.usefixtures("impl")
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gather_gpu_offsets_beyond_int32():
    row = 1 << 16
    src = _ops.alloc_pinned_mapped([40960, row], torch.uint8)  # 2.5 GiB pinned
    src[40959] = torch.arange(row).remainder(251).to(torch.uint8)
    src[7] = 9
    dst = torch.zeros((40960, row), dtype=torch.uint8, device="cuda")
    _ops.gather_blocks(src, dst, torch.tensor([40959, 7]), torch.tensor([7, 40959]))
    torch.cuda.synchronize()
    assert torch.equal(dst[7].cpu(), src[40959]) and torch.equal(dst[40959].cpu(), src[7])


@pytest.mark.usefixtures("impl")
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_device_view_gpu():
    host = _ops.alloc_pinned_mapped([5, 7], torch.float32)
    host.copy_(torch.arange(35.0).reshape(5, 7))
    view = _ops.host_device_view(host[1:])  # interior view: storage offset
    assert view.is_cuda and view.shape == (4, 7)
    assert torch.equal(view.cpu(), host[1:])
    assert float(view.sum()) == float(host[1:].sum())  # a CUDA kernel reading host memory
    view[0].fill_(-3.0)
    torch.cuda.synchronize()
    assert torch.equal(host[1], torch.full((7,), -3.0))
    with pytest.raises(ValueError, match="pageable"):
        _ops.host_device_view(torch.zeros(3))


# opcheck clones its inputs with torch.clone, which drops pinning, so only GPU<->GPU can go through
# it (the host directions refuse pageable memory by design); the fakes of the host paths are
# checked directly below.
@needs_cuda_ext
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_opcheck_gather_gpu():
    src, dst, src_idx, dst_idx = make_case(*CASES[2])
    torch.library.opcheck(
        torch.ops.vllm_hip.gather_blocks.default, (src.cuda(), dst.cuda(), src_idx, dst_idx)
    )


@needs_cuda_ext
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fake_host_paths_gpu():
    from torch._subclasses.fake_tensor import FakeTensorMode

    host = _ops.alloc_pinned_mapped([4, 6], torch.float32).fill_(2.0)
    real = torch.ops.vllm_hip.host_device_view(host)
    dev = torch.zeros(3, 6, device="cuda")
    with FakeTensorMode() as mode:
        fake_host, fake_dev = mode.from_tensor(host), mode.from_tensor(dev)
        out = torch.ops.vllm_hip.host_device_view(fake_host)
        torch.ops.vllm_hip.gather_blocks(fake_host, fake_dev, torch.tensor([1]), torch.tensor([2]))
    assert (out.device, out.shape, out.stride(), out.dtype) == (
        real.device, real.shape, real.stride(), real.dtype
    )


@needs_cuda_ext
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gather_h2d_bandwidth(capsys):
    """256 scattered 64 KiB blocks host -> GPU; prints GB/s next to copy-engine baselines."""
    blocks, row, pages = 256, 64 << 10, 4096
    store = _ops.alloc_pinned_mapped([pages, row], torch.uint8)
    store.copy_(torch.randint(0, 256, (pages, row), dtype=torch.uint8))
    cache = torch.empty((blocks, row), dtype=torch.uint8, device="cuda")
    gen = torch.Generator().manual_seed(0)
    src_idx = torch.randperm(pages, generator=gen)[:blocks]
    dst_idx = torch.randperm(blocks, generator=gen)

    def timed(fn, iters=20):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters / 1e3

    nbytes = blocks * row
    results = {
        "gather_blocks kernel (zero-copy)": timed(
            lambda: torch.ops.vllm_hip.gather_blocks(store, cache, src_idx, dst_idx)
        ),
        "one contiguous cudaMemcpyAsync (upper bound)": timed(
            lambda: cache.copy_(store[:blocks], non_blocking=True)
        ),
        "256 cudaMemcpyAsync, one per block": timed(
            lambda: [
                cache[d].copy_(store[s], non_blocking=True)
                for s, d in zip(src_idx.tolist(), dst_idx.tolist())
            ],
            iters=5,
        ),
        "index_select on host + copy + index_copy_": timed(
            lambda: cache.index_copy_(
                0, dst_idx.cuda(), store.index_select(0, src_idx).cuda(non_blocking=True)
            ),
            iters=5,
        ),
    }
    torch.ops.vllm_hip.gather_blocks(store, cache, src_idx, dst_idx)
    torch.cuda.synchronize()
    assert torch.equal(cache[dst_idx[:8]].cpu(), store[src_idx[:8]])
    with capsys.disabled():
        print(f"\nhost->GPU gather of {blocks} blocks x {row >> 10} KiB ({nbytes >> 20} MiB), "
              f"{torch.cuda.get_device_name()}:")
        for name, sec in results.items():
            print(f"  {name:48s} {sec * 1e6:9.1f} us  {nbytes / sec / 1e9:6.1f} GB/s")
    assert nbytes / results["gather_blocks kernel (zero-copy)"] > 1e9  # far below any PCIe link
