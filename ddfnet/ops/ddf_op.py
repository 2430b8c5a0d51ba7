"""The DDF operation as a PyTorch custom operator.

Two operators live in the ``ddfnet`` namespace:

* ``torch.ops.ddfnet.ddf(input, channel_filter, spatial_filter, kernel_size, dilation, stride,
  kernel_combine) -> Tensor``
* ``torch.ops.ddfnet.ddf_backward(grad_output, input, channel_filter, spatial_filter, kernel_size,
  dilation, stride, kernel_combine) -> (grad_input, grad_channel_filter, grad_spatial_filter)``

Both have fake (meta) implementations and autograd kernels (reverse mode to any order, forward mode,
vmap rules; see the Autograd section below), so ``torch.library.opcheck`` passes and
``torch.compile(fullgraph=True)`` traces through them without graph breaks.

Implementations. The schemas are declared once, in C++ (``csrc/ddf.cpp``), and the native CPU and
CUDA kernels register there; this module adds the fake kernels, the autograd formulas, the FLOP formulas
and the autocast rule. When the extension cannot be loaded or built (see :mod:`ddfnet.ops._native`), or
``DDFNET_FORCE_REFERENCE=1`` is set, the same schemas are defined here instead. Any device without a
native kernel runs the pure-PyTorch reference in :mod:`ddfnet.ops.reference` and says so once with a
:class:`DDFSlowPathWarning`; :func:`implementation` tells which one a device type gets.

Autocast rule. :func:`ddf` (the public wrapper) follows autocast: if autocast is enabled for the
device type of ``input`` (CUDA or CPU), the three tensors are cast to the autocast dtype (float64 ones
excepted, as autocast does) and the op runs in that dtype, accumulating in float32; the output has the
autocast dtype. Outside autocast the three
tensors must share one dtype. (The original release silently cast float16 to float32; we do not.)
The same rule is registered on the op itself (its AutocastCPU/AutocastCUDA kernels, at the end of this
module), so direct ``torch.ops.ddfnet.ddf`` calls (the layers, TorchScript, FX graphs, exported programs)
follow it too.
"""

import warnings

import torch
from torch import Tensor
from torch.autograd import forward_ad
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


# ---------------------------------------------------------------------------------------------------
# Autograd: reverse mode (any order), forward mode and vmap, for both operators.
#
# The op is linear in the input and in the combined filter F, and F = cf * sf ('mul') or cf + sf ('add'),
# so every derivative of ddf and ddf_backward is again a ddf / ddf_backward call with one tensor replaced
# by a tangent (or a zero filter). Writing them that way makes them hold for the native CPU/CUDA kernels
# and the reference alike, and makes them differentiable in turn (third order and up).
#
# torch.library.register_autograd is not used: the autograd.Function it generates has no forward-mode
# rule and no setup_context, so forward-mode AD / torch.func.jvp silently lose the tangent (torch 2.14
# takes its no-grad path for dual tensors) and torch.func.grad raises. The two Functions below have
# both, and an explicit vmap rule. Under torch.func transforms an autograd.Function must be applied
# before the dispatcher (functorch handles it level by level), so every call here, and the public
# ddf(), goes through _call_ddf / _call_ddf_backward; the Autograd-key kernels serve plain autograd.
# ---------------------------------------------------------------------------------------------------

def _functorch_active() -> bool:
    # Under torch.compile the op stays one opaque node; dynamo need not see this check.
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _call_ddf(*args) -> Tensor:
    """``torch.ops.ddfnet.ddf(*args)``, differentiable in every autograd mode and torch.func transform."""
    if _functorch_active():
        # The Function is applied above the dispatcher, where the op's autocast kernel would cast only the
        # inner call: cast here, so that it saves (and differentiates) the tensors the op computes with.
        return _DDFFunction.apply(*_autocast_inputs(*args[:3]), *args[3:])
    return torch.ops.ddfnet.ddf(*args)


