// The test-only extension that runs the CUDA kernels (csrc/cuda/ddf_cuda*.cu) on the CPU under cuda_emu.h.
//
// torch.ops.ddfnet_emu.ddf / ddf_backward have the schemas of torch.ops.ddfnet.ddf / ddf_backward and take
// CPU tensors; they run the CUDA entry points, launchers and kernels (registered in ddf_cuda.cu). The
// other ops (wrapped by tests/support/cuda_emulation) control the emulation: set_mode / mode (fibers or
// threads), the SM count, the traffic counters (traffic.h) and `selftest`, small faulty kernels that show
// each check of the emulation firing. Everything is an op rather than a pybind11 binding because
// <torch/extension.h> alone takes minutes to compile per file, and the sanitizer builds compile this file
// with instrumentation.
#include "cuda_emu.h"
#include "traffic.h"

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace {

constexpr unsigned int kFull = 0xffffffffu;

// Sum of `v` over the block (a multiple of 32 threads): the pattern of the filter-gradient kernels. Without
// its `barrier`, thread 0 reads the other warps' partial sums unordered with their writes (a race).
__global__ void block_sum_kernel(const float* in, float* out, bool barrier) {
  DDF_SHARED(float, partial, [32]);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  float v = in[blockIdx.x * blockDim.x + tid];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(kFull, v, offset);
  if (lane == 0) partial[warp] = v;
  if (barrier) __syncthreads();
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

// For the traffic model: each of 256 threads copies one float, from every `stride`-th one.
__global__ void copy_kernel(const float* in, float* out, int stride) { out[threadIdx.x] = in[threadIdx.x * stride]; }

at::Tensor selftest(const std::string& name) {
  at::Tensor out = at::zeros({256}, at::kFloat);
  float* o = out.mutable_data_ptr<float>();
  if (name == "block_sum" || name == "block_sum_no_barrier") {
    const at::Tensor in = at::arange(1024, at::kFloat);
    at::Tensor sums = at::empty({4}, at::kFloat);
    DDF_LAUNCH(4, 256, 0, nullptr, block_sum_kernel)(in.const_data_ptr<float>(), sums.mutable_data_ptr<float>(),
                                                     name == "block_sum");
    return sums;
  }
  if (name == "copy_coalesced" || name == "copy_strided") {
    const at::Tensor in = at::arange(8 * 256, at::kFloat);
    DDF_LAUNCH(1, 256, 0, nullptr, copy_kernel)(in.const_data_ptr<float>(), o, name == "copy_strided" ? 8 : 1);
    return out;
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
  else TORCH_CHECK_VALUE(false, "unknown selftest '", name, "'");
  return out;
}


void set_mode(const std::string& mode) {
  TORCH_CHECK_VALUE(mode == "fibers" || mode == "threads", "mode must be 'fibers' or 'threads', got '", mode, "'");
  ddf_emu::set_mode(mode == "fibers" ? ddf_emu::Mode::fibers : ddf_emu::Mode::threads);
}

std::string mode() { return ddf_emu::mode() == ddf_emu::Mode::fibers ? "fibers" : "threads"; }

int64_t multiprocessors() { return ddf_emu::multiprocessors(); }

void set_multiprocessors(int64_t count) { ddf_emu::set_multiprocessors(static_cast<int>(count)); }

bool traffic_available() { return ddf_emu::traffic::available(); }

void traffic_start() { ddf_emu::traffic::start(); }

// The kernels' names, and per launch one row: grid, block, then load and store {requests, bytes, sectors,
// distinct bytes}.
std::tuple<std::vector<std::string>, at::Tensor> traffic_stop() {
  const auto launches = ddf_emu::traffic::stop();
  std::vector<std::string> names;
  at::Tensor rows = at::empty({static_cast<int64_t>(launches.size()), 10}, at::kLong);
  int64_t* row = rows.mutable_data_ptr<int64_t>();
  for (const auto& l : launches) {
    names.push_back(l.kernel);
    row[0] = l.grid;
    row[1] = l.block;
    for (int i = 0; i < 4; ++i) {
      row[2 + i] = static_cast<int64_t>(l.load[i]);
      row[6 + i] = static_cast<int64_t>(l.store[i]);
    }
    row += 10;
  }
  return {names, rows};
}

}  // namespace

TORCH_LIBRARY(ddfnet_emu, m) {
  m.def("ddf(Tensor input, Tensor channel_filter, Tensor spatial_filter, int kernel_size, int dilation, "
        "int stride, str kernel_combine) -> Tensor");
  m.def("ddf_backward(Tensor grad_output, Tensor input, Tensor channel_filter, Tensor spatial_filter, "
        "int kernel_size, int dilation, int stride, str kernel_combine) -> (Tensor, Tensor, Tensor)");
  m.def("selftest(str name) -> Tensor", &selftest);
  m.def("set_mode(str mode) -> ()", &set_mode);
  m.def("mode() -> str", &mode);
  m.def("multiprocessors() -> int", &multiprocessors);
  m.def("set_multiprocessors(int count) -> ()", &set_multiprocessors);
  m.def("traffic_available() -> bool", &traffic_available);
  m.def("traffic_start() -> ()", &traffic_start);
  m.def("traffic_stop() -> (str[] kernels, Tensor counts)", &traffic_stop);
}

// An importable module (no contents): importing it loads the library, which registers the ops above.
#define DDF_EMU_CONCAT(a, b) a##b
#define DDF_EMU_INIT(name) DDF_EMU_CONCAT(PyInit_, name)
#define DDF_EMU_STR2(x) #x
#define DDF_EMU_STR(x) DDF_EMU_STR2(x)
PyMODINIT_FUNC DDF_EMU_INIT(TORCH_EXTENSION_NAME)() {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, DDF_EMU_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
