// Filter-gradient kernels: reductions, done without atomics in a fixed order (deterministic).
//
//   grad_cf[b, c, t]      = sum over output pixels (oy, ox) of g[b, c, oy, ox] * x[b, c, iy, ix] * S
//   grad_sf[b, t, oy, ox] = sum over channels c            of g[b, c, oy, ox] * x[b, c, iy, ix] * Cf
// with S = sf[b, t, oy, ox], Cf = cf[b, c, t] for 'mul' and S = Cf = 1 for 'add'; terms whose sample
// (iy, ix) is outside the image are 0 (so grad_sf is 0 there).
//
// Taps are processed in chunks of TC with TC accumulators per thread: for K = 3, 5, 7, TC = k*k (one
// chunk, fully unrolled, registers; one kernel row for grad_sf NHWC, to save registers); TC = 1 (one tap
// at a time) for the run-time kernel size.
//
// Splitting: when the natural parallelism is too small to fill the GPU (few (b, c) planes for grad_cf,
// few pixels for grad_sf), the reduction axis is cut into `nsplit` contiguous parts; each part writes a
// float partial sum to a workspace (nsplit, n) and sum_partials_kernel adds the parts in order 0, 1, ...
// nsplit depends on the shapes only, so the results are bitwise reproducible run to run on one GPU model
// and build (another architecture's code may fuse multiply-adds differently).
#include "ddf_cuda.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#include <algorithm>

namespace ddfnet {
namespace ddf_cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxSplits = 64;
// Aim for about this many threads in flight before splitting a reduction further.
constexpr int64_t kBusyThreads = int64_t(1) << 18;

// Parts a reduction over `extent` terms is cut into when `threads` threads would work on it unsplit:
// enough for about kBusyThreads threads, each part keeping at least `min_part` terms, at most kMaxSplits.
int split_count(int64_t threads, int64_t extent, int64_t min_part) {
  const int64_t wanted = ceil_div(kBusyThreads, threads);
  const int64_t most = std::max<int64_t>(1, extent / min_part);
  return static_cast<int>(std::min<int64_t>({wanted, most, int64_t(kMaxSplits)}));
}

int next_pow2_at_most_32(int64_t n) {
  int p = 1;
  while (p < n && p < kWarp) p *= 2;
  return p;
}

// Sum over the 32 lanes of a warp, in a fixed tree order; the result is valid in lane 0.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over each aligned group of `width` lanes (a power of 2 <= 32), butterfly order; every lane of the
// group gets the same bits. All 32 lanes must call it.
template <typename T>
__device__ __forceinline__ T group_sum(T v, int width) {
  for (int mask = width / 2; mask > 0; mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, mask);
  return v;
}

// Final value `index` of a reduction: straight to the output, or to part `split` of the workspace.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_result(scalar_t* out, acc_t* partial, int nsplit, int64_t split, int64_t n,
                                             int64_t index, acc_t v) {
  if (nsplit == 1) {
    out[index] = static_cast<scalar_t>(v);
  } else {
    partial[split * n + index] = v;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sum_partials_kernel(const at::opmath_type<scalar_t>* __restrict__ partial, scalar_t* __restrict__ out,
                    const int nsplit, const int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t sum = acc_t(0);
    for (int s = 0; s < nsplit; ++s) sum += partial[s * n + idx];
    out[idx] = static_cast<scalar_t>(sum);
  }
}

// ---------------------------------------------------------------------------------------------------
// grad_cf, NCHW. One block per work item (plane b*C + c, split); the split's pixels are strided over the
// block's threads (1-D block, a multiple of 32), then reduced: lanes by warp_sum, warps in order 0, 1, ...
// Output (B, C, k*k): value (plane, t) at plane * k*k + t.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t, K>)
grad_cf_nchw_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                    const scalar_t* __restrict__ sf, scalar_t* __restrict__ gcf,
                    at::opmath_type<scalar_t>* __restrict__ partial, const Geometry g, const int nsplit) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int TC = K > 0 ? K * K : 1;
  DDF_SHARED(acc_t, red, [kThreads / kWarp][TC]);
  const int k = K > 0 ? K : g.k, half = k / 2;
  const int64_t kk = static_cast<int64_t>(k) * k;
  const int64_t C = g.channels, Wo = g.out_w;
  const int64_t hw = g.height * g.width, hwo = g.out_h * Wo;
  const int64_t planes = g.batch * C, n = planes * kk;
  const int64_t span = dceil_div31(hwo, nsplit);  // pixels per split
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, nwarps = blockDim.x / kWarp;
  for (GridCursor it(blockIdx.x, gridDim.x, C, nsplit); it.i0 < g.batch; it.advance()) {  // uniform per block
    const int64_t b = it.i0, plane = b * C + it.i1, split = it.i2;
    // Pixel indices fit 32 bits (hwo < 2^31; p stays below hwo + blockDim.x).
    const unsigned int p_begin = static_cast<unsigned int>(split * span);
    const unsigned int p_end = static_cast<unsigned int>(dmin(hwo, split * span + span));
    const scalar_t* gop = go + plane * hwo;
    const scalar_t* xp = x + plane * hw;
    const scalar_t* sfb = sf + b * kk * hwo;  // tap t, pixel p at t * hwo + p
    for (int64_t t0 = 0; t0 < kk; t0 += TC) {
      acc_t acc[TC];
#pragma unroll
      for (int tt = 0; tt < TC; ++tt) acc[tt] = acc_t(0);
      for (unsigned int p = p_begin + tid; p < p_end; p += blockDim.x) {
        int64_t oy, ox;
        pixel_coords(p, Wo, oy, ox);
        const acc_t gv = static_cast<acc_t>(gop[p]);
#pragma unroll
        for (int tt = 0; tt < TC; ++tt) {
          const int t = (K > 0 ? 0 : static_cast<int>(t0)) + tt;  // K > 0: one chunk, t0 == 0
          const int off = tap_offset(oy, ox, t / k, t % k, half, g);
          if (off < 0) continue;
          acc_t v = gv * static_cast<acc_t>(xp[off]);
          if (g.mul) v *= static_cast<acc_t>(sfb[t * hwo + p]);
          acc[tt] += v;
        }
      }
#pragma unroll
      for (int tt = 0; tt < TC; ++tt) {
        const acc_t v = warp_sum(acc[tt]);
        if (lane == 0) red[warp][tt] = v;
      }
      __syncthreads();
      for (int tt = tid; tt < TC; tt += blockDim.x) {
        acc_t sum = acc_t(0);
        for (int w = 0; w < nwarps; ++w) sum += red[w][tt];
        store_result(gcf, partial, nsplit, split, n, plane * kk + t0 + tt, sum);
      }
      __syncthreads();  // red is rewritten by the next chunk / item
    }
  }
}

