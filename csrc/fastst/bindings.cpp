// pybind11 module fastst._C: launchers that take raw pointers (ints), sizes, dtype codes and, for
// CUDA, a device index and a stream handle. No torch header: one binary serves every torch.
// Python side: fastst/ops/_library.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>

#include "cpu/bootstrap_loss.h"
#include "cpu/cbst.h"
#include "cpu/exp_vector.h"
#include "cpu/ias.h"
#include "cpu/region_loss.h"
#include "cpu/stats.h"
#include "cpu/tpld.h"
#if defined(FASTST_WITH_CUDA)
#include "cuda/ias.h"
#include "cuda/stats.h"
#endif

namespace py = pybind11;
using fastst::StatsArgs;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

StatsArgs make_stats_args(uintptr_t x, int dtype, std::array<int64_t, 4> shape_in,
                          std::array<int64_t, 2> size_out, std::array<int64_t, 4> strides,
                          bool from_logits, bool align_corners, uintptr_t m, uintptr_t a,
                          uintptr_t counts, uintptr_t flags) {
  if (dtype < fastst::kFloat32 || dtype > fastst::kBFloat16) throw std::invalid_argument("fastst._C: unknown dtype code");
  StatsArgs args;
  args.x = ptr<const void>(x);
  args.dtype = dtype;
  args.B = shape_in[0];
  args.C = shape_in[1];
  args.h = shape_in[2];
  args.w = shape_in[3];
  args.H = size_out[0];
  args.W = size_out[1];
  args.stride_b = strides[0];
  args.stride_c = strides[1];
  args.stride_h = strides[2];
  args.stride_w = strides[3];
  args.from_logits = from_logits;
  args.align_corners = align_corners;
  args.m = ptr<float>(m);
  args.a = ptr<uint8_t>(a);
  args.counts = ptr<int64_t>(counts);
  args.flags = ptr<int32_t>(flags);
  return args;
}

