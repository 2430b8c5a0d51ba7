"""The DDF operation as a PyTorch custom operator.

Two operators live in the ``ddfnet`` namespace:

* ``torch.ops.ddfnet.ddf(input, channel_filter, spatial_filter, kernel_size, dilation, stride,
  kernel_combine) -> Tensor``
* ``torch.ops.ddfnet.ddf_backward(grad_output, input, channel_filter, spatial_filter, kernel_size,
  dilation, stride, kernel_combine) -> (grad_input, grad_channel_filter, grad_spatial_filter)``

Both have fake (meta) implementations, and the forward has a ``register_autograd`` formula that calls
the backward operator, so ``torch.library.opcheck`` passes and ``torch.compile(fullgraph=True)`` traces
through them without graph breaks.

Implementations. The schemas are declared once, in C++ (``csrc/ddf.cpp``), and the native CPU and
CUDA kernels register there; this module adds the fake kernels, the autograd formula, the FLOP formulas
and the autocast rule. When the extension cannot be loaded or built (see :mod:`ddfnet.ops._native`), or
``DDFNET_FORCE_REFERENCE=1`` is set, the same schemas are defined here instead. Any device without a
native kernel runs the pure-PyTorch reference in :mod:`ddfnet.ops.reference` and says so once with a
:class:`DDFSlowPathWarning`; :func:`implementation` tells which one a device type gets.

Autocast rule. :func:`ddf` (the public wrapper) follows autocast: if autocast is enabled for the
device type of ``input`` (CUDA or CPU), the three tensors are cast to the autocast dtype (float64 ones
excepted, as autocast does) and the op runs in that dtype, accumulating in float32; the output has the
autocast dtype. Outside autocast the three
tensors must share one dtype. (The original release silently cast float16 to float32; we do not.)
Calling ``torch.ops.ddfnet.ddf`` directly bypasses the autocast rule.
"""

import warnings

import torch
from torch import Tensor
from torch.utils import flop_counter

from . import _native
from .reference import ddf_backward_reference, ddf_forward_reference, new_output, output_size

__all__ = ['ddf', 'implementation', 'native_device_types', 'DDFSlowPathWarning', 'KERNEL_COMBINES']

KERNEL_COMBINES = ('mul', 'add')
_FLOATING = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class DDFSlowPathWarning(UserWarning):
    """Issued once per device type when the DDF op falls back to the pure-PyTorch reference implementation."""


_EXTENSION, _NO_EXTENSION_REASON = _native.load()
_warned: set[str] = set()

# The schemas of csrc/ddf.cpp, for the pure-Python fallback only; a test checks they match the C++ ones.
SCHEMAS = {
    'ddf': 'ddf(Tensor input, Tensor channel_filter, Tensor spatial_filter, int kernel_size, int dilation, '
           'int stride, str kernel_combine) -> Tensor',
    'ddf_backward': 'ddf_backward(Tensor grad_output, Tensor input, Tensor channel_filter, '
                    'Tensor spatial_filter, int kernel_size, int dilation, int stride, str kernel_combine) '
                    '-> (Tensor, Tensor, Tensor)',
}
if _EXTENSION is None:
    _def_lib = torch.library.Library('ddfnet', 'DEF')  # module-level: registrations live as long as it
    for _schema in SCHEMAS.values():
        _def_lib.define(_schema)


def native_device_types() -> tuple[str, ...]:
    """Device types with a native kernel in this process ('cpu', and 'cuda' for a CUDA build)."""
    if _EXTENSION is None:
        return ()
    return ('cpu', 'cuda') if _EXTENSION.with_cuda else ('cpu',)


def implementation(device_type: str) -> str:
    """'native' or 'reference': which DDF implementation runs on ``device_type``."""
    return 'native' if device_type in native_device_types() else 'reference'


