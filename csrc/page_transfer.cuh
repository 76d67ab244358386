// KV page transfers: kernels and launchers. Torch-free on purpose (only the CUDA runtime), so the
// launch logic can be read, tested and reused without ATen; input checks, device guards, streams and
// dtype handling live one layer up in page_transfer.cu.
//
// A "block" is one slice of the first dimension of a tensor whose trailing dimensions are contiguous
// (one KV page: [2, page_size, num_kv_heads, head_dim] elements, or its keys only). Blocks are moved
// as raw bytes, so one kernel per vector width serves every dtype.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace vllm_hip {

// Where source and destination live. Host memory is reached through its mapped device address
// (UVA), so every direction is the same kernel; the direction only changes how the work is split.
enum class CopyDirection : int {
  kHostToDevice = 0,    // cache fill: pinned host store -> GPU block cache
  kDeviceToHost = 1,    // write-back: GPU -> pinned host store
  kDeviceToDevice = 2,  // same GPU
};

namespace detail {

constexpr int kGatherThreads = 256;
// Vectors each thread keeps in flight per iteration: host reads cross PCIe with ~1-2 us latency, so
// several independent loads per thread are needed to saturate the link.
constexpr int kGatherUnroll = 4;

// Grid: x = blocks (grid-strided), y = chunks of one block's bytes (grid-strided). Every offset is
// int64: a host store of many GiB overflows 32-bit byte offsets long before 2^31 pages.
template <typename VecT>
__global__ void gather_blocks_kernel(const char* __restrict__ src, char* __restrict__ dst,
                                     const int64_t* __restrict__ src_idx,
                                     const int64_t* __restrict__ dst_idx, int64_t num_blocks,
                                     int64_t src_stride_bytes, int64_t dst_stride_bytes,
                                     int64_t row_vecs) {
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    const VecT* s = reinterpret_cast<const VecT*>(src + src_idx[b] * src_stride_bytes);
    VecT* d = reinterpret_cast<VecT*>(dst + dst_idx[b] * dst_stride_bytes);
    int64_t v = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
    for (; v + (kGatherUnroll - 1) * step < row_vecs; v += kGatherUnroll * step) {
      VecT r[kGatherUnroll];
#pragma unroll
      for (int u = 0; u < kGatherUnroll; ++u) r[u] = s[v + u * step];
#pragma unroll
      for (int u = 0; u < kGatherUnroll; ++u) d[v + u * step] = r[u];
    }
    for (; v < row_vecs; v += step) d[v] = s[v];
  }
}

template <typename VecT>
cudaError_t launch_gather_blocks_typed(const char* src, char* dst, const int64_t* src_idx,
                                       const int64_t* dst_idx, int64_t num_blocks,
                                       int64_t row_bytes, int64_t src_stride_bytes,
                                       int64_t dst_stride_bytes, int64_t chunk_bytes,
                                       cudaStream_t stream) {
  const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(VecT));
  const int64_t chunks = (row_bytes + chunk_bytes - 1) / chunk_bytes;
  const int64_t max_y = 65535;
  const int64_t max_x = 2147483647;
  const dim3 grid(static_cast<unsigned>(num_blocks < max_x ? num_blocks : max_x),
                  static_cast<unsigned>(chunks < max_y ? chunks : max_y));
  gather_blocks_kernel<VecT><<<grid, kGatherThreads, 0, stream>>>(
      src, dst, src_idx, dst_idx, num_blocks, src_stride_bytes, dst_stride_bytes, row_vecs);
  return cudaGetLastError();
}

}  // namespace detail

// dst[dst_idx[i]] = src[src_idx[i]] for i < num_blocks, one launch for all blocks.
//
// Why a kernel and not copy engines (cudaMemcpyAsync per contiguous run / cudaMemcpyBatchAsync):
// the blocks an LRU admits are scattered pages of a few KiB to a few hundred KiB, so each DMA copy
// pays ~2-5 us of submission cost and runs of adjacent pages are rare; one launch that reads the
// mapped host pages directly costs the same for 1 or 10,000 blocks, needs the indices only on the
// device (no per-block host loop), and is the same code for every direction.
//
// src / dst: device-dereferenceable addresses (device memory, or the mapped address of pinned host
// memory). src_idx / dst_idx: device-resident int64 arrays of num_blocks entries, already range
// checked. Strides and row_bytes are in bytes. Returns the launch status.
inline cudaError_t launch_gather_blocks(const void* src, void* dst, const int64_t* src_idx,
                                        const int64_t* dst_idx, int64_t num_blocks,
                                        int64_t row_bytes, int64_t src_stride_bytes,
                                        int64_t dst_stride_bytes, CopyDirection direction,
                                        cudaStream_t stream) {
  if (num_blocks <= 0 || row_bytes <= 0) return cudaSuccess;
  // Traffic over PCIe is latency bound: smaller per-CTA chunks put more CTAs (and more outstanding
  // reads) in flight. Within HBM, larger chunks cut scheduling overhead.
  const int64_t chunk_bytes =
      direction == CopyDirection::kDeviceToDevice ? int64_t{64} << 10 : int64_t{16} << 10;
  const char* s = static_cast<const char*>(src);
  char* d = static_cast<char*>(dst);
  // Widest vector dividing both base addresses, the row size and both strides: then every row start
  // (base + idx * stride) is aligned too.
  const uint64_t align = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                         static_cast<uint64_t>(row_bytes) |
                         static_cast<uint64_t>(src_stride_bytes) |
                         static_cast<uint64_t>(dst_stride_bytes);
  if (align % 16 == 0)
    return detail::launch_gather_blocks_typed<uint4>(s, d, src_idx, dst_idx, num_blocks, row_bytes,
                                                     src_stride_bytes, dst_stride_bytes,
                                                     chunk_bytes, stream);
  if (align % 8 == 0)
    return detail::launch_gather_blocks_typed<uint2>(s, d, src_idx, dst_idx, num_blocks, row_bytes,
                                                     src_stride_bytes, dst_stride_bytes,
                                                     chunk_bytes, stream);
  if (align % 4 == 0)
    return detail::launch_gather_blocks_typed<uint32_t>(s, d, src_idx, dst_idx, num_blocks,
                                                        row_bytes, src_stride_bytes,
                                                        dst_stride_bytes, chunk_bytes, stream);
  if (align % 2 == 0)
    return detail::launch_gather_blocks_typed<uint16_t>(s, d, src_idx, dst_idx, num_blocks,
                                                        row_bytes, src_stride_bytes,
                                                        dst_stride_bytes, chunk_bytes, stream);
  return detail::launch_gather_blocks_typed<uint8_t>(s, d, src_idx, dst_idx, num_blocks, row_bytes,
                                                     src_stride_bytes, dst_stride_bytes,
                                                     chunk_bytes, stream);
}

}  // namespace vllm_hip
