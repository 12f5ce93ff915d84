// The inputs every fused per-pixel loss shares (region loss, bootstrapping, MRKLD): logits of any
// strides, the labels at the output size, and the gradient output. Each loss's argument struct
// extends it with its own parameters.
#pragma once
#include "../common.h"

namespace fastst {

struct LossInputs {
  const void* logits;  // (B, C, h, w), any strides, dtype code `dtype`
  int dtype;
  int64_t B, C, h, w, H, W;
  int64_t stride_b, stride_c, stride_h, stride_w;
  const void* target;  // (B, H, W) contiguous, uint8 or int64
  bool target_is_u8;
  int ignore_index;
  bool align_corners;  // of the bilinear upsample (h, w) -> (H, W), as F.interpolate
  float* grad;         // out (B, C, h, w) contiguous float32 d loss / d logits, or null (no gradient)
  // Optional second logits (B, C, h, w), contiguous float32, upsampled with the same taps and
  // handed to the loss beside the first (a teacher's), or null. Never differentiated.
  const float* aux = nullptr;
};

// The class of labelled pixel `index` (flat over (B, H, W)), or -1 for ignore_index. Labels
// outside 0..C-1 only reach here with the value checks off (FASTST_CHECK=0): they count as
// ignored instead of reading out of bounds.
inline int32_t class_of(const LossInputs& a, int64_t index) {
  const int64_t v = a.target_is_u8 ? int64_t(static_cast<const uint8_t*>(a.target)[index])
                                   : static_cast<const int64_t*>(a.target)[index];
  return (v >= 0 && v < a.C && v != a.ignore_index) ? int32_t(v) : -1;
}

}  // namespace fastst
