"""The native CPU kernel (csrc/cpu) against the pure-PyTorch reference, which is the oracle.

Low-precision runs are compared with the float64 reference evaluated on the same (rounded) inputs, so
the tolerance only covers the kernel's float32 accumulation and the final rounding.
"""
import itertools
import os
import subprocess
import sys

import pytest
import torch
from naive import random_inputs

import ddfnet
from ddfnet.ops import ddf_backward_reference, ddf_forward_reference
from ddfnet.ops.registrations import SCHEMAS

pytestmark = pytest.mark.skipif(os.environ.get('DDFNET_FORCE_REFERENCE', '') not in ('', '0'),
                                reason='the reference path is forced')

# Per dtype: (rtol, atol) for values of order 1-10 (sums of up to 81 products of standard normals).
TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-4), torch.bfloat16: (1.6e-2, 5e-2),
              torch.float16: (2e-3, 1e-2)}


def test_native_cpu_kernel_is_active():
    # CI builds the extension ahead of time; a user install JIT-compiles it. Either way CPU must be native.
    assert ddfnet.ops.implementation('cpu') == 'native', ddfnet.ops.registrations.native_unavailable_reason()


def test_python_fallback_schemas_match_the_cpp_ones():
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.ddfnet, name).default._schema) == f'ddfnet::{schema}'


def _case(b, c, h, w, k, stride, dtype, fmt, seed):
    # rounded once to dtype; the reference sees the rounded values
    return random_inputs(b, c, h, w, k, stride, dtype=dtype, seed=seed, memory_format=fmt)


def _check(x, cf, sf, k, d, s, combine):
    dtype = x.dtype
    rtol, atol = TOLERANCES[dtype]
    wide = [t.double() for t in (x, cf, sf)]
    out = torch.ops.ddfnet.ddf(x, cf, sf, k, d, s, combine)
    want = ddf_forward_reference(*wide, k, d, s, combine)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(dtype)
    grads = torch.ops.ddfnet.ddf_backward(grad, x, cf, sf, k, d, s, combine)
    wants = ddf_backward_reference(grad.double(), *wide, k, d, s, combine)
    # Filter gradients sum over many terms: scale the tolerance with the number of summands.
    terms = (1, out.shape[2] * out.shape[3], x.shape[1])
    for got, expected, like, n in zip(grads, wants, (x, cf, sf), terms):
        assert got.dtype == dtype and got.shape == like.shape
        assert got.stride() == torch.empty_like(like).stride()
        torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol * max(1, n) ** 0.5)
    return out


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda t: str(t)[6:])
@pytest.mark.parametrize('fmt', [torch.contiguous_format, torch.channels_last], ids=['nchw', 'nhwc'])
@pytest.mark.parametrize('k', [1, 3, 5, 7, 9])
@pytest.mark.parametrize('combine', ['mul', 'add'])
def test_cpu_kernel_matches_reference(combine, k, fmt, dtype):
    for seed, (d, s) in enumerate(itertools.product((1, 2, 3), (1, 2))):
        # Odd, non-square sizes; channels_last only differs from NCHW when C > 1 and H*W > 1.
        x, cf, sf = _case(2, 3, 9, 11, k, s, dtype, fmt, seed)
        out = _check(x, cf, sf, k, d, s, combine)
        assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize('shape, k, d, s', [
    ((1, 2, 20, 23, ), 15, 1, 1),   # a kernel wider than... most of the image
    ((1, 2, 17, 19), 13, 2, 3),
    ((2, 3, 40, 33), 3, 8, 1),      # dilation 8 (the original crashed)
    ((64, 2, 5, 5), 3, 1, 2),       # many samples, tiny images
    ((1, 1, 1, 1), 3, 1, 1),
    ((1, 3, 2, 7), 5, 1, 4),        # stride larger than the image's height
    ((1, 70, 9, 10), 3, 1, 1),      # channels_last channel blocks of 64 plus a remainder
    ((2, 3, 9, 11), 3, 2 ** 40, 2 ** 33),  # dilation / stride far beyond the image: buffers stay small
])
@pytest.mark.parametrize('fmt', [torch.contiguous_format, torch.channels_last], ids=['nchw', 'nhwc'])
def test_cpu_kernel_edge_shapes(shape, k, d, s, fmt):
    for combine in ('mul', 'add'):
        _check(*_case(*shape, k, s, torch.float32, fmt, seed=3), k, d, s, combine)


def test_non_contiguous_inputs():
    x, cf, sf = _case(2, 4, 12, 10, 3, 1, torch.float32, torch.contiguous_format, 0)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, H and W strides swapped
    sft = sf[:, :, :, :].transpose(0, 1).contiguous().transpose(0, 1)
    out = torch.ops.ddfnet.ddf(xt, cf[:, :, :, :].clone(), sft, 3, 1, 1, 'mul')
    torch.testing.assert_close(out, torch.ops.ddfnet.ddf(x, cf, sf, 3, 1, 1, 'mul'))
    grads = torch.ops.ddfnet.ddf_backward(torch.ones_like(out), xt, cf, sft, 3, 1, 1, 'mul')
    assert grads[0].stride() == torch.empty_like(xt).stride()
    assert grads[2].stride() == torch.empty_like(sft).stride()
    _check(x[:, ::2], cf[:, ::2], sf, 3, 1, 1, 'add')  # strided channel slices