def _warn_slow_path(device_type: str) -> None:
    if device_type in _warned:
        return
    _warned.add(device_type)
    if _EXTENSION is None:
        why = _NO_EXTENSION_REASON
    else:
        why = f'the native kernels were built for {", ".join(native_device_types())} only'
    warnings.warn(f'ddfnet: no native DDF kernel for device type {device_type!r} ({why}); using the '
                  'pure-PyTorch reference implementation (correct, but slower).',
                  DDFSlowPathWarning, stacklevel=3)


def _shape(t: Tensor) -> str:
    return '(' + ', '.join(str(s) for s in t.shape) + ')'


def _check_arg_types(input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                     kernel_combine) -> None:
    # The dispatcher's own message for a wrong Python type does not name our argument, so check first.
    for name, t in (('input', input), ('channel_filter', channel_filter), ('spatial_filter', spatial_filter)):
        if not isinstance(t, Tensor):
            raise TypeError(f'ddf: {name} must be a Tensor, got {type(t).__name__}')
    for name, value in (('kernel_size', kernel_size), ('dilation', dilation), ('stride', stride)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f'ddf: {name} must be an int, got {type(value).__name__}')
    if not isinstance(kernel_combine, str):
        raise TypeError(f"ddf: kernel_combine must be 'mul' or 'add', got {kernel_combine!r}")


