// TPLD on the CPU (OpenMP): per-pixel pass and sliding-window vote. The arithmetic is
// kernels/cbst.h and kernels/tpld.h; this file organises the loops.
//
// Pixel pass: rows of (image, y) in parallel, a row in tiles of kTile pixels visited class by
// class (contiguous reads when the input is), keeping q's top-2 and p's argmax per pixel.
// Per-(image, class) counts for the confidence are kept per thread and summed (integers: order
// free, so the result does not depend on the schedule).
// Vote: per iteration, every unlabelled pixel walks its clipped window in row-major order over
// the previous map, pooling only its own two candidate classes (the label and the q of each
// labelled neighbour are two arrays, so the cost is independent of C). Two label/q buffers
// alternate; an iteration that labels nothing ends the loop (the next would repeat it).
#include "tpld.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../kernels/stats.h"

namespace fastst {
namespace {

constexpr int64_t kTile = 256;

// One class c of a tile of n pixels with probabilities p: q = fdiv(p, lam), kernels/cbst.h's
// top2_push written with selects (strict '>': the lower index wins ties) so that the loop
// vectorises, and the argmax of p with q at it. Returns the OR of the value flags.
FASTST_CPU_CLONES int32_t push_class(const float* __restrict p, int64_t n, float lam, int32_t c,
                                     float* __restrict q1, float* __restrict q2, int32_t* __restrict k1,
                                     int32_t* __restrict k2, float* __restrict pbest, int32_t* __restrict parg,
                                     float* __restrict qat) {
  int32_t flags = 0;
  for (int64_t t = 0; t < n; ++t) {
    const float q = fdiv(p[t], lam);
    flags |= value_flags(p[t], false);
    const bool gt1 = q > q1[t], gt2 = q > q2[t];
    q2[t] = gt1 ? q1[t] : (gt2 ? q : q2[t]);
    k2[t] = gt1 ? k1[t] : (gt2 ? c : k2[t]);
    q1[t] = gt1 ? q : q1[t];
    k1[t] = gt1 ? c : k1[t];
    const bool better = p[t] > pbest[t];
    pbest[t] = better ? p[t] : pbest[t];
    parg[t] = better ? c : parg[t];
    qat[t] = better ? q : qat[t];
  }
  return flags;
}

template <typename T>
FASTST_CPU_CLONES void pixels_typed(const TpldPixelArgs& a) {
  const int64_t B = a.B, C = a.C, H = a.H, W = a.W;
  const bool conf = a.confidence != nullptr;
  std::vector<int64_t> n(static_cast<size_t>(B * C), 0), n_sure(static_cast<size_t>(B * C), 0);
  int32_t flags = 0;
#pragma omp parallel reduction(| : flags)
  {
    std::vector<int64_t> own_n(conf ? static_cast<size_t>(B * C) : 0, 0);
    std::vector<int64_t> own_sure(conf ? static_cast<size_t>(B * C) : 0, 0);
    float q1[kTile], q2[kTile], pbest[kTile], qat[kTile], pv[kTile];
    int32_t k1[kTile], k2[kTile], parg[kTile];
#pragma omp for schedule(static)
    for (int64_t row = 0; row < B * H; ++row) {
      const int64_t b = row / H, y = row % H;
      const T* base = static_cast<const T*>(a.probs) + b * a.stride_b + y * a.stride_h;
      for (int64_t x0 = 0; x0 < W; x0 += kTile) {
        const int64_t len = std::min(kTile, W - x0);
        for (int64_t t = 0; t < len; ++t) {
          q1[t] = q2[t] = -1.0f;
          k1[t] = k2[t] = 0;
          pbest[t] = -1.0f;
          parg[t] = 0;
          qat[t] = 0.0f;
        }
        for (int64_t c = 0; c < C; ++c) {
          const T* src = base + c * a.stride_c + x0 * a.stride_w;
          const float* p = pv;
          if (a.stride_w == 1 && std::is_same<T, float>::value) {
            p = reinterpret_cast<const float*>(src);  // float32 rows: read in place
          } else if (a.stride_w == 1) {
            for (int64_t t = 0; t < len; ++t) pv[t] = to_float(src[t]);  // contiguous: vectorises
          } else {
            for (int64_t t = 0; t < len; ++t) pv[t] = to_float(src[t * a.stride_w]);
          }
          flags |= push_class(p, len, a.lambdas[c], int32_t(c), q1, q2, k1, k2, pbest, parg, qat);
        }
        const int64_t out = (b * H + y) * W + x0;
        for (int64_t t = 0; t < len; ++t) {
          a.labels[out + t] = confident_label(Top2{q1[t], q2[t], k1[t], k2[t]});
        }
        if (a.k1 != nullptr) {
          for (int64_t t = 0; t < len; ++t) {
            a.k1[out + t] = uint8_t(k1[t]);
            a.k2[out + t] = uint8_t(k2[t]);
            a.q1[out + t] = q1[t];
            a.q2[out + t] = q2[t];
          }
        }
        if (conf) {
          for (int64_t t = 0; t < len; ++t) {
            own_n[b * C + parg[t]] += 1;
            own_sure[b * C + parg[t]] += qat[t] >= 1.0f ? 1 : 0;
          }
        }
      }
    }
    if (conf) {
#pragma omp critical
      for (int64_t i = 0; i < B * C; ++i) n[i] += own_n[i], n_sure[i] += own_sure[i];
    }
  }
  *a.flags |= flags;
  if (!conf) return;
  for (int64_t b = 0; b < B; ++b) {
    a.confidence[b] = image_confidence_of(n.data() + b * C, n_sure.data() + b * C, a.lambdas, C);
  }
}

}  // namespace

void tpld_pixels_cpu(const TpldPixelArgs& args) {
  switch (args.dtype) {
    case kFloat32: return pixels_typed<float>(args);
    case kFloat16: return pixels_typed<Half>(args);
    default: return pixels_typed<BFloat16>(args);
  }
}

void tpld_vote_cpu(uint8_t* labels, const uint8_t* k1, const uint8_t* k2, const float* q1, const float* q2,
                   int64_t B, int64_t H, int64_t W, int64_t window, double weight, int64_t iterations) {
  if (iterations <= 0) return;
  const int64_t n = B * H * W, r = window / 2;
  const double one_minus_weight = 1.0 - weight;
  std::vector<uint8_t> other(static_cast<size_t>(n));
  std::vector<float> own_q[2] = {std::vector<float>(static_cast<size_t>(n)), std::vector<float>(static_cast<size_t>(n))};
  // q of each labelled pixel at its own label (the confident label is k1).
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) own_q[0][i] = labels[i] != kUnlabelled ? q1[i] : 0.0f;
  uint8_t* cur = labels;
  uint8_t* next = other.data();
  int which = 0;
  for (int64_t it = 0; it < iterations; ++it) {
    const float* qc = own_q[which].data();
    float* qn = own_q[1 - which].data();
    int64_t changed = 0;
#pragma omp parallel for schedule(dynamic, 4) reduction(+ : changed)
    for (int64_t row = 0; row < B * H; ++row) {
      const int64_t b = row / H, y = row % H;
      const int64_t y0 = std::max<int64_t>(0, y - r), y1 = std::min<int64_t>(H - 1, y + r);
      for (int64_t x = 0; x < W; ++x) {
        const int64_t i = row * W + x;
        if (cur[i] != kUnlabelled) {
          next[i] = cur[i];
          qn[i] = qc[i];
          continue;
        }
        const int64_t x0 = std::max<int64_t>(0, x - r), x1 = std::min<int64_t>(W - 1, x + r);
        const uint8_t c1 = k1[i], c2 = k2[i];
        double sum1 = 0.0, sum2 = 0.0;
        int64_t count1 = 0, count2 = 0;
        for (int64_t yy = y0; yy <= y1; ++yy) {
          const uint8_t* lr = cur + (b * H + yy) * W;
          const float* qr = qc + (b * H + yy) * W;
          for (int64_t xx = x0; xx <= x1; ++xx) {
            const uint8_t l = lr[xx];
            if (l == c1) {
              sum1 = dadd(sum1, double(qr[xx]));
              ++count1;
            } else if (l == c2) {
              sum2 = dadd(sum2, double(qr[xx]));
              ++count2;
            }
          }
        }
        const double s1 = vote_score(q1[i], sum1, count1, weight, one_minus_weight);
        const double s2 = vote_score(q2[i], sum2, count2, weight, one_minus_weight);
        const uint8_t label = vote_label(c1, s1, c2, s2);
        next[i] = label;
        qn[i] = label == c1 ? q1[i] : (label == c2 ? q2[i] : 0.0f);
        changed += label != kUnlabelled ? 1 : 0;
      }
    }
    std::swap(cur, next);
    which = 1 - which;
    if (changed == 0) break;
  }
  if (cur != labels) std::memcpy(labels, cur, static_cast<size_t>(n));
}

}  // namespace fastst