def _autocast_inputs(input: Tensor, channel_filter: Tensor, spatial_filter: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The autocast rule: under autocast for ``input``'s device type (CUDA or CPU) the floating tensors except
    float64 ones are cast to the autocast dtype, as autocast itself does; otherwise unchanged."""
    device_type = input.device.type
    if device_type not in ('cuda', 'cpu') or not torch.is_autocast_enabled(device_type):
        return input, channel_filter, spatial_filter
    dtype = torch.get_autocast_dtype(device_type)
    input, channel_filter, spatial_filter = (
        t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
        for t in (input, channel_filter, spatial_filter))
    _check_autocast_dtypes(input, channel_filter, spatial_filter, dtype)
    return input, channel_filter, spatial_filter


def _call_ddf_backward(*args) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.ddfnet.ddf_backward(*args)``, differentiable like :func:`_call_ddf`."""
    if _functorch_active():
        return _DDFBackwardFunction.apply(*args)
    return torch.ops.ddfnet.ddf_backward(*args)


def _forward_call(op, call, args):
    # The Functions' forward. Plain autograd runs it with gradients of both modes disabled: straight to
    # the backend kernel (what the Autograd kernel would do, minus a dispatcher round trip, ~20 us). A
    # torch.func transform runs it one level down, where the next transform must see the call.
    if _functorch_active():
        return call(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _total(terms) -> Tensor | None:
    """Sum of the terms that are not None (None when all are)."""
    present = [t for t in terms if t is not None]
    return sum(present[1:], present[0]) if present else None


def _or_zeros(tangent: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if tangent is None else tangent


def _ddf_directional(input, channel_filter, spatial_filter, d_input, d_channel, d_spatial, args):
    """Derivative of ``ddf(input, channel_filter, spatial_filter)`` along the given tangents (None: zero).

    'mul' is trilinear in the three tensors: one call per tangent. 'add' is bilinear in the input and
    cf + sf: one call for the input's tangent, one for the filters' (a zero tensor for a missing one).
    """
    terms = [None if d_input is None else _call_ddf(d_input, channel_filter, spatial_filter, *args)]
    if args[3] == 'mul':
        terms += [None if d_channel is None else _call_ddf(input, d_channel, spatial_filter, *args),
                  None if d_spatial is None else _call_ddf(input, channel_filter, d_spatial, *args)]
    elif d_channel is not None or d_spatial is not None:
        terms.append(_call_ddf(input, _or_zeros(d_channel, channel_filter), _or_zeros(d_spatial, spatial_filter),
                               *args))
    return _total(terms)


def _ddf_backward_directional(grad_output, input, channel_filter, spatial_filter, d_input, d_channel, d_spatial,
                              args, needed=(True, True, True)):
    """Derivative of ``ddf_backward``'s three gradients along (d_input, d_channel, d_spatial), grad_output fixed.

    This is the Hessian of <grad_output, ddf(...)> w.r.t. (input, cf, sf) applied to the tangent, so it is
    both ddf_backward's forward-mode rule (in those arguments) and its reverse-mode rule (with the incoming
    gradients as the tangent). Each gradient is linear in the tensors it depends on and does not depend on
    its own argument, so its derivative replaces one of the *other* tensors at a time ('mul'); for 'add',
    grad_input depends on cf + sf only, and the filter gradients do not depend on the filters at all.
    ``needed`` skips calls whose results are not wanted. Missing results are None.
    """
    def backward(x, cf, sf):
        return _call_ddf_backward(grad_output, x, cf, sf, *args)

    need_input, need_channel, need_spatial = needed
    from_input = from_channel = from_spatial = (None, None, None)
    if d_input is not None and (need_channel or need_spatial):
        from_input = backward(d_input, channel_filter, spatial_filter)
    if args[3] == 'mul':
        if d_channel is not None and (need_input or need_spatial):
            from_channel = backward(input, d_channel, spatial_filter)
        if d_spatial is not None and (need_input or need_channel):
            from_spatial = backward(input, channel_filter, d_spatial)
        return (_total((from_channel[0], from_spatial[0])) if need_input else None,
                _total((from_input[1], from_spatial[1])) if need_channel else None,
                _total((from_input[2], from_channel[2])) if need_spatial else None)
    if need_input and (d_channel is not None or d_spatial is not None):
        from_channel = backward(input, _or_zeros(d_channel, channel_filter), _or_zeros(d_spatial, spatial_filter))
    return (from_channel[0] if need_input else None, from_input[1] if need_channel else None,
            from_input[2] if need_spatial else None)


class _DDFFunction(torch.autograd.Function):
    """Autograd of ``ddfnet::ddf``: backward is ``ddf_backward``, the forward-mode rule is directional ddf calls."""

    @staticmethod
    def forward(*args):
        return _forward_call(torch.ops.ddfnet.ddf.default, _call_ddf, args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3])
        ctx.save_for_forward(*inputs[:3])
        ctx.args = inputs[3:]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None:
            return (None,) * 7
        grads = _call_ddf_backward(grad_output, *ctx.saved_tensors, *ctx.args)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None, None, None)

    @staticmethod
    def jvp(ctx, d_input, d_channel, d_spatial, *_):
        input, channel_filter, spatial_filter = ctx.saved_tensors
        # Autograd calls jvp only when some input has a tangent, so this is a tensor.
        return _ddf_directional(input, channel_filter, spatial_filter, d_input, d_channel, d_spatial, ctx.args)


class _DDFBackwardFunction(torch.autograd.Function):
    """Autograd of ``ddfnet::ddf_backward`` (gradients of gradients): see :func:`_ddf_backward_directional`."""

    @staticmethod
    def forward(*args):
        return _forward_call(torch.ops.ddfnet.ddf_backward.default, _call_ddf_backward, args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])
        ctx.save_for_forward(*inputs[:4])
        ctx.args = inputs[4:]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gg_input, gg_channel, gg_spatial):
        grad_output, input, channel_filter, spatial_filter = ctx.saved_tensors
        need_grad_output, *needed = ctx.needs_input_grad[:4]
        # <gg, ddf_backward(g, ...)> is linear in g: its gradient w.r.t. g is ddf's derivative along gg.
        d_grad_output = _ddf_directional(input, channel_filter, spatial_filter, gg_input, gg_channel, gg_spatial,
                                         ctx.args) if need_grad_output else None
        rest = _ddf_backward_directional(grad_output, input, channel_filter, spatial_filter, gg_input, gg_channel,
                                         gg_spatial, ctx.args, tuple(needed))
        return (d_grad_output, *rest, None, None, None, None)

    @staticmethod
    def jvp(ctx, d_grad_output, d_input, d_channel, d_spatial, *_):
        grad_output, input, channel_filter, spatial_filter = ctx.saved_tensors
        # ddf_backward is linear in grad_output: that tangent gives one more call with it in grad_output's place.
        from_grad = (None, None, None) if d_grad_output is None else _call_ddf_backward(
            d_grad_output, input, channel_filter, spatial_filter, *ctx.args)
        rest = _ddf_backward_directional(grad_output, input, channel_filter, spatial_filter, d_input, d_channel,
                                         d_spatial, ctx.args)
        return tuple(_or_zeros(_total((a, b)), like) for a, b, like in
                     zip(from_grad, rest, (input, channel_filter, spatial_filter)))


