// Shared declarations of the native DDF kernels (semantics: docs/design.md, "The DDF operation").
//
// The schema of both operators is declared once, in ddf.cpp (TORCH_LIBRARY(ddfnet, ...)). Each backend
// registers its kernels with TORCH_LIBRARY_IMPL(ddfnet, <Backend>, ...) in its own folder. Python keeps
// the fake kernels and FLOP formulas (ddfnet/ops/registrations.py), the autograd formula
// (ddfnet/ops/autograd.py) and the autocast rule (ddfnet/ops/autocast.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>

#include <string_view>
#include <tuple>

namespace ddfnet {

// Output extent along one axis: the conv formula with 'same' padding, floor((size - 1) / stride) + 1
// (0 for an empty axis, as in Python, where C++'s truncating division would give 1).
inline int64_t out_size(int64_t size, int64_t stride) { return size <= 0 ? 0 : (size - 1) / stride + 1; }

// A dilation or stride clamped to extent = max(H, W) (at least 1) gives the same result, and keeps buffer
// sizes and index math bounded, so every backend clamps (output sizes still use the original stride).
// A tap offset (i - half) * dilation with i != half and dilation >= extent never lands in the image (the
// same holds for extent itself); a stride >= extent leaves Ho = Wo = 1, so only output coordinate 0
// exists and samples the same pixels for stride = extent as for any larger one.
inline int64_t clamp_to_extent(int64_t value, int64_t height, int64_t width) {
  return std::min(value, std::max<int64_t>({height, width, 1}));
}

// The schema's `str` arrives as c10::string_view: std::string_view itself from torch 2.6, a class of its
// own before, which does not convert implicitly. Built from data() and size(), it works with both.
inline std::string_view std_view(c10::string_view s) { return std::string_view(s.data(), s.size()); }

// Validates the forward arguments with the same exception types and messages as the Python
// check_ddf_args (ValueError / TypeError), and returns true for 'mul', false for 'add'.
bool check_ddf_args(const at::Tensor& input, const at::Tensor& channel_filter,
                    const at::Tensor& spatial_filter, int64_t kernel_size, int64_t dilation,
                    int64_t stride, std::string_view kernel_combine);

// Checks grad_output's shape/dtype/device against the forward arguments (backward entry points).
void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, int64_t stride);

// The layout rule shared with the Python fake kernel (reference.new_output): a 4-D tensor that is not
// contiguous but is channels_last-contiguous is "channels_last"; everything else is treated as NCHW.
bool is_channels_last(const at::Tensor& t);

// A tensor laid out like `like` would be by at::empty_like (what the fake kernels return), holding `t`'s
// values: `t` itself when its strides already match, else a copy.
at::Tensor like_layout(const at::Tensor& t, const at::Tensor& like);

// Each backend (cpu/, cuda/) registers, with TORCH_LIBRARY_IMPL, entry points that call
// check_ddf_args (and check_grad_output) first, then run its kernels.

}  // namespace ddfnet
