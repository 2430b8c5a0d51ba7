"""The Triton kernels of the DDF op (imported only by :mod:`ddfnet.ops.triton_ddf`, which needs triton).

Notation of csrc/cuda/ddf_cuda.cuh: input (B, C, H, W), channel filter (B, C, k, k), spatial filter
(B, k*k, Ho, Wo); output pixel (oy, ox) tap (i, j) samples iy = oy*S + (i - K//2)*D (ix likewise), and a
sample outside the image contributes 0. Every tensor comes with its four strides, so one kernel serves NCHW,
channels_last and strided views; triton specialises a stride of 1, so each layout gets its own coalesced
code. A program owns a tile of BLOCK_P pixels x BLOCK_C channels of one sample and accumulates in ACC
(float32, float64 for float64). The taps are a loop, not unrolled: k = 9 would otherwise keep 81 taps'
loads in flight and spill. Reductions run in a fixed order with no atomics, so results are bitwise
reproducible: the filter gradients accumulate a tile per program over pixel (channel) tiles in order and
reduce it once at the end.

The kernels use triton.language's builtins and this module's own jit functions only (tl.full, not tl.zeros;
tl.reduce with :func:`_add`, not tl.sum): triton's interpreter runs a jit function as Python only when
``TRITON_INTERPRET=1`` was set as it was decorated, and torch imports triton (decorating triton.language's
own jit functions) before a test can set it; this module is imported on first use, after.
"""
import triton
import triton.language as tl


