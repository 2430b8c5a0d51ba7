"""Loading the native DDF kernels of ``csrc/``.

In order of preference: the extension built ahead of time by ``pip install --no-build-isolation -e .``
(``ddfnet._C``); a just-in-time build of ``csrc/`` with ninja (cached, so only the first use compiles);
nothing, in which case the pure-PyTorch reference runs everywhere and :mod:`ddfnet.ops.registrations` warns
once. Setting ``DDFNET_FORCE_REFERENCE=1`` skips the native kernels altogether (debugging, and the
tests' oracle runs).
"""
import glob
import importlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

FORCE_REFERENCE_ENV = 'DDFNET_FORCE_REFERENCE'
BUILD_CUDA_ENV = 'DDFNET_BUILD_CUDA'
CSRC = Path(__file__).resolve().parents[2] / 'csrc'


def force_reference() -> bool:
    return os.environ.get(FORCE_REFERENCE_ENV, '').strip() not in ('', '0')


def cxx_flags() -> list[str]:
    """Host compiler flags, shared by setup.py and the JIT build so both produce the same kernels."""
    return ['-O3']  # torch's build adds its own -std (C++17 or C++20, per torch version)


def nvcc_flags() -> list[str]:
    # No --use_fast_math: it flushes subnormals to zero (the CPU kernel and the reference keep them), and
    # the kernels have no division or transcendental it could speed up.
    return ['-O3', '-lineinfo']


def cuda_toolkit_root(cuda_home: str | None) -> bool:
    """Whether ``cuda_home`` is a CUDA toolkit root (has include/cuda_runtime.h), not a bare nvcc folder."""
    return cuda_home is not None and os.path.exists(os.path.join(cuda_home, 'include', 'cuda_runtime.h'))


def nvcc_version(cuda_home: str) -> tuple[int, int] | None:
    """(major, minor) of ``cuda_home``'s nvcc, or None when it does not run."""
    try:
        out = subprocess.run([os.path.join(cuda_home, 'bin', 'nvcc'), '--version'], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r'release (\d+)\.(\d+)', out)
    return (int(m[1]), int(m[2])) if m else None


def cuda_build(cuda_home: str | None) -> tuple[bool, str]:
    """Whether a build compiles the CUDA kernels, and if not, why not.

    They are compiled when a GPU is visible, or when asked for (``DDFNET_BUILD_CUDA=1``, or a
    ``TORCH_CUDA_ARCH_LIST`` naming the architectures), and can be: a CUDA build of torch, a CUDA toolkit
    root in ``cuda_home`` whose nvcc has torch's CUDA major version (torch refuses to compile with another).
    Otherwise the CPU kernel alone is built, in seconds rather than minutes; ``DDFNET_BUILD_CUDA=0`` asks
    for that. Raises ValueError for a ``DDFNET_BUILD_CUDA`` other than 0 or 1.
    """
    asked = os.environ.get(BUILD_CUDA_ENV, '').strip()
    if asked not in ('', '0', '1'):
        raise ValueError(f'{BUILD_CUDA_ENV} must be 0 or 1, got {asked!r}')
    if asked == '0':
        return False, f'{BUILD_CUDA_ENV}=0'
    if torch.version.cuda is None:
        return False, f'torch {torch.__version__} is a build without CUDA'
    if asked != '1' and not os.environ.get('TORCH_CUDA_ARCH_LIST') and not torch.cuda.is_available():
        return False, (f'no GPU is visible (set {BUILD_CUDA_ENV}=1 or TORCH_CUDA_ARCH_LIST to compile the CUDA '
                       'kernels for another machine)')
    if not cuda_toolkit_root(cuda_home):
        return False, (f'CUDA_HOME={cuda_home} is not a CUDA toolkit root (no include/cuda_runtime.h); set CUDA_HOME '
                       'to one')
    version = nvcc_version(cuda_home)
    if version is None:
        return False, f'{cuda_home}/bin/nvcc does not run'
    if version[0] != int(torch.version.cuda.split('.')[0]):
        return False, (f'nvcc under CUDA_HOME={cuda_home} is CUDA {version[0]}.{version[1]}, torch was built with '
                       f'CUDA {torch.version.cuda} (torch refuses another major version)')
    return True, ''


def _sources() -> tuple[list[str], list[str]]:
    cpp = sorted(glob.glob(str(CSRC / '**' / '*.cpp'), recursive=True))
    cuda = sorted(glob.glob(str(CSRC / '**' / '*.cu'), recursive=True))
    return cpp, cuda


def _jit_build(prebuilt_error: str) -> ModuleType:
    from torch.utils import cpp_extension

    from ddfnet.utils.io import extension_build_dir  # here: setup.py loads this file by path, without ddfnet

    cpp, cuda = _sources()
    with_cuda = bool(cuda) and torch.cuda.is_available() and cuda_build(cpp_extension.CUDA_HOME)[0]
    name = 'ddfnet_native_cuda' if with_cuda else 'ddfnet_native'
    build_dir = extension_build_dir(name)
    inputs = cpp + (cuda if with_cuda else []) + glob.glob(str(CSRC / '**' / '*.h'), recursive=True) \
        + glob.glob(str(CSRC / '**' / '*.cuh'), recursive=True)
    built = list(build_dir.glob(f'{name}*.so')) + list(build_dir.glob(f'{name}*.pyd'))
    fresh = built and min(p.stat().st_mtime for p in built) >= max(os.path.getmtime(p) for p in inputs)
    defines = ['-DDDFNET_WITH_CUDA'] if with_cuda else []
    start = time.perf_counter()
    if not fresh:
        why = f' (prebuilt ddfnet._C not importable: {prebuilt_error})' if prebuilt_error else ''
        print(f'ddfnet: compiling native DDF kernels{" with CUDA" if with_cuda else ""} into {build_dir}'
              f'{why} ...', end=' ', file=sys.stderr, flush=True)
    try:
        module = cpp_extension.load(
            name=name, sources=cpp + (cuda if with_cuda else []), build_directory=str(build_dir),
            extra_cflags=cxx_flags() + defines, extra_cuda_cflags=nvcc_flags() + defines, with_cuda=with_cuda,
            verbose=False)
    except Exception:
        if not fresh:
            print('failed', file=sys.stderr, flush=True)
        raise
    if not fresh:
        print(f'done in {time.perf_counter() - start:.1f} s', file=sys.stderr, flush=True)
    return module


def load() -> tuple[ModuleType | None, str]:
    """The loaded extension module, or ``None`` and the reason the reference path will be used."""
    if force_reference():
        return None, f'{FORCE_REFERENCE_ENV} is set'
    try:
        return importlib.import_module('ddfnet._C'), ''
    except ImportError as e:
        # A missing module is the normal pure-Python install; anything else (say, a binary built
        # against another torch) is worth naming when we rebuild.
        prebuilt_error = '' if isinstance(e, ModuleNotFoundError) else str(e).splitlines()[0]
    if not _sources()[0]:
        return None, 'no prebuilt extension and no csrc/ sources to compile'
    try:
        return _jit_build(prebuilt_error), ''
    except Exception as e:  # no compiler, no ninja, a compile error: fall back, and say why
        lines = [line for line in str(e).splitlines() if line.strip()]
        return None, f'compiling csrc/ failed ({lines[-1] if lines else type(e).__name__})'
