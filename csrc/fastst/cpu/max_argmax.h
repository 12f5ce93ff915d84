// Per-pixel max and argmax over the C channel rows of a tile of probabilities or logits, with a
// one-instruction value screen. The statistics pass (stats.cpp) spends most of its time here.
#pragma once
#include <cstdint>

namespace fastst {

// For t < n: best[t] = max_c rows[c][t], arg[t] = the lowest c reaching it (strict '>' over c
// ascending, so NaNs never win). Returns true when some value's bits, read as uint32, exceed
// those of 1.0f: a superset of "NaN, Inf, < 0 or > 1" (it also holds -0.0, which is a valid
// probability), so the caller rescans such a tile for the exact flags.
bool max_argmax_probs(const float* const* rows, int64_t n, int64_t C, float* best, int32_t* arg);

// The same max and argmax over logits; returns true exactly when some value is NaN or +-Inf.
bool max_argmax_logits(const float* const* rows, int64_t n, int64_t C, float* best, int32_t* arg);

}  // namespace fastst
