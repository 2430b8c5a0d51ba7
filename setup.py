"""Install ddfnet.

A pure-Python install always works; ddfnet then JIT-compiles ``csrc/`` at first import (cached). The
native kernels are compiled ahead of time into ``ddfnet._C`` when torch is importable in the build
environment, i.e. with ``pip install --no-build-isolation -e .`` (pip's default isolated build
environment has no torch, and installing a second torch there would risk an ABI mismatch). The CPU kernel
always; the CUDA kernels when a GPU is visible or they are asked for (``DDFNET_BUILD_CUDA=1``, or
``TORCH_CUDA_ARCH_LIST`` naming the architectures; default "8.0;9.0+PTX": A100, H100/H200, and PTX that
newer GPUs compile at load time) and nvcc (``CUDA_HOME``) matches torch's CUDA major version
(``ddfnet.ops._native.cuda_build``). Where they cannot be, the build says why in one line and compiles the
CPU kernel only, unless ``DDFNET_BUILD_CUDA=1`` asked for them: then it fails. The same holds when nvcc fails
to compile them (:func:`cpu_fallback`). Set ``DDFNET_NO_EXTENSION=1`` to skip the ahead-of-time build.

The CUDA kernels compiled for the CPU (the tests' emulation, ``tests/support/cuda_emulation``) are no part of
the install: the tests JIT-compile them on first use.
"""
import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _native_module():
    """ddfnet/ops/_native.py (flags, toolkit check), so the JIT and ahead-of-time builds match."""
    spec = importlib.util.spec_from_file_location('_ddfnet_native', os.path.join(ROOT, 'ddfnet', 'ops', '_native.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_fallback(build_ext, cpu_extension, asked: bool):
    """``build_ext`` that, when building the CUDA kernels fails and they were not asked for (``asked``:
    ``DDFNET_BUILD_CUDA=1``), says why in one line and builds ``cpu_extension``, the CPU kernel, instead."""
    class BuildWithCPUFallback(build_ext):
        def build_extensions(self):
            patched = self.compiler.compile, self.compiler._compile  # torch's BuildExtension wraps them per call
            try:
                super().build_extensions()
            except Exception as e:  # nvcc's error, or ninja's 'Error compiling objects for extension'
                if asked:
                    raise
                lines = [line for line in str(e).splitlines() if line.strip()]
                print(f'ddfnet: building the CUDA kernels failed ({lines[-1] if lines else type(e).__name__}); '
                      'building the CPU kernel only', file=sys.stderr)
                self.compiler.compile, self.compiler._compile = patched
                self.extensions = [cpu_extension]
                super().build_extensions()
    return BuildWithCPUFallback


def native_extension():
    """The ``ddfnet._C`` extension and its build command, or ``([], {})`` for a pure-Python install."""
    cpp = sorted(glob.glob(os.path.join('csrc', '**', '*.cpp'), recursive=True))
    cuda = sorted(glob.glob(os.path.join('csrc', '**', '*.cu'), recursive=True))
    if not cpp or os.environ.get('DDFNET_NO_EXTENSION') == '1':
        return [], {}
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # an isolated build environment without torch: pure Python, JIT at first use
        return [], {}
    native = _native_module()
    cxx, nvcc = native.cxx_flags(), native.nvcc_flags()
    with_cuda, why_not = native.cuda_build(CUDA_HOME) if cuda else (False, 'no CUDA sources')
    if not with_cuda:
        if os.environ.get(native.BUILD_CUDA_ENV, '').strip() == '1':
            raise SystemExit(f'ddfnet: {native.BUILD_CUDA_ENV}=1, but the CUDA kernels cannot be built: {why_not}')
        print(f'ddfnet: building the CPU kernel only: {why_not}', file=sys.stderr)
    cpu_ext = CppExtension('ddfnet._C', cpp, extra_compile_args={'cxx': cxx})
    build_ext = BuildExtension.with_options(use_ninja=True)
    if not with_cuda:
        return [cpu_ext], {'build_ext': build_ext}
    os.environ.setdefault('TORCH_CUDA_ARCH_LIST', '8.0;9.0+PTX')  # A100, H100/H200; PTX for newer GPUs
    ext = CUDAExtension('ddfnet._C', cpp + cuda, define_macros=[('DDFNET_WITH_CUDA', None)],
                        extra_compile_args={'cxx': cxx, 'nvcc': nvcc})
    asked = os.environ.get(native.BUILD_CUDA_ENV, '').strip() == '1'
    return [ext], {'build_ext': cpu_fallback(build_ext, cpu_ext, asked)}


ext_modules, cmdclass = native_extension()

with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    long_description = f.read()

setup(
    name='ddfnet',
    version='0.1.0',
    description='Decoupled Dynamic Filter networks (DDF, CVPR 2021) for PyTorch and timm',
    long_description=long_description,
    long_description_content_type='text/markdown',
    license='MIT',
    python_requires='>=3.10',
    packages=find_packages(include=['ddfnet', 'ddfnet.*']),
    install_requires=['torch>=2.4', 'torchvision', 'timm>=1.0', 'pyyaml', 'tensorboard', 'ninja'],
    extras_require={'test': ['pytest>=7', 'pytest-xdist>=3.2'],  # make test-all runs in two workers
                    'onnx': ['onnx>=1.16', 'onnxscript>=0.2', 'onnxruntime>=1.18'],  # ddfnet.export_onnx
                    'wds': ['webdataset>=1.0'],  # --dataset wds/NAME shards
                    'detection': ['pycocotools>=2.0']},  # COCO box AP in scripts/train_detection.py
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
