// CPU kernels of the DDF op (semantics: docs/design.md): forward and the three gradients, NCHW and channels_last.
//
// The kernels compute in the accumulation type (double for float64, float otherwise): reduced-precision
// tensors are converted once on entry and the result rounded once on exit, which keeps the inner loops
// plain float loops the compiler vectorises. Every output element is written by exactly one task, and
// reductions run in a fixed order, so results are deterministic and independent of the thread count.
//
// Parallelisation: NCHW work is split over (sample, channel) planes, except the spatial-filter gradient
// (a sum over channels), which is split over (sample, output row). channels_last work is split over
// (sample, row) with the channel axis as the vectorised inner loop, except the channel-filter gradient
// (a sum over pixels), split over (sample, block of channels).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../ddf.h"

namespace ddfnet {
namespace {

struct Geometry {
  int64_t B, C, H, W, Ho, Wo, k, d, s;
  int64_t K2() const { return k * k; }
  int64_t off(int64_t tap_index) const { return (tap_index - k / 2) * d; }  // tap row/col -> offset
};

// For an input coordinate and a tap offset, the output coordinate that samples it, or -1.
inline int64_t source_of(int64_t in_pos, int64_t offset, int64_t s, int64_t out) {
  const int64_t n = in_pos - offset;
  if (n < 0 || n % s != 0) return -1;
  const int64_t o = n / s;
  return o < out ? o : -1;
}

// Everything a kernel reads and writes; unused pointers are null. cf is (B, C, K2) for NCHW and
// (B, K2, C) for channels_last; for NCHW, sf is a copy with padded rows: (B, K2, Ho, Wv) for the
// forward, (B, K2, Ho, PaddedRows::width) for the backward.
template <typename T>
struct Args {
  const T* x = nullptr;
  const T* cf = nullptr;
  const T* sf = nullptr;
  const T* go = nullptr;
  T* out = nullptr;
  T* gx = nullptr;
  T* gcf = nullptr;
  T* gsf = nullptr;
  Geometry g;
  bool mul = true;
};

// Enough iterations per task that scheduling overhead stays small.
int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item)); }

// ---------------------------------------------------------------------------------------------------
// NCHW. x (B, C, H, W), cf (B, C, K2), sf (B, K2, Ho, Wo), out/grad_out (B, C, Ho, Wo), all contiguous.

// Vector lanes V; the forward's register block is U chunks x G channels (see forward_nchw_planes).
constexpr int64_t V = 8;
constexpr int64_t U = 2;
constexpr int64_t G = 4;

// The zero-padded, column-phase-split copy of input rows the NCHW kernels read (see fill_padded_row):
// `pad` zeros around, outputs computed in rows of Wv = roundup(Wo, V), Wq positions per phase row (wide
// enough for a vector at any chunk start shifted by any tap).
inline int64_t pad_of(const Geometry& g) { return (g.k / 2) * g.d; }
inline int64_t vec_width(const Geometry& g) { return (g.Wo + V - 1) / V * V; }
inline int64_t phase_width(const Geometry& g) {
  return std::max((g.W + 2 * pad_of(g) + g.s - 1) / g.s, vec_width(g) + (g.k - 1) * g.d / g.s + 1);
}

// tap -> offset of the value it reads for a chunk's first output, relative to the chunk's base, in a
// buffer whose column phases are phase_stride apart and whose input rows are row_stride apart.
std::vector<int64_t> tap_offsets(const Geometry& g, int64_t phase_stride, int64_t row_stride) {
  std::vector<int64_t> offset(g.K2());
  for (int64_t t = 0; t < g.K2(); ++t) {
    const int64_t dy = (t / g.k) * g.d, dx = (t % g.k) * g.d;
    offset[t] = (dx % g.s) * phase_stride + dy * row_stride + dx / g.s;
  }
  return offset;
}

// Copies n values with inline vector moves: the kernels copy many short rows (often 14 or 56
// values), where std::copy is a library call (memmove) per row.
template <typename T>
inline void copy_row(const T* __restrict src, int64_t n, T* __restrict dst) {
  using Vec [[gnu::vector_size(V * sizeof(T))]] = T;
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    Vec v;
    std::memcpy(&v, src + i, sizeof(Vec));
    std::memcpy(dst + i, &v, sizeof(Vec));
  }
  for (; i < n; ++i) dst[i] = src[i];
}

// Copies input row src (W values) into dst, `pad` zeros on the left, split by column phase: padded column
// c goes to phase c % s (phases phase_stride apart), position c / s, so a tap reads V contiguous values
// for V adjacent outputs whatever the stride. The zeros around must already be there.
template <typename T>
inline void fill_padded_row(const T* src, const Geometry& g, int64_t pad, int64_t phase_stride, T* dst) {
  const int64_t s = g.s;
  if (s == 1) {
    copy_row(src, g.W, dst + pad);
    return;
  }
  for (int64_t phase = 0; phase < s; ++phase) {
    const int64_t c0 = ((phase - pad) % s + s) % s;  // first input column of this phase
    T* d = dst + phase * phase_stride + (c0 + pad) / s;
    for (int64_t c = c0, i = 0; c < g.W; c += s, ++i) d[i] = src[c];
  }
}

