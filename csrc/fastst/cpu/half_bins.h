// Histogram slots of official-mode IAS (docs/ops.md §1.2): the float16 bit pattern of each m, per class.
#pragma once
#include <cstdint>

namespace fastst {

// For j < n: index[j] = a[j] * bins + min(half_bits_of(m[j]), max_bin) - min_bin, where
// half_bits_of rounds to nearest even (kernels/ias.h); min_bin <= max_bin <= 0x7c00 (+inf), so
// NaN and negative m (sign bit set) land in the top bin. The caller guarantees every m whose
// pattern is not clamped has a pattern >= min_bin.
void half_bins(const float* m, const uint8_t* a, int64_t n, uint32_t min_bin, uint32_t max_bin, uint32_t bins,
               uint32_t* index);

}  // namespace fastst
