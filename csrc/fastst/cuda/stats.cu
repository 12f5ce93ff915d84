// CUDA launcher of the fused statistics pass; the arithmetic is in kernels/stats.h.
//
// Grid: (ceil(H*W / kThreads), B). Each thread handles pixels of one image with a grid-stride
// loop (consecutive threads read consecutive columns: coalesced for the usual W-contiguous
// layout). Per-class counts go to a shared-memory histogram first, then one atomicAdd per
// (block, class) to global memory.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../kernels/stats.h"
#include "device_guard.h"
#include "stats.h"

namespace fastst {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void stats_kernel(StatsArgs args) {
  extern __shared__ unsigned int block_counts[];
  const int64_t b = blockIdx.y;
  const int64_t plane = args.H * args.W;
  for (int64_t c = threadIdx.x; c < args.C; c += blockDim.x) block_counts[c] = 0;
  __syncthreads();
  const T* xb = static_cast<const T*>(args.x) + b * args.stride_b;
  int flags = 0;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < plane;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t y = p / args.W;
    const int64_t xo = p - y * args.W;
    const PixelSource src = pixel_source(y, xo, args.h, args.w, args.H, args.W, args.stride_h,
                                         args.stride_w, args.align_corners);
    const PixelStats st = pixel_stats(xb, args.C, args.stride_c, src, args.from_logits);
    args.m[b * plane + p] = st.m;
    args.a[b * plane + p] = uint8_t(st.a);
    atomicAdd(&block_counts[st.a], 1u);
    flags |= st.flags;
  }
  if (flags) atomicOr(args.flags, flags);
  __syncthreads();
  for (int64_t c = threadIdx.x; c < args.C; c += blockDim.x) {
    if (block_counts[c]) {
      atomicAdd(reinterpret_cast<unsigned long long*>(args.counts + b * args.C + c),
                static_cast<unsigned long long>(block_counts[c]));
    }
  }
}

}  // namespace

void stats_cuda(const StatsArgs& args, int device, uintptr_t stream) {
  const DeviceGuard guard(device, "stats_cuda");
  const int64_t plane = args.H * args.W;
  int64_t blocks = (plane + kThreads - 1) / kThreads;
  if (blocks > 65535) blocks = 65535;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(args.B));
  const size_t shared = size_t(args.C) * sizeof(unsigned int);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case kFloat32: stats_kernel<float><<<grid, kThreads, shared, s>>>(args); break;
    case kFloat16: stats_kernel<Half><<<grid, kThreads, shared, s>>>(args); break;
    case kBFloat16: stats_kernel<BFloat16><<<grid, kThreads, shared, s>>>(args); break;
  }
  check_cuda(cudaGetLastError(), "stats_cuda", "kernel launch");
}

}  // namespace fastst
