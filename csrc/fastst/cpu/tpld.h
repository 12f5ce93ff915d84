// TPLD (docs/ops.md §6) and CBST labels (docs/ops.md §5) on the CPU: the per-pixel pass (confident labels,
// voting candidates, image confidence) and the sliding-window vote. The fused losses are in
// bootstrap_loss.h.
#pragma once
#include "../kernels/tpld.h"

namespace fastst {

struct TpldPixelArgs {
  const void* probs;  // (B, C, H, W), any strides, dtype code `dtype`
  int dtype;
  int64_t B, C, H, W;
  int64_t stride_b, stride_c, stride_h, stride_w;
  const float* lambdas;  // (C,)
  uint8_t* labels;       // out (B, H, W): the confident map
  uint8_t* k1;           // out (B, H, W) or null: the two largest q, k1 first
  uint8_t* k2;
  float* q1;             // out (B, H, W) or null
  float* q2;
  double* confidence;    // out (B,) or null: conf_t
  int32_t* flags;        // out (1,), zeroed by the caller: kernels/stats.h value flags of probs
};

void tpld_pixels_cpu(const TpldPixelArgs& args);

// Voting (docs/ops.md §6) in place on `labels` (B, H, W), which holds the confident map on entry.
void tpld_vote_cpu(uint8_t* labels, const uint8_t* k1, const uint8_t* k2, const float* q1, const float* q2,
                   int64_t B, int64_t H, int64_t W, int64_t window, double weight, int64_t iterations);

}  // namespace fastst
