// IAS selection, mode "official", on a CUDA device. The arithmetic per class (theta ** gamma,
// the numpy-percentile plan, the EMA, the label rule) is kernels/ias.h, shared with the C++ twin
// in cpu/ias.cpp, which the CPU tests check bit for bit against the reference.
//
//  1. histogram: one thread per pixel adds 1 to hist[instance][a][half(m)]. Peaked maps put many
//     pixels of a warp in the same bin, so lanes with the same (class, bin) are merged with
//     __match_any_sync and one atomicAdd per group is issued.
//  2. select: one block per class walks the instances in order; per instance a block-wide scan of
//     the class's histogram finds n_below (values < theta) and the two order statistics.
//  3. labels: one thread per pixel compares m with theta after its instance's update.
#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <stdexcept>
#include <string>

#include "../kernels/ias.h"
#include "device_guard.h"
#include "ias.h"

namespace fastst {
namespace {

constexpr int kThreads = 256;
constexpr int kSelectThreads = 512;
constexpr int kBinsPerThread = int((kOfficialBins + kSelectThreads - 1) / kSelectThreads);


__global__ void histogram_kernel(IasArgs args) {
  const int64_t b = blockIdx.y;
  const int64_t g = b / args.group;
  const int lane = int(threadIdx.x % 32);
  // The loop runs per warp (all lanes share `base`, blockDim is a multiple of 32), so every lane
  // reaches __match_any_sync together; lanes past the end carry no pixel.
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x + threadIdx.x - lane; base < args.HW;
       base += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = base + lane;
    const bool valid = p < args.HW;
    uint32_t key = 0xffffffffu;
    if (valid) {
      uint32_t bin = half_bits_of(args.m[b * args.HW + p]);
      bin = bin < uint32_t(kOfficialBins - 1) ? bin : uint32_t(kOfficialBins - 1);
      key = (uint32_t(args.a[b * args.HW + p]) << 16) | bin;
    }
    const unsigned same = __match_any_sync(0xffffffffu, key);
    if (valid && lane == __ffs(same) - 1) {
      atomicAdd(args.hist + (g * args.C + (key >> 16)) * kOfficialBins + (key & 0xffffu), __popc(same));
    }
  }
}

// j-th smallest value (0-based) of the class histogram `hist`, given each thread's inclusive
// prefix `before` (count of the bins before its range). Returns through shared memory.
__device__ void find_value(const int32_t* hist, int64_t j, int64_t before, int first_bin, double* out) {
  if (j < 0) return;
  int64_t seen = before;
  for (int i = 0; i < kBinsPerThread; ++i) {
    const int bin = first_bin + i;
    if (bin >= kOfficialBins) break;
    const int32_t n = hist[bin];
    if (n > 0 && seen <= j && j < seen + n) *out = (double)to_float(Half{(uint16_t)bin});
    seen += n;
  }
}

__global__ void __launch_bounds__(kSelectThreads) select_kernel(IasArgs args) {
  using Scan = cub::BlockScan<int64_t, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ double theta, lo, hi;
  __shared__ int64_t n_below_shared;
  __shared__ int theta_bin;
  const int64_t c = blockIdx.x;
  const int64_t G = (args.B + args.group - 1) / args.group;
  const int first_bin = int(threadIdx.x) * kBinsPerThread;
  if (threadIdx.x == 0) theta = args.theta_in[c];
  __syncthreads();
  for (int64_t g = 0; g < G; ++g) {
    const int32_t* hist = args.hist + (g * args.C + c) * kOfficialBins;
    int64_t mine = 0;
    for (int i = 0; i < kBinsPerThread && first_bin + i < kOfficialBins; ++i) mine += hist[first_bin + i];
    int64_t before = 0;
    Scan(scan_storage).ExclusiveSum(mine, before);
    if (threadIdx.x == 0) {
      // First pattern whose value is >= theta (patterns order like values for m >= +0).
      int left = 0, right = int(kOfficialBins);
      while (left < right) {
        const int mid = (left + right) / 2;
        if ((double)to_float(Half{(uint16_t)mid}) < theta) left = mid + 1; else right = mid;
      }
      theta_bin = left;
      n_below_shared = 0;
    }
    __syncthreads();
    int64_t below = 0;
    for (int i = 0; i < kBinsPerThread && first_bin + i < theta_bin; ++i) below += hist[first_bin + i];
    if (below) atomicAdd(reinterpret_cast<unsigned long long*>(&n_below_shared), (unsigned long long)below);
    __syncthreads();
    int64_t n = 0;
    for (int64_t b = g * args.group; b < args.B && b < (g + 1) * args.group; ++b) n += args.counts[b * args.C + c];
    const double k = dmul(args.alpha, theta_pow(theta, args.gamma));
    const PercentilePlan plan = official_plan(k, n);
    const int64_t s_lo = official_source(plan.j_lo, n_below_shared);
    const int64_t s_hi = official_source(plan.j_hi, n_below_shared);
    if (threadIdx.x == 0) {
      lo = theta;
      hi = theta;
    }
    __syncthreads();
    find_value(hist, s_lo, before, first_bin, &lo);
    find_value(hist, s_hi, before, first_bin, &hi);
    __syncthreads();
    if (threadIdx.x == 0) {
      theta = official_ema(theta, official_lerp(lo, hi, plan.t), args.beta);
      args.theta_per_instance[g * args.C + c] = theta;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) args.theta_out[c] = theta;
}

__global__ void label_kernel(IasArgs args, bool strict) {
  const int64_t b = blockIdx.y;
  const double* theta = args.theta_per_instance + (b / args.group) * args.C;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < args.HW;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int a = args.a[b * args.HW + p];
    args.labels[b * args.HW + p] = ias_label_f32(args.m[b * args.HW + p], a, float_threshold(theta[a], strict), strict);
  }
}

}  // namespace

