// Forward and grad_input kernels: every output value is a sum over the k*k taps of one pixel and one
// channel, so a thread owns whole output values and no reduction across threads is needed (no atomics;
// the sum over taps runs in the fixed order t = 0, 1, ..., k*k - 1).
//
//   forward     out[b, c, oy, ox] = sum_t x[b, c, iy, ix] * F(cf[b, c, t], sf[b, t, oy, ox])
//   grad_input  gx[b, c, iy, ix]  = sum_t g[b, c, oy, ox] * F(cf[b, c, t], sf[b, t, oy, ox])
//               over the taps t whose output pixel (oy, ox) samples (iy, ix) (gather form).
//
// NCHW: a thread owns one pixel of one sample and a run of up to kMaxChannels channels; threads of a
// warp take consecutive pixels, so x / g / out are read and written coalesced, the pixel's spatial-filter
// value is read once per tap for all its channels, and cf reads are (mostly) warp-uniform.
// NHWC: a thread owns one channel and a run of up to kMaxPixels pixels; threads of a warp take
// consecutive channels (coalesced), the channel's k*k cf values stay in registers (K = 3, 5, 7) and the
// pixel's sf values are warp-broadcast reads.
#include "ddf_cuda.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

namespace ddfnet {
namespace ddf_cuda {
namespace {

constexpr int kMaxChannels = 8;  // channels per thread, NCHW kernels
constexpr int kMaxPixels = 8;    // pixels per thread, NHWC kernels
// Below this many threads the run per thread is halved (down to 1) to keep the GPU busy. Only the
// amount of work per thread changes: every output value is computed the same way whatever the run.
constexpr int64_t kBusyThreads = int64_t(1) << 18;

int run_length(int max_run, int64_t batch, int64_t outer, int64_t split_extent) {
  int run = max_run;
  while (run > 1 && batch * outer * ceil_div(split_extent, run) < kBusyThreads) run /= 2;
  return run;
}

// ---------------------------------------------------------------------------------------------------
// NCHW. Work item = (b, chunk of `cpt` channels starting at c0, pixel p), pixel fastest.

template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t, K>)
forward_nchw_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ cf,
                    const scalar_t* __restrict__ sf, scalar_t* __restrict__ out, const Geometry g,
                    const int cpt) {
  using acc_t = at::opmath_type<scalar_t>;
  const int k = K > 0 ? K : g.k, half = k / 2;
  const int64_t kk = static_cast<int64_t>(k) * k;
  const int64_t C = g.channels, H = g.height, W = g.width, Wo = g.out_w;
  const int64_t hw = H * W, hwo = g.out_h * Wo;
  const int64_t chunks = dceil_div31(C, cpt);
  for (GridCursor it(static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                     static_cast<int64_t>(gridDim.x) * blockDim.x, chunks, hwo);
       it.i0 < g.batch; it.advance()) {
    const int64_t b = it.i0, c0 = it.i1 * cpt, p = it.i2;
    const int nc = static_cast<int>(dmin(cpt, C - c0));  // channels c0 .. c0 + nc - 1
    int64_t oy, ox;
    pixel_coords(p, Wo, oy, ox);
    const scalar_t* xb = x + (b * C + c0) * hw;     // plane of channel c0; channel c0 + cc at + cc * hw
    const scalar_t* cfb = cf + (b * C + c0) * kk;   // tap t of channel c0 + cc at cc * kk + t
    const scalar_t* sfb = sf + b * kk * hwo + p;    // tap t at t * hwo
    acc_t acc[kMaxChannels];
#pragma unroll
    for (int cc = 0; cc < kMaxChannels; ++cc) acc[cc] = acc_t(0);
#pragma unroll
    for (int i = 0; i < k; ++i) {
      const int64_t iy = sample_coord(oy, i, half, g);
      if (iy < 0 || iy >= H) continue;
#pragma unroll
      for (int j = 0; j < k; ++j) {
        const int64_t ix = sample_coord(ox, j, half, g);
        if (ix < 0 || ix >= W) continue;
        const int64_t t = static_cast<int64_t>(i) * k + j;
        const acc_t s = static_cast<acc_t>(sfb[t * hwo]);
        const int64_t off = iy * W + ix;
#pragma unroll
        for (int cc = 0; cc < kMaxChannels; ++cc) {
          if (cc < nc) {
            const acc_t f = combine(static_cast<acc_t>(cfb[cc * kk + t]), s, g.mul);
            acc[cc] += static_cast<acc_t>(xb[cc * hw + off]) * f;
          }
        }
      }
    }
    scalar_t* ob = out + (b * C + c0) * hwo + p;
#pragma unroll
    for (int cc = 0; cc < kMaxChannels; ++cc) {
      if (cc < nc) ob[cc * hwo] = static_cast<scalar_t>(acc[cc]);
    }
  }
}

// Work item = (b, chunk of `cpt` channels starting at c0, input pixel p), pixel fastest.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t, K>)
grad_input_nchw_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ cf,
                       const scalar_t* __restrict__ sf, scalar_t* __restrict__ gx, const Geometry g,
                       const int cpt) {
  using acc_t = at::opmath_type<scalar_t>;
  const int k = K > 0 ? K : g.k, half = k / 2;
  const int64_t kk = static_cast<int64_t>(k) * k;
  const int64_t C = g.channels, W = g.width, Ho = g.out_h, Wo = g.out_w;
  const int64_t hw = g.height * W, hwo = Ho * Wo;
  const int64_t chunks = dceil_div31(C, cpt);
  for (GridCursor it(static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                     static_cast<int64_t>(gridDim.x) * blockDim.x, chunks, hw);
       it.i0 < g.batch; it.advance()) {
    const int64_t b = it.i0, c0 = it.i1 * cpt, p = it.i2;
    const int nc = static_cast<int>(dmin(cpt, C - c0));
    int64_t iy, ix;
    pixel_coords(p, W, iy, ix);
    const scalar_t* gob = go + (b * C + c0) * hwo;  // channel c0 + cc, output pixel q at cc * hwo + q
    const scalar_t* cfb = cf + (b * C + c0) * kk;
    const scalar_t* sfb = sf + b * kk * hwo;        // tap t, output pixel q at t * hwo + q
    acc_t acc[kMaxChannels];
#pragma unroll
    for (int cc = 0; cc < kMaxChannels; ++cc) acc[cc] = acc_t(0);
#pragma unroll
    for (int i = 0; i < k; ++i) {
      const int64_t oy = gather_coord(iy, i, half, Ho, g);
      if (oy < 0) continue;
#pragma unroll
      for (int j = 0; j < k; ++j) {
        const int64_t ox = gather_coord(ix, j, half, Wo, g);
        if (ox < 0) continue;
        const int64_t t = static_cast<int64_t>(i) * k + j;
        const int64_t q = oy * Wo + ox;
        const acc_t s = static_cast<acc_t>(sfb[t * hwo + q]);
#pragma unroll
        for (int cc = 0; cc < kMaxChannels; ++cc) {
          if (cc < nc) {
            const acc_t f = combine(static_cast<acc_t>(cfb[cc * kk + t]), s, g.mul);
            acc[cc] += static_cast<acc_t>(gob[cc * hwo + q]) * f;
          }
        }
      }
    }
    scalar_t* gxb = gx + (b * C + c0) * hw + p;
#pragma unroll
    for (int cc = 0; cc < kMaxChannels; ++cc) {
      if (cc < nc) gxb[cc * hw] = static_cast<scalar_t>(acc[cc]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// NHWC. Work item = (b, run of `ppt` pixels starting at ppt * run, channel c), channel fastest.

// The k*k channel-filter values of one channel: registers when K is fixed (3, 5, 7), else read from
// global memory (L1-cached) at each use. cft is (B, k*k, C); `base` points at cft[b, 0, c].
template <typename scalar_t, int K>
struct ChannelTaps {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kRegs = K > 0 ? K * K : 1;
  acc_t reg[kRegs];
  const scalar_t* base;
  int64_t C;

  __device__ __forceinline__ ChannelTaps(const scalar_t* base_, int64_t C_) : base(base_), C(C_) {
    if constexpr (K > 0) {
#pragma unroll
      for (int t = 0; t < K * K; ++t) reg[t] = static_cast<acc_t>(base[t * C]);
    }
  }
  __device__ __forceinline__ acc_t operator[](int64_t t) const {
    if constexpr (K > 0) {
      return reg[t];
    } else {
      return static_cast<acc_t>(base[t * C]);
    }
  }
};

template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t, K>)
forward_nhwc_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ cft,
                    const scalar_t* __restrict__ sf, scalar_t* __restrict__ out, const Geometry g,
                    const int ppt) {
  using acc_t = at::opmath_type<scalar_t>;
  const int k = K > 0 ? K : g.k, half = k / 2;
  const int64_t kk = static_cast<int64_t>(k) * k;
  const int64_t C = g.channels, H = g.height, W = g.width, Wo = g.out_w;
  const int64_t hwo = g.out_h * Wo;
  const int64_t runs = dceil_div31(hwo, ppt);
  for (GridCursor it(static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                     static_cast<int64_t>(gridDim.x) * blockDim.x, runs, C);
       it.i0 < g.batch; it.advance()) {
    const int64_t b = it.i0, p_begin = it.i1 * ppt, c = it.i2;
    const int64_t p_end = dmin(hwo, p_begin + ppt);
    const ChannelTaps<scalar_t, K> cv(cft + b * kk * C + c, C);
    const scalar_t* xb = x + b * H * W * C + c;  // input pixel (iy, ix) at (iy * W + ix) * C
    for (int64_t p = p_begin; p < p_end; ++p) {
      int64_t oy, ox;
      pixel_coords(p, Wo, oy, ox);
      const scalar_t* sfp = sf + (b * hwo + p) * kk;  // tap t at sfp[t]
      acc_t acc = acc_t(0);
#pragma unroll
      for (int i = 0; i < k; ++i) {
        const int64_t iy = sample_coord(oy, i, half, g);
        if (iy < 0 || iy >= H) continue;
#pragma unroll
        for (int j = 0; j < k; ++j) {
          const int64_t ix = sample_coord(ox, j, half, g);
          if (ix < 0 || ix >= W) continue;
          const int64_t t = static_cast<int64_t>(i) * k + j;
          const acc_t f = combine(cv[t], static_cast<acc_t>(sfp[t]), g.mul);
          acc += static_cast<acc_t>(xb[(iy * W + ix) * C]) * f;
        }
      }
      out[(b * hwo + p) * C + c] = static_cast<scalar_t>(acc);
    }
  }
}

// Work item = (b, run of `ppt` input pixels, channel c), channel fastest.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t, K>)
grad_input_nhwc_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ cft,
                       const scalar_t* __restrict__ sf, scalar_t* __restrict__ gx, const Geometry g,
                       const int ppt) {
  using acc_t = at::opmath_type<scalar_t>;
  const int k = K > 0 ? K : g.k, half = k / 2;
  const int64_t kk = static_cast<int64_t>(k) * k;
  const int64_t C = g.channels, W = g.width, Ho = g.out_h, Wo = g.out_w;
  const int64_t hw = g.height * W, hwo = Ho * Wo;
  const int64_t runs = dceil_div31(hw, ppt);
  for (GridCursor it(static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                     static_cast<int64_t>(gridDim.x) * blockDim.x, runs, C);
       it.i0 < g.batch; it.advance()) {
    const int64_t b = it.i0, p_begin = it.i1 * ppt, c = it.i2;
    const int64_t p_end = dmin(hw, p_begin + ppt);
    const ChannelTaps<scalar_t, K> cv(cft + b * kk * C + c, C);
    for (int64_t p = p_begin; p < p_end; ++p) {
      int64_t iy, ix;
      pixel_coords(p, W, iy, ix);
      acc_t acc = acc_t(0);
#pragma unroll
      for (int i = 0; i < k; ++i) {
        const int64_t oy = gather_coord(iy, i, half, Ho, g);
        if (oy < 0) continue;
#pragma unroll
        for (int j = 0; j < k; ++j) {
          const int64_t ox = gather_coord(ix, j, half, Wo, g);
          if (ox < 0) continue;
          const int64_t t = static_cast<int64_t>(i) * k + j;
          const int64_t q = b * hwo + oy * Wo + ox;  // output pixel, counted over the whole batch
          const acc_t f = combine(cv[t], static_cast<acc_t>(sf[q * kk + t]), g.mul);
          acc += static_cast<acc_t>(go[q * C + c]) * f;
        }
      }
      gx[(b * hw + p) * C + c] = static_cast<scalar_t>(acc);
    }
  }
}

}  // namespace

