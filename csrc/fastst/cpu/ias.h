// IAS selection on the CPU: per-(instance, class) order statistics, the sequential threshold
// EMA and the label pass, from the output of the statistics pass (cpu/stats.h).
#pragma once
#include <cstdint>

namespace fastst {

struct IasArgs {
  const float* m;            // (B, HW) max probability, >= +0
  const uint8_t* a;          // (B, HW) argmax
  const int64_t* counts;     // (B, C) pixels per (image, argmax class)
  int64_t B, C, HW;
  const double* theta_in;    // (C,)
  double* theta_out;         // (C,)
  double* theta_per_instance;// (G, C), G = ceil(B / group)
  uint8_t* labels;           // (B, HW)
  double alpha, beta, gamma;
  bool official;             // SPEC 1.2 when true, else 1.1 ("paper")
  int64_t group;
};

void ias_select_cpu(const IasArgs& args);

}  // namespace fastst
