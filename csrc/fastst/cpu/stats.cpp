// CPU (OpenMP) launcher of the fused statistics pass. The arithmetic is kernels/stats.h, the same
// functions in the same order as the CUDA kernel, so both give identical bits.
//
// Organisation (why it is fast): work is split by output rows; a row is processed in tiles of
// kTile pixels, with the C channel values of the tile gathered into a small buffer (class-major)
// so the max/argmax (max_argmax.cpp, registers) and the exp sum (exp_vector.cpp) run over
// contiguous floats. For a resize, the row-wise lerp of a source row (all C channels, all output
// columns; row_lerp.cpp) is computed once and kept while consecutive output rows reuse it (8x
// upsampling: ~8 output rows per source row).
// Float32 probabilities whose (H, W) plane is contiguous are read in place, in flat tiles of
// kFlatTile pixels that may span rows: max_argmax_probs reads a few channel rows at a time in
// long runs, which the hardware prefetcher follows (see max_argmax.cpp).
#include "stats.h"

#include <omp.h>

#include <type_traits>
#include <vector>

#include "../kernels/stats.h"
#include "exp_vector.h"
#include "max_argmax.h"
#include "row_lerp.h"

namespace fastst {
namespace {

constexpr int64_t kTile = 256;
constexpr int64_t kFlatTile = 8192;  // best + arg: 64 KiB per thread
constexpr int64_t kBanks = 4;

// Per-class pixel counts of a tile into kBanks banks of `bank` counters (bank k counts pixels
// j = k mod kBanks): neighbouring pixels mostly share a class, and a single counter would make
// every increment wait for the previous one's store.
void count_classes(const int32_t* arg, int64_t n, int64_t* counts, int64_t bank) {
  int64_t j = 0;
  for (; j + kBanks <= n; j += kBanks) {
    for (int64_t k = 0; k < kBanks; ++k) counts[k * bank + arg[j + k]] += 1;
  }
  for (; j < n; ++j) counts[arg[j]] += 1;
}

// A tile's outputs: a[j] = arg[j] and m[j] = 1 / value[j] (kReciprocal: value is the exp sum) or
// value[j] + 0.0f (the max probability; -0 becomes +0, so the bits of m sort like its value).
// Restrict pointers: a uint8_t store may alias anything, and without them the loops reload
// their pointers after every byte instead of vectorising.
template <bool kReciprocal>
FASTST_CPU_CLONES void store_tile(const float* __restrict value, const int32_t* __restrict arg, int64_t n,
                                  float* __restrict m, uint8_t* __restrict a) {
  for (int64_t j = 0; j < n; ++j) m[j] = kReciprocal ? 1.0f / value[j] : value[j] + 0.0f;
  for (int64_t j = 0; j < n; ++j) a[j] = uint8_t(arg[j]);
}

// counts[i] (the output) += the sum of its kBanks banks.
void merge_banks(const std::vector<int64_t>& banks, int64_t bank, int64_t* counts) {
  for (int64_t i = 0; i < bank; ++i) {
    for (int64_t k = 0; k < kBanks; ++k) counts[i] += banks[size_t(k * bank + i)];
  }
}

// The column taps of a resize as parallel arrays, as lerp_row (row_lerp.h) reads them.
struct ColumnTaps {
  std::vector<int32_t> i0, i1;
  std::vector<float> l0, l1;
};

ColumnTaps column_taps(const StatsArgs& args) {
  ColumnTaps col;
  for (int64_t xo = 0; xo < args.W; ++xo) {
    const LinearTap t = linear_tap(xo, args.w, args.W, args.align_corners);
    col.i0.push_back(int32_t(t.i0));
    col.i1.push_back(int32_t(t.i1));
    col.l0.push_back(t.l0);
    col.l1.push_back(t.l1);
  }
  return col;
}

// Row-wise lerp of source row `y` of every channel at every output column: out[c * W + x].
// Each channel's source row is first widened into `source` (w floats, contiguous).
template <typename T>
FASTST_CPU_CLONES void lerp_source_row(const T* xb, const StatsArgs& args, int64_t y, const ColumnTaps& col,
                                       float* __restrict source, float* __restrict out) {
  const int64_t w = args.w, stride_w = args.stride_w;
  for (int64_t c = 0; c < args.C; ++c) {
    const T* row = xb + c * args.stride_c + y * args.stride_h;
    for (int64_t s = 0; s < w; ++s) source[s] = to_float(row[s * stride_w]);
    lerp_row(source, w, col.i0.data(), col.i1.data(), col.l0.data(), col.l1.data(), args.W, out + c * args.W);
  }
}

// Probabilities: max_argmax_probs screens every value with one unsigned compare of its bits;
// only a tile that fails the screen (bad input, or a -0.0) is rescanned for the exact flags.
int32_t max_argmax_probabilities(const float* const* rows, int64_t n, int64_t C, float* best, int32_t* arg) {
  if (!max_argmax_probs(rows, n, C, best, arg)) return 0;
  int32_t flags = 0;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t j = 0; j < n; ++j) flags |= value_flags(rows[c][j], false);
  }
  return flags;
}