def _autograd_kernel(op, function):
    """The Autograd-key kernel of ``op``: ``function.apply`` when gradients of either mode may be needed,
    else straight to the backend kernel (no autograd.Function overhead at inference)."""
    def kernel(keyset, *args):
        if ((torch.is_grad_enabled() and torch._C._any_requires_grad(*args))
                or (forward_ad._current_level >= 0 and torch._C._is_fwd_grad_enabled())):
            if _functorch_active():  # an autograd.Function cannot start inside the dispatcher under functorch
                raise RuntimeError(f'{op} was called directly under a torch.func transform; call ddfnet.ddf '
                                   '(or ddfnet.ops.ddf) instead, which supports torch.func.grad/jvp/vmap')
            return function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)
    return kernel


_impl_lib.impl('ddf', _autograd_kernel(torch.ops.ddfnet.ddf.default, _DDFFunction), 'Autograd', with_keyset=True)
_impl_lib.impl('ddf_backward', _autograd_kernel(torch.ops.ddfnet.ddf_backward.default, _DDFBackwardFunction),
               'Autograd', with_keyset=True)


def _fold_vmap_dim(info, in_dims, tensors):
    """Fold vmap's dimension into the batch dimension: (N, B, ...) -> (N*B, ...), broadcasting unbatched
    tensors. The op treats samples independently, so one call on the folded batch is the batched op."""
    folded = []
    for t, dim in zip(tensors, in_dims):
        t = t.expand(info.batch_size, *t.shape) if dim is None else t.movedim(dim, 0)
        if t.dim() != 5:
            raise ValueError(f'ddf: under vmap each tensor must be 4-D per vmapped slice, got {t.dim() - 1}-D')
        folded.append(t.flatten(0, 1))
    return folded


