// CUDA kernels of the DDF op: what the entry points (ddf_cuda.cu) and the kernel files share.
//
//   ddf_cuda.cu          entry points, layouts, registration (TORCH_LIBRARY_IMPL(ddfnet, CUDA, ...))
//   ddf_cuda_pixels.cu   forward and grad_input: one output value per (pixel, channel), a sum over taps
//   ddf_cuda_filters.cu  grad_channel_filter and grad_spatial_filter: reductions over pixels / channels
//
// Notation used in every kernel: input (B, C, H, W), output (B, C, Ho, Wo), kernel size k
// (odd), half = k / 2, tap t = i * k + j for i, j in [0, k). Output pixel (oy, ox) samples input pixel
//   iy = oy * stride + (i - half) * dilation,   ix = ox * stride + (j - half) * dilation,
// and the tap contributes nothing when (iy, ix) is outside the image.
//
// Two physical layouts, picked by the entry points from the input's memory format:
//   NCHW path: input/grad_input (B, C, H, W), output/grad_output (B, C, Ho, Wo), channel filter
//              (B, C, k*k), spatial filter (B, k*k, Ho, Wo); all contiguous.
//   NHWC path: input/grad_input (B, H, W, C), output/grad_output (B, Ho, Wo, C), channel filter
//              transposed to (B, k*k, C), spatial filter (B, Ho, Wo, k*k) (i.e. channels_last).
// Every global offset is computed in int64_t. The grad channel filter is always (B, C, k*k).
//
// The kernel files are also compiled as C++ against cuda_emu.h (DDFNET_CUDA_EMULATION, a
// test-only build that runs them on the CPU). For that they write two constructs through macros that are
// the plain CUDA syntax under nvcc: DDF_LAUNCH(grid, block, shmem, stream, kernel)(args...) for
// kernel<<<grid, block, shmem, stream>>>(args...), and DDF_SHARED(type, name, [dims]) for
// `__shared__ type name[dims]`; the stream is current_stream().
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <type_traits>

#ifdef DDFNET_CUDA_EMULATION
#include "cuda_emu.h"  // tests/support/cuda_emulation/csrc, on the emulation build's include path
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#define DDF_LAUNCH(grid, block, shmem, stream, ...) __VA_ARGS__<<<grid, block, shmem, stream>>>
#define DDF_SHARED(type, name, dims) __shared__ type name dims
#endif