fastst::IasArgs make_ias_args(uintptr_t m, uintptr_t a, uintptr_t counts, int64_t B, int64_t C, int64_t HW,
                              int64_t group, uintptr_t theta_in, uintptr_t theta_out,
                              uintptr_t theta_per_instance, uintptr_t labels, double alpha, double beta,
                              double gamma, bool official) {
  fastst::IasArgs args{};
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

// The fields every fused loss shares (kernels/loss_inputs.h); the gradient output is set apart.
void set_loss_inputs(fastst::LossInputs& args, uintptr_t logits, int dtype, const std::array<int64_t, 4>& shape_in,
                     const std::array<int64_t, 2>& size_out, const std::array<int64_t, 4>& strides,
                     uintptr_t target, bool target_is_u8, int ignore_index, bool align_corners) {
  if (dtype < fastst::kFloat32 || dtype > fastst::kBFloat16) throw std::invalid_argument("fastst._C: unknown dtype code");
  args.logits = ptr<const void>(logits);
  args.dtype = dtype;
  args.B = shape_in[0];
  args.C = shape_in[1];
  args.h = shape_in[2];
  args.w = shape_in[3];
  args.H = size_out[0];
  args.W = size_out[1];
  args.stride_b = strides[0];
  args.stride_c = strides[1];
  args.stride_h = strides[2];
  args.stride_w = strides[3];
  args.target = ptr<const void>(target);
  args.target_is_u8 = target_is_u8;
  args.ignore_index = ignore_index;
  args.align_corners = align_corners;
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "fastst kernels (C++/OpenMP always, CUDA when built with nvcc)";
#if defined(FASTST_WITH_CUDA)
  mod.attr("has_cuda") = true;
#else
  mod.attr("has_cuda") = false;
#endif

  mod.def(
      "stats_cpu",
      [](uintptr_t x, int dtype, std::array<int64_t, 4> shape_in, std::array<int64_t, 2> size_out,
         std::array<int64_t, 4> strides, bool from_logits, bool align_corners, uintptr_t m,
         uintptr_t a, uintptr_t counts, uintptr_t flags) {
        fastst::stats_cpu(make_stats_args(x, dtype, shape_in, size_out, strides, from_logits,
                                          align_corners, m, a, counts, flags));
      },
      py::call_guard<py::gil_scoped_release>(),
      "Fused max/argmax/counts pass (softmax + bilinear upsample for logits) on the CPU.");

  mod.def(
      "exp_nonpositive_cpu",
      [](uintptr_t x, int64_t n, uintptr_t out) { fastst::exp_shifted(ptr<const float>(x), nullptr, n, ptr<float>(out)); },
      py::call_guard<py::gil_scoped_release>(),
      "exp(x) for float32 x <= 0 as the statistics pass computes it, through the same vector "
      "kernels (tests only: they check its bits against a float32 transcription of the formula).");

  mod.def(
      "ias_select_cpu",
      [](uintptr_t m, uintptr_t a, uintptr_t counts, int64_t B, int64_t C, int64_t HW,
         uintptr_t theta_in, uintptr_t theta_out, uintptr_t theta_per_instance, uintptr_t labels,
         double alpha, double beta, double gamma, bool official, int64_t group) {
        const fastst::IasArgs args = make_ias_args(m, a, counts, B, C, HW, group, theta_in, theta_out,
                                                   theta_per_instance, labels, alpha, beta, gamma, official);
        fastst::ias_select_cpu(args);
      },
      py::call_guard<py::gil_scoped_release>(),
      "IAS order statistics, sequential EMA and labels from the statistics pass, on the CPU.");

  mod.def(
      "region_loss_cpu",
      [](uintptr_t logits, int dtype, std::array<int64_t, 4> shape_in, std::array<int64_t, 2> size_out,
         std::array<int64_t, 4> strides, uintptr_t target, bool target_is_u8, int ignore_index,
         float lambda_kld, float lambda_ent, bool need_kld, bool need_ent, bool align_corners, uintptr_t parts,
         uintptr_t grad) {
        if ((!need_kld && lambda_kld != 0.0f) || (!need_ent && lambda_ent != 0.0f)) {
          throw std::invalid_argument("fastst._C.region_loss_cpu: a term with a non-zero lambda must be computed "
                                      "(need_kld / need_ent may be false only where lambda_kld / lambda_ent is 0)");
        }
        fastst::RegionLossArgs args{};
        set_loss_inputs(args, logits, dtype, shape_in, size_out, strides, target, target_is_u8, ignore_index,
                        align_corners);
        args.lambda_kld = lambda_kld;
        args.lambda_ent = lambda_ent;
        args.need_kld = need_kld;
        args.need_ent = need_ent;
        args.parts = ptr<float>(parts);
        args.grad = ptr<float>(grad);
        fastst::region_loss_cpu(args);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Fused region loss (docs/ops.md §2) with on-the-fly bilinear upsample: parts (loss, ce, kld, ent) "
      "and, when grad != 0, d loss / d logits in the low-resolution layout, on the CPU. A term whose "
      "need_kld / need_ent is false (its lambda must be 0) is skipped and its part set to NaN.");

  mod.def(
      "cbst_collect_cpu",
      [](uintptr_t m, uintptr_t a, int64_t B, int64_t HW, int64_t C, int64_t subsample, uintptr_t values,
         uintptr_t classes) {
        fastst::cbst_collect_cpu(ptr<const float>(m), ptr<const uint8_t>(a), B, HW, C, subsample,
                                 ptr<float>(values), ptr<uint8_t>(classes));
      },
      py::call_guard<py::gil_scoped_release>(),
      "CBST: append the subsampled (per image and class, every s-th in row-major order) max "
      "probabilities and their classes, on the CPU.");

  mod.def(
      "cbst_thresholds_cpu",
      [](uintptr_t values, uintptr_t classes, int64_t n, int64_t C, double portion, uintptr_t lambdas) {
        fastst::cbst_thresholds_cpu(ptr<const float>(values), ptr<const uint8_t>(classes), n, C, portion,
                                    ptr<float>(lambdas));
      },
      py::call_guard<py::gil_scoped_release>(),
      "CBST class-balanced thresholds (exact per-class order statistics) on the CPU.");

  mod.def(
      "tpld_pixels_cpu",
      [](uintptr_t probs, int dtype, std::array<int64_t, 4> shape, std::array<int64_t, 4> strides,
         uintptr_t lambdas, uintptr_t labels, uintptr_t k1, uintptr_t k2, uintptr_t q1, uintptr_t q2,
         uintptr_t confidence, uintptr_t flags) {
        if (dtype < fastst::kFloat32 || dtype > fastst::kBFloat16) throw std::invalid_argument("fastst._C: unknown dtype code");
        fastst::TpldPixelArgs args{};
        args.probs = ptr<const void>(probs);
        args.dtype = dtype;
        args.B = shape[0];
        args.C = shape[1];
        args.H = shape[2];
        args.W = shape[3];
        args.stride_b = strides[0];
        args.stride_c = strides[1];
        args.stride_h = strides[2];
        args.stride_w = strides[3];
        args.lambdas = ptr<const float>(lambdas);
        args.labels = ptr<uint8_t>(labels);
        args.k1 = ptr<uint8_t>(k1);
        args.k2 = ptr<uint8_t>(k2);
        args.q1 = ptr<float>(q1);
        args.q2 = ptr<float>(q2);
        args.confidence = ptr<double>(confidence);
        args.flags = ptr<int32_t>(flags);
        fastst::tpld_pixels_cpu(args);
      },
      py::call_guard<py::gil_scoped_release>(),
      "TPLD/CBST per-pixel pass: confident labels and, when the pointers are non-zero, the top-2 "
      "voting candidates and the image confidence, on the CPU.");

  mod.def(
      "tpld_vote_cpu",
      [](uintptr_t labels, uintptr_t k1, uintptr_t k2, uintptr_t q1, uintptr_t q2, int64_t B, int64_t H,
         int64_t W, int64_t window, double weight, int64_t iterations) {
        fastst::tpld_vote_cpu(ptr<uint8_t>(labels), ptr<const uint8_t>(k1), ptr<const uint8_t>(k2),
                              ptr<const float>(q1), ptr<const float>(q2), B, H, W, window, weight, iterations);
      },
      py::call_guard<py::gil_scoped_release>(),
      "TPLD sliding-window top-2 voting, in place on the confident map, on the CPU.");

  mod.def(
      "st_loss_cpu",
      [](uintptr_t logits, int dtype, std::array<int64_t, 4> shape_in, std::array<int64_t, 2> size_out,
         std::array<int64_t, 4> strides, uintptr_t target, bool target_is_u8, int ignore_index, int mode,
         uintptr_t lambdas, uintptr_t soft_target, uintptr_t is_target, float beta, float mrkld_weight,
         float gamma, bool sum_reduction, bool align_corners, uintptr_t loss, uintptr_t grad) {
        if (mode < fastst::kBootstrapHard || mode > fastst::kBootstrapTeacher) throw std::invalid_argument("fastst._C: unknown loss mode");
        fastst::StLossArgs args{};
        set_loss_inputs(args, logits, dtype, shape_in, size_out, strides, target, target_is_u8, ignore_index,
                        align_corners);
        args.mode = mode;
        args.lambdas = ptr<const float>(lambdas);
        args.is_target = ptr<const uint8_t>(is_target);
        args.beta = beta;
        args.mrkld_weight = mrkld_weight;
        args.gamma = gamma;
        // Mode 3 reads the teacher's logits through the scaffolding's second input.
        if (mode == fastst::kBootstrapTeacher) {
          args.aux = ptr<const float>(soft_target);
        } else {
          args.soft_target = ptr<const float>(soft_target);
        }
        args.sum_reduction = sum_reduction;
        args.loss = ptr<float>(loss);
        args.grad = ptr<float>(grad);
        fastst::st_loss_cpu(args);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Fused bootstrapping (mode 0 hard, 1 soft, 3 soft from a teacher's logits passed as soft_target) "
      "or CRST-MRKLD (mode 2) loss with on-the-fly "
      "bilinear upsample: the loss and, when grad != 0, d loss / d logits, on the CPU.");

#if defined(FASTST_WITH_CUDA)
  mod.def(
      "stats_cuda",
      [](uintptr_t x, int dtype, std::array<int64_t, 4> shape_in, std::array<int64_t, 2> size_out,
         std::array<int64_t, 4> strides, bool from_logits, bool align_corners, uintptr_t m,
         uintptr_t a, uintptr_t counts, uintptr_t flags, int device, uintptr_t stream) {
        fastst::stats_cuda(make_stats_args(x, dtype, shape_in, size_out, strides, from_logits,
                                           align_corners, m, a, counts, flags),
                           device, stream);
      },
      py::call_guard<py::gil_scoped_release>(),
      "Fused max/argmax/counts pass on a CUDA device, enqueued on the given stream.");

  mod.attr("ias_official_bins") = fastst::kOfficialBins;
  mod.def(
      "ias_official_cuda",
      [](uintptr_t m, uintptr_t a, uintptr_t counts, int64_t B, int64_t C, int64_t HW, int64_t group,
         uintptr_t hist, uintptr_t theta_in, uintptr_t theta_out, uintptr_t theta_per_instance,
         uintptr_t labels, double alpha, double beta, double gamma, int device, uintptr_t stream) {
        fastst::IasArgs args = make_ias_args(m, a, counts, B, C, HW, group, theta_in, theta_out,
                                             theta_per_instance, labels, alpha, beta, gamma, true);
        args.hist = ptr<int32_t>(hist);
        fastst::ias_official_cuda(args, device, stream);
      },
      py::call_guard<py::gil_scoped_release>(),
      "IAS official-mode histograms, per-class sequential EMA and labels on a CUDA device.");

  mod.def("ias_paper_temp_bytes", &fastst::ias_paper_temp_bytes,
          "Bytes of CUB workspace ias_paper_cuda needs for `items` pixels in `segments` (image, class) runs.");
  mod.def(
      "ias_paper_cuda",
      [](uintptr_t m, uintptr_t a, uintptr_t counts, int64_t B, int64_t C, int64_t HW, uintptr_t keys,
         uintptr_t sorted_keys, uintptr_t temp, size_t temp_bytes, uintptr_t theta_in,
         uintptr_t theta_out, uintptr_t theta_per_instance, uintptr_t labels, double alpha,
         double beta, double gamma, int device, uintptr_t stream) {
        const fastst::IasArgs args = make_ias_args(m, a, counts, B, C, HW, 1, theta_in, theta_out,
                                                   theta_per_instance, labels, alpha, beta, gamma, false);
        fastst::IasPaperWorkspace ws{ptr<uint64_t>(keys), ptr<uint64_t>(sorted_keys), ptr<void>(temp), temp_bytes};
        fastst::ias_paper_cuda(args, ws, device, stream);
      },
      py::call_guard<py::gil_scoped_release>(),
      "IAS paper-mode radix sort, per-class sequential EMA and labels on a CUDA device.");
#endif
}
