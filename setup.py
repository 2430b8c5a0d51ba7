"""Install ddfnet.

A pure-Python install always works. Native DDF kernels (``csrc/``) are compiled ahead of time only when
``csrc/`` holds C++ sources and torch's C++ extension tooling is importable in the build environment
(``pip install --no-build-isolation -e .``); for CUDA sources, nvcc (``CUDA_HOME``) and a CUDA build of
torch are needed too, and ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default sm_80 and sm_90).
Set ``DDFNET_NO_EXTENSION=1`` to skip the extension.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def native_extension():
    """The ``ddfnet._C`` extension and its build command, or ``([], {})`` for a pure-Python install."""
    cpp = sorted(glob.glob(os.path.join('csrc', '**', '*.cpp'), recursive=True))
    cuda = sorted(glob.glob(os.path.join('csrc', '**', '*.cu'), recursive=True))
    if not cpp or os.environ.get('DDFNET_NO_EXTENSION') == '1':
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    args = {'cxx': ['-O3', '-std=c++17']}
    if cuda and CUDA_HOME is not None and torch.version.cuda is not None:
        os.environ.setdefault('TORCH_CUDA_ARCH_LIST', '8.0;9.0')
        args['nvcc'] = ['-O3', '--use_fast_math', '-std=c++17']
        ext = CUDAExtension('ddfnet._C', cpp + cuda, extra_compile_args=args)
    else:
        ext = CppExtension('ddfnet._C', cpp, extra_compile_args=args)
    return [ext], {'build_ext': BuildExtension.with_options(use_ninja=True)}


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
    extras_require={'test': ['pytest>=7']},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
