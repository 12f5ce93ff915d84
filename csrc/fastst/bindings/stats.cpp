// Launchers of the statistics pass (cpu/stats.h, cuda/stats.h).
#include "../cpu/exp_vector.h"
#include "../cpu/stats.h"
#include "decode.h"
#if defined(FASTST_WITH_CUDA)
#include "../cuda/stats.h"
#endif

namespace fastst::bindings {
namespace {

StatsArgs stats_args(const char* op, uintptr_t x, int dtype, const Sizes4& shape_in, const Sizes2& size_out,
                     const Sizes4& strides, bool from_logits, bool align_corners, uintptr_t m, uintptr_t a,
                     uintptr_t counts, uintptr_t flags) {
  const StridedInput in = decode_strided(op, x, dtype, shape_in, strides);
  StatsArgs args;
  args.x = in.data;
  set_upsampled(args, in, size_out);
  args.from_logits = from_logits;
  args.align_corners = align_corners;
  args.m = ptr<float>(m);
  args.a = ptr<uint8_t>(a);
  args.counts = ptr<int64_t>(counts);
  args.flags = ptr<int32_t>(flags);
  return args;
}

}  // namespace

void register_stats(py::module_& mod) {
  mod.def(
      "stats_cpu",
      [](uintptr_t x, int dtype, Sizes4 shape_in, Sizes2 size_out, Sizes4 strides, bool from_logits,
         bool align_corners, uintptr_t m, uintptr_t a, uintptr_t counts, uintptr_t flags) {
        stats_cpu(stats_args("stats_cpu", x, dtype, shape_in, size_out, strides, from_logits, align_corners, m, a,
                             counts, flags));
      },
      py::call_guard<py::gil_scoped_release>(),
      "Fused max/argmax/counts pass (softmax + bilinear upsample for logits) on the CPU.");

  mod.def(
      "exp_nonpositive_cpu",
      [](uintptr_t x, int64_t n, uintptr_t out) { exp_shifted(ptr<const float>(x), nullptr, n, ptr<float>(out)); },
      py::call_guard<py::gil_scoped_release>(),
      "exp(x) for float32 x <= 0 as the statistics pass computes it, through the same vector "
      "kernels (tests only: they check its bits against a float32 transcription of the formula).");

#if defined(FASTST_WITH_CUDA)
  mod.def(
      "stats_cuda",
      [](uintptr_t x, int dtype, Sizes4 shape_in, Sizes2 size_out, Sizes4 strides, bool from_logits,
         bool align_corners, uintptr_t m, uintptr_t a, uintptr_t counts, uintptr_t flags, int device,
         uintptr_t stream) {
        stats_cuda(stats_args("stats_cuda", x, dtype, shape_in, size_out, strides, from_logits, align_corners, m,
                              a, counts, flags),
                   device, stream);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Fused max/argmax/counts pass on a CUDA device, enqueued on the given stream.");
#endif
}

}  // namespace fastst::bindings