template <typename T>
FASTST_CPU_CLONES void stats_cpu_typed(const StatsArgs& args) {
  const T* x = static_cast<const T*>(args.x);
  const int64_t C = args.C, W = args.W;
  const bool resize = args.h != args.H || args.w != args.W;
  const bool logits = args.from_logits;
  const ColumnTaps col = column_taps(args);
  int32_t flags = 0;
#pragma omp parallel reduction(| : flags)
  {
    const int64_t bank = args.B * C;
    std::vector<int64_t> counts(static_cast<size_t>(kBanks * bank), 0);  // merged once at the end
    std::vector<float> values(static_cast<size_t>(C * kTile));
    std::vector<float> best(kTile), sum(kTile);
    std::vector<const float*> rows(static_cast<size_t>(C));
    std::vector<int32_t> arg(kTile);
    // Two cached lerped source rows (resize only): cached_y[i] is the source row in slot i.
    std::vector<float> cache(resize ? static_cast<size_t>(2 * C * W) : 0);
    std::vector<float> source(resize ? static_cast<size_t>(args.w) : 0);
    int64_t cached_b = -1, cached_y[2] = {-1, -1};
#pragma omp for schedule(static)
    for (int64_t row = 0; row < args.B * args.H; ++row) {
      const int64_t b = row / args.H, y = row % args.H;
      const T* xb = x + b * args.stride_b;
      LinearTap ty{y, y, 1.0f, 0.0f};
      const float* r0 = nullptr;
      const float* r1 = nullptr;
      if (resize) {
        ty = linear_tap(y, args.h, args.H, args.align_corners);
        if (cached_b != b) cached_y[0] = cached_y[1] = -1, cached_b = b;
        auto slot_of = [&](int64_t source_row) {
          return cached_y[0] == source_row ? 0 : cached_y[1] == source_row ? 1 : -1;
        };
        auto load = [&](int slot, int64_t source_row) {
          lerp_source_row(xb, args, source_row, col, source.data(), cache.data() + slot * C * W);
          cached_y[slot] = source_row;
        };
        int s0 = slot_of(ty.i0);
        if (s0 < 0) load(s0 = (slot_of(ty.i1) == 0 ? 1 : 0), ty.i0);
        int s1 = slot_of(ty.i1);
        if (s1 < 0) load(s1 = 1 - s0, ty.i1);
        r0 = cache.data() + s0 * C * W;
        r1 = cache.data() + s1 * C * W;
      }
      int64_t* counts_b = counts.data() + b * C;
      for (int64_t x0 = 0; x0 < W; x0 += kTile) {
        const int64_t n = W - x0 < kTile ? W - x0 : kTile;
        for (int64_t c = 0; c < C; ++c) {
          float* v = values.data() + c * kTile;
          rows[size_t(c)] = v;
          if (resize) {
            const float* a0 = r0 + c * W + x0;
            const float* a1 = r1 + c * W + x0;
            for (int64_t j = 0; j < n; ++j) v[j] = lerp2(ty.l0, a0[j], ty.l1, a1[j]);
          } else {
            const T* src = xb + c * args.stride_c + y * args.stride_h + x0 * args.stride_w;
            if (args.stride_w == 1 && !logits && std::is_same<T, float>::value) {
              rows[size_t(c)] = reinterpret_cast<const float*>(src);  // probabilities: read in place
            } else if (args.stride_w == 1) {
              for (int64_t j = 0; j < n; ++j) v[j] = to_float(src[j]);  // contiguous: vectorises
            } else {
              for (int64_t j = 0; j < n; ++j) v[j] = to_float(src[j * args.stride_w]);
            }
          }
        }
        const int64_t out = (b * args.H + y) * W + x0;
        if (logits) {
          flags |= max_argmax_logits(rows.data(), n, C, best.data(), arg.data()) ? int32_t(kNonFinite) : 0;
          exp_sum_classes(values.data(), kTile, n, C, best.data(), sum.data());
          store_tile<true>(sum.data(), arg.data(), n, args.m + out, args.a + out);
        } else {
          flags |= max_argmax_probabilities(rows.data(), n, C, best.data(), arg.data());
          store_tile<false>(best.data(), arg.data(), n, args.m + out, args.a + out);
        }
        count_classes(arg.data(), n, counts_b, bank);
      }
    }
#pragma omp critical
    merge_banks(counts, bank, args.counts);
  }
  *args.flags |= flags;
}

