// Launchers of the IAS selection (cpu/ias.h, cuda/ias.h): order statistics, sequential EMA and
// labels from the statistics pass's outputs.
#include "../cpu/ias.h"
#include "decode.h"
#if defined(FASTST_WITH_CUDA)
#include "../cuda/ias.h"
#endif

namespace fastst::bindings {
namespace {

IasArgs ias_args(uintptr_t m, uintptr_t a, uintptr_t counts, int64_t B, int64_t C, int64_t HW, int64_t group,
                 uintptr_t theta_in, uintptr_t theta_out, uintptr_t theta_per_instance, uintptr_t labels,
                 double alpha, double beta, double gamma, bool official) {
  IasArgs args{};
  args.m = ptr<const float>(m);
  args.a = ptr<const uint8_t>(a);
  args.counts = ptr<const int64_t>(counts);
  args.B = B;
  args.C = C;
  args.HW = HW;
  args.group = group;
  args.theta_in = ptr<const double>(theta_in);
  args.theta_out = ptr<double>(theta_out);
  args.theta_per_instance = ptr<double>(theta_per_instance);
  args.labels = ptr<uint8_t>(labels);
  args.alpha = alpha;
  args.beta = beta;
  args.gamma = gamma;
  args.official = official;
  return args;
}

}  // namespace

void register_ias(py::module_& mod) {
  mod.def(
      "ias_select_cpu",
      [](uintptr_t m, uintptr_t a, uintptr_t counts, int64_t B, int64_t C, int64_t HW, uintptr_t theta_in,
         uintptr_t theta_out, uintptr_t theta_per_instance, uintptr_t labels, double alpha, double beta,
         double gamma, bool official, int64_t group) {
        ias_select_cpu(ias_args(m, a, counts, B, C, HW, group, theta_in, theta_out, theta_per_instance, labels,
                                alpha, beta, gamma, official));
      },
      py::call_guard<py::gil_scoped_release>(),
      "IAS order statistics, sequential EMA and labels from the statistics pass, on the CPU.");

#if defined(FASTST_WITH_CUDA)
  mod.attr("ias_official_bins") = kOfficialBins;
  mod.def(
      "ias_official_cuda",
      [](uintptr_t m, uintptr_t a, uintptr_t counts, int64_t B, int64_t C, int64_t HW, int64_t group,
         uintptr_t hist, uintptr_t theta_in, uintptr_t theta_out, uintptr_t theta_per_instance, uintptr_t labels,
         double alpha, double beta, double gamma, int device, uintptr_t stream) {
        IasArgs args = ias_args(m, a, counts, B, C, HW, group, theta_in, theta_out, theta_per_instance, labels,
                                alpha, beta, gamma, true);
        args.hist = ptr<int32_t>(hist);
        ias_official_cuda(args, device, stream);
      },
      py::call_guard<py::gil_scoped_release>(),
      "IAS official-mode histograms, per-class sequential EMA and labels on a CUDA device.");

  mod.def("ias_paper_temp_bytes", &ias_paper_temp_bytes,
          "Bytes of CUB workspace ias_paper_cuda needs for `items` pixels in `segments` (image, class) runs.");
  mod.def(
      "ias_paper_cuda",
      [](uintptr_t m, uintptr_t a, uintptr_t counts, int64_t B, int64_t C, int64_t HW, uintptr_t keys,
         uintptr_t sorted_keys, uintptr_t temp, size_t temp_bytes, uintptr_t theta_in, uintptr_t theta_out,
         uintptr_t theta_per_instance, uintptr_t labels, double alpha, double beta, double gamma, int device,
         uintptr_t stream) {
        const IasArgs args = ias_args(m, a, counts, B, C, HW, 1, theta_in, theta_out, theta_per_instance, labels,
                                      alpha, beta, gamma, false);
        IasPaperWorkspace ws{ptr<uint64_t>(keys), ptr<uint64_t>(sorted_keys), ptr<void>(temp), temp_bytes};
        ias_paper_cuda(args, ws, device, stream);
      },
      py::call_guard<py::gil_scoped_release>(),
      "IAS paper-mode radix sort, per-class sequential EMA and labels on a CUDA device.");
#endif
}

}  // namespace fastst::bindings
