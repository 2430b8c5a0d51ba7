"""Which kernels an install compiles (ddfnet.ops._native.cuda_build, used by setup.py and the JIT build): the
CUDA kernels where a GPU will use them or they are asked for, and the CPU kernel alone, with one line saying
why, where they cannot be built or nvcc fails on them."""
import os
import runpy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ddfnet.ops import _native
from support.runner import ROOT, repo_env


@pytest.fixture
def toolkit(tmp_path):
    """A fake CUDA toolkit root whose nvcc reports CUDA 13.0."""
    (tmp_path / 'include').mkdir()
    (tmp_path / 'include' / 'cuda_runtime.h').write_text('')
    (tmp_path / 'bin').mkdir()
    nvcc = tmp_path / 'bin' / 'nvcc'
    nvcc.write_text('#!/bin/sh\necho "Cuda compilation tools, release 13.0, V13.0.48"\n')
    nvcc.chmod(0o755)
    return str(tmp_path)


@pytest.fixture
def cuda_torch(monkeypatch):
    """A CUDA 13.0 build of torch on a machine without a GPU, nothing asked for in the environment."""
    monkeypatch.setattr(torch.version, 'cuda', '13.0')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.delenv(_native.BUILD_CUDA_ENV, raising=False)
    monkeypatch.delenv('TORCH_CUDA_ARCH_LIST', raising=False)
    return monkeypatch


def test_no_gpu_and_nothing_asked_builds_the_cpu_kernel_only(cuda_torch, toolkit):
    assert _native.cuda_build(toolkit) == (False, 'no GPU is visible (set DDFNET_BUILD_CUDA=1 or TORCH_CUDA_ARCH_LIST '
                                                  'to compile the CUDA kernels for another machine)')


@pytest.mark.parametrize('how', ['gpu', 'arch_list', 'asked'])
def test_a_visible_gpu_or_a_request_builds_the_cuda_kernels(cuda_torch, toolkit, how):
    if how == 'gpu':
        cuda_torch.setattr(torch.cuda, 'is_available', lambda: True)
    elif how == 'arch_list':
        cuda_torch.setenv('TORCH_CUDA_ARCH_LIST', '9.0')
    else:
        cuda_torch.setenv(_native.BUILD_CUDA_ENV, '1')
    assert _native.cuda_build(toolkit) == (True, '')


def test_what_cannot_build_the_cuda_kernels_says_why(cuda_torch, toolkit, tmp_path):
    cuda_torch.setenv('TORCH_CUDA_ARCH_LIST', '9.0')
    cuda_torch.setattr(torch.version, 'cuda', '12.1')
    assert _native.cuda_build(toolkit) == (False, f'nvcc under CUDA_HOME={toolkit} is CUDA 13.0, torch was built '
                                                  'with CUDA 12.1 (torch refuses another major version)')
    cuda_torch.setattr(torch.version, 'cuda', '13.2')  # another minor version is fine
    assert _native.cuda_build(toolkit)[0]
    assert 'is not a CUDA toolkit root' in _native.cuda_build('/usr/local')[1]  # torch's guess from a wrapper
    cuda_torch.setattr(torch.version, 'cuda', None)
    assert _native.cuda_build(toolkit) == (False, f'torch {torch.__version__} is a build without CUDA')
    cuda_torch.setenv(_native.BUILD_CUDA_ENV, '0')
    assert _native.cuda_build(toolkit) == (False, 'DDFNET_BUILD_CUDA=0')
    cuda_torch.setenv(_native.BUILD_CUDA_ENV, 'yes')
    with pytest.raises(ValueError, match="DDFNET_BUILD_CUDA must be 0 or 1, got 'yes'"):
        _native.cuda_build(toolkit)


def _setup_py(**env):
    """setup.py evaluated as pip's build runs it (``--name``: nothing is built or written)."""
    base = {k: v for k, v in os.environ.items() if k not in ('TORCH_CUDA_ARCH_LIST', _native.BUILD_CUDA_ENV)}
    return subprocess.run([sys.executable, 'setup.py', '--name'], cwd=ROOT, capture_output=True, text=True,
                          env=repo_env(base, CUDA_VISIBLE_DEVICES='', **env), timeout=300)


