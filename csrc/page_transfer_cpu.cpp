// CPU implementations of the KV page-transfer ops and the checks every implementation shares.
// Compiled in every build (with or without CUDA), so CPU CI builds and tests the same op surface.
#include "page_transfer.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace vllm_hip {

namespace {

void check_index(const at::Tensor& idx, const char* name) {
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "gather_blocks: ", name,
                   " must be an int64 tensor, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.device().is_cpu(), "gather_blocks: ", name,
                    " must be a CPU tensor (indices are range-checked on the host and uploaded "
                    "in one copy), got a tensor on ",
                    idx.device());
  TORCH_CHECK_VALUE(idx.dim() == 1, "gather_blocks: ", name, " must be 1-D, got shape ",
                    idx.sizes());
}

void check_range(const at::Tensor& idx, int64_t limit, const char* name, const char* of) {
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < limit, "gather_blocks: ", name, "[", i, "] = ", p[i],
                      " is out of range for ", of, " with ", limit, " blocks");
  }
}

// A thread races with another one writing the same block: refuse instead of picking a winner.
void check_unique(const at::Tensor& idx, const char* name) {
  std::vector<int64_t> v(idx.data_ptr<int64_t>(), idx.data_ptr<int64_t>() + idx.numel());
  std::sort(v.begin(), v.end());
  auto it = std::adjacent_find(v.begin(), v.end());
  TORCH_CHECK_VALUE(it == v.end(), "gather_blocks: ", name, " repeats block ", *it,
                    "; every destination block must be written at most once");
}

// Blocks must be contiguous; the stride between blocks (dim 0) is free, so views such as the keys
// half of a [pages, 2, ...] store are accepted.
void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() >= 1, "gather_blocks: ", name, " must have at least one dimension");
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    TORCH_CHECK_VALUE(t.size(d) == 1 || t.stride(d) == expected, "gather_blocks: each block of ",
                      name, " (dims 1..) must be contiguous, got shape ", t.sizes(),
                      " and strides ", t.strides());
    expected *= t.size(d);
  }
}

}  // namespace

int64_t block_bytes(const at::Tensor& t) {
  int64_t n = t.element_size();
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

int64_t checked_nbytes(at::IntArrayRef shape, at::ScalarType dtype, const char* op) {
  uint64_t n = c10::elementSize(dtype);
  for (int64_t s : shape) {
    TORCH_CHECK_VALUE(s >= 0, op, ": negative dimension in shape ", shape);
    TORCH_CHECK_VALUE(!__builtin_mul_overflow(n, static_cast<uint64_t>(s), &n) &&
                          n <= static_cast<uint64_t>(INT64_MAX),
                      op, ": shape ", shape, " of ", dtype, " overflows 64-bit byte sizes");
  }
  return static_cast<int64_t>(n);
}

void check_gather_args(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& src_idx,
                       const at::Tensor& dst_idx) {
  check_index(src_idx, "src_idx");
  check_index(dst_idx, "dst_idx");
  TORCH_CHECK_VALUE(src_idx.numel() == dst_idx.numel(),
                    "gather_blocks: src_idx and dst_idx must have the same length, got ",
                    src_idx.numel(), " and ", dst_idx.numel());
  TORCH_CHECK_TYPE(src.scalar_type() == dst.scalar_type(),
                   "gather_blocks: src and dst must have the same dtype, got ", src.scalar_type(),
                   " and ", dst.scalar_type());
  check_rows(src, "src");
  check_rows(dst, "dst");
  TORCH_CHECK_VALUE(src.dim() == dst.dim() && src.sizes().slice(1) == dst.sizes().slice(1),
                    "gather_blocks: src and dst blocks must have the same shape, got src ",
                    src.sizes(), " and dst ", dst.sizes(), " (dims 1.. must match)");
  const int64_t row_numel = block_bytes(dst) / dst.element_size();
  TORCH_CHECK_VALUE(dst.size(0) <= 1 || row_numel == 0 || dst.stride(0) >= row_numel,
                    "gather_blocks: dst blocks overlap in memory (stride(0) = ", dst.stride(0),
                    " < ", row_numel, " elements per block)");
  TORCH_CHECK_VALUE(!src.is_alias_of(dst), "gather_blocks: src and dst must not share storage");
  check_range(src_idx.contiguous(), src.size(0), "src_idx", "src");
  const at::Tensor di = dst_idx.contiguous();
  check_range(di, dst.size(0), "dst_idx", "dst");
  check_unique(di, "dst_idx");
}

at::Tensor alloc_pinned_mapped_cpu(at::IntArrayRef shape, at::ScalarType dtype) {
  const int64_t nbytes = checked_nbytes(shape, dtype, "alloc_pinned_mapped");
  try {
    return at::empty(shape, at::TensorOptions().dtype(dtype).device(at::kCPU));
  } catch (const c10::Error& e) {
    C10_THROW_ERROR(OutOfMemoryError,
                    c10::str("alloc_pinned_mapped: could not allocate ", nbytes, " bytes (",
                             static_cast<double>(nbytes) / (1 << 30),
                             " GiB) of host memory: ", e.what_without_backtrace()));
  }
}

// Without a GPU the compute device is the CPU, which sees host memory as it is.
at::Tensor host_device_view_cpu(const at::Tensor& host) {
  TORCH_CHECK_VALUE(host.device().is_cpu(), "host_device_view: expected a host (CPU) tensor, got ",
                    host.device());
  return host.alias();
}

void gather_blocks_cpu(const at::Tensor& src, at::Tensor& dst, const at::Tensor& src_idx,
                       const at::Tensor& dst_idx) {
  check_gather_args(src, dst, src_idx, dst_idx);
  TORCH_CHECK_VALUE(src.device().is_cpu() && dst.device().is_cpu(),
                    "gather_blocks (CPU): src and dst must be CPU tensors, got ", src.device(),
                    " and ", dst.device());
  const int64_t n = src_idx.numel();
  const int64_t row = block_bytes(src);
  if (n == 0 || row == 0) return;
  const at::Tensor si = src_idx.contiguous();
  const at::Tensor di = dst_idx.contiguous();
  const int64_t* sp = si.data_ptr<int64_t>();
  const int64_t* dp = di.data_ptr<int64_t>();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  const int64_t ss = src.stride(0) * src.element_size();
  const int64_t ds = dst.stride(0) * dst.element_size();
  // About 1 MiB per task: memcpy is bandwidth bound, smaller tasks only add scheduling.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / row);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) std::memcpy(d + dp[i] * ds, s + sp[i] * ss, row);
  });
}

}  // namespace vllm_hip
