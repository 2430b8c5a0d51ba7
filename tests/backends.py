"""The native kernels the op tests run on, by name:

  cpu   csrc/cpu through torch.ops.ddfnet on CPU tensors (must be the native kernel, not the reference);
  cuda  csrc/cuda through torch.ops.ddfnet on CUDA tensors (skipped without a GPU; with one, the CUDA
        kernels must be active);
  emu   the same csrc/cuda sources compiled for the CPU against the emulation (torch.ops.ddfnet_emu,
        support.cuda_emulation): launch configurations and kernels executed thread by thread.
"""
import pytest
import torch

import ddfnet
from ddfnet.ops._native import force_reference

BACKENDS = ('cpu', 'cuda', 'emu')
DEVICE_BACKENDS = ('cpu', 'cuda')  # the ones ddfnet.ddf (autograd, autocast, opcheck) dispatches to


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
