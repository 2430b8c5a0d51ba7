"""Which kernels CUDA tensors run (ddfnet.ops.registrations): native, else Triton, else the reference;
DDFNET_CUDA_KERNELS forces one. Checked without a GPU: the choice itself, and what a fresh process
registers and reports."""
import subprocess
import sys

import pytest
from support.runner import repo_env

import ddfnet
from ddfnet.ops import registrations
from ddfnet.ops.registrations import choose_cuda_kernels


@pytest.mark.parametrize('native, triton, want', ((True, True, 'native'), (True, False, 'native'),
                                                  (False, True, 'triton'), (False, False, 'reference')))
def test_preference(native, triton, want):
    assert choose_cuda_kernels('', native, lambda: triton) == want


def test_native_needs_no_triton():
    def fail():
        raise AssertionError('triton looked up')
    assert choose_cuda_kernels('', True, fail) == 'native'


@pytest.mark.parametrize('forced', ('native', 'triton', 'reference'))
def test_forced(forced):
    assert choose_cuda_kernels(forced, True, lambda: True) == forced


@pytest.mark.parametrize('forced, native, triton, message', (
    ('cudnn', True, True, "DDFNET_CUDA_KERNELS='cudnn' is unknown; available: native, triton, reference"),
    ('native', False, True, "DDFNET_CUDA_KERNELS='native' is not available here; available: triton, reference"),
    ('triton', True, False, "DDFNET_CUDA_KERNELS='triton' is not available here; available: native, reference"),
))
def test_unknown_or_unavailable(forced, native, triton, message):
    with pytest.raises(ValueError) as info:
        choose_cuda_kernels(forced, native, lambda: triton)
    assert str(info.value) == message


def test_implementation_reports_the_choice(monkeypatch):
    for choice in registrations.CUDA_KERNELS:
        monkeypatch.setattr(registrations, '_cuda_kernels', choice)
        assert ddfnet.ops.implementation('cuda') == choice
    assert ddfnet.ops.implementation('cpu') in ('native', 'reference')


def _fresh(forced, code, force_reference='0'):
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                          env=repo_env(DDFNET_CUDA_KERNELS=forced, DDFNET_FORCE_REFERENCE=force_reference))


@pytest.mark.parametrize('force_reference', ('0', '1'))  # with the extension's kernels, and without
@pytest.mark.parametrize('forced', ('triton', 'reference'))
def test_forced_kernels_are_registered_for_cuda(forced, force_reference):
    code = ('import torch, ddfnet\n'
            'print(ddfnet.ops.implementation("cuda"), "cuda" in ddfnet.ops.native_device_types(), '
            'torch._C._dispatch_has_kernel_for_dispatch_key("ddfnet::ddf", "CUDA"), '
            'torch._C._dispatch_has_kernel_for_dispatch_key("ddfnet::ddf_backward", "CUDA"))')
    proc = _fresh(forced, code, force_reference)
    assert proc.returncode == 0, proc.stderr
    implementation, native_cuda, *registered = proc.stdout.split()
    # Triton's kernels sit at the CUDA key; the reference too when it replaces native CUDA kernels (without
    # them it runs from CompositeExplicitAutograd).
    want = forced == 'triton' or native_cuda == 'True'
    assert implementation == forced and registered == [str(want)] * 2, proc.stdout


def test_force_reference_means_the_reference_on_cuda_too():
    code = 'import ddfnet; print(ddfnet.ops.implementation("cuda"))'
    proc = _fresh('', code, '1')
    assert proc.returncode == 0 and proc.stdout.split() == ['reference'], proc.stdout + proc.stderr


def test_bad_value_fails_the_import_in_one_line():
    proc = _fresh('cudnn', 'import ddfnet')
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "ValueError: DDFNET_CUDA_KERNELS='cudnn' is unknown; available: ")
