"""The DDF operation: its entry point :func:`ddf`, checks, kernels' registration and the pure-PyTorch reference.

Modules, by job: :mod:`.ddf_op` (the entry point), :mod:`.checks` (argument checks), :mod:`.autocast`
(the autocast rule), :mod:`.autograd` (autograd Functions, forward mode, vmap), :mod:`.decomposition`
(the standard-operator form for ONNX), :mod:`.registrations` (everything registered with PyTorch),
:mod:`.reference` (the pure-PyTorch kernels), :mod:`._native` (loading the C++/CUDA kernels) and
:mod:`._torch_internals` (the private PyTorch APIs used, with why).
"""
from ._native import FORCE_REFERENCE_ENV
from .checks import KERNEL_COMBINES, check_ddf_args
from .ddf_op import ddf
from .reference import ddf_backward_reference, ddf_forward_reference, output_size
from .registrations import DDFSlowPathWarning, implementation, native_device_types, register_all

# The one place the op is registered: importing the modules above registers nothing, so nothing depends on
# which of them is imported first.
register_all()

__all__ = ['ddf', 'check_ddf_args', 'implementation', 'native_device_types', 'FORCE_REFERENCE_ENV',
           'DDFSlowPathWarning', 'KERNEL_COMBINES', 'ddf_forward_reference', 'ddf_backward_reference',
           'output_size']