// Copies plane xp (H, W) into buf, (Hp = H + 2 pad) rows of Wq per phase.
template <typename T>
void fill_padded_plane(const T* xp, T* buf, const Geometry& g, int64_t pad, int64_t Hp, int64_t Wq) {
  for (int64_t r = 0; r < g.H; ++r) fill_padded_row(xp + r * g.W, g, pad, Hp * Wq, buf + (r + pad) * Wq);
}

// The forward over planes [begin, end). Each plane is first copied into a zero-padded buffer, split by
// column phase (padded column c goes to phase c % s, position c / s), so every tap reads V contiguous
// values whatever the stride, and the hot loop has no border checks. Outputs are computed in chunks of V
// adjacent pixels of a row, U chunks of G channels (planes of one sample) at a time: each sum stays in a
// vector register over all k*k taps, the G*U independent chains hide the multiply-add latency, and each
// spatial-filter vector is loaded once for G channels (the filter plane, k*k times the size of an output
// plane, lives in L2: loading it once per channel made the kernel L2-bound). Rows are computed up to
// Wv = roundup(Wo, V) columns; the padded spatial filter (psf, (B, K2, Ho, Wv)) and the buffers are wide
// enough, and the extra results are dropped.
template <typename T, bool MUL>
void forward_nchw_planes(const Args<T>& a, int64_t begin, int64_t end) {
  // GCC/Clang vector extension: V lanes, compiled to the target's SIMD width (SSE, or AVX2 in the
  // AVX2 variant).
  using Vec [[gnu::vector_size(V * sizeof(T))]] = T;
  const T *x = a.x, *cf = a.cf, *psf = a.sf;
  T* out = a.out;
  const Geometry& g = a.g;
  const int64_t s = g.s, K2 = g.K2(), pad = pad_of(g), Wv = vec_width(g), Hp = g.H + 2 * pad, Wq = phase_width(g);
  const int64_t per_row = Wv / V, chunks = g.Ho * per_row, filter_plane = g.Ho * Wv, plane_buffer = s * Hp * Wq;
  const std::vector<int64_t> offset = tap_offsets(g, Hp * Wq, Wq);  // in a plane's buffer
  // Where each chunk reads and writes, computed once: divisions in the chunk loop (q / per_row) cost
  // more than the chunk's arithmetic.
  struct Chunk {
    int64_t in, filter, out, n;  // offsets in a plane's buffer, the filter plane and the output plane; width
  };
  std::vector<Chunk> chunk(chunks);
  for (int64_t q = 0; q < chunks; ++q) {
    const int64_t y = q / per_row, x0 = q % per_row * V;
    chunk[q] = {y * s * Wq + x0, y * Wv + x0, y * g.Wo + x0, std::min(V, g.Wo - x0)};
  }
  // Borders stay zero; each plane overwrites the interior. Channels past the group's end compute on
  // whatever their buffer holds and are not stored.
  std::vector<T> buffer(G * plane_buffer, T(0));
  for (int64_t p0 = begin; p0 < end;) {
    const int64_t b = p0 / g.C, n_planes = std::min({G, end - p0, (b + 1) * g.C - p0});
    const T* cp[G];
    const T* pin[G];
    for (int64_t gi = 0; gi < G; ++gi) {
      const int64_t p = p0 + std::min(gi, n_planes - 1);
      cp[gi] = cf + p * K2;
      pin[gi] = buffer.data() + gi * plane_buffer;
      if (gi >= n_planes) continue;
      fill_padded_plane(x + p * g.H * g.W, buffer.data() + gi * plane_buffer, g, pad, Hp, Wq);
    }
    const T* sp = psf + b * K2 * filter_plane;
    for (int64_t q0 = 0; q0 < chunks; q0 += U) {
      int64_t in[U];
      const T* f[U];
      for (int64_t u = 0; u < U; ++u) {
        const Chunk& ch = chunk[std::min(q0 + u, chunks - 1)];  // past the end: redo the last chunk
        in[u] = ch.in;
        f[u] = sp + ch.filter;
      }
      Vec acc[G][U] = {};
      for (int64_t t = 0; t < K2; ++t) {
        for (int64_t u = 0; u < U; ++u) {
          Vec fv;
          std::memcpy(&fv, f[u] + t * filter_plane, sizeof(Vec));
          for (int64_t gi = 0; gi < G; ++gi) {
            Vec xv;
            std::memcpy(&xv, pin[gi] + in[u] + offset[t], sizeof(Vec));
            if constexpr (MUL) {
              acc[gi][u] += xv * (cp[gi][t] * fv);
            } else {
              acc[gi][u] += xv * (cp[gi][t] + fv);
            }
          }
        }
      }
      for (int64_t gi = 0; gi < n_planes; ++gi) {
        T* op = out + (p0 + gi) * g.Ho * g.Wo;
        for (int64_t u = 0; u < U && q0 + u < chunks; ++u) {
          const Chunk& ch = chunk[q0 + u];
          if (ch.n == V) {
            std::memcpy(op + ch.out, &acc[gi][u], sizeof(Vec));
          } else {
            for (int64_t l = 0; l < ch.n; ++l) op[ch.out + l] = acc[gi][u][l];
          }
        }
      }
    }
    p0 += n_planes;
  }
}

// Register block of the gradient kernels that keep one vector of sums per tap: NT taps at a time.
constexpr int64_t NT = 9;

