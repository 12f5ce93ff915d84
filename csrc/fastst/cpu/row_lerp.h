// The horizontal step of a bilinear resize for one source row (statistics pass, stats.cpp).
#pragma once
#include <cstdint>

namespace fastst {

// dst[x] = lerp2(l0[x], src[i0[x]], l1[x], src[i1[x]]) (kernels/stats.h) for x < W, where
// 0 <= i0[x], i1[x] < w. The same bits on every path.
void lerp_row(const float* src, int64_t w, const int32_t* i0, const int32_t* i1, const float* l0, const float* l1,
              int64_t W, float* dst);

}  // namespace fastst
