"""The DDF operation: custom-op registration, dispatch point and pure-PyTorch reference."""
from .ddf_op import KERNEL_COMBINES, DDFSlowPathWarning, check_ddf_args, ddf, kernels_for, register_kernels
from .reference import ddf_backward_reference, ddf_forward_reference, output_size

__all__ = ['ddf', 'check_ddf_args', 'kernels_for', 'register_kernels', 'DDFSlowPathWarning',
           'KERNEL_COMBINES', 'ddf_forward_reference', 'ddf_backward_reference', 'output_size']