void ias_official_cuda(const IasArgs& args, int device, uintptr_t stream) {
  constexpr const char* kName = "ias_official_cuda";
  const DeviceGuard guard(device, kName);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  int64_t blocks = (args.HW + kThreads - 1) / kThreads;
  if (blocks > 65535) blocks = 65535;
  const dim3 grid(unsigned(blocks), unsigned(args.B));
  histogram_kernel<<<grid, kThreads, 0, s>>>(args);
  check_cuda(cudaGetLastError(), kName, "histogram kernel launch");
  select_kernel<<<unsigned(args.C), kSelectThreads, 0, s>>>(args);
  check_cuda(cudaGetLastError(), kName, "select kernel launch");
  label_kernel<<<grid, kThreads, 0, s>>>(args, /*strict=*/false);
  check_cuda(cudaGetLastError(), kName, "label kernel launch");
}

// ---- mode "paper" ----
namespace {

int key_bits(int64_t segments) {
  int bits = 32;
  while ((int64_t(1) << (bits - 32)) < segments) ++bits;
  return bits;
}

// key = ((b * C + a) << 32) | float_bits(m): sorting orders pixels by image, class, then value.
__global__ void pack_keys_kernel(IasArgs args, uint64_t* keys) {
  const int64_t total = args.B * args.HW;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / args.HW;
    keys[i] = (uint64_t(b * args.C + args.a[i]) << 32) | float_to_bits(args.m[i]);
  }
}

// One thread per class walks the images in order (group is 1 in this mode).
__global__ void paper_select_kernel(IasArgs args, const uint64_t* sorted_keys) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= args.C) return;
  double theta = args.theta_in[c];
  int64_t start = 0;  // offset of segment (b, c) = pixels of earlier images + earlier classes of b
  for (int64_t b = 0; b < args.B; ++b) {
    int64_t offset = start;
    for (int64_t j = 0; j < c; ++j) offset += args.counts[b * args.C + j];
    const int64_t n = args.counts[b * args.C + c];
    if (n > 0) {
      const double k = dmul(args.alpha, theta_pow(theta, args.gamma));
      const int64_t r = paper_rank(k, n);
      const float psi = bits_to_float(uint32_t(sorted_keys[offset + n - 1 - r] & 0xffffffffu));
      theta = paper_ema(theta, (double)psi, args.beta);
    }
    args.theta_per_instance[b * args.C + c] = theta;
    start += args.HW;
  }
  args.theta_out[c] = theta;
}

}  // namespace

size_t ias_paper_temp_bytes(int64_t items, int64_t segments) {
  size_t bytes = 0;
  check_cuda(cub::DeviceRadixSort::SortKeys(nullptr, bytes, static_cast<const uint64_t*>(nullptr),
                                            static_cast<uint64_t*>(nullptr), items, 0,
                                            key_bits(segments)),
             "ias_paper_temp_bytes", "radix sort workspace query");
  return bytes;
}

void ias_paper_cuda(const IasArgs& args, const IasPaperWorkspace& ws, int device, uintptr_t stream) {
  constexpr const char* kName = "ias_paper_cuda";
  const DeviceGuard guard(device, kName);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t items = args.B * args.HW;
  int64_t blocks = (items + kThreads - 1) / kThreads;
  if (blocks > 65535) blocks = 65535;
  pack_keys_kernel<<<unsigned(blocks), kThreads, 0, s>>>(args, ws.keys);
  check_cuda(cudaGetLastError(), kName, "pack kernel launch");
  size_t temp_bytes = ws.temp_bytes;
  check_cuda(cub::DeviceRadixSort::SortKeys(ws.temp, temp_bytes, ws.keys, ws.sorted_keys, items, 0,
                                            key_bits(args.B * args.C), s),
             kName, "radix sort");
  paper_select_kernel<<<unsigned((args.C + 63) / 64), 64, 0, s>>>(args, ws.sorted_keys);
  check_cuda(cudaGetLastError(), kName, "paper select kernel launch");
  int64_t pixel_blocks = (args.HW + kThreads - 1) / kThreads;
  if (pixel_blocks > 65535) pixel_blocks = 65535;
  label_kernel<<<dim3(unsigned(pixel_blocks), unsigned(args.B)), kThreads, 0, s>>>(args, /*strict=*/true);
  check_cuda(cudaGetLastError(), kName, "label kernel launch");
}

}  // namespace fastst