// Lanes of v summed in a fixed tree order.
template <typename T, typename Vec>
inline T horizontal_sum(Vec v) {
  constexpr int64_t n = sizeof(Vec) / sizeof(T);
  using Half [[gnu::vector_size(n / 2 * sizeof(T))]] = T;
  Half lo, hi;
  std::memcpy(&lo, &v, sizeof(Half));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
  if constexpr (n / 2 == 1) {
    return lo[0] + hi[0];
  } else {
    return horizontal_sum<T>(lo + hi);
  }
}

// Rows of grad_output and of the spatial filter as the NCHW backward reads them: `left` zero columns,
// the Wo values, zeros up to `width`. Wide enough for U vectors of V outputs at any chunk start below
// Wo, shifted by any tap (grad_input reads column m + (phase - offset) / s).
struct PaddedRows {
  int64_t left, width;
};
PaddedRows padded_rows(const Geometry& g) {
  const int64_t pad = pad_of(g), Wu = (g.Wo + U * V - 1) / (U * V) * (U * V);
  const int64_t left = (pad + g.s - 1) / g.s;
  return {left, left + Wu + (g.s - 1 + pad) / g.s + 1};
}

// grad_input and grad_channel_filter over planes [begin, end). sf is the (B, K2, Ho, width) copy with
// padded rows (see PaddedRows); grad_output's plane is copied the same way into a buffer, so a vector
// of V adjacent outputs reads V contiguous values per operand with no border checks.
//
// grad_input, gather form: input pixel (yi, xi) collects the taps (i, j) whose output position
// ((yi - off_i) / s, (xi - off_j) / s) is whole and inside. Input columns are done by phase
// xi = m * s + phase, for which the valid taps and their column shift are fixed, so chunks of V values
// of m are vectors; U chunks at a time keep U independent multiply-add chains in flight. (The scatter
// form, adding each tap's row into the grad_input row, costs a load and a store per multiply-add and
// a strided store at stride 2: 2-3x slower.)
//
// grad_channel_filter[t] = sum over output pixels of grad_out * x(tap t) (* sf[t]): the plane is copied
// into a padded phase-split buffer (as in the forward); the sums of NT taps stay in vector registers
// over the whole plane, with one horizontal sum per tap at the end (per-tap partial rows in memory
// cost a load and a store per multiply-add, 2x slower).
template <typename T, bool MUL>
void backward_nchw_planes(const Args<T>& a, int64_t begin, int64_t end) {
  using Vec [[gnu::vector_size(V * sizeof(T))]] = T;
  const T *go = a.go, *x = a.x, *cf = a.cf, *psf = a.sf;
  T *gx = a.gx, *gcf = a.gcf;
  const Geometry& g = a.g;
  const int64_t K2 = g.K2(), in_plane = g.H * g.W, out_plane = g.Ho * g.Wo, s = g.s;
  const int64_t pad = pad_of(g), Hp = g.H + 2 * pad, Wq = phase_width(g);
  const PaddedRows pr = padded_rows(g);
  const int64_t filter_plane = g.Ho * pr.width;
  const std::vector<int64_t> offset = tap_offsets(g, Hp * Wq, Wq);  // in the plane buffer
  std::vector<T> buffer(s * Hp * Wq, T(0)), grad_rows(filter_plane, T(0)), gx_row(pr.width);
  // Which output row each input row takes from each kernel row (or -1), and the column shift of each
  // kernel column in each column phase (or `none`): computed once, as the divisions cost
  // more than the arithmetic they select (stride 2).
  constexpr int64_t none = std::numeric_limits<int64_t>::min();
  std::vector<int64_t> source_row(g.H * g.k), shift(s * g.k);
  for (int64_t yi = 0; yi < g.H; ++yi)
    for (int64_t i = 0; i < g.k; ++i) source_row[yi * g.k + i] = source_of(yi, g.off(i), s, g.Ho);
  for (int64_t phase = 0; phase < s; ++phase) {
    for (int64_t j = 0; j < g.k; ++j) {
      const int64_t n = phase - g.off(j);  // m * s + phase - off_j is a multiple of s for every m or none
      shift[phase * g.k + j] = n % s == 0 ? n / s : none;
    }
  }
  // The taps each (input row, column phase) gathers from: the same for every plane.
  struct Tap {
    int64_t at;  // offset of the tap's first value in grad_rows, and in the sample's filter planes
    int64_t t;
  };
  const int64_t phases = std::min(s, g.W);
  std::vector<Tap> taps;
  std::vector<int64_t> first_tap(g.H * phases + 1, 0);  // (yi, phase) -> its taps' start in `taps`
  for (int64_t yi = 0; yi < g.H; ++yi) {
    for (int64_t phase = 0; phase < phases; ++phase) {
      for (int64_t i = 0; i < g.k; ++i) {
        const int64_t y = source_row[yi * g.k + i];
        if (y < 0) continue;
        for (int64_t j = 0; j < g.k; ++j) {
          const int64_t n = shift[phase * g.k + j];
          if (n == none) continue;
          taps.push_back({y * pr.width + pr.left + n, i * g.k + j});
        }
      }
      first_tap[yi * phases + phase + 1] = int64_t(taps.size());
    }
  }
  for (int64_t p = begin; p < end; ++p) {
    const T* xp = x + p * in_plane;
    const T* gp = go + p * out_plane;
    const T* cp = cf + p * K2;
    const T* sp = psf + (p / g.C) * K2 * filter_plane;
    for (int64_t y = 0; y < g.Ho; ++y)
      copy_row(gp + y * g.Wo, g.Wo, grad_rows.data() + y * pr.width + pr.left);
    const T* grp = grad_rows.data();

    for (int64_t yi = 0; yi < g.H; ++yi) {
      T* row = gx + p * in_plane + yi * g.W;
      for (int64_t phase = 0; phase < phases; ++phase) {
        const Tap* tp = taps.data() + first_tap[yi * phases + phase];
        const int64_t n_taps = first_tap[yi * phases + phase + 1] - first_tap[yi * phases + phase];
        for (int64_t m0 = 0; m0 < g.Wo; m0 += U * V) {
          // Even and odd taps in separate sums: 2 * U chains of multiply-adds, enough to hide their
          // latency (U chains alone were latency-bound).
          Vec even[U] = {}, odd[U] = {};
          auto add_tap = [&](const Tap& tap, Vec(&sum)[U]) {
            const T c = cp[tap.t];
            const T* gr = grp + tap.at + m0;
            const T* sr = sp + tap.t * filter_plane + tap.at + m0;
            for (int64_t u = 0; u < U; ++u) {
              Vec gv, sv;
              std::memcpy(&gv, gr + u * V, sizeof(Vec));
              std::memcpy(&sv, sr + u * V, sizeof(Vec));
              if constexpr (MUL) {
                sum[u] += gv * (c * sv);
              } else {
                sum[u] += gv * (c + sv);
              }
            }
          };
          for (int64_t n = 0; n + 1 < n_taps; n += 2) {
            add_tap(tp[n], even);
            add_tap(tp[n + 1], odd);
          }
          if (n_taps % 2) add_tap(tp[n_taps - 1], even);
          for (int64_t u = 0; u < U; ++u) {
            const Vec total = even[u] + odd[u];
            std::memcpy(&gx_row[m0 + u * V], &total, sizeof(Vec));
          }
        }
        if (s == 1) {
          copy_row(gx_row.data(), g.W, row);
        } else {
          for (int64_t xi = phase, m = 0; xi < g.W; xi += s, ++m) row[xi] = gx_row[m];
        }
      }
    }

    fill_padded_plane(xp, buffer.data(), g, pad, Hp, Wq);
    for (int64_t t0 = 0; t0 < K2; t0 += NT) {
      const T* in[NT];
      const T* f[NT];
      for (int64_t u = 0; u < NT; ++u) {
        const int64_t t = std::min(t0 + u, K2 - 1);  // past the last tap: redo it, not stored
        in[u] = buffer.data() + offset[t];
        f[u] = sp + t * filter_plane + pr.left;  // not read for 'add', where the spatial filter drops out
      }
      Vec acc[NT] = {};
      // The last chunk of a row past Wo reads real input columns (zero grad_output): those lanes are
      // cleared rather than multiplied by zero, so an inf there cannot turn the sum into NaN.
      auto add_chunk = [&](int64_t src, int64_t dst, int64_t n) {
        Vec gv;
        std::memcpy(&gv, grp + pr.left + dst, sizeof(Vec));
        for (int64_t u = 0; u < NT; ++u) {
          Vec xv;
          std::memcpy(&xv, in[u] + src, sizeof(Vec));
          for (int64_t l = n; l < V; ++l) xv[l] = T(0);
          if constexpr (MUL) {
            Vec fv;
            std::memcpy(&fv, f[u] + dst, sizeof(Vec));
            acc[u] += gv * xv * fv;
          } else {
            acc[u] += gv * xv;
          }
        }
      };
      const int64_t full = g.Wo / V * V;
      for (int64_t y = 0; y < g.Ho; ++y) {
        for (int64_t x0 = 0; x0 < full; x0 += V) add_chunk(y * s * Wq + x0, y * pr.width + x0, V);
        if (full < g.Wo) add_chunk(y * s * Wq + full, y * pr.width + full, g.Wo - full);
      }
      for (int64_t u = 0; u < NT && t0 + u < K2; ++u) gcf[p * K2 + t0 + u] = horizontal_sum<T>(acc[u]);
    }
  }
}

