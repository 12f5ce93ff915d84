// The argument decoder every launcher of fastst._C shares. Python passes each tensor as its data
// pointer (an int); a strided input also as a dtype code (common.h's DType), its four sizes and its
// four strides in elements; CUDA launchers end with a device index and a stream handle
// (docs/design.md §1.3). Nothing here reads the tensors: pointers are only converted.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common.h"
#include "../kernels/loss_inputs.h"

namespace fastst::bindings {

namespace py = pybind11;
using Sizes4 = std::array<int64_t, 4>;  // (B, C, rows, cols) or their strides, in elements
using Sizes2 = std::array<int64_t, 2>;  // an output size (H, W)

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// A (B, C, rows, cols) input of any strides, dtype float32, float16 or bfloat16.
struct StridedInput {
  const void* data;
  int dtype;
  Sizes4 sizes;
  Sizes4 strides;
};

// Decodes one strided input; `op` (the launcher's name) goes into the error for an unknown dtype.
inline StridedInput decode_strided(const char* op, uintptr_t data, int dtype, const Sizes4& sizes,
                                   const Sizes4& strides) {
  if (dtype < kFloat32 || dtype > kBFloat16) {
    throw std::invalid_argument(std::string("fastst._C.") + op + ": unknown dtype code " + std::to_string(dtype) +
                                " (expected 0 float32, 1 float16 or 2 bfloat16)");
  }
  return {ptr<const void>(data), dtype, sizes, strides};
}

// Copies dtype, B, C and the four strides into a kernel's argument struct (any struct with the
// fields dtype, B, C, stride_b, stride_c, stride_h, stride_w). The data pointer and the spatial
// sizes are named differently per kernel: the caller sets them.
template <class Args>
void set_layout(Args& args, const StridedInput& in) {
  args.dtype = in.dtype;
  args.B = in.sizes[0];
  args.C = in.sizes[1];
  args.stride_b = in.strides[0];
  args.stride_c = in.strides[1];
  args.stride_h = in.strides[2];
  args.stride_w = in.strides[3];
}

// As set_layout, for a kernel that upsamples its (h, w) input to (H, W) = size_out.
template <class Args>
void set_upsampled(Args& args, const StridedInput& in, const Sizes2& size_out) {
  set_layout(args, in);
  args.h = in.sizes[2];
  args.w = in.sizes[3];
  args.H = size_out[0];
  args.W = size_out[1];
}

// The fields every fused loss shares (kernels/loss_inputs.h); the gradient output is set apart.
inline void set_loss_inputs(LossInputs& args, const StridedInput& logits, const Sizes2& size_out, uintptr_t target,
                            bool target_is_u8, int ignore_index, bool align_corners) {
  args.logits = logits.data;
  set_upsampled(args, logits, size_out);
  args.target = ptr<const void>(target);
  args.target_is_u8 = target_is_u8;
  args.ignore_index = ignore_index;
  args.align_corners = align_corners;
}

// One registration function per op family (bindings/<family>.cpp), called by module.cpp. Each
// registers its CPU launchers and, when built with CUDA, its CUDA launchers.
void register_stats(py::module_& mod);
void register_ias(py::module_& mod);
void register_region_loss(py::module_& mod);
void register_st_loss(py::module_& mod);
void register_cbst(py::module_& mod);
void register_tpld(py::module_& mod);

}  // namespace fastst::bindings
