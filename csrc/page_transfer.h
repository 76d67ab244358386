// Torch-level entry points of the KV page-transfer ops, shared by the CPU implementations
// (page_transfer_cpu.cpp, always built), the CUDA implementations (page_transfer.cu, built when
// VLLM_HIP_WITH_CUDA is defined) and the registrations (bindings.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace vllm_hip {

// ----------------------------------------------------------------------------- shared checks
// Checks everything about a gather that does not depend on the device: dtypes, shapes, row
// layout, index dtype/device/shape, index range and repeated destinations. Throws c10 errors that
// surface in Python as TypeError / ValueError / IndexError.
void check_gather_args(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& src_idx,
                       const at::Tensor& dst_idx);

// Bytes of one block (one slice of dim 0) of t.
int64_t block_bytes(const at::Tensor& t);

// Number of bytes of a tensor of this shape and dtype; throws ValueError on negative sizes and on
// int64 overflow.
int64_t checked_nbytes(at::IntArrayRef shape, at::ScalarType dtype, const char* op);

// ----------------------------------------------------------------------------- CPU
at::Tensor alloc_pinned_mapped_cpu(at::IntArrayRef shape, at::ScalarType dtype);
at::Tensor host_device_view_cpu(const at::Tensor& host);
void gather_blocks_cpu(const at::Tensor& src, at::Tensor& dst, const at::Tensor& src_idx,
                       const at::Tensor& dst_idx);

#ifdef VLLM_HIP_WITH_CUDA
// ----------------------------------------------------------------------------- CUDA
// Fall back to the CPU versions when no CUDA device is visible at run time (a CUDA build on a CPU
// machine), so the same wheel serves both.
at::Tensor alloc_pinned_mapped_cuda(at::IntArrayRef shape, at::ScalarType dtype);
at::Tensor host_device_view_cuda(const at::Tensor& host);
void gather_blocks_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& src_idx,
                        const at::Tensor& dst_idx);
#endif

}  // namespace vllm_hip