// grad_spatial_filter: a sum over channels, so split over (sample, output row) instead; each row's sums
// run over the channels in order, whatever rows a call gets, so results do not depend on the split.
//
// A call works on groups of up to R rows of one sample. For a block of channels it copies the input
// rows the group's taps read into zero-padded phase-split rows (as in forward_nchw_planes), and
// grad_output's rows into rows of Wv with zero tails; then, per chunk of V outputs, the sums of NT taps
// stay in vector registers over the block's channels, carried from block to block in `part`.
// Why: reading k rows of every channel per output row jumps from plane to plane every few cache lines,
// which the prefetchers do not follow (the copies alone cost more than the arithmetic); a group reads
// (R - 1) * s + k contiguous rows per channel. Blocks of 256 KiB of rows (in L2) measured best: L1-sized
// blocks (16 KiB, 3 channels at 56x56) spent their time carrying sums through `part`. Partial rows in
// memory instead of register sums cost a load and a store per multiply-add.
constexpr int64_t R = 8;

template <typename T, bool MUL>
void backward_nchw_sf_rows(const Args<T>& a, int64_t begin, int64_t end) {
  using Vec [[gnu::vector_size(V * sizeof(T))]] = T;
  const T *go = a.go, *x = a.x, *cf = a.cf;
  T* gsf = a.gsf;
  const Geometry& g = a.g;
  const int64_t K2 = g.K2(), C = g.C, s = g.s, in_plane = g.H * g.W, out_plane = g.Ho * g.Wo;
  const int64_t pad = pad_of(g), Wv = vec_width(g), Wq = phase_width(g);
  const int64_t row_len = s * Wq, n_rows = (R - 1) * s + 2 * pad + 1, per_channel = n_rows * row_len;
  const int64_t grad_len = R * Wv;
  const std::vector<int64_t> offset = tap_offsets(g, Wq, row_len);  // in a channel's rows
  // The block's channel filter with each channel's taps padded to whole groups of NT (zeros past K2),
  // so a group's NT values sit at fixed offsets from one pointer.
  const int64_t K2n = (K2 + NT - 1) / NT * NT;
  const int64_t block =
      std::max<int64_t>(1, std::min(C, int64_t(262144 / sizeof(T)) / (per_channel + grad_len + K2n)));
  std::vector<T> rows(block * per_channel, T(0)), grad(block * grad_len, T(0)), weights(block * K2n, T(0));
  std::vector<T> part(R * K2 * Wv);
  for (int64_t r0 = begin; r0 < end;) {
    const int64_t b = r0 / g.Ho, y0 = r0 % g.Ho, nr = std::min({R, end - r0, g.Ho - y0});
    for (int64_t c0 = 0; c0 < C; c0 += block) {
      const int64_t nc = std::min(block, C - c0);
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t p = b * C + c0 + c;
        for (int64_t r = 0; r < (nr - 1) * s + 2 * pad + 1; ++r) {
          T* dst = rows.data() + c * per_channel + r * row_len;
          const int64_t yi = y0 * s - pad + r;
          if (yi < 0 || yi >= g.H) {
            std::fill(dst, dst + row_len, T(0));
            continue;
          }
          fill_padded_row(x + p * in_plane + yi * g.W, g, pad, Wq, dst);
        }
        for (int64_t r = 0; r < nr; ++r)
          copy_row(go + p * out_plane + (y0 + r) * g.Wo, g.Wo, grad.data() + c * grad_len + r * Wv);
        if (MUL) copy_row(cf + p * K2, K2, weights.data() + c * K2n);
      }
      for (int64_t r = 0; r < nr; ++r) {
        for (int64_t q0 = 0; q0 < Wv; q0 += V) {
          for (int64_t t0 = 0; t0 < K2; t0 += NT) {
            const T* in[NT];  // past the last tap: read the last tap's rows, not stored
            for (int64_t u = 0; u < NT; ++u)
              in[u] = rows.data() + r * s * row_len + offset[std::min(t0 + u, K2 - 1)] + q0;
            T* pp = part.data() + r * K2 * Wv + q0;
            Vec acc[NT] = {};
            if (c0 > 0) {
              for (int64_t u = 0; u < NT && t0 + u < K2; ++u) std::memcpy(&acc[u], pp + (t0 + u) * Wv, sizeof(Vec));
            }
            for (int64_t c = 0; c < nc; ++c) {
              Vec gv;
              std::memcpy(&gv, grad.data() + c * grad_len + r * Wv + q0, sizeof(Vec));
              const T* w = weights.data() + c * K2n + t0;
              for (int64_t u = 0; u < NT; ++u) {
                Vec xv;
                std::memcpy(&xv, in[u] + c * per_channel, sizeof(Vec));
                if constexpr (MUL) {
                  acc[u] += gv * w[u] * xv;
                } else {
                  acc[u] += gv * xv;
                }
              }
            }
            if (c0 + nc < C) {
              for (int64_t u = 0; u < NT && t0 + u < K2; ++u) std::memcpy(pp + (t0 + u) * Wv, &acc[u], sizeof(Vec));
              continue;
            }
            const int64_t n = std::min(V, g.Wo - q0);
            for (int64_t u = 0; u < NT && t0 + u < K2; ++u) {
              T* out = gsf + ((b * K2 + t0 + u) * g.Ho + y0 + r) * g.Wo + q0;
              for (int64_t l = 0; l < n; ++l) out[l] = acc[u][l];
            }
          }
        }
      }
    }
    r0 += nr;
  }
}

