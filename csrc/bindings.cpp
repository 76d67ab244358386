// Registration of the vllm_hip ops with the PyTorch dispatcher (schemas, CPU and CUDA kernels) and
// the module init that lets `import vllm_hip._C` load this library. There are no pybind11
// functions: Python reaches everything through torch.ops.vllm_hip.*, which torch.compile, fake
// tensors and CUDA graphs understand. Fake (meta) implementations are in vllm_hip/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "page_transfer.h"

namespace vllm_hip {
namespace {

// No tensor argument, so the dispatcher cannot choose a backend from the inputs: one
// CompositeExplicitAutograd kernel that picks pinned (CUDA build, GPU present) or plain memory.
at::Tensor alloc_pinned_mapped(at::IntArrayRef shape, at::ScalarType dtype) {
#ifdef VLLM_HIP_WITH_CUDA
  return alloc_pinned_mapped_cuda(shape, dtype);
#else
  return alloc_pinned_mapped_cpu(shape, dtype);
#endif
}

// The only tensor argument is a host tensor, so the dispatcher always selects the CPU key; the GPU
// decision is made here at run time.
at::Tensor host_device_view(const at::Tensor& host) {
#ifdef VLLM_HIP_WITH_CUDA
  return host_device_view_cuda(host);
#else
  return host_device_view_cpu(host);
#endif
}

}  // namespace
}  // namespace vllm_hip

TORCH_LIBRARY(vllm_hip, m) {
  // Host tensor of `shape` in pinned memory mapped into every GPU's address space
  // (cudaHostAllocMapped | cudaHostAllocPortable); ordinary host memory without a GPU.
  m.def("alloc_pinned_mapped(int[] shape, ScalarType dtype) -> Tensor");
  // CUDA tensor aliasing the mapped host memory of `host` (same shape, strides and dtype) on the
  // current device; `host` itself (an alias) when no GPU is present.
  m.def("host_device_view(Tensor(a) host) -> Tensor(a)");
  // dst[dst_idx[i]] = src[src_idx[i]] over dim 0. Indices: int64, 1-D, on the CPU. src and dst may
  // be pinned host + GPU in either direction, both on one GPU, or both on the CPU.
  m.def("gather_blocks(Tensor src, Tensor! dst, Tensor src_idx, Tensor dst_idx) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_hip, CompositeExplicitAutograd, m) {
  m.impl("alloc_pinned_mapped", &vllm_hip::alloc_pinned_mapped);
}

TORCH_LIBRARY_IMPL(vllm_hip, CPU, m) {
  m.impl("host_device_view", &vllm_hip::host_device_view);
  m.impl("gather_blocks", &vllm_hip::gather_blocks_cpu);
}

#ifdef VLLM_HIP_WITH_CUDA
TORCH_LIBRARY_IMPL(vllm_hip, CUDA, m) {
  // Selected whenever src or dst is a CUDA tensor (host<->GPU or GPU<->GPU).
  m.impl("gather_blocks", &vllm_hip::gather_blocks_cuda);
}
#endif

// `import vllm_hip._C` needs a module init; the module itself is empty, loading the library runs
// the registrations above.
#define VLLM_HIP_CONCAT_(a, b) a##b
#define VLLM_HIP_CONCAT(a, b) VLLM_HIP_CONCAT_(a, b)
#define VLLM_HIP_STR_(x) #x
#define VLLM_HIP_STR(x) VLLM_HIP_STR_(x)

PyMODINIT_FUNC VLLM_HIP_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, VLLM_HIP_STR(TORCH_EXTENSION_NAME), nullptr,
                               0, nullptr};
  return PyModule_Create(&module);
}
