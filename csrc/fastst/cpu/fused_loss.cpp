// Non-template pieces of the fused-loss scaffolding (fused_loss.h): the tile softmax, the column
// taps of a resize with their gather and scatter, and the final band reduction.
#include "fused_loss.h"

#include <cmath>

#include "exp_vector.h"

namespace fastst {
namespace fused_loss {

FASTST_CPU_CLONES void tile_softmax(const float* vals, int64_t n, int64_t C, float* e, TileSoftmax& sm) {
  for (int64_t t = 0; t < n; ++t) sm.m[t] = vals[t];
  for (int64_t c = 1; c < C; ++c) {
    const float* v = vals + c * kTile;
    for (int64_t t = 0; t < n; ++t) sm.m[t] = v[t] > sm.m[t] ? v[t] : sm.m[t];
  }
  float ones[kTile], rest[kTile];
  for (int64_t t = 0; t < n; ++t) ones[t] = -1.0f, rest[t] = 0.0f;  // ones: (number of e == 1) - 1
  for (int64_t c = 0; c < C; ++c) {
    const float* v = vals + c * kTile;
    float* ec = e + c * kTile;
    exp_shifted(v, sm.m, n, ec);
    for (int64_t t = 0; t < n; ++t) {
      // 1.0f where e == 1, else 0, through a bit mask: GCC vectorises this, not a select
      const float one = bits_to_float((0u - uint32_t(ec[t] == 1.0f)) & 0x3f800000u);
      rest[t] += ec[t] - one;
      ones[t] += one;
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    const float r = rest[t] + ones[t];
    sm.log_s[t] = std::log1p(r);
    sm.inv_s[t] = 1.0f / (1.0f + r);
  }
}

ColumnTaps::ColumnTaps(int64_t w, int64_t W, bool align_corners)
    : i0(static_cast<size_t>(W)), i1(static_cast<size_t>(W)), l0(static_cast<size_t>(W)), l1(static_cast<size_t>(W)) {
  for (int64_t x = 0; x < W; ++x) {
    const LinearTap tap = linear_tap(x, w, W, align_corners);
    i0[x] = int32_t(tap.i0);
    i1[x] = int32_t(tap.i1);
    l0[x] = tap.l0;
    l1[x] = tap.l1;
  }
}

FASTST_CPU_CLONES void gather_columns(const float* src, const int32_t* i0, const int32_t* i1, const float* l0,
                                      const float* l1, float* v, int64_t n) {
  for (int64_t t = 0; t < n; ++t) v[t] = l0[t] * src[i0[t]] + l1[t] * src[i1[t]];
}

// The upper taps are non-decreasing, so runs of equal i0 (about W / w pixels) are summed in
// registers and added once, instead of a read-modify-write of memory per pixel.
void scatter_columns(const float* g, const int32_t* i0, const int32_t* i1, const float* l0, const float* l1,
                     float* row_grad, int64_t n) {
  int64_t t = 0;
  while (t < n) {
    const int32_t run = i0[t];
    float to0 = 0.0f, to1 = 0.0f;
    for (; t < n && i0[t] == run; ++t) {
      to0 += l0[t] * g[t];
      to1 += l1[t] * g[t];
    }
    row_grad[run] += to0;
    row_grad[i1[t - 1]] += to1;
  }
}

void add_bands(const float* band, int64_t B, int64_t C, int64_t h, int64_t w, float* out) {
  const int64_t plane = C * w;
#pragma omp parallel for schedule(static)
  for (int64_t bi = 0; bi < B * h; ++bi) {
    const int64_t b = bi / h, i = bi % h;
    const float* upper = band + bi * 2 * plane;
    const float* lower_of_previous = i > 0 ? band + (bi - 1) * 2 * plane + plane : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      float* dst = out + ((b * C + c) * h + i) * w;
      for (int64_t j = 0; j < w; ++j) {
        dst[j] = upper[c * w + j] + (lower_of_previous ? lower_of_previous[c * w + j] : 0.0f);
      }
    }
  }
}

std::vector<int64_t> rows_by_source(int64_t h, int64_t H, bool align_corners) {
  std::vector<int64_t> first(static_cast<size_t>(h + 1), H);
  for (int64_t y = H - 1; y >= 0; --y) first[linear_tap(y, h, H, align_corners).i0] = y;
  for (int64_t i = h - 1; i >= 0; --i) first[i] = std::min(first[i], first[i + 1]);
  return first;
}

}  // namespace fused_loss
}  // namespace fastst
