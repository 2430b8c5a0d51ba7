"""The DDF op: exactness against naive loops, gradients, custom-op registration, dtypes, errors."""
import subprocess
import sys

import pytest
import torch
from support.oracles import naive_ddf, random_inputs
from torch.utils.flop_counter import FlopCounterMode

import ddfnet
from ddfnet.ops import ddf_backward_reference, ddf_forward_reference

COMBINES = ('mul', 'add')


@pytest.mark.parametrize('combine', COMBINES)
@pytest.mark.parametrize('k', (1, 3, 5, 7))
@pytest.mark.parametrize('dilation', (1, 2))
@pytest.mark.parametrize('stride', (1, 2))
@pytest.mark.parametrize('hw', ((7, 9), (8, 6)))
def test_forward_and_backward_match_naive(combine, k, dilation, stride, hw):
    x, cf, sf = random_inputs(2, 3, *hw, k, stride, requires_grad=True)
    out = ddfnet.ddf(x, cf, sf, k, dilation, stride, combine)
    expected = naive_ddf(x, cf, sf, k, dilation, stride, combine)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, cf, sf), grad)
    want = torch.autograd.grad(expected, (x, cf, sf), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_output_size_is_conv_formula():
    # A 'same'-padded convolution's size: (size - 1) // stride + 1 per side, batch and channels kept.
    for h, w, stride, dilation in ((7, 10, 2, 1), (8, 5, 2, 2), (9, 13, 3, 1), (1, 4, 2, 3), (6, 6, 1, 2)):
        x, cf, sf = random_inputs(2, 3, h, w, 3, stride)
        out = ddfnet.ddf(x, cf, sf, 3, dilation, stride)
        assert out.shape == (2, 3, (h - 1) // stride + 1, (w - 1) // stride + 1), (h, w, stride, dilation)


@pytest.mark.parametrize('combine', COMBINES)
@pytest.mark.parametrize('k, dilation, stride', ((3, 1, 1), (3, 2, 2), (5, 1, 2), (1, 1, 1)))
def test_gradcheck(combine, k, dilation, stride):
    inputs = random_inputs(2, 3, 7, 6, k, stride, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ddfnet.ddf(*t, k, dilation, stride, combine), inputs)


@pytest.mark.parametrize('combine', COMBINES)
@pytest.mark.parametrize('channels_last', (False, True))
def test_opcheck(combine, channels_last):
    x, cf, sf = random_inputs(2, 4, 9, 7, 3, 2, dtype=torch.float32, requires_grad=True)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.ddfnet.ddf.default, (x, cf, sf, 3, 1, 2, combine))
    grad = torch.randn(2, 4, 5, 4)
    torch.library.opcheck(torch.ops.ddfnet.ddf_backward.default,
                          (grad, x.detach(), cf.detach(), sf.detach(), 3, 1, 2, combine))


@pytest.mark.parametrize('dtype, tol', ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)))
@pytest.mark.parametrize('combine', COMBINES)
def test_low_precision_against_float64(dtype, tol, combine):
    x, cf, sf = random_inputs(2, 8, 10, 9, 3, dtype=torch.float64)
    # Compare on inputs that are exactly representable in `dtype`, so only arithmetic error remains.
    x, cf, sf = (t.to(dtype) for t in (x, cf, sf))
    out = ddfnet.ddf(x, cf, sf, 3, 1, 1, combine)
    assert out.dtype == dtype
    expected = naive_ddf(*(t.double() for t in (x, cf, sf)), 3, 1, 1, combine)
    # float32 accumulation: the only error is the final rounding of each output to `dtype`.
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    grads = ddf_backward_reference(torch.ones_like(out), x, cf, sf, 3, 1, 1, combine)
    assert [g.dtype for g in grads] == [dtype] * 3


