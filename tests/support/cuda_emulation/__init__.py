"""The CUDA kernels of ``csrc/cuda`` run on the CPU, for tests and tuning without a GPU (test support, not
part of the ddfnet package: import it as ``support.cuda_emulation`` with ``tests/`` on the import path).

:func:`load` builds (once, cached under ``ddfnet.utils.io.extension_build_dir``) and imports a separate
extension that compiles the unchanged kernel files against ``csrc/cuda_emu.h`` (of this folder) and
registers ``torch.ops.ddfnet_emu.ddf`` and ``torch.ops.ddfnet_emu.ddf_backward`` (the schemas of
``torch.ops.ddfnet.*``) on CPU tensors: the CUDA entry points, launch configurations and kernels, executed
thread by thread. It never replaces ``torch.ops.ddfnet``.

Variants (one per process, they share the op namespace):
  plain     the emulation as is;
  asan      AddressSanitizer + UndefinedBehaviorSanitizer; tsan: ThreadSanitizer (threads mode). Both need
            their runtime preloaded: run Python with :func:`sanitizer_env`;
  traffic   counts each kernel's global loads and stores (``traffic_start`` / ``traffic_stop``).
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from ddfnet.utils.io import extension_build_dir

CSRC = Path(__file__).resolve().parents[3] / 'csrc'  # the repository's kernel sources
EMULATION = Path(__file__).resolve().parent / 'csrc'  # the emulation layer and its wrappers of the .cu files
_BASE = ['-DDDFNET_CUDA_EMULATION', '-Wno-unknown-pragmas']  # nvcc's `#pragma unroll`
# The wrappers include the kernel files by name, and the kernel files include cuda_emu.h by name.
INCLUDE_DIRS = [str(CSRC / 'cuda'), str(EMULATION)]
_SANITIZE_UB = ['-fsanitize=address,undefined', '-fno-sanitize=vptr', '-fno-sanitize-recover=all']
# (compile flags, link flags, sanitizer runtime to preload)
VARIANTS: dict[str, tuple[list[str], list[str], str | None]] = {
    'plain': (['-O2'], [], None),
    'asan': (['-O1', '-g', '-fno-omit-frame-pointer', *_SANITIZE_UB], _SANITIZE_UB, 'libasan.so'),
    'tsan': (['-O1', '-g', '-fsanitize=thread'], ['-fsanitize=thread'], 'libtsan.so'),
    # gcc's kernel-address instrumentation as plain calls, which csrc/traffic.cc answers.
    'traffic': (['-O1', '-fno-tree-vectorize', '-DDDF_EMU_TRAFFIC', '-fsanitize=kernel-address',
                 '--param', 'asan-instrumentation-with-call-threshold=0', '--param', 'asan-stack=0',
                 '--param', 'asan-globals=0', '--param', 'asan-memintrin=0'], [], None),
}
H200_MULTIPROCESSORS = 132  # the SM count the emulated launchers size grids for, by default
_loaded: dict[str, 'Emulation'] = {}


def sources() -> list[str]:
    """The emulation extension's sources: the argument checks of ``csrc`` and the emulation's runtime and
    wrappers of the ``.cu`` files."""
    return [str(CSRC / 'ddf_checks.cpp')] + sorted(glob.glob(str(EMULATION / '*.cc')))


def _inputs() -> list[str]:
    """Every file the build reads: the sources, the kernel files and headers of ``csrc``, the emulation's headers."""
    return sources() + [str(p) for folder in (CSRC, EMULATION) for p in folder.rglob('*')
                        if p.suffix in ('.h', '.cuh', '.cu')]


