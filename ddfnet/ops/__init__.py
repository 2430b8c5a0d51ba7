"""The DDF operation: operator registration, native-kernel loading and the pure-PyTorch reference."""
from ._native import FORCE_REFERENCE_ENV
from .ddf_op import KERNEL_COMBINES, DDFSlowPathWarning, check_ddf_args, ddf, implementation, native_device_types
from .reference import ddf_backward_reference, ddf_forward_reference, output_size

__all__ = ['ddf', 'check_ddf_args', 'implementation', 'native_device_types', 'FORCE_REFERENCE_ENV',
           'DDFSlowPathWarning',
           'KERNEL_COMBINES', 'ddf_forward_reference', 'ddf_backward_reference', 'output_size']
