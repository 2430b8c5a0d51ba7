// The ddfnet operator schemas, declared once, here (the argument checks all backends share are in
// ddf_checks.cpp).
#include <torch/extension.h>

TORCH_LIBRARY(ddfnet, m) {
  m.def("ddf(Tensor input, Tensor channel_filter, Tensor spatial_filter, int kernel_size, int dilation, "
        "int stride, str kernel_combine) -> Tensor");
  m.def("ddf_backward(Tensor grad_output, Tensor input, Tensor channel_filter, Tensor spatial_filter, "
        "int kernel_size, int dilation, int stride, str kernel_combine) -> (Tensor, Tensor, Tensor)");
}

// A Python module only so that `import ddfnet._C` (ahead-of-time build) and cpp_extension.load (JIT)
// load the library, which runs the registrations above; the ops are reached through torch.ops.ddfnet.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef DDFNET_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