// ---------------------------------------------------------------------------------------------------
// channels_last. x (B, H, W, C), cft (B, K2, C) (channel filter transposed so a tap's C values are
// contiguous), sf (B, Ho, Wo, K2), out/grad_out (B, Ho, Wo, C).

template <typename T>
void forward_nhwc_rows(const Args<T>& a, int64_t begin, int64_t end) {
  const T *x = a.x, *cft = a.cf, *sf = a.sf;
  T* out = a.out;
  const Geometry& g = a.g;
  const bool mul = a.mul;
  const int64_t K2 = g.K2(), C = g.C;
  {
    for (int64_t r_idx = begin; r_idx < end; ++r_idx) {
      const int64_t b = r_idx / g.Ho, y = r_idx % g.Ho;
      for (int64_t xo = 0; xo < g.Wo; ++xo) {
        T* __restrict o = out + (r_idx * g.Wo + xo) * C;
        const T* spix = sf + (r_idx * g.Wo + xo) * K2;
        std::fill(o, o + C, T(0));
        for (int64_t i = 0; i < g.k; ++i) {
          const int64_t yi = y * g.s + g.off(i);
          if (yi < 0 || yi >= g.H) continue;
          for (int64_t j = 0; j < g.k; ++j) {
            const int64_t xi = xo * g.s + g.off(j);
            if (xi < 0 || xi >= g.W) continue;
            const int64_t t = i * g.k + j;
            const T* __restrict in = x + ((b * g.H + yi) * g.W + xi) * C;
            const T* __restrict ct = cft + (b * K2 + t) * C;
            const T sv = spix[t];
            if (mul) {
              for (int64_t c = 0; c < C; ++c) o[c] += in[c] * ct[c] * sv;
            } else {
              for (int64_t c = 0; c < C; ++c) o[c] += in[c] * (ct[c] + sv);
            }
          }
        }
      }
    }
  }
}