@pytest.mark.parametrize('fmt', [torch.contiguous_format, torch.channels_last], ids=['nchw', 'nhwc'])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('combine', ['mul', 'add'])
def test_infinite_inputs_give_the_references_inf_and_nan(combine, stride, fmt):
    # Vector lanes past a row's end (W = 11, not a multiple of 8) must not mix an inf of the last
    # columns into a sum as 0 * inf = NaN where the reference, which never visits them, stays finite.
    x, cf, sf = _case(2, 3, 7, 11, 3, stride, torch.float32, fmt, seed=5)
    x[:, :, :, -1] = float('inf')
    x[:, :, 2, 0] = float('-inf')
    grad = torch.randn(2, 3, *sf.shape[2:], generator=torch.Generator().manual_seed(1))
    got = (torch.ops.ddfnet.ddf(x, cf, sf, 3, 1, stride, combine),
           *torch.ops.ddfnet.ddf_backward(grad, x, cf, sf, 3, 1, stride, combine))
    want = (ddf_forward_reference(x, cf, sf, 3, 1, stride, combine),
            *ddf_backward_reference(grad, x, cf, sf, 3, 1, stride, combine))
    for a, b in zip(got, want):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
        finite = b.isfinite()
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-5, atol=1e-4)


def test_gradcheck_native():
    x, cf, sf = random_inputs(1, 2, 6, 5, 3, 2, requires_grad=True)
    for combine in ('mul', 'add'):
        assert torch.autograd.gradcheck(lambda *t, c=combine: ddfnet.ddf(*t, 3, 2, 2, c), (x, cf, sf))
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: ddfnet.ddf(*t, 3, 1, 2, 'mul'), (xl, cf, sf))


@pytest.mark.parametrize('fmt', [torch.contiguous_format, torch.channels_last], ids=['nchw', 'nhwc'])
def test_opcheck_native(fmt):
    x, cf, sf = random_inputs(2, 3, 7, 8, 3, 2, dtype=torch.float32, requires_grad=True)
    x = x.detach().contiguous(memory_format=fmt).requires_grad_()
    torch.library.opcheck(torch.ops.ddfnet.ddf.default, (x, cf, sf, 3, 1, 2, 'mul'))
    torch.library.opcheck(torch.ops.ddfnet.ddf.default, (x, cf, sf, 3, 2, 2, 'add'))


def test_deterministic_and_thread_count_independent():
    x, cf, sf = _case(4, 32, 15, 13, 3, 1, torch.float32, torch.contiguous_format, 0)
    results = []
    threads = torch.get_num_threads()
    try:
        for n, fmt in itertools.product((1, 2, 1), (torch.contiguous_format, torch.channels_last)):
            torch.set_num_threads(n)
            xf = x.contiguous(memory_format=fmt)
            out = torch.ops.ddfnet.ddf(xf, cf, sf, 3, 1, 1, 'mul')
            grads = torch.ops.ddfnet.ddf_backward(torch.ones_like(out), xf, cf, sf, 3, 1, 1, 'mul')
            results.append((fmt, [out, *grads]))
    finally:
        torch.set_num_threads(threads)
    for fmt in (torch.contiguous_format, torch.channels_last):
        runs = [r for f, r in results if f == fmt]
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                assert torch.equal(a, b)


def test_forced_reference_path_in_a_subprocess(tmp_path):
    # DDFNET_FORCE_REFERENCE=1: no native kernels; the schemas come from Python, the reference runs,
    # warns once, passes opcheck, and gives the native kernel's results.
    code = ('import warnings, torch, ddfnet\n'
            'from ddfnet.ops import DDFSlowPathWarning\n'
            'x = torch.randn(2, 3, 7, 6); cf = torch.randn(2, 3, 3, 3); sf = torch.randn(2, 9, 4, 3)\n'
            'with warnings.catch_warnings(record=True) as w:\n'
            '    warnings.simplefilter("always")\n'
            '    out = ddfnet.ddf(x, cf, sf, 3, 1, 2); ddfnet.ddf(x, cf, sf, 3, 1, 2)\n'
            'print(ddfnet.ops.implementation("cpu"), sum(issubclass(i.category, DDFSlowPathWarning) for i in w))\n'
            'torch.library.opcheck(torch.ops.ddfnet.ddf.default, (x.requires_grad_(), cf, sf, 3, 1, 2, "mul"))\n'
            'torch.save((x.detach(), cf, sf, out), "ref.pt")\n')
    env = dict(os.environ, DDFNET_FORCE_REFERENCE='1')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['reference', '1']
    x, cf, sf, out = torch.load(tmp_path / 'ref.pt')
    torch.testing.assert_close(torch.ops.ddfnet.ddf(x, cf, sf, 3, 1, 2, 'mul'), out)


@pytest.mark.skipif(torch.cuda.is_available(), reason='with a GPU, tests/test_cuda.py runs for real')
def test_the_cuda_suite_passes_as_a_cpu_dry_run():
    # Without a GPU tests/test_cuda.py skips; running its tests against the CPU kernel keeps its helpers,
    # shapes and tolerances honest until a GPU runs it (about a minute).
    env = dict(os.environ, DDFNET_TEST_CUDA_ON='cpu')
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider',
                             os.path.join(os.path.dirname(__file__), 'test_cuda.py')],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert ' passed' in result.stdout and ' failed' not in result.stdout
