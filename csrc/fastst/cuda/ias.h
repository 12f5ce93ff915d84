// IAS selection on a CUDA device. Mode "official": per-(instance, class) histograms of the
// float16 patterns of m, one block per class walking the instances in order (the EMA of a class
// depends only on its own history), and the label pass. Mode "paper": one radix sort of the
// packed keys (image, class, float bits of m), one thread per class walking the images, and the
// label pass. Enqueued on `stream`; no host sync.
#pragma once
#include <cstdint>

#include "../kernels/ias.h"

namespace fastst {

// Histogram width of the official mode: float16 patterns 0 .. 0x3c00 (= 1.0). Values above 1,
// which only unchecked input (FASTST_CHECK=0) can hold, are counted as 1.0.
constexpr int64_t kOfficialBins = 0x3c01;

void ias_official_cuda(const IasArgs& args, int device, uintptr_t stream);

// Mode "paper". keys/sorted_keys: (B * HW,) uint64 workspaces; temp: `paper_temp_bytes(B * HW,
// B * C)` bytes of CUB workspace.
struct IasPaperWorkspace {
  uint64_t* keys;
  uint64_t* sorted_keys;
  void* temp;
  size_t temp_bytes;
};
size_t ias_paper_temp_bytes(int64_t items, int64_t segments);
void ias_paper_cuda(const IasArgs& args, const IasPaperWorkspace& ws, int device, uintptr_t stream);

}  // namespace fastst
