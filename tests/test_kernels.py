"""The native kernels of every backend against the float64 reference: one grid, run on the CPU kernel,
on the CUDA kernels when a GPU is present, and on the same CUDA kernels executed on the CPU under the
emulation (support/backends.py; its cases are slow). Low-precision results are compared with the reference
evaluated on the same (rounded) inputs, so the tolerance covers only float32 accumulation and the final
rounding.

The tests that go through ddfnet.ddf (autograd, opcheck, autocast) run on the device backends; what
needs two devices or CUDA graphs is in test_cuda.py, what only the CPU kernel has in test_cpu_kernel.py.
"""
import itertools

import pytest
import torch
from support.backends import (BACKENDS, COMBINES, DEVICE_BACKENDS, LAYOUTS, NAMES, TOLERANCES, check, dtype_id,
                              every_other, inputs, marks, params, require, run, transposed)

import ddfnet
from ddfnet.ops import ddf_backward_reference, ddf_forward_reference


# Odd sizes. C = 37 in NHWC gives a full and a partial group of 32 channels; C = 3, W = 11 leaves
# remainders after the CPU kernel's vectors. The emulation runs the first shape of each layout.
GRID_SHAPES = {'nchw': [(2, 5, 11, 9), (2, 3, 9, 11)], 'nhwc': [(2, 37, 9, 7), (2, 3, 9, 11)]}
GRID = [pytest.param(backend, combine, k, dilation, stride, layout, dtype, shape, marks=marks(backend),
                     id=f'{backend}-{combine}-k{k}-d{dilation}-s{stride}-{layout}-{dtype_id(dtype)}-'
                        + 'x'.join(map(str, shape)))
        for backend, combine, k, dilation, stride, layout, dtype in itertools.product(
            BACKENDS, COMBINES, (1, 3, 5, 7, 9), (1, 2, 3), (1, 2), LAYOUTS, list(TOLERANCES))
        for shape in GRID_SHAPES[layout][:1 if backend == 'emu' else None]]


@pytest.mark.parametrize('backend, combine, k, dilation, stride, layout, dtype, shape', GRID)
def test_matches_reference(backend, combine, k, dilation, stride, layout, dtype, shape):
    ops = require(backend)
    out = check(ops, *inputs(backend, shape, k, stride, dtype, layout), k, dilation, stride, combine)[0]
    fmt = torch.channels_last if layout == 'nhwc' else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize('backend', params())
@pytest.mark.parametrize('combine', COMBINES)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('shape, k, dilation, stride', (
    ((2, 6, 21, 19), 13, 1, 1), ((2, 6, 21, 19), 13, 2, 2), ((2, 6, 21, 19), 15, 1, 1), ((2, 6, 21, 19), 15, 2, 3),
    ((2, 6, 21, 19), 15, 8, 1), ((2, 6, 21, 19), 3, 8, 1), ((2, 6, 21, 19), 5, 8, 2), ((2, 6, 21, 19), 3, 100, 1),
    ((2, 6, 21, 19), 5, 3, 50),
    ((2, 6, 21, 19), 3, 2 ** 40, 2 ** 33),  # dilation / stride far beyond the image: buffers stay small
    ((1, 2, 20, 23), 15, 1, 1),  # a kernel wider than most of the image
    ((1, 2, 17, 19), 13, 2, 3),
    ((2, 3, 40, 33), 3, 8, 1),
    ((64, 2, 5, 5), 3, 1, 2),  # many samples, tiny images
    ((1, 1, 1, 1), 3, 1, 1),
    ((1, 3, 2, 7), 5, 1, 4),  # stride larger than the image's height
    ((1, 70, 9, 10), 3, 1, 1),  # the CPU kernel's channels_last blocks of 64 plus a remainder
))
def test_edge_shapes(backend, combine, layout, shape, k, dilation, stride):
    ops = require(backend)
    check(ops, *inputs(backend, shape, k, stride, torch.float32, layout, seed=3), k, dilation, stride, combine)