def _unfold(info, t: Tensor) -> Tensor:
    return t.unflatten(0, (info.batch_size, -1))


def _vmap_rules(call_ddf, call_ddf_backward):
    """vmap rules for ddf and ddf_backward that fold the vmapped dimension into the batch and make one call."""
    def ddf_rule(info, in_dims, input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                 kernel_combine):
        folded = _fold_vmap_dim(info, in_dims[:3], (input, channel_filter, spatial_filter))
        return _unfold(info, call_ddf(*folded, kernel_size, dilation, stride, kernel_combine)), 0

    def ddf_backward_rule(info, in_dims, grad_output, input, channel_filter, spatial_filter, kernel_size, dilation,
                          stride, kernel_combine):
        folded = _fold_vmap_dim(info, in_dims[:4], (grad_output, input, channel_filter, spatial_filter))
        grads = call_ddf_backward(*folded, kernel_size, dilation, stride, kernel_combine)
        return tuple(_unfold(info, g) for g in grads), (0, 0, 0)
    return ddf_rule, ddf_backward_rule


# The Functions' rules run one transform level down, so their calls go through _call_ddf* again (and
# stay differentiable). The operators' own rules serve torch.ops.ddfnet.* called directly under vmap;
# those run inside the dispatcher, where only the plain operators can be called.
_DDFFunction.vmap, _DDFBackwardFunction.vmap = (staticmethod(rule) for rule in _vmap_rules(_call_ddf,
                                                                                          _call_ddf_backward))
for _name, _rule in zip(('ddf', 'ddf_backward'), _vmap_rules(torch.ops.ddfnet.ddf, torch.ops.ddfnet.ddf_backward)):
    torch.library.register_vmap(f'ddfnet::{_name}', _rule)


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