def check_ddf_args(input: Tensor, channel_filter: Tensor, spatial_filter: Tensor, kernel_size: int,
                   dilation: int, stride: int, kernel_combine: str) -> None:
    """Validate the op's arguments; raise ValueError/TypeError naming the argument and expected shape.

    Python types are the schema's business (and :func:`ddf` checks them with clearer messages), so the
    op bodies and fake kernels that call this do not check them again.
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


# Devices without a native kernel (all of them without the extension) get the reference, through the
# CompositeExplicitAutograd key: backend kernels registered in C++ take precedence over it.
_impl_lib = torch.library.Library('ddfnet', 'IMPL')


def _ddf_reference_impl(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine):
    check_ddf_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine)
    _warn_slow_path(input.device.type)
    return ddf_forward_reference(input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                                 kernel_combine)


def _ddf_backward_reference_impl(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation,
                                 stride, kernel_combine):
    _warn_slow_path(input.device.type)
    return ddf_backward_reference(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation,
                                  stride, kernel_combine)


_impl_lib.impl('ddf', _ddf_reference_impl, 'CompositeExplicitAutograd')
_impl_lib.impl('ddf_backward', _ddf_backward_reference_impl, 'CompositeExplicitAutograd')


@torch.library.register_fake('ddfnet::ddf')
def _ddf_fake(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine):
    check_ddf_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine)
    return new_output(input, output_size(input.shape[2], stride), output_size(input.shape[3], stride),
                      input.dtype)


@torch.library.register_fake('ddfnet::ddf_backward')
def _ddf_backward_fake(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                       kernel_combine):
    return torch.empty_like(input), torch.empty_like(channel_filter), torch.empty_like(spatial_filter)


def _setup_context(ctx, inputs, output):
    input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine = inputs
    ctx.save_for_backward(input, channel_filter, spatial_filter)
    ctx.args = (kernel_size, dilation, stride, kernel_combine)


def _backward(ctx, grad_output):
    input, channel_filter, spatial_filter = ctx.saved_tensors
    grads = torch.ops.ddfnet.ddf_backward(grad_output, input, channel_filter, spatial_filter, *ctx.args)
    return (*grads, None, None, None, None)


torch.library.register_autograd('ddfnet::ddf', _backward, setup_context=_setup_context)


def _register_flop_formula(op):
    def register(formula):
        wrapped = flop_counter.register_flop_formula(op)(formula)
        # torch 2.4 files the formula under the op's overloads while FlopCounterMode looks it up by the
        # overload packet; file it under the packet too so the op is counted on every supported torch.
        flop_counter.flop_registry.setdefault(op, wrapped)
        return wrapped
    return register


@_register_flop_formula(torch.ops.ddfnet.ddf)
def _ddf_flops(input_shape, channel_filter_shape, spatial_filter_shape, kernel_size, dilation, stride,
               kernel_combine, out_shape=None, **kwargs) -> int:
    # Per output element and tap: one op to combine the two filters, one multiply, one add = 3 FLOPs
    # (1.5 MACs). Counting only the multiply-add (as SPEC §3's "0.012 GMACs" does) would give 2 FLOPs.
    batch, channels = input_shape[:2]
    return 3 * batch * channels * out_shape[2] * out_shape[3] * kernel_size * kernel_size


@_register_flop_formula(torch.ops.ddfnet.ddf_backward)
def _ddf_backward_flops(grad_output_shape, input_shape, *args, out_shape=None, **kwargs) -> int:
    # Three gradients, each one combine + one multiply-add per output element and tap.
    kernel_size = args[2]
    batch, channels, out_h, out_w = grad_output_shape
    return 3 * 3 * batch * channels * out_h * out_w * kernel_size * kernel_size


def ddf(input: Tensor, channel_filter: Tensor, spatial_filter: Tensor, kernel_size: int = 3,
        dilation: int = 1, stride: int = 1, kernel_combine: str = 'mul') -> Tensor:
    """Decoupled dynamic filtering (SPEC §1).

    ``out[b, c, y, x] = sum_{i,j} input[b, c, y*stride + (i - k//2)*dilation, x*stride + (j - k//2)*dilation]
    * F[b, c, i, j, y, x]`` with zero padding, where ``F = channel_filter[b, c, i, j] (*|+)
    spatial_filter[b, i*k + j, y, x]`` for ``kernel_combine`` 'mul' or 'add'.

    Args:
        input: (B, C, H, W) features.
        channel_filter: (B, C, k, k) per-sample, per-channel filter.
        spatial_filter: (B, k*k, Ho, Wo) per-pixel filter, Ho = (H - 1) // stride + 1 (same for Wo).
        kernel_size: odd k >= 1. dilation, stride: >= 1. kernel_combine: 'mul' or 'add'.

    Returns:
        (B, C, Ho, Wo) in the inputs' dtype (the autocast dtype under autocast) and the input's memory
        format. Differentiable w.r.t. all three tensors. Argument order matches the original release.
        An empty batch (B = 0) gives an empty output; non-contiguous inputs are fine.

    Raises:
        TypeError: a tensor argument is not a Tensor or not float64/32/16/bfloat16; kernel_size,
            dilation or stride is not an int; the three tensors' dtypes differ (outside autocast).
        ValueError: a tensor is not 4-D; channel_filter is not (B, C, k, k) or spatial_filter not
            (B, k*k, Ho, Wo) for the input (the message gives the expected shape); kernel_size is even or
            < 1; dilation or stride < 1; kernel_combine is not 'mul'/'add'; the tensors are on different
            devices.
    """
    _check_arg_types(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine)
    device_type = input.device.type
    if device_type in ('cuda', 'cpu') and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        # Like autocast's own casts: floating tensors except float64 ones.
        input, channel_filter, spatial_filter = (
            t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
            for t in (input, channel_filter, spatial_filter))
    if torch.onnx.is_in_onnx_export():
        # Under a plain torch.onnx.export (either exporter) trace standard operators, not the custom op, so
        # the graph runs in any ONNX runtime; ddfnet.export_onnx keeps the op and translates it itself
        # (fewer nodes, faster). See ddfnet/export/onnx.py. torch.compile folds this check to False.
        from ..export import onnx as onnx_export
        if not onnx_export.translating_the_op():
            return onnx_export.ddf_standard_ops(input, channel_filter, spatial_filter, kernel_size, dilation,
                                                stride, kernel_combine)
    return torch.ops.ddfnet.ddf(input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                                kernel_combine)