def test_autocast_cpu_runs_in_autocast_dtype():
    x, cf, sf = random_inputs(2, 4, 6, 6, 3, dtype=torch.float32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = ddfnet.ddf(x, cf.bfloat16(), sf, 3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ddfnet.ddf(*(t.bfloat16() for t in (x, cf, sf)), 3).float())
    with torch.autocast('cpu', dtype=torch.bfloat16):  # float64 is left alone, as autocast does
        assert ddfnet.ddf(x.double(), cf.double(), sf.double(), 3).dtype == torch.float64


def test_empty_batch():
    x, cf, sf = random_inputs(0, 4, 6, 5, 3, 2, requires_grad=True)
    out = ddfnet.ddf(x, cf, sf, 3, 1, 2)
    assert out.shape == (0, 4, 3, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape and sf.grad.shape == sf.shape


def test_channels_last_keeps_memory_format():
    x, cf, sf = random_inputs(2, 4, 6, 6, 3, dtype=torch.float32)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    out = ddfnet.ddf(x, cf, sf, 3)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ddfnet.ddf(x.contiguous(), cf, sf, 3))
    out.sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def _bad(**overrides):
    x, cf, sf = random_inputs(2, 4, 6, 6, 3, dtype=torch.float32)
    args = dict(input=x, channel_filter=cf, spatial_filter=sf, kernel_size=3, dilation=1, stride=1,
                kernel_combine='mul')
    args.update(overrides)
    return args


BAD_INPUTS = [
    (dict(input=torch.randn(4, 6, 6)), ValueError, 'input must be 4-D'),
    (dict(channel_filter=torch.randn(2, 4, 9)), ValueError, 'channel_filter must be 4-D'),
    (dict(channel_filter=torch.randn(2, 5, 3, 3)), ValueError, r'channel_filter must have shape \(B, C, k, k\)'),
    (dict(channel_filter=torch.randn(3, 4, 3, 3)), ValueError, r'channel_filter must have shape \(B, C, k, k\)'),
    (dict(channel_filter=torch.randn(2, 4, 5, 5)), ValueError, r'channel_filter must have shape'),
    (dict(spatial_filter=torch.randn(3, 9, 6, 6)), ValueError, r'spatial_filter must have shape \(B, k\*k, Ho, Wo\)'),
    (dict(spatial_filter=torch.randn(2, 8, 6, 6)), ValueError, r'spatial_filter must have shape'),
    (dict(spatial_filter=torch.randn(2, 9, 6, 6), stride=2), ValueError, r'\(2, 9, 3, 3\)'),
    (dict(kernel_size=2), ValueError, 'kernel_size must be a positive odd int'),
    (dict(kernel_size=0), ValueError, 'kernel_size must be a positive odd int'),
    (dict(kernel_size=-3), ValueError, 'kernel_size must be a positive odd int'),
    (dict(kernel_size=3.0), TypeError, 'kernel_size must be an int'),
    (dict(dilation=0), ValueError, 'dilation must be >= 1'),
    (dict(stride=0), ValueError, 'stride must be >= 1'),
    (dict(kernel_combine='sum'), ValueError, "kernel_combine must be 'mul' or 'add'"),
    (dict(kernel_combine=None), TypeError, "kernel_combine must be 'mul' or 'add'"),
    (dict(input=torch.randn(2, 4, 6, 6, dtype=torch.float64)), TypeError, 'must share one dtype'),
    (dict(spatial_filter=torch.randn(2, 9, 6, 6).half()), TypeError, 'must share one dtype'),
    (dict(input=torch.ones(2, 4, 6, 6, dtype=torch.int64)), TypeError, 'input must be float64/32/16 or bfloat16'),
    (dict(input=[1.0]), TypeError, 'input must be a Tensor'),
    (dict(channel_filter=torch.randn(2, 4, 3, 3, device='meta')), ValueError, 'must be on one device'),
]


@pytest.mark.parametrize('overrides, error, match', BAD_INPUTS)
def test_bad_input_raises_clear_error(overrides, error, match):
    args = _bad(**overrides)
    with pytest.raises(error, match=match):
        ddfnet.ddf(**args)
    if isinstance(args['input'], torch.Tensor) and not isinstance(args['kernel_size'], float) \
            and isinstance(args['kernel_combine'], str):
        with pytest.raises(error, match=match):  # the registered op validates too
            torch.ops.ddfnet.ddf(*args.values())


def test_flop_formula_counts_the_op():
    x, cf, sf = random_inputs(2, 4, 8, 8, 5, 2, dtype=torch.float32)
    counter = FlopCounterMode(display=False)
    with counter:
        ddfnet.ddf(x, cf, sf, 5, 1, 2)
    forward_flops = 3 * 2 * 4 * 4 * 4 * 25  # 3 FLOPs per output element and tap
    assert counter.get_total_flops() == forward_flops
    x.requires_grad_()
    with counter:
        ddfnet.ddf(x, cf, sf, 5, 1, 2).sum().backward()
    assert counter.get_total_flops() == forward_flops * (1 + 3)  # three gradients


@pytest.mark.slow  # a subprocess
def test_reference_memory_stays_near_output_size():
    # A k*k unfold of this input would need 49 x 16 MiB = 784 MiB; the tap loop needs a few outputs.
    code = ('import resource, torch, warnings\n'
            'warnings.simplefilter("ignore")\n'
            'from ddfnet.ops import ddf_forward_reference, ddf_backward_reference\n'
            'x = torch.randn(1, 64, 256, 256); cf = torch.randn(1, 64, 7, 7); sf = torch.randn(1, 49, 256, 256)\n'
            'before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n'
            'out = ddf_forward_reference(x, cf, sf, 7, 1, 1, "mul")\n'
            'grads = ddf_backward_reference(out, x, cf, sf, 7, 1, 1, "mul")\n'
            'print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    growth_mib = int(out.stdout.strip())
    assert growth_mib < 200, f'reference path grew peak memory by {growth_mib} MiB'


def test_reference_functions_match_op():
    x, cf, sf = random_inputs(1, 2, 5, 5, 3)
    torch.testing.assert_close(ddf_forward_reference(x, cf, sf, 3, 1, 1, 'add'), ddfnet.ddf(x, cf, sf, 3, 1, 1, 'add'))


def test_torch_compile_fullgraph_cpu():
    x, cf, sf = random_inputs(2, 4, 9, 9, 3, 2, dtype=torch.float32, requires_grad=True)

    def f(x, cf, sf):
        return ddfnet.ddf(x.relu(), cf * 2, sf, 3, 1, 2).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend='inductor')
    got = compiled(x, cf, sf)
    got_grads = torch.autograd.grad(got, (x, cf, sf))
    want = f(x, cf, sf)
    want_grads = torch.autograd.grad(want, (x, cf, sf))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_random_configurations_match_naive():
    # Seeded sweep over shapes the grid above does not pin: larger kernels, dilation 3, stride 3,
    # thin images, and one-channel/one-sample batches.
    rng = torch.Generator().manual_seed(1234)
    for trial in range(12):
        k = int(torch.randint(0, 5, (), generator=rng)) * 2 + 1
        dilation = int(torch.randint(1, 4, (), generator=rng))
        stride = int(torch.randint(1, 4, (), generator=rng))
        b, c = int(torch.randint(1, 3, (), generator=rng)), int(torch.randint(1, 4, (), generator=rng))
        h, w = (int(v) for v in torch.randint(1, 12, (2,), generator=rng))
        combine = COMBINES[trial % 2]
        x, cf, sf = random_inputs(b, c, h, w, k, stride, requires_grad=True, seed=trial)
        out = ddfnet.ddf(x, cf, sf, k, dilation, stride, combine)
        expected = naive_ddf(x, cf, sf, k, dilation, stride, combine)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(out.sum(), (x, cf, sf))
        want = torch.autograd.grad(expected.sum(), (x, cf, sf), allow_unused=True)
        for g, wg in zip(grads, want):
            torch.testing.assert_close(g, torch.zeros_like(g) if wg is None else wg, rtol=1e-12, atol=1e-12)