@triton.jit
def _filter(cf, sf, MUL: tl.constexpr):
    # cf: (BLOCK_C,), sf: (BLOCK_P,) -> the combined filter (BLOCK_P, BLOCK_C).
    if MUL:
        return sf[:, None] * cf[None, :]
    return sf[:, None] + cf[None, :]


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def ddf_forward_kernel(x, cf, sf, out, C, H, W, Ho, Wo, D, S,
                       sxb, sxc, sxh, sxw, scb, scc, sci, scj, ssb, sst, ssh, ssw, sob, soc, soh, sow,
                       K: tl.constexpr, MUL: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_in, c_in = p < Ho * Wo, c < C
    oy, ox = p // Wo, p % Wo
    acc = tl.full((BLOCK_P, BLOCK_C), 0, ACC)
    for i in range(K):
        iy = oy * S + (i - K // 2) * D
        for j in range(K):
            ix = ox * S + (j - K // 2) * D
            hit = p_in & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            xv = tl.load(x + b * sxb + iy[:, None] * sxh + ix[:, None] * sxw + c[None, :] * sxc,
                         mask=hit[:, None] & c_in[None, :], other=0.0).to(ACC)
            cv = tl.load(cf + b * scb + c * scc + i * sci + j * scj, mask=c_in, other=0.0).to(ACC)
            sv = tl.load(sf + b * ssb + (i * K + j) * sst + oy * ssh + ox * ssw, mask=hit, other=0.0).to(ACC)
            acc += xv * _filter(cv, sv, MUL)
    tl.store(out + b * sob + oy[:, None] * soh + ox[:, None] * sow + c[None, :] * soc,
             acc.to(out.dtype.element_ty), mask=p_in[:, None] & c_in[None, :])


@triton.jit
def ddf_grad_input_kernel(g, cf, sf, gx, C, H, W, Ho, Wo, D, S,
                          sgb, sgc, sgh, sgw, scb, scc, sci, scj, ssb, sst, ssh, ssw, sxb, sxc, sxh, sxw,
                          K: tl.constexpr, MUL: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # Gather form: input pixel (y, x) collects tap (i, j) of output pixel (oy, ox) when
    # y = oy*S + (i - K//2)*D, i.e. when y - (i - K//2)*D is a non-negative multiple of S below Ho*S.
    b = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_in, c_in = p < H * W, c < C
    y, x = p // W, p % W
    acc = tl.full((BLOCK_P, BLOCK_C), 0, ACC)
    for i in range(K):
        ty = y - (i - K // 2) * D
        oy = ty // S
        for j in range(K):
            tx = x - (j - K // 2) * D
            ox = tx // S
            hit = (p_in & (ty >= 0) & (ty % S == 0) & (oy < Ho)
                   & (tx >= 0) & (tx % S == 0) & (ox < Wo))
            gv = tl.load(g + b * sgb + oy[:, None] * sgh + ox[:, None] * sgw + c[None, :] * sgc,
                         mask=hit[:, None] & c_in[None, :], other=0.0).to(ACC)
            cv = tl.load(cf + b * scb + c * scc + i * sci + j * scj, mask=c_in, other=0.0).to(ACC)
            sv = tl.load(sf + b * ssb + (i * K + j) * sst + oy * ssh + ox * ssw, mask=hit, other=0.0).to(ACC)
            acc += gv * _filter(cv, sv, MUL)
    tl.store(gx + b * sxb + y[:, None] * sxh + x[:, None] * sxw + c[None, :] * sxc,
             acc.to(gx.dtype.element_ty), mask=p_in[:, None] & c_in[None, :])


@triton.jit
def ddf_grad_channel_filter_kernel(g, x, sf, gcf, C, H, W, Ho, Wo, D, S,
                                   sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw, ssb, sst, ssh, ssw,
                                   scb, scc, sci, scj,
                                   K: tl.constexpr, MUL: tl.constexpr, ACC: tl.constexpr,
                                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # One program per (tap, channel block, sample): the sum over every output pixel, tile after tile.
    tap = tl.program_id(0)
    i, j = tap // K, tap % K
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    acc = tl.full((BLOCK_P, BLOCK_C), 0, ACC)
    for start in range(0, Ho * Wo, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        oy, ox = p // Wo, p % Wo
        iy = oy * S + (i - K // 2) * D
        ix = ox * S + (j - K // 2) * D
        hit = (p < Ho * Wo) & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        mask = hit[:, None] & c_in[None, :]
        gv = tl.load(g + b * sgb + oy[:, None] * sgh + ox[:, None] * sgw + c[None, :] * sgc,
                     mask=mask, other=0.0).to(ACC)
        xv = tl.load(x + b * sxb + iy[:, None] * sxh + ix[:, None] * sxw + c[None, :] * sxc,
                     mask=mask, other=0.0).to(ACC)
        if MUL:
            sv = tl.load(sf + b * ssb + tap * sst + oy * ssh + ox * ssw, mask=hit, other=0.0).to(ACC)
            acc += gv * xv * sv[:, None]
        else:
            acc += gv * xv
    tl.store(gcf + b * scb + c * scc + i * sci + j * scj, tl.reduce(acc, 0, _add).to(gcf.dtype.element_ty),
             mask=c_in)


@triton.jit
def ddf_grad_spatial_filter_kernel(g, x, cf, gsf, C, H, W, Ho, Wo, D, S,
                                   sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw, scb, scc, sci, scj,
                                   ssb, sst, ssh, ssw,
                                   K: tl.constexpr, MUL: tl.constexpr, ACC: tl.constexpr,
                                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # One program per (pixel block, tap, sample): the sum over every channel, block after block.
    tap = tl.program_id(1)
    i, j = tap // K, tap % K
    b = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_in = p < Ho * Wo
    oy, ox = p // Wo, p % Wo
    iy = oy * S + (i - K // 2) * D
    ix = ox * S + (j - K // 2) * D
    hit = p_in & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    acc = tl.full((BLOCK_P, BLOCK_C), 0, ACC)
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_in = c < C
        mask = hit[:, None] & c_in[None, :]
        gv = tl.load(g + b * sgb + oy[:, None] * sgh + ox[:, None] * sgw + c[None, :] * sgc,
                     mask=mask, other=0.0).to(ACC)
        xv = tl.load(x + b * sxb + iy[:, None] * sxh + ix[:, None] * sxw + c[None, :] * sxc,
                     mask=mask, other=0.0).to(ACC)
        if MUL:
            cv = tl.load(cf + b * scb + c * scc + i * sci + j * scj, mask=c_in, other=0.0).to(ACC)
            acc += gv * xv * cv[None, :]
        else:
            acc += gv * xv
    tl.store(gsf + b * ssb + tap * sst + oy * ssh + ox * ssw, tl.reduce(acc, 1, _add).to(gsf.dtype.element_ty),
             mask=p_in)
