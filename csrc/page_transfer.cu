// CUDA implementations of the KV page-transfer ops: input checks, device guard, current stream and
// the choice of kernel; the kernels themselves are in page_transfer.cuh.
#include "page_transfer.cuh"
#include "page_transfer.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>

namespace vllm_hip {

namespace {

bool cuda_device_present() { return c10::cuda::device_count() > 0; }

// Device address of a pinned host tensor, valid on the current device. The storage base is queried
// (not the possibly interior data pointer) because that is the address the driver registered.
char* mapped_device_pointer(const at::Tensor& host, const char* op, const char* name) {
  TORCH_CHECK_VALUE(host.device().is_cpu(), op, ": ", name, " must be a CPU or CUDA tensor, got ",
                    host.device());
  const char* base = static_cast<const char*>(host.storage().data());
  cudaPointerAttributes attr{};
  C10_CUDA_CHECK(cudaPointerGetAttributes(&attr, base));
  TORCH_CHECK_VALUE(attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr, op, ": ", name,
                    " is in pageable host memory; the GPU can only reach pinned, mapped host "
                    "memory (allocate it with alloc_pinned_mapped or Tensor.pin_memory())");
  const int64_t offset = static_cast<const char*>(host.data_ptr()) - base;
  return static_cast<char*>(attr.devicePointer) + offset;
}

}  // namespace

at::Tensor alloc_pinned_mapped_cuda(at::IntArrayRef shape, at::ScalarType dtype) {
  if (!cuda_device_present()) return alloc_pinned_mapped_cpu(shape, dtype);
  const int64_t nbytes = checked_nbytes(shape, dtype, "alloc_pinned_mapped");
  const auto opts = at::TensorOptions().dtype(dtype).device(at::kCPU);
  if (nbytes == 0) return at::empty(shape, opts);
  void* ptr = nullptr;
  // Portable: usable from every device's context. Mapped: has a device address, so kernels read it
  // over PCIe without a staging copy.
  const cudaError_t err =
      cudaHostAlloc(&ptr, static_cast<size_t>(nbytes), cudaHostAllocMapped | cudaHostAllocPortable);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error so later calls do not see it
    C10_THROW_ERROR(OutOfMemoryError,
                    c10::str("alloc_pinned_mapped: cudaHostAlloc of ", nbytes, " bytes (",
                             static_cast<double>(nbytes) / (1 << 30),
                             " GiB) of pinned host memory failed: ", cudaGetErrorString(err)));
  }
  auto deleter = [](void* p) {
    const cudaError_t e = cudaFreeHost(p);
    // At interpreter exit the runtime may already be unloading; the memory goes with the process.
    if (e == cudaErrorCudartUnloading) {
      (void)cudaGetLastError();
      return;
    }
    C10_CUDA_CHECK_WARN(e);
  };
  return at::from_blob(ptr, shape, deleter, opts);
}

at::Tensor host_device_view_cuda(const at::Tensor& host) {
  TORCH_CHECK_VALUE(host.device().is_cpu(), "host_device_view: expected a host (CPU) tensor, got ",
                    host.device());
  if (!cuda_device_present()) return host_device_view_cpu(host);
  const at::Device device(at::kCUDA, c10::cuda::current_device());
  const auto opts = host.options().device(device);
  if (host.numel() == 0) return at::empty_strided(host.sizes(), host.strides(), opts);
  c10::cuda::CUDAGuard guard(device);
  char* dptr = mapped_device_pointer(host, "host_device_view", "host");
  // The view keeps the host storage alive; it never frees the memory itself.
  c10::Storage keep = host.storage();
  return at::for_blob(dptr, host.sizes())
      .strides(host.strides())
      .deleter([keep](void*) mutable { keep = c10::Storage(); })
      .options(opts)
      .target_device(device)
      .make_tensor();
}

void gather_blocks_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& src_idx,
                        const at::Tensor& dst_idx) {
  check_gather_args(src, dst, src_idx, dst_idx);
  const bool src_gpu = src.is_cuda();
  const bool dst_gpu = dst.is_cuda();
  TORCH_CHECK_VALUE(src_gpu || dst_gpu, "gather_blocks (CUDA): src or dst must be a CUDA tensor");
  if (src_gpu && dst_gpu) {
    TORCH_CHECK_VALUE(src.device() == dst.device(),
                      "gather_blocks: src and dst are on different GPUs (", src.device(), ", ",
                      dst.device(), ")");
  }
  const CopyDirection direction = !src_gpu  ? CopyDirection::kHostToDevice
                                  : !dst_gpu ? CopyDirection::kDeviceToHost
                                             : CopyDirection::kDeviceToDevice;
  const at::Device device = src_gpu ? src.device() : dst.device();
  const int64_t n = src_idx.numel();
  const int64_t row = block_bytes(src);
  if (n == 0 || row == 0) return;

  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const char* src_ptr = src_gpu ? static_cast<const char*>(src.data_ptr())
                                : mapped_device_pointer(src, "gather_blocks", "src");
  char* dst_ptr = dst_gpu ? static_cast<char*>(dst.data_ptr())
                          : mapped_device_pointer(dst, "gather_blocks", "dst");

  // One pinned staging tensor, one async upload: the caching host allocator keeps the staging
  // block alive until the copy has run (it records an event on the stream), so there is no sync.
  at::Tensor idx_host = at::empty({2, n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  idx_host.select(0, 0).copy_(src_idx);
  idx_host.select(0, 1).copy_(dst_idx);
  const at::Tensor idx = idx_host.to(device, /*non_blocking=*/true);
  const int64_t* idx_ptr = idx.data_ptr<int64_t>();

  C10_CUDA_CHECK(launch_gather_blocks(src_ptr, dst_ptr, idx_ptr, idx_ptr + n, n, row,
                                      src.stride(0) * src.element_size(),
                                      dst.stride(0) * dst.element_size(), direction, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace vllm_hip
