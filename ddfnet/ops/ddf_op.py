"""The DDF op's one entry point, :func:`ddf`, for users and for the layers.

Behind it, each way a model can be run reaches the right form of the op: TorchScript compiles the
operator call itself; eager code, ``torch.jit.trace``, FX, ``torch.compile`` and ``torch.export`` call
``torch.ops.ddfnet.ddf`` (whose autocast, autograd and fake kernels :mod:`ddfnet.ops.registrations`
registers); torch.func transforms apply the op's autograd.Function first (:func:`ddfnet.ops.autograd.call_ddf`);
and a plain ``torch.onnx.export`` traces the standard-operator form of :mod:`ddfnet.ops.decomposition`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import decomposition
from .autograd import call_ddf
from .checks import check_arg_types

__all__ = ['ddf']


def ddf(input: Tensor, channel_filter: Tensor, spatial_filter: Tensor, kernel_size: int = 3,
        dilation: int = 1, stride: int = 1, kernel_combine: str = 'mul') -> Tensor:
    """Decoupled dynamic filtering (Zhou et al., "Decoupled Dynamic Filter Networks", CVPR 2021).

    ``out[b, c, y, x] = sum_{i,j} input[b, c, y*stride + (i - k//2)*dilation, x*stride + (j - k//2)*dilation]
    * F[b, c, i, j, y, x]`` with zero padding, where ``F = channel_filter[b, c, i, j] (*|+)
    spatial_filter[b, i*k + j, y, x]`` for ``kernel_combine`` 'mul' or 'add'.

    Args:
        input: (B, C, H, W) features.
        channel_filter: (B, C, k, k) per-sample, per-channel filter.
        spatial_filter: (B, k*k, Ho, Wo) per-pixel filter, Ho = (H - 1) // stride + 1 (same for Wo).
        kernel_size: odd k >= 1. dilation, stride: >= 1. kernel_combine: 'mul' or 'add'.

    Returns:
        (B, C, Ho, Wo) in the inputs' dtype and the input's memory format. Under autocast for the input's
        device type (CPU or CUDA) the tensors are cast to the autocast dtype (float64 ones excepted, as
        autocast does) and the op runs in it, accumulating in float32; scripted, traced and exported
        models follow the same rule. Differentiable w.r.t. all three tensors to any order (gradients of
        gradients, e.g. a gradient penalty), in forward mode (``torch.func.jvp``,
        ``torch.autograd.forward_ad``) and under ``torch.func.grad`` / ``vmap`` / ``hessian``. Argument
        order matches the original release. An empty batch (B = 0) gives an empty output; non-contiguous
        inputs are fine. Scriptable, and traceable by FX, ``torch.jit.trace``, ``torch.compile``,
        ``torch.export`` and both ONNX exporters.

    Raises:
        TypeError: a tensor argument is not a Tensor or not float64/32/16/bfloat16; kernel_size,
            dilation or stride is not an int; the three tensors' dtypes differ (outside autocast), or
            under autocast some but not all of them are float64.
        ValueError: a tensor is not 4-D; channel_filter is not (B, C, k, k) or spatial_filter not
            (B, k*k, Ho, Wo) for the input (the message gives the expected shape); kernel_size is even or
            < 1; dilation or stride < 1; kernel_combine is not 'mul'/'add'; the tensors are on different
            devices.
    """
    if not torch.jit.is_scripting():  # TorchScript compiles only the operator call below
        check_arg_types(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine)
        if torch.onnx.is_in_onnx_export() and not decomposition.keeping_the_op():
            # A plain torch.onnx.export (either exporter) traces standard operators, so the graph runs in any
            # ONNX runtime; ddfnet.export_onnx keeps the op and translates it itself (fewer nodes, faster).
            # torch.compile folds this check to False.
            return decomposition.ddf_standard_ops(input, channel_filter, spatial_filter, kernel_size, dilation,
                                                  stride, kernel_combine)
        # The autocast rule is applied once: by the op's autocast kernel, or by call_ddf under torch.func.
        return call_ddf(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine)
    return torch.ops.ddfnet.ddf(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine)
