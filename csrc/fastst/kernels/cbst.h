// Per-pixel arithmetic of CBST's class-balanced labels (docs/ops.md §5) and of TPLD's confident map
// (docs/ops.md §6), shared by the CPU and any device twin:
//   q_k = float32(p_k) / float32(lambda_k)   (IEEE round-to-nearest division)
//   label = argmax_k q_k (lowest index on ties) where max_k q_k >= 1, else 255.
// The same pass yields the two largest q (the voting candidates) and argmax_k p (for the image
// confidence), so one read of the probabilities serves labels, voting and confidence.
#pragma once
#include "../common.h"

namespace fastst {

constexpr uint8_t kUnlabelled = 255;

// IEEE float32 division, never the approximate reciprocal some device compilers substitute.
#if defined(__CUDA_ARCH__)
FASTST_HD float fdiv(float a, float b) { return __fdiv_rn(a, b); }
#else
FASTST_HD float fdiv(float a, float b) { return a / b; }
#endif

// Running top-2 of q over the classes visited in ascending order: strict '>' keeps the lower
// index first on ties (k1 < k2 when q1 == q2).
struct Top2 {
  float q1, q2;
  int k1, k2;
};

FASTST_HD Top2 top2_init() {
  Top2 t;
  t.q1 = t.q2 = -1.0f;  // below every q (q >= 0 for probabilities)
  t.k1 = t.k2 = 0;
  return t;
}

FASTST_HD void top2_push(Top2& t, float q, int c) {
  if (q > t.q1) {
    t.q2 = t.q1;
    t.k2 = t.k1;
    t.q1 = q;
    t.k1 = c;
  } else if (q > t.q2) {
    t.q2 = q;
    t.k2 = c;
  }
}

FASTST_HD uint8_t confident_label(const Top2& t) { return t.q1 >= 1.0f ? uint8_t(t.k1) : kUnlabelled; }

}  // namespace fastst