@pytest.mark.parametrize('backend', params())
@pytest.mark.parametrize('combine', COMBINES)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('k', (3, 7))
def test_large_batch(backend, combine, layout, k):
    # The original CUDA kernel put batch * channels in the grid and failed from batch 384.
    ops = require(backend)
    check(ops, *inputs(backend, (512, 8, 6, 6), k, 1, torch.float32, layout), k, 1, 1, combine)


# Shapes that reach the CUDA kernels' other launch configurations (csrc/cuda: run_length, split_count):
# runs of 8 channels / 8 pixels per thread with a remainder and several grid-stride iterations (many
# pixels), runs halved for small problems, and reductions cut into several parts (few (b, c) planes with
# many pixels for grad_channel_filter; few pixels with many channels for grad_spatial_filter). Long
# float32 sums, hence the looser atol.
LAUNCH_SHAPES = [((4, 20, 161, 159), 3, 1, 1), ((4, 20, 161, 159), 7, 2, 2), ((1, 3, 96, 96), 3, 2, 1),
                 ((1, 64, 40, 40), 5, 1, 1), ((1, 256, 15, 17), 3, 1, 1), ((1, 40, 33, 31), 9, 1, 2),
                 ((1, 8, 24, 24), 3, 1, 1), ((2, 33, 12, 10), 5, 1, 1)]


@pytest.mark.parametrize('backend', params())
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('shape, k, dilation, stride', LAUNCH_SHAPES)
def test_launch_configurations(backend, shape, k, dilation, stride, layout):
    ops = require(backend)
    check(ops, *inputs(backend, shape, k, stride, torch.float32, layout), k, dilation, stride, 'mul', tol=(1e-4, 1e-3))


@pytest.mark.parametrize('backend', params())
@pytest.mark.parametrize('combine', COMBINES)
def test_non_contiguous_inputs(backend, combine):
    # Each kernel takes any strides: the same values as the contiguous call, gradients with the strides
    # torch.empty_like gives each argument.
    ops = require(backend)
    x, cf, sf, grad = inputs(backend, (2, 6, 9, 8), 3, 2)
    want = run(ops, x, cf, sf, grad, 3, 1, 2, combine)
    channels_last_slice = every_other(x, 1, torch.channels_last)  # channel stride 2: not channels_last
    cases = ((transposed(x), cf, sf, grad),
             (every_other(x, 1), transposed(cf), every_other(sf, 3), transposed(grad)),
             (channels_last_slice, every_other(cf, 0), transposed(sf), every_other(grad, 2)),
             (x, cf.transpose(0, 1).contiguous().transpose(0, 1), sf.transpose(0, 1).contiguous().transpose(0, 1),
              grad))
    for case in cases:
        assert not all(t.is_contiguous() for t in case)
        got = run(ops, *case, 3, 1, 2, combine)
        for name, g, w in zip(NAMES, got, want):
            torch.testing.assert_close(g, w, msg=lambda m, name=name: f'{name}: {m}')
        torch.testing.assert_close(ddf_forward_reference(*case[:3], 3, 1, 2, combine), want[0])  # the reference too
        for name, g, arg in zip(NAMES[1:], got[1:], case[:3]):
            assert g.stride() == torch.empty_like(arg).stride(), name
    # Strided channel slices against the reference.
    x, cf, sf, grad = inputs(backend, (2, 8, 12, 10), 3, 1)
    check(ops, x[:, ::2], cf[:, ::2], sf, grad[:, ::2], 3, 1, 1, combine)


