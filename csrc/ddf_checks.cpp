// The argument checks and layout helpers every backend's entry points share (ddf.h). Kept apart from the
// schemas (ddf.cpp) so that the test-only CUDA emulation build links them without the ddfnet library.
#include "ddf.h"

#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace ddfnet {
namespace {

std::string shape(const at::Tensor& t) {
  std::ostringstream os;
  os << '(';
  for (int64_t i = 0; i < t.dim(); ++i) os << (i ? ", " : "") << t.size(i);
  os << ')';
  return os.str();
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

bool check_ddf_args(const at::Tensor& input, const at::Tensor& channel_filter,
                    const at::Tensor& spatial_filter, int64_t kernel_size, int64_t dilation,
                    int64_t stride, std::string_view kernel_combine) {
  // Messages and exception types match ddfnet/ops/checks.py:check_ddf_args, so a user sees the same
  // error whichever path validated first.
  TORCH_CHECK_VALUE(kernel_size >= 1 && kernel_size % 2 == 1,
                    "ddf: kernel_size must be a positive odd int, got ", kernel_size);
  TORCH_CHECK_VALUE(dilation >= 1, "ddf: dilation must be >= 1, got ", dilation);
  TORCH_CHECK_VALUE(stride >= 1, "ddf: stride must be >= 1, got ", stride);
  const bool mul = kernel_combine == "mul";
  TORCH_CHECK_VALUE(mul || kernel_combine == "add",
                    "ddf: kernel_combine must be 'mul' or 'add', got '", std::string(kernel_combine), "'");
  const std::pair<const char*, const at::Tensor*> tensors[] = {
      {"input", &input}, {"channel_filter", &channel_filter}, {"spatial_filter", &spatial_filter}};
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK_VALUE(t->dim() == 4, "ddf: ", name, " must be 4-D, got shape ", shape(*t));
    TORCH_CHECK_TYPE(is_supported_float(t->scalar_type()), "ddf: ", name,
                     " must be float64/32/16 or bfloat16, got ", t->scalar_type());
  }
  TORCH_CHECK_VALUE(input.device() == channel_filter.device() && input.device() == spatial_filter.device(),
                    "ddf: input, channel_filter and spatial_filter must be on one device, got input on ",
                    input.device(), ", channel_filter on ", channel_filter.device(), ", spatial_filter on ",
                    spatial_filter.device());
  TORCH_CHECK_TYPE(input.scalar_type() == channel_filter.scalar_type() &&
                       input.scalar_type() == spatial_filter.scalar_type(),
                   "ddf: input, channel_filter and spatial_filter must share one dtype (outside autocast), got "
                   "input ", input.scalar_type(), ", channel_filter ", channel_filter.scalar_type(),
                   ", spatial_filter ", spatial_filter.scalar_type());
  const int64_t batch = input.size(0), channels = input.size(1), k = kernel_size;
  TORCH_CHECK_VALUE(channel_filter.sizes() == at::IntArrayRef({batch, channels, k, k}),
                    "ddf: channel_filter must have shape (B, C, k, k) = (", batch, ", ", channels, ", ", k,
                    ", ", k, ") for input ", shape(input), ", got ", shape(channel_filter));
  const int64_t out_h = out_size(input.size(2), stride), out_w = out_size(input.size(3), stride);
  TORCH_CHECK_VALUE(spatial_filter.sizes() == at::IntArrayRef({batch, k * k, out_h, out_w}),
                    "ddf: spatial_filter must have shape (B, k*k, Ho, Wo) = (", batch, ", ", k * k, ", ",
                    out_h, ", ", out_w, ") for input ", shape(input), " with stride ", stride, ", got ",
                    shape(spatial_filter));
  return mul;
}

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, int64_t stride) {
  const int64_t out_h = out_size(input.size(2), stride), out_w = out_size(input.size(3), stride);
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({input.size(0), input.size(1), out_h, out_w}),
                    "ddf_backward: grad_output must have shape (", input.size(0), ", ", input.size(1), ", ",
                    out_h, ", ", out_w, "), got ", shape(grad_output));
  TORCH_CHECK_TYPE(grad_output.scalar_type() == input.scalar_type(),
                   "ddf_backward: grad_output must have the input's dtype ", input.scalar_type(), ", got ",
                   grad_output.scalar_type());
  TORCH_CHECK_VALUE(grad_output.device() == input.device(), "ddf_backward: grad_output must be on ",
                    input.device(), ", got ", grad_output.device());
}

bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor like_layout(const at::Tensor& t, const at::Tensor& like) {
  at::Tensor out = at::empty_like(like, t.options());
  if (out.strides() == t.strides()) return t;
  return out.copy_(t);
}

}  // namespace ddfnet
