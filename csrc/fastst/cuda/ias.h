// IAS selection on a CUDA device. Mode "official": per-(instance, class) histograms of the
// float16 patterns of m, one block per class walking the instances in order (the EMA of a class
// depends only on its own history), and the label pass. Mode "paper": one radix sort of the
// packed keys (image, class, float bits of m), one thread per class walking the images, and the
// label pass. Enqueued on `stream`; no host sync.
#pragma once
#include <cstdint>

namespace fastst {

struct IasCudaArgs {
  const float* m;             // (B, HW)
  const uint8_t* a;           // (B, HW)
  const int64_t* counts;      // (B, C)
  int64_t B, C, HW, group;
  int32_t* hist;              // (G, C, kOfficialBins) workspace, zero-initialised by the caller
  const double* theta_in;     // (C,)
  double* theta_out;          // (C,)
  double* theta_per_instance; // (G, C)
  uint8_t* labels;            // (B, HW)
  double alpha, beta, gamma;
};

// Histogram width of the official mode: float16 patterns 0 .. 0x3c00 (= 1.0). Values above 1,
// which only unchecked input (FASTST_CHECK=0) can hold, are counted as 1.0.
constexpr int64_t kOfficialBins = 0x3c01;

void ias_official_cuda(const IasCudaArgs& args, int device, uintptr_t stream);

// Mode "paper". keys/sorted_keys: (B * HW,) uint64 workspaces; temp: `paper_temp_bytes(B * HW,
// B * C)` bytes of CUB workspace.
struct IasPaperWorkspace {
  uint64_t* keys;
  uint64_t* sorted_keys;
  void* temp;
  size_t temp_bytes;
};
size_t ias_paper_temp_bytes(int64_t items, int64_t segments);
void ias_paper_cuda(const IasCudaArgs& args, const IasPaperWorkspace& ws, int device, uintptr_t stream);

}  // namespace fastst