namespace ddfnet {
namespace ddf_cuda {

// Shapes and parameters of one call, as the kernels see them (filled by the entry points).
struct Geometry {
  int64_t batch, channels, height, width;  // input (B, C, H, W); B, C < 2^31, H, W < 2^30, H * W < 2^31
  int64_t out_h, out_w;                    // (H - 1) / stride + 1, (W - 1) / stride + 1 (original stride)
  int64_t dilation, stride;                // clamped to max(H, W), which changes no result (ddf.h)
  int k;                                   // kernel size, odd
  bool mul;                                // kernel_combine == 'mul' ('add' otherwise)
};

// Kernel launchers. Tensors are laid out as described above for the path `channels_last` names;
// outputs are preallocated and fully written. Inputs must be non-empty (B, C, H, W >= 1).
void launch_forward(const at::Tensor& input, const at::Tensor& channel_filter, const at::Tensor& spatial_filter,
                    const at::Tensor& output, const Geometry& g, bool channels_last);
void launch_grad_input(const at::Tensor& grad_output, const at::Tensor& channel_filter,
                       const at::Tensor& spatial_filter, const at::Tensor& grad_input, const Geometry& g,
                       bool channels_last);
void launch_grad_filters(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& channel_filter,
                         const at::Tensor& spatial_filter, const at::Tensor& grad_channel_filter,
                         const at::Tensor& grad_spatial_filter, const Geometry& g, bool channels_last);

// Threads per block of every kernel (a multiple of 32).
constexpr int kThreads = 256;

// Minimum resident blocks per SM that kernels unrolled for kernel size K (0: run-time k) ask the compiler
// for (__launch_bounds__): 4 blocks of kThreads (at most 64 registers a thread, 50% occupancy) at k = 3,
// the size the models use, and 2 (128 registers, 25%) otherwise, where k*k accumulators must fit. float64
// (two registers a value; a checking dtype, not a fast one) keeps every register it needs instead of
// spilling.
template <typename scalar_t, int K>
constexpr int kMinBlocks = std::is_same_v<scalar_t, double> ? 1 : K == 3 ? 4 : 2;

// Calls f(std::integral_constant<int, K>{}) with K = k for the unrolled kernel sizes 3, 5, 7 and K = 0
// (kernel size read at run time, no upper limit) for every other k.
template <typename F>
void dispatch_kernel_size(int k, F&& f) {
  switch (k) {
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#ifdef DDFNET_CUDA_EMULATION
inline cudaStream_t current_stream() { return nullptr; }
// The emulation sizes grids for a fixed GPU, so launch configurations do not depend on the machine.
inline int multiprocessor_count() { return ddf_emu::multiprocessors(); }
#else
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
int multiprocessor_count();  // of the current device
#endif

// Blocks for a grid-stride loop over `work` items of `per_block` each: enough to fill the GPU a few
// times over, never more than needed (and never 0). Results never depend on the grid size.
unsigned int grid_size(int64_t work, int64_t per_block);

#if defined(__CUDACC__) || defined(DDFNET_CUDA_EMULATION)

__device__ __forceinline__ int64_t dmin(int64_t a, int64_t b) { return a < b ? a : b; }

// Kernels divide 64-bit values only outside their loops: on the GPU a 64-bit division is a called
// subroutine (tens of instructions, and the registers live across the call are spilled to the stack),
// while a 32-bit one is inline. Quotient and remainder of a / n for 0 <= a < 2^31 and n >= 1 (n may be
// larger), in 32 bits.
__device__ __forceinline__ void divmod31(int64_t a, int64_t n, int64_t& q, int64_t& r) {
  if (n > a) {
    q = 0;
    r = a;
  } else {
    const unsigned int ua = static_cast<unsigned int>(a), un = static_cast<unsigned int>(n);
    q = ua / un;
    r = ua - static_cast<unsigned int>(q) * un;
  }
}

// The position of a grid-stride loop in an index space (n0, n1, n2), last index fastest: item
// (i0 * n1 + i1) * n2 + i2, with n1, n2 < 2^31. The loop's start and step are below 2^31 (the thread or
// block index and the grid's thread or block count; grid_size keeps grids far below that), so splitting
// them takes 32-bit divisions, and advancing adds the step's digits with a carry: no division per item.
struct GridCursor {
  int64_t i0, d0;              // the outer index and the step's outer digit
  unsigned int i1, i2, d1, d2;  // the inner indices and the step's digits (d1 < n1, d2 < n2: one carry each)
  unsigned int n1, n2;

  __device__ __forceinline__ GridCursor(int64_t start, int64_t step, int64_t n1_, int64_t n2_)
      : n1(static_cast<unsigned int>(n1_)), n2(static_cast<unsigned int>(n2_)) {
    const unsigned int s = static_cast<unsigned int>(start), t = static_cast<unsigned int>(step);
    i2 = s % n2;
    i1 = (s / n2) % n1;
    i0 = (s / n2) / n1;
    d2 = t % n2;
    d1 = (t / n2) % n1;
    d0 = (t / n2) / n1;
  }
  __device__ __forceinline__ void advance() {
    i2 += d2;  // < 2 * n2 < 2^32
    i1 += d1;
    i0 += d0;
    if (i2 >= n2) {
      i2 -= n2;
      ++i1;
    }
    if (i1 >= n1) {
      i1 -= n1;
      ++i0;
    }
  }
};

// ceil(a / n) for 1 <= n and 0 <= a, n < 2^31, in 32 bits.
__device__ __forceinline__ int64_t dceil_div31(int64_t a, int64_t n) {
  return static_cast<unsigned int>(a + n - 1) / static_cast<unsigned int>(n);
}

// Row and column of pixel p of a plane `width` wide (p < 2^31, which the entry points check).
__device__ __forceinline__ void pixel_coords(int64_t p, int64_t width, int64_t& y, int64_t& x) {
  divmod31(p, width, y, x);
}

// The per-(channel, tap, pixel) filter value F from its channel part c and spatial part s.
template <typename acc_t>
__device__ __forceinline__ acc_t combine(acc_t c, acc_t s, bool mul) {
  return mul ? c * s : c + s;
}

// Input coordinate sampled along one axis by kernel index i (0..k-1) from output coordinate o.
__device__ __forceinline__ int64_t sample_coord(int64_t o, int i, int half, const Geometry& g) {
  return o * g.stride + static_cast<int64_t>(i - half) * g.dilation;
}

// Offset within an (H, W) plane of the input pixel that tap (i, j) of output pixel (oy, ox) samples, or -1
// when that pixel is outside the image. Fits an int: the entry points check H * W < 2^31.
__device__ __forceinline__ int tap_offset(int64_t oy, int64_t ox, int i, int j, int half, const Geometry& g) {
  const int64_t iy = sample_coord(oy, i, half, g), ix = sample_coord(ox, j, half, g);
  if (iy < 0 || iy >= g.height || ix < 0 || ix >= g.width) return -1;
  return static_cast<int>(iy * g.width + ix);
}

// The K x K taps (K > 0) of output pixel (oy, ox), for walking them without recomputing each one's
// coordinates: tap (i, j) samples plane offset base + i * row_step + j * dilation (base is the offset of
// tap (0, 0), possibly outside the image), and lies inside the image when bit i of `rows` and bit j of
// `cols` are set.
template <int K>
struct TapWindow {
  int64_t base, row_step;
  unsigned int rows = 0, cols = 0;

  __device__ __forceinline__ TapWindow(int64_t oy, int64_t ox, const Geometry& g) {
    const int64_t y0 = oy * g.stride - (K / 2) * g.dilation, x0 = ox * g.stride - (K / 2) * g.dilation;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int64_t y = y0 + i * g.dilation, x = x0 + i * g.dilation;
      rows |= static_cast<unsigned int>(y >= 0 && y < g.height) << i;
      cols |= static_cast<unsigned int>(x >= 0 && x < g.width) << i;
    }
    base = y0 * g.width + x0;
    row_step = g.dilation * g.width;
  }
  __device__ __forceinline__ bool inside(int i, int j) const { return (rows >> i) & (cols >> j) & 1u; }
};

// The inverse (gather form, for grad_input): the output coordinate o in [0, out_size) whose kernel index
// i samples input coordinate `in`, or -1 when there is none (in - (i - half) * dilation must be a
// non-negative multiple of the stride below out_size * stride).
__device__ __forceinline__ int64_t gather_coord(int64_t in, int i, int half, int64_t out_size, const Geometry& g) {
  const int64_t n = in - static_cast<int64_t>(i - half) * g.dilation;  // = o * stride
  if (n < 0 || n >= out_size * g.stride) return -1;
  if (g.stride == 1) return n;
  // 0 <= n < out_size * stride <= H - 1 + stride < 2^31 (H, W < 2^30 and stride <= max(H, W)), so the
  // 32-bit integer division is exact and cheaper than a 64-bit one.
  const int s = static_cast<int>(g.stride), n32 = static_cast<int>(n);
  const int o = n32 / s;
  return o * s == n32 ? o : -1;
}

#endif  // __CUDACC__ || DDFNET_CUDA_EMULATION

}  // namespace ddf_cuda
}  // namespace ddfnet