// grad_input, gather form, over (sample, input row) rows [begin, end).
template <typename T>
void backward_nhwc_gx_rows(const Args<T>& a, int64_t begin, int64_t end) {
  const T *go = a.go, *cft = a.cf, *sf = a.sf;
  T* gx = a.gx;
  const Geometry& g = a.g;
  const bool mul = a.mul;
  const int64_t K2 = g.K2(), C = g.C;
  {
    for (int64_t r_idx = begin; r_idx < end; ++r_idx) {
      const int64_t b = r_idx / g.H, yi = r_idx % g.H;
      for (int64_t xi = 0; xi < g.W; ++xi) {
        T* __restrict o = gx + (r_idx * g.W + xi) * C;
        std::fill(o, o + C, T(0));
        for (int64_t i = 0; i < g.k; ++i) {
          const int64_t y = source_of(yi, g.off(i), g.s, g.Ho);
          if (y < 0) continue;
          for (int64_t j = 0; j < g.k; ++j) {
            const int64_t xo = source_of(xi, g.off(j), g.s, g.Wo);
            if (xo < 0) continue;
            const int64_t t = i * g.k + j, pix = (b * g.Ho + y) * g.Wo + xo;
            const T* __restrict gp = go + pix * C;
            const T* __restrict ct = cft + (b * K2 + t) * C;
            const T sv = sf[pix * K2 + t];
            if (mul) {
              for (int64_t c = 0; c < C; ++c) o[c] += gp[c] * ct[c] * sv;
            } else {
              for (int64_t c = 0; c < C; ++c) o[c] += gp[c] * (ct[c] + sv);
            }
          }
        }
      }
    }
  }
}

// grad_spatial_filter: per output pixel and tap, a dot product over channels; (sample, row) rows.
// The taps of a pixel are done together, NT at a time, each tap's sum in its own vector register over
// the channel loop: grad_output's vector is loaded once for all NT taps, and each tap needs a single
// horizontal sum at the end (one dot product per tap, each with its own reduction, was 5x slower at
// C = 64). Taps outside the image read a zero row, so the register block has a fixed size.
template <typename T, bool MUL>
void backward_nhwc_sf_rows(const Args<T>& a, int64_t begin, int64_t end) {
  using Vec [[gnu::vector_size(V * sizeof(T))]] = T;
  const T *go = a.go, *x = a.x, *cft = a.cf;
  T* gsf = a.gsf;
  const Geometry& g = a.g;
  const int64_t K2 = g.K2(), C = g.C, Cv = C / V * V;
  const std::vector<T> zeros(C, T(0));
  for (int64_t r_idx = begin; r_idx < end; ++r_idx) {
    const int64_t b = r_idx / g.Ho, y = r_idx % g.Ho;
    for (int64_t xo = 0; xo < g.Wo; ++xo) {
      const int64_t pix = r_idx * g.Wo + xo;
      const T* __restrict gp = go + pix * C;
      for (int64_t t0 = 0; t0 < K2; t0 += NT) {
        const T* in[NT];
        const T* w[NT];
        for (int64_t u = 0; u < NT; ++u) {
          const int64_t t = std::min(t0 + u, K2 - 1);  // past the last tap: redo it, not stored
          const int64_t yi = y * g.s + g.off(t / g.k), xi = xo * g.s + g.off(t % g.k);
          const bool inside = yi >= 0 && yi < g.H && xi >= 0 && xi < g.W;
          in[u] = inside ? x + ((b * g.H + yi) * g.W + xi) * C : zeros.data();
          w[u] = cft + (b * K2 + t) * C;  // not read for 'add', where the channel filter drops out
        }
        Vec acc[NT] = {};
        for (int64_t c = 0; c < Cv; c += V) {
          Vec gv;
          std::memcpy(&gv, gp + c, sizeof(Vec));
          for (int64_t u = 0; u < NT; ++u) {
            Vec xv;
            std::memcpy(&xv, in[u] + c, sizeof(Vec));
            if constexpr (MUL) {
              Vec wv;
              std::memcpy(&wv, w[u] + c, sizeof(Vec));
              acc[u] += gv * wv * xv;
            } else {
              acc[u] += gv * xv;
            }
          }
        }
        for (int64_t u = 0; u < NT && t0 + u < K2; ++u) {
          T value = horizontal_sum<T>(acc[u]);
          for (int64_t c = Cv; c < C; ++c) value += MUL ? gp[c] * w[u][c] * in[u][c] : gp[c] * in[u][c];
          gsf[pix * K2 + t0 + u] = value;
        }
      }
    }
  }
}

// grad_channel_filter: a sum over pixels, over (sample, block of CB channels) tasks [begin, end).
constexpr int64_t CB = 64;

