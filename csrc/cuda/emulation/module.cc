// The test-only extension that runs the CUDA kernels (../ddf_cuda*.cu) on the CPU under cuda_emu.h.
//
// torch.ops.ddfnet_emu.ddf / ddf_backward have the schemas of torch.ops.ddfnet.ddf / ddf_backward and take
// CPU tensors; they run the CUDA entry points, launchers and kernels (registered in ../ddf_cuda.cu). The
// Python module adds set_mode / mode (fibers or threads), the traffic counters (traffic.h) and
// `selftest`, small faulty kernels that show each check of the emulation firing.
#include "cuda_emu.h"
#include "traffic.h"

#include <torch/extension.h>

#include <cmath>
#include <stdexcept>
#include <string>

TORCH_LIBRARY(ddfnet_emu, m) {
  m.def("ddf(Tensor input, Tensor channel_filter, Tensor spatial_filter, int kernel_size, int dilation, "
        "int stride, str kernel_combine) -> Tensor");
  m.def("ddf_backward(Tensor grad_output, Tensor input, Tensor channel_filter, Tensor spatial_filter, "
        "int kernel_size, int dilation, int stride, str kernel_combine) -> (Tensor, Tensor, Tensor)");
}

namespace {

constexpr unsigned int kFull = 0xffffffffu;

// Sum of `v` over the block (a multiple of 32 threads): the pattern of the filter-gradient kernels.
__global__ void block_sum_kernel(const float* in, float* out) {
  DDF_SHARED(float, partial, [32]);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  float v = in[blockIdx.x * blockDim.x + tid];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(kFull, v, offset);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (tid == 0) {
    float sum = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) sum += partial[w];
    out[blockIdx.x] = sum;
  }
}

__global__ void shuffle_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
}

__global__ void shuffle_kernel(float* out) { out[threadIdx.x] = __shfl_down_sync(kFull, 1.0f, 1); }

__global__ void shuffle_divergent_kernel(float* out) {
  float v = 1.0f;
  if (threadIdx.x % 32 < 16) {
    v = __shfl_down_sync(kFull, v, 1);
  } else {
    v = __shfl_xor_sync(kFull, v, 1);
  }
  out[threadIdx.x] = v;
}

__global__ void shuffle_exited_lane_kernel(float* out) {
  if (threadIdx.x % 32 == 7) return;
  out[threadIdx.x] = __shfl_down_sync(kFull, 1.0f, 1);
}

__global__ void shuffle_vs_syncthreads_kernel(float* out) {
  float v = 1.0f;
  if (threadIdx.x < 32) v = __shfl_down_sync(kFull, v, 1);
  if (threadIdx.x == 5) v = __shfl_down_sync(kFull, v, 1);  // lane 5 again: the others are at the barrier
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void syncthreads_exited_kernel(float* out) {
  if (threadIdx.x >= 128) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void syncthreads_two_sites_kernel(float* out) {
  if (threadIdx.x < 128) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void shared_too_large_kernel(float* out) {
  DDF_SHARED(float, big, [13 * 1024]);  // 52 KiB
  big[threadIdx.x] = 1.0f;
  out[threadIdx.x] = big[threadIdx.x];
}

__global__ void shared_write_past_end_kernel(float* out) {
  DDF_SHARED(float, small, [32]);
  if (threadIdx.x <= 32) small[threadIdx.x] = 1.0f;  // thread 32 writes one past the end
  __syncthreads();
  out[threadIdx.x] = threadIdx.x < 32 ? small[threadIdx.x] : 0.0f;
}

// Every thread but 30 writes its slot; each reads its neighbour's: thread 29 reads the unwritten slot.
__global__ void shared_unwritten_kernel(float* out) {
  DDF_SHARED(float, slots, [32]);
  if (threadIdx.x != 30) slots[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = slots[(threadIdx.x + 1) % 32];
}

at::Tensor selftest(const std::string& name) {
  at::Tensor out = at::zeros({256}, at::kFloat);
  float* o = out.mutable_data_ptr<float>();
  if (name == "block_sum") {
    const at::Tensor in = at::arange(1024, at::kFloat);
    at::Tensor sums = at::empty({4}, at::kFloat);
    DDF_LAUNCH(4, 256, 0, nullptr, block_sum_kernel)(in.const_data_ptr<float>(), sums.mutable_data_ptr<float>());
    return sums;
  }
  if (name == "shuffle_mask") DDF_LAUNCH(1, 64, 0, nullptr, shuffle_mask_kernel)(o);
  else if (name == "shuffle_partial_warp") DDF_LAUNCH(1, 48, 0, nullptr, shuffle_kernel)(o);
  else if (name == "shuffle_divergent") DDF_LAUNCH(1, 64, 0, nullptr, shuffle_divergent_kernel)(o);
  else if (name == "shuffle_exited_lane") DDF_LAUNCH(1, 64, 0, nullptr, shuffle_exited_lane_kernel)(o);
  else if (name == "shuffle_vs_syncthreads") DDF_LAUNCH(1, 64, 0, nullptr, shuffle_vs_syncthreads_kernel)(o);
  else if (name == "syncthreads_exited") DDF_LAUNCH(1, 256, 0, nullptr, syncthreads_exited_kernel)(o);
  else if (name == "syncthreads_two_sites") DDF_LAUNCH(1, 256, 0, nullptr, syncthreads_two_sites_kernel)(o);
  else if (name == "block_too_large") DDF_LAUNCH(1, 2048, 0, nullptr, shuffle_mask_kernel)(o);
  else if (name == "block_z_too_large") DDF_LAUNCH(1, dim3(1, 1, 65), 0, nullptr, shuffle_mask_kernel)(o);
  else if (name == "grid_zero") DDF_LAUNCH(0, 32, 0, nullptr, shuffle_mask_kernel)(o);
  else if (name == "grid_y_too_large") DDF_LAUNCH(dim3(1, 70000), 32, 0, nullptr, shuffle_mask_kernel)(o);
  else if (name == "dynamic_shared_too_large") DDF_LAUNCH(1, 32, 64 * 1024, nullptr, shuffle_mask_kernel)(o);
  else if (name == "shared_too_large") DDF_LAUNCH(1, 32, 0, nullptr, shared_too_large_kernel)(o);
  else if (name == "shared_write_past_end") DDF_LAUNCH(1, 64, 0, nullptr, shared_write_past_end_kernel)(o);
  else if (name == "shared_unwritten") DDF_LAUNCH(2, 32, 0, nullptr, shared_unwritten_kernel)(o);
  else throw std::invalid_argument("unknown selftest '" + name + "'");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_mode", [](const std::string& mode) {
    if (mode != "fibers" && mode != "threads") throw std::invalid_argument("mode must be 'fibers' or 'threads'");
    ddf_emu::set_mode(mode == "fibers" ? ddf_emu::Mode::fibers : ddf_emu::Mode::threads);
  }, "Run each block's threads as fibers (deterministic, fast) or as OS threads (for ThreadSanitizer).");
  m.def("mode", [] { return ddf_emu::mode() == ddf_emu::Mode::fibers ? "fibers" : "threads"; });
  m.def("selftest", &selftest, "Run one of the emulation's check kernels (most of them raise).");
  m.def("multiprocessors", &ddf_emu::multiprocessors, "The SM count grids are sized for (default: 132, an H200).");
  m.def("set_multiprocessors", &ddf_emu::set_multiprocessors);
  ddf_emu::bind_traffic(m);
}