// grad_cf, NHWC. One block per work item (b, group of blockDim.x channels, split); a 2-D block:
// threadIdx.x = channel within the group (coalesced), threadIdx.y strides over the split's pixels. The
// per-thread sums are then added over threadIdx.y in order 0, 1, ... through shared memory, one tap at
// a time. Output (B, C, k*k).
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t, K>)
grad_cf_nhwc_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                    const scalar_t* __restrict__ sf, scalar_t* __restrict__ gcf,
                    at::opmath_type<scalar_t>* __restrict__ partial, const Geometry g, const int nsplit) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int TC = K > 0 ? K * K : 1;
  DDF_SHARED(acc_t, red, [kThreads]);
  const int k = K > 0 ? K : g.k, half = k / 2;
  const int64_t kk = static_cast<int64_t>(k) * k;
  const int64_t C = g.channels, Wo = g.out_w;
  const int64_t hw = g.height * g.width, hwo = g.out_h * Wo;
  const int64_t n = g.batch * C * kk;
  const int cw = blockDim.x, rows = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int64_t groups = dceil_div31(C, cw);
  const int64_t span = dceil_div31(hwo, nsplit);
  for (GridCursor it(blockIdx.x, gridDim.x, groups, nsplit); it.i0 < g.batch; it.advance()) {  // uniform per block
    const int64_t b = it.i0, c = it.i1 * cw + tx, split = it.i2;
    const bool active = c < C;
    // Pixel indices fit 32 bits (hwo < 2^31; p stays below hwo + blockDim.x).
    const unsigned int p_begin = static_cast<unsigned int>(split * span);
    const unsigned int p_end = static_cast<unsigned int>(dmin(hwo, split * span + span));
    const scalar_t* xb = x + b * hw * C + (active ? c : 0);  // input pixel q (of the sample) at q * C
    for (int64_t t0 = 0; t0 < kk; t0 += TC) {
      acc_t acc[TC];
#pragma unroll
      for (int tt = 0; tt < TC; ++tt) acc[tt] = acc_t(0);
      if (active) {
        for (unsigned int p = p_begin + ty; p < p_end; p += rows) {
          int64_t oy, ox;
          pixel_coords(p, Wo, oy, ox);
          const acc_t gv = static_cast<acc_t>(go[(b * hwo + p) * C + c]);
          const scalar_t* sfp = sf + (b * hwo + p) * kk;  // tap t at sfp[t]
          if constexpr (K > 0) {
            const TapWindow<K> win(oy, ox, g);
            const scalar_t* xw = xb + win.base * C;  // tap (i, j) at (i * row_step + j * dilation) * C
#pragma unroll
            for (int i = 0; i < K; ++i) {
#pragma unroll
              for (int j = 0; j < K; ++j) {
                if (!win.inside(i, j)) continue;
                acc_t v = gv * static_cast<acc_t>(xw[(i * win.row_step + j * g.dilation) * C]);
                if (g.mul) v *= static_cast<acc_t>(sfp[i * K + j]);
                acc[i * K + j] += v;
              }
            }
          } else {
            const int t = static_cast<int>(t0);
            const int off = tap_offset(oy, ox, t / k, t % k, half, g);
            if (off >= 0) {
              acc_t v = gv * static_cast<acc_t>(xb[off * C]);
              if (g.mul) v *= static_cast<acc_t>(sfp[t]);
              acc[0] += v;
            }
          }
        }
      }
#pragma unroll
      for (int tt = 0; tt < TC; ++tt) {
        red[ty * cw + tx] = acc[tt];
        __syncthreads();
        if (ty == 0 && active) {
          acc_t sum = acc_t(0);
          for (int r = 0; r < rows; ++r) sum += red[r * cw + tx];
          store_result(gcf, partial, nsplit, split, n, (b * C + c) * kk + t0 + tt, sum);
        }
        __syncthreads();
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// grad_sf, NCHW. Work item = (split, b, pixel p), pixel fastest; a thread loops over the split's
// channels in order. Output (B, k*k, Ho, Wo): value (b, t, p) at (b * k*k + t) * hwo + p.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t, K>)
grad_sf_nchw_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                    const scalar_t* __restrict__ cf, scalar_t* __restrict__ gsf,
                    at::opmath_type<scalar_t>* __restrict__ partial, const Geometry g, const int nsplit) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int TC = K > 0 ? K * K : 1;
  const int k = K > 0 ? K : g.k, half = k / 2;
  const int64_t kk = static_cast<int64_t>(k) * k;
  const int64_t B = g.batch, C = g.channels, Wo = g.out_w;
  const int64_t hw = g.height * g.width, hwo = g.out_h * Wo;
  const int64_t n = B * kk * hwo;
  const int64_t span = dceil_div31(C, nsplit);  // channels per split
  for (GridCursor it(static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                     static_cast<int64_t>(gridDim.x) * blockDim.x, B, hwo);
       it.i0 < nsplit; it.advance()) {
    const int64_t split = it.i0, b = it.i1, p = it.i2;
    const int64_t c_begin = split * span, c_end = dmin(C, c_begin + span);
    int64_t oy, ox;
    pixel_coords(p, Wo, oy, ox);
    for (int64_t t0 = 0; t0 < kk; t0 += TC) {
      acc_t acc[TC];
#pragma unroll
      for (int tt = 0; tt < TC; ++tt) acc[tt] = acc_t(0);
      int off[TC];  // where the chunk's taps sample, within a plane (-1: outside the image)
#pragma unroll
      for (int tt = 0; tt < TC; ++tt) {
        const int t = (K > 0 ? 0 : static_cast<int>(t0)) + tt;  // K > 0: one chunk, t0 == 0
        off[tt] = tap_offset(oy, ox, t / k, t % k, half, g);
      }
      // Channel c_begin's planes, advanced one plane per channel.
      const scalar_t* gop = go + (b * C + c_begin) * hwo + p;
      const scalar_t* xp = x + (b * C + c_begin) * hw;
      const scalar_t* cfp = cf + (b * C + c_begin) * kk + (K > 0 ? 0 : t0);  // tap t0 + tt at cfp[tt]
      for (int64_t c = c_begin; c < c_end; ++c, gop += hwo, xp += hw, cfp += kk) {
        const acc_t gv = static_cast<acc_t>(*gop);
#pragma unroll
        for (int tt = 0; tt < TC; ++tt) {
          if (off[tt] < 0) continue;
          acc_t v = gv * static_cast<acc_t>(xp[off[tt]]);
          if (g.mul) v *= static_cast<acc_t>(cfp[tt]);
          acc[tt] += v;
        }
      }
#pragma unroll
      for (int tt = 0; tt < TC; ++tt) {
        store_result(gsf, partial, nsplit, split, n, (b * kk + t0 + tt) * hwo + p, acc[tt]);
      }
    }
  }
}

// grad_sf, NHWC. Work item = (split, b, pixel p), pixel fastest, taken by a group of `lanes` lanes (a
// power of 2 <= 32, 32 / lanes groups per warp); the group's lanes stride over the split's channels
// (coalesced), then group_sum adds the lanes. The loop over items is warp-uniform so every lane reaches
// the shuffles. Output (B, Ho, Wo, k*k): value (b, p, t) at (b * hwo + p) * k*k + t.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t, K>)
grad_sf_nhwc_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                    const scalar_t* __restrict__ cft, scalar_t* __restrict__ gsf,
                    at::opmath_type<scalar_t>* __restrict__ partial, const Geometry g, const int nsplit,
                    const int lanes) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int TC = K > 0 ? K : 1;  // chunk = one kernel row (K taps): fewer registers per lane
  const int k = K > 0 ? K : g.k, half = k / 2;
  const int64_t kk = static_cast<int64_t>(k) * k;
  const int64_t B = g.batch, C = g.channels, Wo = g.out_w;
  const int64_t hw = g.height * g.width, hwo = g.out_h * Wo;
  const int64_t n = B * hwo * kk;
  const int64_t items = nsplit * B * hwo;
  const int64_t span = dceil_div31(C, nsplit);  // channels per split
  const int lane = threadIdx.x % kWarp, sub = lane % lanes, slot = lane / lanes, per_warp = kWarp / lanes;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  GridCursor it(warp * per_warp + slot, warps * per_warp, B, hwo);  // this lane's item
  for (int64_t first = warp * per_warp; first < items; first += warps * per_warp, it.advance()) {  // uniform per warp
    const bool active = it.i0 < nsplit;  // item first + slot exists
    const int64_t split = active ? it.i0 : 0, b = it.i1, p = it.i2;
    const int64_t c_begin = split * span, c_end = active ? dmin(C, c_begin + span) : c_begin;
    int64_t oy, ox;
    pixel_coords(p, Wo, oy, ox);
    const int64_t pix = b * hwo + p;  // output pixel over the whole batch
    const scalar_t* xb = x + b * hw * C;  // input pixel q (within the sample), channel c at q * C + c
#pragma unroll 1  // one row at a time: unrolled, the rows' loads interleave and spill at k = 3 on sm_80
    for (int64_t t0 = 0; t0 < kk; t0 += TC) {
      int off[TC];  // input pixel the chunk's taps sample, within the sample (-1: outside the image)
      acc_t acc[TC];
#pragma unroll
      for (int tt = 0; tt < TC; ++tt) {
        const int t = static_cast<int>(t0) + tt;
        off[tt] = tap_offset(oy, ox, t / k, t % k, half, g);
        acc[tt] = acc_t(0);
      }
      const scalar_t* cfb = cft + (b * kk + t0) * C;  // tap t0 + tt, channel c at tt * C + c
      for (int64_t c = c_begin + sub; c < c_end; c += lanes) {
        const acc_t gv = static_cast<acc_t>(go[pix * C + c]);
#pragma unroll
        for (int tt = 0; tt < TC; ++tt) {
          if (off[tt] < 0) continue;
          acc_t v = gv * static_cast<acc_t>(xb[off[tt] * C + c]);
          if (g.mul) v *= static_cast<acc_t>(cfb[tt * C + c]);
          acc[tt] += v;
        }
      }
#pragma unroll
      for (int tt = 0; tt < TC; ++tt) {
        const acc_t sum = group_sum(acc[tt], lanes);
        if (active && sub == tt % lanes) store_result(gsf, partial, nsplit, split, n, pix * kk + t0 + tt, sum);
      }
    }
  }
}