void launch_forward(const at::Tensor& input, const at::Tensor& channel_filter, const at::Tensor& spatial_filter,
                    const at::Tensor& output, const Geometry& g, bool channels_last) {
  const cudaStream_t stream = current_stream();
  const int64_t hwo = g.out_h * g.out_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ddf_forward_cuda", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* cf = channel_filter.const_data_ptr<scalar_t>();
    const scalar_t* sf = spatial_filter.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    dispatch_kernel_size(g.k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      if (channels_last) {
        const int ppt = run_length(kMaxPixels, g.batch, g.channels, hwo);
        const int64_t total = g.batch * ceil_div(hwo, ppt) * g.channels;
        DDF_LAUNCH(grid_size(total, kThreads), kThreads, 0, stream, forward_nhwc_kernel<scalar_t, K>)(
            x, cf, sf, out, g, ppt);
      } else {
        const int cpt = run_length(kMaxChannels, g.batch, hwo, g.channels);
        const int64_t total = g.batch * ceil_div(g.channels, cpt) * hwo;
        DDF_LAUNCH(grid_size(total, kThreads), kThreads, 0, stream, forward_nchw_kernel<scalar_t, K>)(
            x, cf, sf, out, g, cpt);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_grad_input(const at::Tensor& grad_output, const at::Tensor& channel_filter,
                       const at::Tensor& spatial_filter, const at::Tensor& grad_input, const Geometry& g,
                       bool channels_last) {
  const cudaStream_t stream = current_stream();
  const int64_t hw = g.height * g.width;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "ddf_grad_input_cuda", [&] {
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* cf = channel_filter.const_data_ptr<scalar_t>();
    const scalar_t* sf = spatial_filter.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_input.mutable_data_ptr<scalar_t>();
    dispatch_kernel_size(g.k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      if (channels_last) {
        const int ppt = run_length(kMaxPixels, g.batch, g.channels, hw);
        const int64_t total = g.batch * ceil_div(hw, ppt) * g.channels;
        DDF_LAUNCH(grid_size(total, kThreads), kThreads, 0, stream, grad_input_nhwc_kernel<scalar_t, K>)(
            go, cf, sf, gx, g, ppt);
      } else {
        const int cpt = run_length(kMaxChannels, g.batch, hw, g.channels);
        const int64_t total = g.batch * ceil_div(g.channels, cpt) * hw;
        DDF_LAUNCH(grid_size(total, kThreads), kThreads, 0, stream, grad_input_nchw_kernel<scalar_t, K>)(
            go, cf, sf, gx, g, cpt);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace ddf_cuda
}  // namespace ddfnet