def test_setup_py_says_in_one_line_when_it_builds_the_cpu_kernel_only():
    proc = _setup_py()
    assert proc.returncode == 0 and proc.stdout.strip() == 'ddfnet', proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith('ddfnet:')]
    assert len(lines) == 1 and lines[0].startswith('ddfnet: building the CPU kernel only: '), proc.stderr


def test_setup_py_fails_when_the_cuda_kernels_were_asked_for_and_cannot_be_built(tmp_path):
    proc = _setup_py(DDFNET_BUILD_CUDA='1', CUDA_HOME=str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f'ddfnet: DDFNET_BUILD_CUDA=1, but the CUDA kernels cannot be built: CUDA_HOME={tmp_path} is not a CUDA '
        'toolkit root (no include/cuda_runtime.h); set CUDA_HOME to one')


def test_a_failed_cuda_build_falls_back_to_the_cpu_kernel_in_one_line(monkeypatch, capsys):
    import setuptools
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(setuptools, 'setup', lambda **kwargs: None)
    cpu_fallback = runpy.run_path(str(ROOT / 'setup.py'))['cpu_fallback']
    capsys.readouterr()

    class Build:  # torch's BuildExtension as far as the fallback sees it, with nvcc failing
        def __init__(self, extensions):
            self.extensions, self.built = extensions, []
            self.compiler = SimpleNamespace(compile='compile', _compile='_compile')

        def build_extensions(self):
            assert (self.compiler.compile, self.compiler._compile) == ('compile', '_compile')  # unwrapped
            if any(source.endswith('.cu') for ext in self.extensions for source in ext.sources):
                self.compiler.compile = 'wrapped'
                raise RuntimeError('ninja: build stopped: subcommand failed.\nError compiling objects for extension')
            self.built += self.extensions

    cuda_ext, cpu_ext = SimpleNamespace(sources=['ddf.cpp', 'ddf_cuda.cu']), SimpleNamespace(sources=['ddf.cpp'])
    build = cpu_fallback(Build, cpu_ext, asked=False)([cuda_ext])
    build.build_extensions()
    assert build.built == [cpu_ext]
    assert capsys.readouterr().err.splitlines() == ['ddfnet: building the CUDA kernels failed (Error compiling objects '
                                                    'for extension); building the CPU kernel only']
    asked = cpu_fallback(Build, cpu_ext, asked=True)([cuda_ext])  # DDFNET_BUILD_CUDA=1: the failure stands
    with pytest.raises(RuntimeError, match='Error compiling objects for extension'):
        asked.build_extensions()
    assert asked.built == [] and capsys.readouterr().err == ''


def test_make_asks_for_no_cuda_kernels_of_its_own():
    # `make demo` / `make test` install with the environment's request only: on a machine without a GPU
    # that is the CPU kernel. CI asks for one architecture in .ci/run.
    for name in ('TORCH_CUDA_ARCH_LIST', _native.BUILD_CUDA_ENV):
        assert all(line.startswith('#') for line in (ROOT / 'Makefile').read_text().splitlines() if name in line)
    assert 'export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"' in (ROOT / '.ci' / 'run').read_text()


def test_a_gpu_without_the_cuda_kernels_warns_how_to_get_them(monkeypatch):
    from ddfnet.ops import registrations
    monkeypatch.setattr(registrations, '_extension', object())  # an extension built for the CPU only
    monkeypatch.setattr(registrations, 'native_device_types', lambda: ('cpu',))
    monkeypatch.setattr(registrations, '_warned', set())
    with pytest.warns(registrations.DDFSlowPathWarning, match=r"no native DDF kernel for device type 'cuda' \(the "
                      r'native kernels were built for cpu only; reinstall with DDFNET_BUILD_CUDA=1, and CUDA_HOME a '
                      r"CUDA toolkit of torch's CUDA major version"):
        registrations._warn_slow_path('cuda')