def sanitizer_runtime(variant: str, lib: str | None = None) -> str:
    """Path of the sanitizer runtime a variant's process must preload (gcc's; or of `lib`)."""
    lib = lib or VARIANTS[variant][2]
    if lib is None:
        raise ValueError(f'the {variant!r} variant needs no sanitizer runtime')
    cxx = os.environ.get('CXX', 'c++')
    path = subprocess.run([cxx, f'-print-file-name={lib}'], capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(path):
        raise RuntimeError(f'{cxx} has no {lib} (install the compiler\'s sanitizer runtime)')
    return path


def sanitizer_env(variant: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a Python process that loads a sanitizer variant: the runtime preloaded, and any
    report fatal (non-zero exit)."""
    env = dict(os.environ if base is None else base)
    # libstdc++ right after the runtime, so that its interceptors (C++ exceptions) find what they wrap.
    env['LD_PRELOAD'] = f'{sanitizer_runtime(variant)} {sanitizer_runtime(variant, "libstdc++.so.6")}'

    env['ASAN_OPTIONS'] = 'detect_leaks=0:abort_on_error=0:halt_on_error=1:exitcode=66'
    env['UBSAN_OPTIONS'] = 'halt_on_error=1:print_stacktrace=1:exitcode=66'
    env['TSAN_OPTIONS'] = 'halt_on_error=1:exitcode=66:report_signal_unsafe=0'
    env['OMP_NUM_THREADS'] = '1'  # OpenMP's own synchronisation is invisible to ThreadSanitizer
    return env


class Emulation:
    """Controls of a loaded emulation (ops of ``torch.ops.ddfnet_emu``, next to ``ddf`` / ``ddf_backward``)."""

    _COUNTERS = ('requests', 'bytes', 'sectors', 'distinct_bytes')

    def __init__(self, module: ModuleType, variant: str):
        self.module, self.variant = module, variant
        self._ops = torch.ops.ddfnet_emu
        self.traffic_available: bool = self._ops.traffic_available()

    def set_mode(self, mode: str) -> None:
        """Run each block's threads as ``'fibers'`` (deterministic, fast) or ``'threads'`` (for ThreadSanitizer)."""
        self._ops.set_mode(mode)

    def mode(self) -> str:
        return self._ops.mode()

    def selftest(self, name: str) -> torch.Tensor:
        """Run one of the emulation's check kernels (most of them raise)."""
        return self._ops.selftest(name)

    def multiprocessors(self) -> int:
        """The SM count the launchers size grids for (default: 132, an H200)."""
        return self._ops.multiprocessors()

    def set_multiprocessors(self, count: int) -> None:
        self._ops.set_multiprocessors(count)

    def traffic_start(self) -> None:
        """Clear the counters and count the global accesses of the following launches ('traffic' variant)."""
        if not self.traffic_available:
            raise RuntimeError(f"the {self.variant!r} emulation counts no traffic: load('traffic')")
        self._ops.traffic_start()

    def traffic_stop(self) -> list[dict]:
        """Stop counting; one dict per launch since :meth:`traffic_start`: kernel, grid, block, and per side
        (``load_`` / ``store_``) the warp requests, bytes requested, 32-byte sectors and distinct bytes."""
        kernels, rows = self._ops.traffic_stop()
        out = []
        for kernel, row in zip(kernels, rows.tolist()):
            launch = {'kernel': kernel, 'grid': row[0], 'block': row[1]}
            for i, side in enumerate(('load', 'store')):
                launch.update({f'{side}_{c}': v for c, v in zip(self._COUNTERS, row[2 + 4 * i:6 + 4 * i])})
            out.append(launch)
        return out


def load(variant: str = 'plain', verbose: bool = False) -> Emulation:
    """The emulation extension of ``variant`` (built on first use, then cached until a source changes)."""
    if variant not in VARIANTS:
        raise ValueError(f'variant must be one of {sorted(VARIANTS)}, got {variant!r}')
    if variant in _loaded:
        return _loaded[variant]
    if _loaded:
        raise RuntimeError(f'the {next(iter(_loaded))!r} emulation is already loaded in this process (one variant '
                           'per process: they share torch.ops.ddfnet_emu)')
    cflags, ldflags, runtime = VARIANTS[variant]
    if runtime is not None and runtime not in os.environ.get('LD_PRELOAD', ''):
        raise RuntimeError(f'the {variant!r} emulation needs {runtime} preloaded: run Python with '
                           f'support.cuda_emulation.sanitizer_env({variant!r})')
    _loaded[variant] = Emulation(_jit_build(variant, cflags, ldflags, verbose), variant)
    return _loaded[variant]


def _name(variant: str) -> str:
    return 'ddfnet_cuda_emu' if variant == 'plain' else f'ddfnet_cuda_emu_{variant}'


def is_built(variant: str = 'plain') -> bool:
    """Whether ``variant``'s build is cached and newer than every source (:func:`load` then compiles nothing)."""
    name = _name(variant)
    built = list(extension_build_dir(name).glob(f'{name}*.so'))
    return bool(built) and min(p.stat().st_mtime for p in built) >= max(os.path.getmtime(p) for p in _inputs())


def _jit_build(variant: str, cflags: list[str], ldflags: list[str], verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    name = _name(variant)
    build_dir = extension_build_dir(name)
    if not is_built(variant):
        print(f'ddfnet: compiling the CUDA emulation ({variant}) into {build_dir} ...', file=sys.stderr, flush=True)
    # The compiler must not run with this process's sanitizer runtime preloaded.
    preload = os.environ.pop('LD_PRELOAD', None)
    try:
        return cpp_extension.load(name=name, sources=sources(), build_directory=str(build_dir),
                                  extra_include_paths=INCLUDE_DIRS, extra_cflags=_BASE + cflags, extra_ldflags=ldflags, verbose=verbose)
    finally:
        if preload is not None:
            os.environ['LD_PRELOAD'] = preload
