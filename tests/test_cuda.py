"""The native CUDA kernels of the DDF op (csrc/cuda) against the pure-PyTorch reference.

Skipped as a whole without a GPU. On a GPU machine the native CUDA kernels must be active: every test
fails (rather than skips) when ``ddfnet.ops.implementation('cuda')`` is not 'native', since comparing
the reference with itself would prove nothing.

Low-precision results are compared with the float64 reference computed on the same (rounded) inputs,
so the only differences left are the kernels' float32 accumulation and the final rounding.

``DDFNET_TEST_CUDA_ON=cpu`` runs the file against the CPU kernel instead (the tests that only make sense
across devices or with CUDA graphs skip): a check of the tests themselves on a machine without a GPU.
"""
import copy
import os

import pytest
import torch

from naive import random_inputs

import ddfnet
from ddfnet.ops import ddf_backward_reference, ddf_forward_reference

DEVICE = os.environ.get('DDFNET_TEST_CUDA_ON', 'cuda')
ON_CPU = DEVICE == 'cpu'  # the dry run
pytestmark = pytest.mark.skipif(not (ON_CPU or torch.cuda.is_available()), reason='needs a CUDA device')
needs_cuda = pytest.mark.skipif(ON_CPU, reason='compares devices or uses CUDA graphs: not in the CPU dry run')

COMBINES = ('mul', 'add')
LAYOUTS = ('nchw', 'nhwc')
GRAD_NAMES = ('grad_input', 'grad_channel_filter', 'grad_spatial_filter')
# rtol = atol per dtype, against float64. float32: accumulation error only. float16 / bfloat16: float32
# accumulation, then one rounding of each result (relative 2^-11 and 2^-8).
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def require_native():
    impl = ddfnet.ops.implementation(DEVICE)
    assert impl == 'native', (
        f"ddfnet.ops.implementation({DEVICE!r}) is {impl!r} on a machine with a GPU: the CUDA kernels of csrc/cuda "
        'are not active (extension not built with CUDA, a build failure, or DDFNET_FORCE_REFERENCE set), so '
        'these tests would only compare the reference with itself.')


def dtype_id(dtype):
    return str(dtype).removeprefix('torch.')


def make_inputs(shape, k, stride, dtype, layout='nchw', seed=0):
    """input, channel_filter, spatial_filter and a grad_output on the GPU, drawn in float64, rounded to
    `dtype`; with layout 'nhwc' the input, spatial filter and grad_output are channels_last."""
    fmt = torch.channels_last if layout == 'nhwc' else torch.contiguous_format
    return random_inputs(*shape, k, stride, dtype=dtype, seed=seed, device=DEVICE, memory_format=fmt,
                         grad_output=True)


def run_op(x, cf, sf, grad, k, dilation, stride, combine):
    """[output, grad_input, grad_channel_filter, grad_spatial_filter] from the public wrapper and the
    backward operator."""
    out = ddfnet.ddf(x, cf, sf, k, dilation, stride, combine)
    return [out, *torch.ops.ddfnet.ddf_backward(grad, x, cf, sf, k, dilation, stride, combine)]


def check_against_reference(x, cf, sf, grad, k, dilation, stride, combine, rtol, atol=None):
    atol = rtol if atol is None else atol
    got = run_op(x, cf, sf, grad, k, dilation, stride, combine)
    args = [t.double() for t in (x, cf, sf)]
    want = [ddf_forward_reference(*args, k, dilation, stride, combine),
            *ddf_backward_reference(grad.double(), *args, k, dilation, stride, combine)]
    for name, g, w in zip(('output', *GRAD_NAMES), got, want):
        assert g.dtype == x.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol, msg=lambda m, name=name: f'{name}: {m}')
    return got


# One odd-sized shape per layout; C = 37 in NHWC gives a full and a partial group of 32 channels.
GRID_SHAPES = {'nchw': (2, 5, 11, 9), 'nhwc': (2, 37, 9, 7)}


@pytest.mark.parametrize('dtype', list(TOLERANCES), ids=dtype_id)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('stride', (1, 2))
@pytest.mark.parametrize('dilation', (1, 2, 3))
@pytest.mark.parametrize('k', (1, 3, 5, 7, 9))
@pytest.mark.parametrize('combine', COMBINES)
def test_matches_reference(combine, k, dilation, stride, layout, dtype):
    require_native()
    x, cf, sf, grad = make_inputs(GRID_SHAPES[layout], k, stride, dtype, layout)
    check_against_reference(x, cf, sf, grad, k, dilation, stride, combine, TOLERANCES[dtype])