template <typename T>
void backward_nhwc_cf_blocks(const Args<T>& a, int64_t begin, int64_t end) {
  const T *go = a.go, *x = a.x, *sf = a.sf;
  T* gcft = a.gcf;
  const Geometry& g = a.g;
  const bool mul = a.mul;
  const int64_t K2 = g.K2(), C = g.C, blocks = (C + CB - 1) / CB;
  {
    std::vector<T> part(K2 * CB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, c0 = (task % blocks) * CB, n = std::min(CB, C - c0);
      std::fill(part.begin(), part.end(), T(0));
      for (int64_t y = 0; y < g.Ho; ++y) {
        for (int64_t xo = 0; xo < g.Wo; ++xo) {
          const int64_t pix = (b * g.Ho + y) * g.Wo + xo;
          const T* __restrict gp = go + pix * C + c0;
          for (int64_t i = 0; i < g.k; ++i) {
            const int64_t yi = y * g.s + g.off(i);
            if (yi < 0 || yi >= g.H) continue;
            for (int64_t j = 0; j < g.k; ++j) {
              const int64_t xi = xo * g.s + g.off(j);
              if (xi < 0 || xi >= g.W) continue;
              const int64_t t = i * g.k + j;
              const T* __restrict in = x + ((b * g.H + yi) * g.W + xi) * C + c0;
              T* __restrict acc = part.data() + t * CB;
              if (mul) {
                const T sv = sf[pix * K2 + t];
                for (int64_t c = 0; c < n; ++c) acc[c] += gp[c] * in[c] * sv;
              } else {
                for (int64_t c = 0; c < n; ++c) acc[c] += gp[c] * in[c];
              }
            }
          }
        }
      }
      for (int64_t t = 0; t < K2; ++t)
        std::copy(part.begin() + t * CB, part.begin() + t * CB + n, gcft + (b * K2 + t) * C + c0);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Instruction sets. The kernels are compiled for the baseline ISA, and on x86 also inlined ("flatten")
// into AVX2+FMA variants picked at run time, so one binary is both portable and fast.

template <typename T>
using Kernel = void (*)(const Args<T>&, int64_t, int64_t);

#if defined(__GNUC__) && defined(__x86_64__)
#define DDFNET_X86_DISPATCH 1
template <typename T, Kernel<T> K>
__attribute__((target("avx2,fma"), flatten)) void avx2_variant(const Args<T>& a, int64_t begin, int64_t end) {
  K(a, begin, end);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

// f(std::true_type) for 'mul', f(std::false_type) for 'add': kernels templated on MUL.
template <typename F>
void with_mul(bool mul, F&& f) {
  if (mul) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Runs K over tasks [0, n) on the intra-op thread pool.
template <typename T, Kernel<T> K>
void launch(const Args<T>& a, int64_t n, int64_t work_per_task) {
  Kernel<T> kernel = K;
#ifdef DDFNET_X86_DISPATCH
  if (cpu_has_avx2()) kernel = avx2_variant<T, K>;
#endif
  at::parallel_for(0, n, grain(work_per_task), [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
}

// ---------------------------------------------------------------------------------------------------
// Operator entry points.

Geometry geometry(const at::Tensor& input, int64_t k, int64_t d, int64_t s) {
  const int64_t H = input.size(2), W = input.size(3);
  // Buffers are sized from d and s: clamp them (no result changes, ddf.h); Ho, Wo use the original s.
  return {input.size(0), input.size(1), H, W, out_size(H, s), out_size(W, s), k,
          clamp_to_extent(d, H, W), clamp_to_extent(s, H, W)};
}

at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::MemoryFormat format_of(const at::Tensor& input) {
  return is_channels_last(input) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The channel filter as the kernels read it: (B, C, K2) for NCHW, (B, K2, C) for channels_last.
at::Tensor channel_filter_for(const at::Tensor& cf, at::ScalarType acc, bool channels_last) {
  at::Tensor flat = cf.to(acc).reshape({cf.size(0), cf.size(1), -1});
  return channels_last ? flat.transpose(1, 2).contiguous() : flat.contiguous();
}

// t (B, K2, Ho, Wo) as a contiguous (B, K2, Ho, width) tensor of the accumulation type, the Wo columns
// starting at `left`, zeros around: one pass over t, whatever its dtype and layout.
at::Tensor padded_columns(const at::Tensor& t, int64_t left, int64_t width, at::ScalarType acc) {
  const int64_t n = t.size(3);
  at::Tensor out = at::empty({t.size(0), t.size(1), t.size(2), width}, t.options().dtype(acc));
  out.narrow(3, 0, left).zero_();
  out.narrow(3, left + n, width - left - n).zero_();
  out.narrow(3, left, n).copy_(t);
  return out;
}

at::Tensor forward_entry(const at::Tensor& input, const at::Tensor& channel_filter,
                         const at::Tensor& spatial_filter, int64_t kernel_size, int64_t dilation, int64_t stride,
                         c10::string_view kernel_combine) {
  const bool mul = check_ddf_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                                  std_view(kernel_combine));
  const Geometry g = geometry(input, kernel_size, dilation, stride);
  const at::MemoryFormat fmt = format_of(input);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::ScalarType acc = accumulation_type(input.scalar_type());
  at::Tensor out = at::empty({g.B, g.C, g.Ho, g.Wo}, input.options().dtype(acc).memory_format(fmt));
  if (out.numel() == 0) return out.to(input.scalar_type());
  const at::Tensor x = input.to(acc).contiguous(fmt);
  const at::Tensor cf = channel_filter_for(channel_filter, acc, cl);
  // NCHW: rows padded to whole vectors (see forward_nchw_planes).
  const at::Tensor sf = cl ? spatial_filter.to(acc).contiguous(fmt)
                           : padded_columns(spatial_filter, 0, vec_width(g), acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "ddf_forward_cpu", [&] {
    Args<scalar_t> a;
    a.x = x.const_data_ptr<scalar_t>();
    a.cf = cf.const_data_ptr<scalar_t>();
    a.sf = sf.const_data_ptr<scalar_t>();
    a.out = out.mutable_data_ptr<scalar_t>();
    a.g = g;
    a.mul = mul;
    if (cl) {
      launch<scalar_t, forward_nhwc_rows<scalar_t>>(a, g.B * g.Ho, g.Wo * g.C * g.K2());
    } else {
      with_mul(mul, [&](auto m) {
        launch<scalar_t, forward_nchw_planes<scalar_t, decltype(m)::value>>(a, g.B * g.C, g.Ho * g.Wo * g.K2());
      });
    }
  });
  return out.to(input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_entry(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& channel_filter,
    const at::Tensor& spatial_filter, int64_t kernel_size, int64_t dilation, int64_t stride,
    c10::string_view kernel_combine) {
  const bool mul = check_ddf_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                                  std_view(kernel_combine));
  check_grad_output(grad_output, input, stride);
  const Geometry g = geometry(input, kernel_size, dilation, stride);
  const at::MemoryFormat fmt = format_of(input);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::ScalarType acc = accumulation_type(input.scalar_type());
  const auto opts = input.options().dtype(acc);
  // The kernels write every element; only an empty problem needs the zeros.
  const bool empty = grad_output.numel() == 0;
  auto alloc = [&](std::vector<int64_t> sizes, at::MemoryFormat f) {
    return empty ? at::zeros(sizes, opts.memory_format(f)) : at::empty(sizes, opts.memory_format(f));
  };
  at::Tensor gx = alloc({g.B, g.C, g.H, g.W}, fmt);
  // The channel-filter gradient in the kernel's layout: (B, C, K2) or (B, K2, C).
  at::Tensor gcf = alloc(cl ? std::vector<int64_t>{g.B, g.K2(), g.C} : std::vector<int64_t>{g.B, g.C, g.K2()},
                         at::MemoryFormat::Contiguous);
  at::Tensor gsf = alloc({g.B, g.K2(), g.Ho, g.Wo}, fmt);
  if (!empty) {
    const at::Tensor go = grad_output.to(acc).contiguous(fmt);
    const at::Tensor x = input.to(acc).contiguous(fmt);
    const at::Tensor cf = channel_filter_for(channel_filter, acc, cl);
    const PaddedRows pr = padded_rows(g);  // NCHW reads padded rows
    const at::Tensor sf =
        cl ? spatial_filter.to(acc).contiguous(fmt) : padded_columns(spatial_filter, pr.left, pr.width, acc);
    AT_DISPATCH_FLOATING_TYPES(acc, "ddf_backward_cpu", [&] {
      Args<scalar_t> a;
      a.go = go.const_data_ptr<scalar_t>();
      a.x = x.const_data_ptr<scalar_t>();
      a.cf = cf.const_data_ptr<scalar_t>();
      a.sf = sf.const_data_ptr<scalar_t>();
      a.gx = gx.mutable_data_ptr<scalar_t>();
      a.gcf = gcf.mutable_data_ptr<scalar_t>();
      a.gsf = gsf.mutable_data_ptr<scalar_t>();
      a.g = g;
      a.mul = mul;
      const int64_t K2 = g.K2();
      if (cl) {
        launch<scalar_t, backward_nhwc_gx_rows<scalar_t>>(a, g.B * g.H, g.W * g.C * K2);
        with_mul(mul, [&](auto m) {
          launch<scalar_t, backward_nhwc_sf_rows<scalar_t, decltype(m)::value>>(a, g.B * g.Ho, g.Wo * g.C * K2);
        });
        launch<scalar_t, backward_nhwc_cf_blocks<scalar_t>>(a, g.B * ((g.C + CB - 1) / CB), g.Ho * g.Wo * CB * K2);
      } else {
        with_mul(mul, [&](auto m) {
          constexpr bool M = decltype(m)::value;
          launch<scalar_t, backward_nchw_planes<scalar_t, M>>(a, g.B * g.C, g.Ho * g.Wo * K2 * 2);
          launch<scalar_t, backward_nchw_sf_rows<scalar_t, M>>(a, g.B * g.Ho, g.C * g.Wo * K2);
        });
      }
    });
  }
  if (cl) gcf = gcf.transpose(1, 2);
  gcf = gcf.reshape(channel_filter.sizes());
  return {like_layout(gx.to(input.scalar_type()), input),
          like_layout(gcf.to(channel_filter.scalar_type()), channel_filter),
          like_layout(gsf.to(spatial_filter.scalar_type()), spatial_filter)};
}

}  // namespace
}  // namespace ddfnet

TORCH_LIBRARY_IMPL(ddfnet, CPU, m) {
  m.impl("ddf", &ddfnet::forward_entry);
  m.impl("ddf_backward", &ddfnet::backward_entry);
}