// Launches `sum_partials_kernel` when the reduction was split.
template <typename scalar_t>
void finish(const at::Tensor& partial, int nsplit, const at::Tensor& out, cudaStream_t stream) {
  if (nsplit == 1) return;
  const int64_t n = out.numel();
  DDF_LAUNCH(grid_size(n, kThreads), kThreads, 0, stream, sum_partials_kernel<scalar_t>)(
      partial.const_data_ptr<at::opmath_type<scalar_t>>(), out.mutable_data_ptr<scalar_t>(), nsplit, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Float workspace for `nsplit` partial results of `out` (an empty tensor when there is no split).
at::Tensor workspace(const at::Tensor& out, int nsplit) {
  const auto options = out.options().dtype(at::toOpMathType(out.scalar_type()));
  return at::empty({nsplit == 1 ? 0 : nsplit * out.numel()}, options);
}

}  // namespace

void launch_grad_filters(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& channel_filter,
                         const at::Tensor& spatial_filter, const at::Tensor& grad_channel_filter,
                         const at::Tensor& grad_spatial_filter, const Geometry& g, bool channels_last) {
  const cudaStream_t stream = current_stream();
  const int64_t B = g.batch, C = g.channels, hwo = g.out_h * g.out_w;

  // grad_cf: launch shape and split.
  dim3 cf_block;
  int64_t cf_items;
  int cf_split;
  if (channels_last) {
    const int cw = next_pow2_at_most_32(C), rows = kThreads / cw;
    cf_block = dim3(cw, rows);
    cf_split = split_count(B * ceil_div(C, cw) * kThreads, hwo, 4 * int64_t(rows));
    cf_items = B * ceil_div(C, cw) * cf_split;
  } else {
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, ceil_div(hwo, kWarp) * kWarp));
    cf_block = dim3(threads);
    cf_split = split_count(B * C * threads, hwo, 4 * int64_t(threads));
    cf_items = B * C * cf_split;
  }
  const unsigned int cf_grid = grid_size(cf_items, 1);

  // grad_sf: launch shape and split.
  // NHWC: `lanes` lanes per pixel, each taking at least 4 channels of a split; NCHW: one thread per
  // pixel, taking at least 16 channels of a split.
  const int lanes = channels_last ? next_pow2_at_most_32(C) : 1;
  const int sf_split = split_count(B * hwo * lanes, C, channels_last ? 4 * int64_t(lanes) : 16);
  const int64_t sf_items = sf_split * B * hwo;
  const int64_t sf_threads = channels_last ? ceil_div(sf_items, kWarp / lanes) * kWarp : sf_items;
  const unsigned int sf_grid = grid_size(sf_threads, kThreads);

  const at::Tensor cf_partial = workspace(grad_channel_filter, cf_split);
  const at::Tensor sf_partial = workspace(grad_spatial_filter, sf_split);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "ddf_grad_filters_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* cf = channel_filter.const_data_ptr<scalar_t>();
    const scalar_t* sf = spatial_filter.const_data_ptr<scalar_t>();
    scalar_t* gcf = grad_channel_filter.mutable_data_ptr<scalar_t>();
    scalar_t* gsf = grad_spatial_filter.mutable_data_ptr<scalar_t>();
    acc_t* cfw = cf_split == 1 ? nullptr : cf_partial.mutable_data_ptr<acc_t>();
    acc_t* sfw = sf_split == 1 ? nullptr : sf_partial.mutable_data_ptr<acc_t>();
    dispatch_kernel_size(g.k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      if (channels_last) {
        DDF_LAUNCH(cf_grid, cf_block, 0, stream, grad_cf_nhwc_kernel<scalar_t, K>)(
            go, x, sf, gcf, cfw, g, cf_split);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        DDF_LAUNCH(sf_grid, kThreads, 0, stream, grad_sf_nhwc_kernel<scalar_t, K>)(
            go, x, cf, gsf, sfw, g, sf_split, lanes);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        DDF_LAUNCH(cf_grid, cf_block, 0, stream, grad_cf_nchw_kernel<scalar_t, K>)(
            go, x, sf, gcf, cfw, g, cf_split);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        DDF_LAUNCH(sf_grid, kThreads, 0, stream, grad_sf_nchw_kernel<scalar_t, K>)(
            go, x, cf, gsf, sfw, g, sf_split);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    finish<scalar_t>(cf_partial, cf_split, grad_channel_filter, stream);
    finish<scalar_t>(sf_partial, sf_split, grad_spatial_filter, stream);
  });
}

}  // namespace ddf_cuda
}  // namespace ddfnet