@pytest.mark.parametrize('backend', params())
@pytest.mark.parametrize('layout', LAYOUTS)
def test_gradient_strides_follow_each_argument(backend, layout):
    ops = require(backend)
    x, cf, sf, grad = inputs(backend, (2, 6, 9, 7), 3, 2, layout=layout)
    out = ops.ddf(x, cf, sf, 3, 1, 2, 'mul')
    assert out.is_contiguous(memory_format=torch.channels_last if layout == 'nhwc' else torch.contiguous_format)
    torch.testing.assert_close(out, ops.ddf(x.contiguous(), cf, sf.contiguous(), 3, 1, 2, 'mul'))
    cl = torch.channels_last
    for cf_, sf_ in ((cf, sf), (cf.contiguous(memory_format=cl), sf.contiguous()),
                     (transposed(cf), sf.contiguous(memory_format=cl))):
        grads = ops.ddf_backward(grad, x, cf_, sf_, 3, 1, 2, 'mul')
        for name, g, arg in zip(NAMES[1:], grads, (x, cf_, sf_)):
            assert g.stride() == torch.empty_like(arg).stride(), name


@pytest.mark.parametrize('backend', params())
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('shape, k', (((1, 64, 40, 40), 5), ((1, 3, 96, 96), 3), ((2, 7, 13, 11), 9),
                                      ((2, 37, 9, 7), 7)))
def test_deterministic(backend, layout, shape, k):
    # Fixed reduction orders, no atomics: two runs agree bit for bit (shapes with split reductions too).
    ops = require(backend)
    x, cf, sf, grad = inputs(backend, shape, k, 1, layout=layout)
    first = run(ops, x, cf, sf, grad, k, 2, 1, 'mul')
    second = run(ops, x, cf, sf, grad, k, 2, 1, 'mul')
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize('backend', params())
@pytest.mark.parametrize('shape', ((0, 4, 6, 5), (2, 0, 6, 5), (2, 3, 0, 5)))
def test_zero_size(backend, shape):
    ops = require(backend)
    x, cf, sf, grad = inputs(backend, shape, 3, 2)
    out = ops.ddf(x, cf, sf, 3, 1, 2, 'mul')
    assert out.shape == (shape[0], shape[1], (shape[2] - 1) // 2 + 1 if shape[2] else 0, 3)
    assert out.device == x.device and not out.any()
    grads = ops.ddf_backward(grad, x, cf, sf, 3, 1, 2, 'mul')
    for name, g, arg in zip(NAMES[1:], grads, (x, cf, sf)):
        assert g.shape == arg.shape and g.dtype == arg.dtype and g.device == arg.device, name
        assert not g.any(), name


@pytest.mark.parametrize('backend', params())
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('stride', (1, 2))
@pytest.mark.parametrize('combine', COMBINES)
def test_infinite_inputs_give_the_references_inf_and_nan(backend, combine, stride, layout):
    # Kernels visit only the taps inside the image, as the reference does: an inf in the last column
    # must not reach a sum through a padded position as 0 * inf = NaN (the CPU kernel's vector lanes
    # past a row's end: W = 11 is not a multiple of 8).
    ops = require(backend)
    x, cf, sf, grad = inputs(backend, (2, 3, 7, 11), 3, stride, layout=layout, seed=5)
    x[:, :, :, -1] = float('inf')
    x[:, :, 2, 0] = float('-inf')
    got = run(ops, x, cf, sf, grad, 3, 1, stride, combine)
    want = [ddf_forward_reference(x, cf, sf, 3, 1, stride, combine),
            *ddf_backward_reference(grad, x, cf, sf, 3, 1, stride, combine)]
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), name
        finite = b.isfinite()
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-5, atol=1e-4, msg=lambda m, name=name: f'{name}: {m}')


# ---- through ddfnet.ddf: autograd, opcheck, autocast on the device backends ----

@pytest.mark.parametrize('backend', params(*DEVICE_BACKENDS))
@pytest.mark.parametrize('combine', COMBINES)
@pytest.mark.parametrize('k, dilation, stride, layout', (
    (3, 1, 1, 'nchw'), (3, 2, 2, 'nhwc'), (5, 1, 2, 'nchw'), (7, 1, 1, 'nhwc'), (1, 1, 1, 'nchw'),
    (9, 1, 2, 'nhwc'), (3, 2, 2, 'nchw')))
