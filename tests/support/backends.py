"""The native kernels the op tests run on, by name, and how the tests run and check them:

  cpu   csrc/cpu through torch.ops.ddfnet on CPU tensors (must be the native kernel, not the reference);
  cuda  csrc/cuda through torch.ops.ddfnet on CUDA tensors (skipped without a GPU; with one, the CUDA
        kernels must be active);
  emu   the same csrc/cuda sources compiled for the CPU against the emulation (torch.ops.ddfnet_emu,
        support.cuda_emulation): launch configurations and kernels executed thread by thread.
"""
import pytest
import torch

import ddfnet
from ddfnet.ops import ddf_backward_reference, ddf_forward_reference
from ddfnet.ops._native import force_reference
from support.oracles import random_inputs

BACKENDS = ('cpu', 'cuda', 'emu')
DEVICE_BACKENDS = ('cpu', 'cuda')  # the ones ddfnet.ddf (autograd, autocast, opcheck) dispatches to

COMBINES = ('mul', 'add')
LAYOUTS = ('nchw', 'nhwc')
NAMES = ('output', 'grad_input', 'grad_channel_filter', 'grad_spatial_filter')
# Per dtype (rtol, atol) for values of order 1-10 (sums of up to 81 products of standard normals); the
# filter gradients, sums over pixels or channels, scale atol with the square root of the term count. The
# reference runs in float64 on the very (rounded) inputs the kernels get, and the kernels accumulate in
# float32, so a float16 / bfloat16 result may differ from it by its final rounding (half a unit in the last
# place: 2**-11 / 2**-8 of the value) and float32 rounding; a dropped or doubled tap (a term of order 1)
# exceeds that.
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4), torch.float16: (2 ** -10, 1e-5),
              torch.bfloat16: (2 ** -8, 1e-5)}


def marks(backend):
    """The marks of a test case on ``backend``: the backend's name (``-m cuda`` selects the cases a GPU runs:
    scripts/gpu_check.sh), and ``slow`` for the emulation, an extension built on first use (minutes), then
    about 0.15 s of CPU per case (make test-all builds it first: make emulation)."""
    return [getattr(pytest.mark, backend)] + ([pytest.mark.slow] if backend == 'emu' else [])


def params(*backends):
    """``backends`` (default: all) as parametrize values, each with its :func:`marks`."""
    return [pytest.param(backend, marks=marks(backend), id=backend) for backend in backends or BACKENDS]


def device(backend):
    return 'cuda' if backend == 'cuda' else 'cpu'


def require(backend):
    """Skips or fails unless `backend`'s kernels are what the test will run; returns its op namespace."""
    if backend == 'emu':
        from support import cuda_emulation
        cuda_emulation.load('plain')
        return torch.ops.ddfnet_emu
    if backend == 'cuda' and not torch.cuda.is_available():
        pytest.skip('needs a CUDA device')
    if backend == 'cpu' and force_reference():
        pytest.skip('DDFNET_FORCE_REFERENCE is set: no native CPU kernel')
    impl = ddfnet.ops.implementation(device(backend))
    assert impl == 'native', (
        f'ddfnet.ops.implementation({device(backend)!r}) is {impl!r}: the native kernels are not active '
        '(extension not built, a build failure), so these tests would only compare the reference with itself.')
    return torch.ops.ddfnet


def dtype_id(dtype):
    return str(dtype).removeprefix('torch.')


def inputs(backend, shape, k, stride, dtype=torch.float32, layout='nchw', seed=0):
    """input, channel_filter, spatial_filter, grad_output on the backend's device."""
    return random_inputs(*shape, k, stride, dtype=dtype, seed=seed, device=device(backend), memory_format=layout,
                         grad_output=True)


def run(ops, x, cf, sf, grad, k, dilation, stride, combine):
    """[output, grad_input, grad_channel_filter, grad_spatial_filter] of the backend's kernels."""
    return [ops.ddf(x, cf, sf, k, dilation, stride, combine),
            *ops.ddf_backward(grad, x, cf, sf, k, dilation, stride, combine)]


def check(ops, x, cf, sf, grad, k, dilation, stride, combine, tol=None):
    """Runs the kernels, checks dtypes, shapes, the layout contract and values against the reference."""
    rtol, atol = tol or TOLERANCES[x.dtype]
    got = run(ops, x, cf, sf, grad, k, dilation, stride, combine)
    wide = [t.double() for t in (x, cf, sf)]
    want = [ddf_forward_reference(*wide, k, dilation, stride, combine),
            *ddf_backward_reference(grad.double(), *wide, k, dilation, stride, combine)]
    terms = (1, 1, grad.shape[2] * grad.shape[3], x.shape[1])
    for name, g, w, n in zip(NAMES, got, want, terms):
        assert g.dtype == x.dtype and g.shape == w.shape and g.device == x.device, name
        torch.testing.assert_close(g.double(), w.to(g.device), rtol=rtol, atol=atol * max(1, n) ** 0.5,
                                   msg=lambda m, name=name: f'{name}: {m}')
    for name, g, arg in zip(NAMES[1:], got[1:], (x, cf, sf)):
        assert g.stride() == torch.empty_like(arg).stride(), name
    return got


def transposed(t):
    """Same values, strides of the transposed tensor: neither contiguous nor channels_last."""
    return t.transpose(2, 3).contiguous().transpose(2, 3)


def every_other(t, dim, memory_format=torch.contiguous_format):
    """Same values, a view of every other entry (along `dim`) of a twice larger tensor."""
    shape = list(t.shape)
    shape[dim] *= 2
    big = torch.zeros(shape, dtype=t.dtype, device=t.device).contiguous(memory_format=memory_format)
    index = [slice(None)] * t.dim()
    index[dim] = slice(None, None, 2)
    view = big[tuple(index)]
    view.copy_(t)
    return view