@pytest.mark.parametrize('combine', COMBINES)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('k, dilation, stride', (
    (13, 1, 1), (13, 2, 2), (15, 1, 1), (15, 2, 3), (15, 8, 1), (3, 8, 1), (5, 8, 2),
    (3, 100, 1), (5, 3, 50), (3, 2 ** 40, 2 ** 33)))  # dilation / stride beyond the image
def test_large_kernels_dilations_and_strides(combine, layout, k, dilation, stride):
    require_native()
    x, cf, sf, grad = make_inputs((2, 6, 21, 19), k, stride, torch.float32, layout)
    check_against_reference(x, cf, sf, grad, k, dilation, stride, combine, TOLERANCES[torch.float32])


@pytest.mark.parametrize('combine', COMBINES)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('k', (3, 7))
def test_large_batch(combine, layout, k):
    # The original CUDA kernel put batch * channels in the grid and failed from batch 384.
    require_native()
    x, cf, sf, grad = make_inputs((512, 8, 6, 6), k, 1, torch.float32, layout)
    check_against_reference(x, cf, sf, grad, k, 1, 1, combine, TOLERANCES[torch.float32])


# Shapes that reach the kernels' other launch configurations (csrc/cuda: run_length, split_count):
# runs of 8 channels / 8 pixels per thread with a remainder (many pixels), and reductions cut into
# several parts (few (b, c) planes with many pixels for grad_channel_filter; few pixels with many
# channels for grad_spatial_filter). Long float32 sums, hence the looser atol.
LAUNCH_SHAPES = [((4, 20, 161, 159), 3, 1, 1), ((4, 20, 161, 159), 7, 2, 2), ((1, 3, 96, 96), 3, 2, 1),
                 ((1, 64, 40, 40), 5, 1, 1), ((1, 256, 15, 17), 3, 1, 1), ((1, 40, 33, 31), 9, 1, 2)]


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('shape, k, dilation, stride', LAUNCH_SHAPES)
def test_launch_configurations(shape, k, dilation, stride, layout):
    require_native()
    x, cf, sf, grad = make_inputs(shape, k, stride, torch.float32, layout)
    check_against_reference(x, cf, sf, grad, k, dilation, stride, 'mul', rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('combine', COMBINES)
@pytest.mark.parametrize('k, dilation, stride, layout', (
    (3, 1, 1, 'nchw'), (3, 2, 2, 'nhwc'), (5, 1, 2, 'nchw'), (7, 1, 1, 'nhwc'), (1, 1, 1, 'nchw'),
    (9, 1, 2, 'nhwc')))
def test_gradcheck(combine, k, dilation, stride, layout):
    require_native()
    x, cf, sf, _ = make_inputs((2, 3, 7, 6), k, stride, torch.float64, layout)
    inputs = tuple(t.requires_grad_() for t in (x, cf, sf))
    assert torch.autograd.gradcheck(lambda *t: ddfnet.ddf(*t, k, dilation, stride, combine), inputs)


@pytest.mark.parametrize('combine', COMBINES)
@pytest.mark.parametrize('k, dilation, stride', [(k, d, s) for k in (1, 3, 5) for d in (1, 2) for s in (1, 2)])
def test_gradgradcheck(combine, k, dilation, stride):
    # Gradients of gradients (the autograd of ddf_backward, written with ddf / ddf_backward calls) on this
    # device's kernels; fast_mode projects the second-order Jacobians on random vectors. Both layouts
    # across the grid, odd sizes.
    require_native()
    layout = LAYOUTS[(k + dilation + stride) % 2]
    x, cf, sf, _ = make_inputs((2, 3, 7, 5), k, stride, torch.float64, layout)
    inputs = tuple(t.requires_grad_() for t in (x, cf, sf))
    assert torch.autograd.gradgradcheck(lambda *t: ddfnet.ddf(*t, k, dilation, stride, combine), inputs,
                                        fast_mode=True, check_fwd_over_rev=True)


@pytest.mark.parametrize('combine', COMBINES)
def test_forward_mode_and_vmap(combine):
    require_native()
    x, cf, sf, _ = make_inputs((2, 3, 7, 5), 3, 2, torch.float64, 'nhwc')
    inputs = tuple(t.requires_grad_() for t in (x, cf, sf))
    assert torch.autograd.gradcheck(lambda *t: ddfnet.ddf(*t, 3, 1, 2, combine), inputs, check_forward_ad=True,
                                    check_backward_ad=False, check_batched_forward_grad=True)
    batch = torch.stack([x.detach(), -x.detach()])
    got = torch.vmap(lambda t: ddfnet.ddf(t, cf, sf, 3, 1, 2, combine))(batch)
    for i in range(2):
        torch.testing.assert_close(got[i], ddfnet.ddf(batch[i], cf, sf, 3, 1, 2, combine))


@needs_cuda
def test_gradient_penalty_cpu_and_cuda_agree():
    require_native()
    torch.manual_seed(0)
    layers = {'cpu': ddfnet.DDFPack(10, stride=2, head=2).double()}
    layers['cuda'] = copy.deepcopy(layers['cpu']).to(DEVICE)
    x = torch.randn(2, 10, 9, 7, dtype=torch.float64)
    for device, layer in layers.items():
        x_ = x.to(device).requires_grad_()
        grad_x, = torch.autograd.grad(layer(x_).square().sum(), x_, create_graph=True)
        grad_x.square().sum().backward()
    for (name, p_cpu), p_cuda in zip(layers['cpu'].named_parameters(), layers['cuda'].parameters()):
        torch.testing.assert_close(p_cuda.grad.cpu(), p_cpu.grad, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize('combine', COMBINES)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('k', (3, 9))
def test_opcheck(combine, layout, k):
    require_native()
    x, cf, sf, grad = make_inputs((2, 4, 9, 7), k, 2, torch.float32, layout)
    args = (x.requires_grad_(), cf.requires_grad_(), sf.requires_grad_(), k, 1, 2, combine)
    torch.library.opcheck(torch.ops.ddfnet.ddf.default, args)
    torch.library.opcheck(torch.ops.ddfnet.ddf_backward.default,
                          (grad, x.detach(), cf.detach(), sf.detach(), k, 1, 2, combine))


@pytest.mark.parametrize('layout', LAYOUTS)
def test_memory_formats(layout):
    require_native()
    x, cf, sf, grad = make_inputs((2, 6, 9, 7), 3, 2, torch.float32, layout)
    out = ddfnet.ddf(x, cf, sf, 3, 1, 2)
    if layout == 'nhwc':
        assert not x.is_contiguous() and not out.is_contiguous()
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()
    torch.testing.assert_close(out, ddfnet.ddf(x.contiguous(), cf, sf.contiguous(), 3, 1, 2))

    # Each gradient has the strides torch.empty_like gives its argument, whatever the mix of formats.
    cl = torch.channels_last
    transposed_cf = cf.transpose(2, 3).contiguous().transpose(2, 3)
    for cf_, sf_ in ((cf, sf), (cf.contiguous(memory_format=cl), sf.contiguous()),
                     (transposed_cf, sf.contiguous(memory_format=cl))):
        grads = torch.ops.ddfnet.ddf_backward(grad, x, cf_, sf_, 3, 1, 2, 'mul')
        for name, g, arg in zip(GRAD_NAMES, grads, (x, cf_, sf_)):
            assert g.stride() == torch.empty_like(arg).stride(), name

    # Through autograd, as in a network.
    x = x.detach().requires_grad_()
    ddfnet.ddf(x, cf, sf, 3, 1, 2).sum().backward()
    assert x.grad.stride() == torch.empty_like(x).stride()


@pytest.mark.parametrize('combine', COMBINES)
def test_non_contiguous_inputs(combine):
    require_native()
    x, cf, sf, grad = make_inputs((2, 5, 9, 8), 3, 2, torch.float32)
    want = run_op(x, cf, sf, grad, 3, 1, 2, combine)

    def transposed(t):  # same values, strides of the transposed tensor: neither contiguous nor channels_last
        return t.transpose(2, 3).contiguous().transpose(2, 3)

    def every_other(t, dim, memory_format=torch.contiguous_format):
        # Same values, a view of every other entry (along `dim`) of a twice larger tensor.
        shape = list(t.shape)
        shape[dim] *= 2
        big = torch.zeros(shape, dtype=t.dtype, device=t.device).contiguous(memory_format=memory_format)
        index = [slice(None)] * t.dim()
        index[dim] = slice(None, None, 2)
        view = big[tuple(index)]
        view.copy_(t)
        return view

    channels_last_slice = every_other(x, 1, torch.channels_last)  # channel stride 2: not channels_last
    cases = ((transposed(x), cf, sf, grad),
             (every_other(x, 1), transposed(cf), every_other(sf, 3), transposed(grad)),
             (channels_last_slice, every_other(cf, 0), transposed(sf), every_other(grad, 2)))
    for case in cases:
        assert not all(t.is_contiguous() for t in case)
        got = run_op(*case, 3, 1, 2, combine)
        for name, g, w in zip(('output', *GRAD_NAMES), got, want):
            torch.testing.assert_close(g, w, msg=lambda m, name=name: f'{name}: {m}')
        for name, g, arg in zip(GRAD_NAMES, got[1:], case[:3]):
            assert g.stride() == torch.empty_like(arg).stride(), name


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('shape, k', (((1, 64, 40, 40), 5), ((1, 3, 96, 96), 3), ((2, 7, 13, 11), 9),
                                      ((2, 37, 9, 7), 7)))
def test_deterministic(layout, shape, k):
    # Fixed reduction orders, no atomics: two runs agree bit for bit (shapes with split reductions too).
    require_native()
    x, cf, sf, grad = make_inputs(shape, k, 1, torch.float32, layout)
    first = run_op(x, cf, sf, grad, k, 2, 1, 'mul')
    second = run_op(x, cf, sf, grad, k, 2, 1, 'mul')
    for name, a, b in zip(('output', *GRAD_NAMES), first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize('shape', ((0, 4, 6, 5), (2, 0, 6, 5)))
def test_zero_size(shape):
    require_native()
    x, cf, sf, grad = make_inputs(shape, 3, 2, torch.float32)
    out = ddfnet.ddf(x, cf, sf, 3, 1, 2)
    assert out.shape == (shape[0], shape[1], 3, 3) and out.device == x.device
    grads = torch.ops.ddfnet.ddf_backward(grad, x, cf, sf, 3, 1, 2, 'mul')
    for name, g, arg in zip(GRAD_NAMES, grads, (x, cf, sf)):
        assert g.shape == arg.shape and g.dtype == arg.dtype and g.device == arg.device, name
        assert not g.any(), name


@needs_cuda
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('dtype', (torch.float64, torch.float32), ids=dtype_id)
@pytest.mark.parametrize('combine', COMBINES)
def test_cpu_and_cuda_agree(combine, dtype, layout):
    require_native()
    on_gpu = make_inputs((2, 6, 10, 9), 5, 2, dtype, layout)
    on_cpu = [t.cpu() for t in on_gpu]
    got = run_op(*on_gpu, 5, 2, 2, combine)
    want = run_op(*on_cpu, 5, 2, 2, combine)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for name, g, w in zip(('output', *GRAD_NAMES), got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=tol, atol=tol, msg=lambda m, name=name: f'{name}: {m}')


def test_autocast_runs_in_half():
    require_native()
    x, cf, sf, _ = make_inputs((2, 4, 8, 8), 3, 1, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.float16):
        out = ddfnet.ddf(x, cf, sf, 3)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ddfnet.ddf(x.half(), cf.half(), sf.half(), 3))


@needs_cuda
def test_mixed_devices_raise():
    require_native()
    x, cf, sf, _ = make_inputs((2, 4, 8, 8), 3, 1, torch.float32)
    with pytest.raises(ValueError, match='one device'):
        torch.ops.ddfnet.ddf(x, cf.cpu(), sf, 3, 1, 1, 'mul')


@needs_cuda
def test_torch_compile_reduce_overhead():
    # CUDA graphs: the kernels must not synchronise or allocate outside the caching allocator.
    require_native()
    torch._dynamo.reset()
    x, cf, sf, _ = make_inputs((2, 8, 12, 10), 3, 1, torch.float32, 'nhwc')
    inputs = tuple(t.requires_grad_() for t in (x, cf, sf))

    def loss_fn(x, cf, sf):
        return ddfnet.ddf(x.relu(), cf, sf, 3, 2, 1, 'mul').square().sum()

    want = loss_fn(*inputs)
    want_grads = torch.autograd.grad(want, inputs)
    compiled = torch.compile(loss_fn, mode='reduce-overhead')
    for _ in range(3):  # warm-up / recording, then replays of the CUDA graphs
        torch.compiler.cudagraph_mark_step_begin()
        got = compiled(*inputs)
        got_grads = torch.autograd.grad(got, inputs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for name, g, w in zip(GRAD_NAMES, got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f'{name}: {m}')
