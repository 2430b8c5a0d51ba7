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
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

FORCE_REFERENCE_ENV = 'DDFNET_FORCE_REFERENCE'
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


def _sources() -> tuple[list[str], list[str]]:
    cpp = sorted(glob.glob(str(CSRC / '**' / '*.cpp'), recursive=True))
    cuda = sorted(glob.glob(str(CSRC / '**' / '*.cu'), recursive=True))
    return cpp, cuda


def _jit_build(prebuilt_error: str) -> ModuleType:
    from torch.utils import cpp_extension

    from ddfnet.utils.io import extension_build_dir  # here: setup.py loads this file by path, without ddfnet

    cpp, cuda = _sources()
    with_cuda = bool(cuda) and torch.cuda.is_available() and cuda_toolkit_root(cpp_extension.CUDA_HOME)
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
