"""Argument checks of the DDF op, shared by the public function, the op's kernels and its decomposition.

Messages name the argument and, for shapes, the expected one, so a wrong call says how to fix it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .reference import output_size

__all__ = ['KERNEL_COMBINES', 'check_arg_types', 'check_ddf_args', 'check_autocast_dtypes']

KERNEL_COMBINES = ('mul', 'add')
_FLOATING = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# An FX proxy stands for a tensor while torch.fx.symbolic_trace records the op's node.
_TENSOR_LIKE = (Tensor, torch.fx.Proxy)


def _shape(t: Tensor) -> str:
    return '(' + ', '.join(str(s) for s in t.shape) + ')'


def check_arg_types(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine) -> None:
    """TypeError for a Python argument of the wrong type.

    The dispatcher's own message for a wrong Python type does not name our argument, so :func:`ddfnet.ddf`
    checks first.
    """
    for name, t in (('input', input), ('channel_filter', channel_filter), ('spatial_filter', spatial_filter)):
        if not isinstance(t, _TENSOR_LIKE):
            raise TypeError(f'ddf: {name} must be a Tensor, got {type(t).__name__}')
    for name, value in (('kernel_size', kernel_size), ('dilation', dilation), ('stride', stride)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f'ddf: {name} must be an int, got {type(value).__name__}')
    if not isinstance(kernel_combine, str):
        raise TypeError(f"ddf: kernel_combine must be 'mul' or 'add', got {kernel_combine!r}")


def check_ddf_args(input: Tensor, channel_filter: Tensor, spatial_filter: Tensor, kernel_size: int,
                   dilation: int, stride: int, kernel_combine: str) -> None:
    """Validate the op's arguments; raise ValueError/TypeError naming the argument and expected shape.

    Python types are the schema's business (and :func:`ddfnet.ddf` checks them with clearer messages), so
    the op bodies and fake kernels that call this do not check them again.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f'ddf: kernel_size must be a positive odd int, got {kernel_size}')
    if dilation < 1:
        raise ValueError(f'ddf: dilation must be >= 1, got {dilation}')
    if stride < 1:
        raise ValueError(f'ddf: stride must be >= 1, got {stride}')
    if kernel_combine not in KERNEL_COMBINES:
        raise ValueError(f"ddf: kernel_combine must be 'mul' or 'add', got {kernel_combine!r}")
    tensors = (('input', input), ('channel_filter', channel_filter), ('spatial_filter', spatial_filter))
    for name, t in tensors:
        if t.dim() != 4:
            raise ValueError(f'ddf: {name} must be 4-D, got shape {_shape(t)}')
        if t.dtype not in _FLOATING:
            raise TypeError(f'ddf: {name} must be float64/32/16 or bfloat16, got {t.dtype}')
    if len({t.device for _, t in tensors}) != 1:
        raise ValueError('ddf: input, channel_filter and spatial_filter must be on one device, got '
                         + ', '.join(f'{n} on {t.device}' for n, t in tensors))
    if len({t.dtype for _, t in tensors}) != 1:
        raise TypeError('ddf: input, channel_filter and spatial_filter must share one dtype (outside '
                        'autocast), got ' + ', '.join(f'{n} {t.dtype}' for n, t in tensors))
    batch, channels, height, width = input.shape
    k = kernel_size
    if tuple(channel_filter.shape) != (batch, channels, k, k):
        raise ValueError(f'ddf: channel_filter must have shape (B, C, k, k) = ({batch}, {channels}, '
                         f'{k}, {k}) for input {_shape(input)}, got {_shape(channel_filter)}')
    out_h, out_w = output_size(height, stride), output_size(width, stride)
    if tuple(spatial_filter.shape) != (batch, k * k, out_h, out_w):
        raise ValueError(f'ddf: spatial_filter must have shape (B, k*k, Ho, Wo) = ({batch}, {k * k}, '
                         f'{out_h}, {out_w}) for input {_shape(input)} with stride {stride}, got '
                         f'{_shape(spatial_filter)}')


def check_autocast_dtypes(input: Tensor, channel_filter: Tensor, spatial_filter: Tensor, dtype: torch.dtype) -> None:
    """TypeError when, after the autocast casts, a float64 tensor sits next to cast ones.

    Only a float64 tensor can then differ, and the op's own message ("outside autocast") would be wrong.
    Non-floating tensors are left to the op's dtype check.
    """
    tensors = (('input', input), ('channel_filter', channel_filter), ('spatial_filter', spatial_filter))
    if all(t.is_floating_point() for _, t in tensors) and len({t.dtype for _, t in tensors}) > 1:
        raise TypeError(f'ddf: under autocast, float64 tensors keep their dtype (as autocast does) and the '
                        f'others are cast to {dtype}, so input, channel_filter and spatial_filter must be '
                        'all float64 or none, got ' + ', '.join(f'{n} {t.dtype}' for n, t in tensors))