// Float32 probabilities with a contiguous (H, W) plane (stride_w == 1, stride_h == W, no
// resize): flat tiles of kFlatTile pixels of one image, read in place.
FASTST_CPU_CLONES void stats_probs_flat(const StatsArgs& args) {
  const float* x = static_cast<const float*>(args.x);
  const int64_t C = args.C, HW = args.H * args.W;
  const int64_t tiles_per_image = (HW + kFlatTile - 1) / kFlatTile;
  int32_t flags = 0;
#pragma omp parallel reduction(| : flags)
  {
    const int64_t bank = args.B * C;
    std::vector<int64_t> counts(static_cast<size_t>(kBanks * bank), 0);
    std::vector<float> best(kFlatTile);
    std::vector<int32_t> arg(kFlatTile);
    std::vector<const float*> rows(static_cast<size_t>(C));
#pragma omp for schedule(dynamic, 2)  // a busy neighbour on a shared host should not stall the other thread
    for (int64_t tile = 0; tile < args.B * tiles_per_image; ++tile) {
      const int64_t b = tile / tiles_per_image, p0 = (tile % tiles_per_image) * kFlatTile;
      const int64_t n = HW - p0 < kFlatTile ? HW - p0 : kFlatTile;
      for (int64_t c = 0; c < C; ++c) rows[size_t(c)] = x + b * args.stride_b + c * args.stride_c + p0;
      flags |= max_argmax_probabilities(rows.data(), n, C, best.data(), arg.data());
      store_tile<false>(best.data(), arg.data(), n, args.m + b * HW + p0, args.a + b * HW + p0);
      count_classes(arg.data(), n, counts.data() + b * C, bank);
    }
#pragma omp critical
    merge_banks(counts, bank, args.counts);
  }
  *args.flags |= flags;
}

}  // namespace

void stats_cpu(const StatsArgs& args) {
  const bool flat = args.dtype == kFloat32 && !args.from_logits && args.h == args.H && args.w == args.W &&
                    args.stride_w == 1 && args.stride_h == args.W;
  if (flat) return stats_probs_flat(args);
  switch (args.dtype) {
    case kFloat32: return stats_cpu_typed<float>(args);
    case kFloat16: return stats_cpu_typed<Half>(args);
    case kBFloat16: return stats_cpu_typed<BFloat16>(args);
  }
}

}  // namespace fastst