def test_gradcheck(backend, combine, k, dilation, stride, layout):
    require(backend)
    x, cf, sf, _ = inputs(backend, (2, 3, 7, 6), k, stride, torch.float64, layout)
    args = tuple(t.requires_grad_() for t in (x, cf, sf))
    assert torch.autograd.gradcheck(lambda *t: ddfnet.ddf(*t, k, dilation, stride, combine), args)


@pytest.mark.parametrize('backend', params(*DEVICE_BACKENDS))
@pytest.mark.parametrize('combine', COMBINES)
@pytest.mark.parametrize('k, dilation, stride', [(k, d, s) for k in (1, 3, 5) for d in (1, 2) for s in (1, 2)])
def test_gradgradcheck(backend, combine, k, dilation, stride):
    # Gradients of gradients (the autograd of ddf_backward, written with ddf / ddf_backward calls) on this
    # device's kernels; fast_mode projects the second-order Jacobians on random vectors. Both layouts
    # across the grid, odd sizes.
    require(backend)
    layout = LAYOUTS[(k + dilation + stride) % 2]
    x, cf, sf, _ = inputs(backend, (2, 3, 7, 5), k, stride, torch.float64, layout)
    args = tuple(t.requires_grad_() for t in (x, cf, sf))
    assert torch.autograd.gradgradcheck(lambda *t: ddfnet.ddf(*t, k, dilation, stride, combine), args,
                                        fast_mode=True, check_fwd_over_rev=True)


@pytest.mark.parametrize('backend', params(*DEVICE_BACKENDS))
@pytest.mark.parametrize('combine', COMBINES)
def test_forward_mode_and_vmap(backend, combine):
    require(backend)
    x, cf, sf, _ = inputs(backend, (2, 3, 7, 5), 3, 2, torch.float64, 'nhwc')
    args = tuple(t.requires_grad_() for t in (x, cf, sf))
    assert torch.autograd.gradcheck(lambda *t: ddfnet.ddf(*t, 3, 1, 2, combine), args, check_forward_ad=True,
                                    check_backward_ad=False, check_batched_forward_grad=True)
    batch = torch.stack([x.detach(), -x.detach()])
    got = torch.vmap(lambda t: ddfnet.ddf(t, cf, sf, 3, 1, 2, combine))(batch)
    for i in range(2):
        torch.testing.assert_close(got[i], ddfnet.ddf(batch[i], cf, sf, 3, 1, 2, combine))


@pytest.mark.parametrize('backend', params(*DEVICE_BACKENDS))
@pytest.mark.parametrize('combine', COMBINES)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('k, dilation', ((3, 1), (9, 1), (3, 2)))
def test_opcheck(backend, combine, layout, k, dilation):
    require(backend)
    x, cf, sf, grad = inputs(backend, (2, 4, 9, 7), k, 2, torch.float32, layout)
    args = (x.requires_grad_(), cf.requires_grad_(), sf.requires_grad_(), k, dilation, 2, combine)
    torch.library.opcheck(torch.ops.ddfnet.ddf.default, args)
    torch.library.opcheck(torch.ops.ddfnet.ddf_backward.default,
                          (grad, x.detach(), cf.detach(), sf.detach(), k, dilation, 2, combine))


@pytest.mark.parametrize('backend', params(*DEVICE_BACKENDS))
@pytest.mark.parametrize('layout', LAYOUTS)
def test_gradients_through_autograd_keep_the_layout(backend, layout):
    require(backend)
    x, cf, sf, _ = inputs(backend, (2, 6, 9, 7), 3, 2, layout=layout)
    x.requires_grad_()
    out = ddfnet.ddf(x, cf, sf, 3, 1, 2)
    assert out.is_contiguous(memory_format=torch.channels_last if layout == 'nhwc' else torch.contiguous_format)
    out.sum().backward()
    assert x.grad.stride() == torch.empty_like(x).stride()
