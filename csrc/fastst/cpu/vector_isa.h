// Run-time choice of the hand-written x86 vector kernels (max_argmax.cpp, half_bins.cpp,
// row_lerp.cpp, exp_vector.cpp): used where the CPU has AVX2, FMA and F16C, unless
// FASTST_PORTABLE_CPU is set; the AVX-512 ones (exp_vector.cpp, max_argmax.cpp) where the CPU
// also has AVX-512F, unless FASTST_NO_AVX512 is set. Both variables are read once per process; tests compare the portable
// loops and the AVX2 kernels with the default ones through them.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTST_HAVE_X86_KERNELS 1
#include <cstdlib>

namespace fastst {

inline bool use_x86_kernels() {
  static const bool use = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") && std::getenv("FASTST_PORTABLE_CPU") == nullptr;
  return use;
}

inline bool use_avx512_kernels() {
  static const bool use = use_x86_kernels() && __builtin_cpu_supports("avx512f") &&
                          std::getenv("FASTST_NO_AVX512") == nullptr;
  return use;
}

}  // namespace fastst
#endif
