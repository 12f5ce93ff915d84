// Run-time choice of the hand-written x86 vector kernels (max_argmax.cpp, half_bins.cpp): used
// where the CPU has AVX2 and F16C, unless FASTST_PORTABLE_CPU is set (read once per process;
// tests compare the portable loops with the vector kernels through it).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTST_HAVE_X86_KERNELS 1
#include <cstdlib>

namespace fastst {

inline bool use_x86_kernels() {
  static const bool use = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                          std::getenv("FASTST_PORTABLE_CPU") == nullptr;
  return use;
}

}  // namespace fastst
#endif