def _check_autocast_dtypes(input: Tensor, channel_filter: Tensor, spatial_filter: Tensor,
                           dtype: torch.dtype) -> None:
    # After the autocast casts only a float64 tensor can differ; the op's own message ("outside
    # autocast") would then be wrong. Non-floating tensors are left to the op's dtype check.
    tensors = (('input', input), ('channel_filter', channel_filter), ('spatial_filter', spatial_filter))
    if all(t.is_floating_point() for _, t in tensors) and len({t.dtype for _, t in tensors}) > 1:
        raise TypeError(f'ddf: under autocast, float64 tensors keep their dtype (as autocast does) and the '
                        f'others are cast to {dtype}, so input, channel_filter and spatial_filter must be '
                        'all float64 or none, got ' + ', '.join(f'{n} {t.dtype}' for n, t in tensors))


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
        format. Differentiable w.r.t. all three tensors to any order (gradients of gradients, e.g. a
        gradient penalty), in forward mode (``torch.func.jvp``, ``torch.autograd.forward_ad``) and under
        ``torch.func.grad`` / ``vmap`` / ``hessian``. Argument order matches the original release.
        An empty batch (B = 0) gives an empty output; non-contiguous inputs are fine.

    Raises:
        TypeError: a tensor argument is not a Tensor or not float64/32/16/bfloat16; kernel_size,
            dilation or stride is not an int; the three tensors' dtypes differ (outside autocast), or
            under autocast some but not all of them are float64.
        ValueError: a tensor is not 4-D; channel_filter is not (B, C, k, k) or spatial_filter not
            (B, k*k, Ho, Wo) for the input (the message gives the expected shape); kernel_size is even or
            < 1; dilation or stride < 1; kernel_combine is not 'mul'/'add'; the tensors are on different
            devices.
    """
    _check_arg_types(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine)
    # The autocast rule is applied once, below: by the op's autocast kernel, or by _call_ddf under torch.func.
    return _run_ddf(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine)


def _run_ddf(input: Tensor, channel_filter: Tensor, spatial_filter: Tensor, kernel_size: int, dilation: int,
             stride: int, kernel_combine: str) -> Tensor:
    """The op, differentiable under torch.func (``_call_ddf``), or its standard-operator form under ONNX export."""
    if torch.onnx.is_in_onnx_export():
        # Under a plain torch.onnx.export (either exporter) trace standard operators, not the custom op, so
        # the graph runs in any ONNX runtime; ddfnet.export_onnx keeps the op and translates it itself
        # (fewer nodes, faster). See ddfnet/export/onnx.py. torch.compile folds this check to False.
        from ..export import onnx as onnx_export
        if not onnx_export.translating_the_op():
            return onnx_export.ddf_standard_ops(input, channel_filter, spatial_filter, kernel_size, dilation,
                                                stride, kernel_combine)
    return _call_ddf(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine)


def call_ddf_op(input: Tensor, channel_filter: Tensor, spatial_filter: Tensor, kernel_size: int, dilation: int,
                stride: int, kernel_combine: str) -> Tensor:
    """The op for the layers: ``torch.ops.ddfnet.ddf`` without :func:`ddf`'s Python type checks (the layers
    pass ints they checked at construction; the op checks the tensors), so it scripts and traces, and
    differentiable under torch.func transforms and exportable to ONNX like :func:`ddf`. The autocast rule is
    the op's own (below), so scripted, traced and exported models follow it too."""
    if not torch.jit.is_scripting():  # TorchScript compiles only the direct call
        return _run_ddf(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine)
    return torch.ops.ddfnet.ddf(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine)


# The autocast rule at the dispatcher, for callers that reach the op without the wrapper: TorchScript,
# FX graphs and exported programs call ``torch.ops.ddfnet.ddf`` directly, and the layers do too (so they
# trace). Without this, such a call under autocast would get mixed dtypes (a conv's float16 output, a
# float32 parameter's product) and raise, or run in float32 where eager runs in the autocast dtype. The
# kernel casts like the wrapper, then redispatches below autocast. torch.library.register_autocast does
# the same but only to a dtype fixed at registration; ours follows the autocast dtype of the moment.
def _register_autocast(device_type: str) -> None:
    key_name = 'Autocast' + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)

    def autocast_ddf(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine):
        input, channel_filter, spatial_filter = _autocast_inputs(input, channel_filter, spatial_filter)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return torch.ops.ddfnet.ddf.default(input, channel_filter, spatial_filter, kernel_size, dilation,
                                                stride, kernel_combine)

    _impl_lib.impl('ddf', lambda _keyset, *args: autocast_ddf(*args), key_name, with_keyset=True)
    # Tracing (torch.compile, torch.export) runs the Python dispatcher, which looks here instead.
    torch.ops.ddfnet.ddf.default.py_impl(key)(autocast_ddf)


for _device_type in ('cpu', 'cuda'):
    _register_autocast(_device_type)
