// CUDA entry points of the ddfnet::ddf and ddfnet::ddf_backward operators (schemas in ../ddf.cpp).
//
// Each entry point validates its arguments (ddf.h), picks the path from the input's memory format
// (NHWC iff ddfnet::is_channels_last(input), else NCHW), makes the tensors it reads dense in that layout,
// and launches the kernels (ddf_cuda_pixels.cu, ddf_cuda_filters.cu) on the current stream of the
// input's device. Layout contract (shared with the Python fake kernels): the forward output is
// channels_last iff the input is, else contiguous; the gradients have the strides at::empty_like of the
// corresponding argument would have. Nothing here synchronises with the host, so both ops can be
// captured in CUDA graphs.
#include "ddf_cuda.cuh"

#include "../ddf.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>
#ifndef DDFNET_CUDA_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

#include <algorithm>
#include <climits>
#include <string_view>
#include <tuple>

namespace ddfnet {
namespace ddf_cuda {

#ifndef DDFNET_CUDA_EMULATION
int multiprocessor_count() {
  // Queried directly rather than via ATen/cuda/CUDAContext.h, which needs the cuSPARSE/cuBLAS headers
  // that a bare toolkit may lack.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return sms;
}
#endif

unsigned int grid_size(int64_t work, int64_t per_block) {
  // A few waves of resident blocks is plenty for grid-stride loops.
  const int64_t most = static_cast<int64_t>(std::max(multiprocessor_count(), 1)) * 32;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(ceil_div(work, per_block), most)));
}

namespace {

#ifdef DDFNET_CUDA_EMULATION
struct DeviceGuard {  // the emulated kernels run on CPU tensors
  explicit DeviceGuard(c10::Device) {}
};
#else
using DeviceGuard = c10::cuda::CUDAGuard;
#endif

// The index limits of the kernels (ddf_cuda.cuh), checked before anything is allocated.
void check_sizes(const at::Tensor& input, int64_t kernel_size) {
  const int64_t height = input.size(2), width = input.size(3);
  TORCH_CHECK(height < (int64_t(1) << 30) && width < (int64_t(1) << 30) && height * width < (int64_t(1) << 31),
              "ddf (CUDA): input height and width must be below 2^30 and height * width below 2^31, got ",
              height, " x ", width);
  TORCH_CHECK(input.size(0) < (int64_t(1) << 31) && input.size(1) < (int64_t(1) << 31),
              "ddf (CUDA): the input's batch size and channels must be below 2^31, got ", input.size(0), " and ",
              input.size(1));
  TORCH_CHECK(kernel_size <= 46339, "ddf (CUDA): kernel_size must be at most 46339 (k * k below 2^31), got ",
              kernel_size);
}

// Call after check_sizes and the zero-size early returns (H, W >= 1).
Geometry make_geometry(const at::Tensor& input, int64_t kernel_size, int64_t dilation, int64_t stride, bool mul) {
  const int64_t height = input.size(2), width = input.size(3);
  Geometry g;
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.height = height;
  g.width = width;
  g.out_h = ddfnet::out_size(height, stride);
  g.out_w = ddfnet::out_size(width, stride);
  g.dilation = ddfnet::clamp_to_extent(dilation, height, width);  // no result changes (ddf.h)
  g.stride = ddfnet::clamp_to_extent(stride, height, width);
  g.k = static_cast<int>(kernel_size);
  g.mul = mul;
  return g;
}

at::MemoryFormat path_format(const at::Tensor& input) {
  return ddfnet::is_channels_last(input) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The channel filter in the layout the path reads: (B, C, k*k) for NCHW, (B, k*k, C) for NHWC (a small
// transposed copy, so that threads along C read it coalesced).
at::Tensor channel_filter_for(const at::Tensor& channel_filter, bool channels_last) {
  const int64_t batch = channel_filter.size(0), channels = channel_filter.size(1);
  const int64_t taps = channel_filter.size(2) * channel_filter.size(3);
  if (!channels_last) return channel_filter.contiguous();
  return channel_filter.reshape({batch, channels, taps}).transpose(1, 2).contiguous();
}

at::Tensor forward_entry(const at::Tensor& input, const at::Tensor& channel_filter, const at::Tensor& spatial_filter,
                         int64_t kernel_size, int64_t dilation, int64_t stride, c10::string_view kernel_combine) {
  const bool mul = ddfnet::check_ddf_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                                          ddfnet::std_view(kernel_combine));
  check_sizes(input, kernel_size);
  const DeviceGuard guard(input.device());
  const at::MemoryFormat fmt = path_format(input);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  at::Tensor output = at::empty({input.size(0), input.size(1), ddfnet::out_size(input.size(2), stride),
                                 ddfnet::out_size(input.size(3), stride)},
                                input.options(), fmt);
  if (output.numel() == 0) return output;
  if (input.numel() == 0) return output.zero_();  // no tap lands anywhere
  const Geometry g = make_geometry(input, kernel_size, dilation, stride, mul);
  launch_forward(input.contiguous(fmt), channel_filter_for(channel_filter, channels_last),
                 spatial_filter.contiguous(fmt), output, g, channels_last);
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_entry(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& channel_filter,
    const at::Tensor& spatial_filter, int64_t kernel_size, int64_t dilation, int64_t stride,
    c10::string_view kernel_combine) {
  const bool mul = ddfnet::check_ddf_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                                          ddfnet::std_view(kernel_combine));
  ddfnet::check_grad_output(grad_output, input, stride);
  check_sizes(input, kernel_size);
  const DeviceGuard guard(input.device());
  if (input.numel() == 0 || grad_output.numel() == 0) {  // B, C, H or W is 0: every gradient is 0
    return {at::zeros_like(input), at::zeros_like(channel_filter), at::zeros_like(spatial_filter)};
  }
  const at::MemoryFormat fmt = path_format(input);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const Geometry g = make_geometry(input, kernel_size, dilation, stride, mul);
  const at::Tensor go = grad_output.contiguous(fmt);
  const at::Tensor x = input.contiguous(fmt);
  const at::Tensor cf = channel_filter_for(channel_filter, channels_last);
  const at::Tensor sf = spatial_filter.contiguous(fmt);
  const at::Tensor grad_input = at::empty(input.sizes(), input.options(), fmt);
  const at::Tensor grad_cf = at::empty(channel_filter.sizes(), channel_filter.options());  // (B, C, k, k)
  const at::Tensor grad_sf = at::empty(spatial_filter.sizes(), spatial_filter.options(), fmt);
  launch_grad_input(go, cf, sf, grad_input, g, channels_last);
  launch_grad_filters(go, x, cf, sf, grad_cf, grad_sf, g, channels_last);
  return {ddfnet::like_layout(grad_input, input), ddfnet::like_layout(grad_cf, channel_filter),
          ddfnet::like_layout(grad_sf, spatial_filter)};
}

}  // namespace
}  // namespace ddf_cuda
}  // namespace ddfnet

#ifdef DDFNET_CUDA_EMULATION
// The emulated kernels take CPU tensors, under their own namespace (schemas in the emulation's module.cc,
// tests/support/cuda_emulation/csrc), so they never stand in for the real ddfnet ops.
TORCH_LIBRARY_IMPL(ddfnet_emu, CPU, m) {
#else
TORCH_LIBRARY_IMPL(ddfnet, CUDA, m) {
#endif
  m.impl("ddf", &ddfnet::ddf_cuda::forward_entry);
  m.impl("ddf_backward", &ddfnet::ddf_cuda::backward_entry);
}
