"""Autograd of the DDF op: reverse mode (any order), forward mode and vmap, for both operators.

The op is linear in the input and in the combined filter F, and F = cf * sf ('mul') or cf + sf ('add'),
so every derivative of ddf and ddf_backward is again a ddf / ddf_backward call with one tensor replaced
by a tangent (or a zero filter). Writing them that way makes them hold for the native CPU/CUDA kernels
and the reference alike, and makes them differentiable in turn (third order and up).

torch.library.register_autograd is not used: the autograd.Function it generates has no forward-mode
rule and no setup_context, so forward-mode AD / torch.func.jvp silently lose the tangent (torch 2.14
takes its no-grad path for dual tensors) and torch.func.grad raises. The two Functions below have
both, and an explicit vmap rule. Under torch.func transforms an autograd.Function must be applied
before the dispatcher (functorch handles it level by level), so every call here, and :func:`ddfnet.ddf`,
goes through :func:`call_ddf` / :func:`call_ddf_backward`; the Autograd-key kernels that
:mod:`ddfnet.ops.registrations` registers (:func:`autograd_kernels`) serve plain autograd.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import _torch_internals
from .autocast import autocast_inputs

__all__ = ['call_ddf', 'call_ddf_backward', 'autograd_kernels', 'operator_vmap_rules']


def call_ddf(*args) -> Tensor:
    """``torch.ops.ddfnet.ddf(*args)``, differentiable in every autograd mode and torch.func transform."""
    if _torch_internals.under_torch_func():
        # The Function is applied above the dispatcher, where the op's autocast kernel would cast only the
        # inner call: cast here, so that it saves (and differentiates) the tensors the op computes with.
        return _DDFFunction.apply(*autocast_inputs(*args[:3]), *args[3:])
    return torch.ops.ddfnet.ddf(*args)


def call_ddf_backward(*args) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.ddfnet.ddf_backward(*args)``, differentiable like :func:`call_ddf`."""
    if _torch_internals.under_torch_func():
        return _DDFBackwardFunction.apply(*args)
    return torch.ops.ddfnet.ddf_backward(*args)


def _forward_call(op, call, args):
    # The Functions' forward. Plain autograd runs it with gradients of both modes disabled: straight to
    # the backend kernel (what the Autograd kernel would do, minus a dispatcher round trip, ~20 us). A
    # torch.func transform runs it one level down, where the next transform must see the call.
    if _torch_internals.under_torch_func():
        return call(*args)
    with _torch_internals.below_autograd():
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
    terms = [None if d_input is None else call_ddf(d_input, channel_filter, spatial_filter, *args)]
    if args[3] == 'mul':
        terms += [None if d_channel is None else call_ddf(input, d_channel, spatial_filter, *args),
                  None if d_spatial is None else call_ddf(input, channel_filter, d_spatial, *args)]
    elif d_channel is not None or d_spatial is not None:
        terms.append(call_ddf(input, _or_zeros(d_channel, channel_filter), _or_zeros(d_spatial, spatial_filter),
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
        return call_ddf_backward(grad_output, x, cf, sf, *args)

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
        return _forward_call(torch.ops.ddfnet.ddf.default, call_ddf, args)

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
        grads = call_ddf_backward(grad_output, *ctx.saved_tensors, *ctx.args)
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
        return _forward_call(torch.ops.ddfnet.ddf_backward.default, call_ddf_backward, args)

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
        from_grad = (None, None, None) if d_grad_output is None else call_ddf_backward(
            d_grad_output, input, channel_filter, spatial_filter, *ctx.args)
        rest = _ddf_backward_directional(grad_output, input, channel_filter, spatial_filter, d_input, d_channel,
                                         d_spatial, ctx.args)
        return tuple(_or_zeros(_total((a, b)), like) for a, b, like in
                     zip(from_grad, rest, (input, channel_filter, spatial_filter)))


def _autograd_kernel(op, function):
    """The Autograd-key kernel of ``op``: ``function.apply`` when gradients of either mode may be needed,
    else straight to the backend kernel (no autograd.Function overhead at inference)."""
    def kernel(keyset, *args):
        if ((torch.is_grad_enabled() and _torch_internals.any_requires_grad(*args))
                or _torch_internals.forward_ad_enabled()):
            if _torch_internals.under_torch_func():  # a Function cannot start inside the dispatcher under torch.func
                raise RuntimeError(f'{op} was called directly under a torch.func transform; call ddfnet.ddf '
                                   '(or ddfnet.ops.ddf) instead, which supports torch.func.grad/jvp/vmap')
            return function.apply(*args)
        with _torch_internals.below_autograd():
            return op.redispatch(_torch_internals.after_autograd(keyset), *args)
    return kernel


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


def _vmap_rules(ddf_call, ddf_backward_call):
    """vmap rules for ddf and ddf_backward that fold the vmapped dimension into the batch and make one call
    (to ``ddf_call`` / ``ddf_backward_call``), not torch's loop over the slices."""
    def ddf_rule(info, in_dims, input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                 kernel_combine):
        folded = _fold_vmap_dim(info, in_dims[:3], (input, channel_filter, spatial_filter))
        return _unfold(info, ddf_call(*folded, kernel_size, dilation, stride, kernel_combine)), 0

    def ddf_backward_rule(info, in_dims, grad_output, input, channel_filter, spatial_filter, kernel_size, dilation,
                          stride, kernel_combine):
        folded = _fold_vmap_dim(info, in_dims[:4], (grad_output, input, channel_filter, spatial_filter))
        grads = ddf_backward_call(*folded, kernel_size, dilation, stride, kernel_combine)
        return tuple(_unfold(info, g) for g in grads), (0, 0, 0)
    return ddf_rule, ddf_backward_rule


# The Functions' rules run one transform level down, so their calls go through call_ddf* again (and
# stay differentiable). The operators' own rules (registered by ddfnet.ops.registrations) serve
# torch.ops.ddfnet.* called directly under vmap; those run inside the dispatcher, where only the plain
# operators can be called.
_DDFFunction.vmap, _DDFBackwardFunction.vmap = (staticmethod(rule) for rule in _vmap_rules(call_ddf, call_ddf_backward))


def autograd_kernels() -> dict[str, Callable]:
    """The Autograd-key kernels of ``ddfnet::ddf`` and ``ddfnet::ddf_backward``, by operator name."""
    return {'ddf': _autograd_kernel(torch.ops.ddfnet.ddf.default, _DDFFunction),
            'ddf_backward': _autograd_kernel(torch.ops.ddfnet.ddf_backward.default, _DDFBackwardFunction)}


def operator_vmap_rules() -> dict[str, Callable]:
    """The vmap rules of the two operators themselves, by operator name (see the Functions' rules above)."""
    return dict(zip(('ddf', 'ddf_backward'), _vmap_rules(torch.ops.ddfnet.ddf, torch.ops.ddfnet.ddf_backward)))
