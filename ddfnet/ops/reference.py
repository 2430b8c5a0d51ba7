"""Pure-PyTorch reference implementation of the DDF operation.

This is the CPU path, the fallback on any device without a native kernel, and the oracle the tests
compare native kernels against. It loops over the k*k taps and, for each tap, touches only the output
pixels whose sampling position falls inside the image, so it never pads the input and never holds more
than a couple of output-sized temporaries at a time (no k*k-times unfold of the activations).

Low-precision inputs (float16/bfloat16) are accumulated in float32 and rounded once at the end;
float64 is accumulated in float64 so gradcheck sees exact arithmetic.
"""
from __future__ import annotations

import torch
from torch import Tensor


def output_size(size: int, stride: int) -> int:
    """Output extent of the DDF op along one axis: the conv formula with 'same' padding."""
    return (size - 1) // stride + 1


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_output(input: Tensor, height: int, width: int, dtype: torch.dtype) -> Tensor:
    """Allocate an uninitialised (B, C, height, width) output in the input's memory format.

    Shared by the real kernels and the fake (meta) kernel so both report identical strides.
    """
    channels_last = input.dim() == 4 and not input.is_contiguous() and input.is_contiguous(
        memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return input.new_empty((input.shape[0], input.shape[1], height, width), dtype=dtype).contiguous(
        memory_format=fmt)


def _valid_range(in_size: int, out_size: int, offset: int, stride: int) -> tuple[int, int]:
    """Output indices o in [lo, hi) whose sample position o*stride + offset lies in [0, in_size)."""
    lo = max(0, -(offset // stride))  # ceil(-offset / stride)
    hi = min(out_size, (in_size - 1 - offset) // stride + 1)
    return lo, hi


def _taps(kernel_size: int, dilation: int, stride: int, in_hw: tuple[int, int], out_hw: tuple[int, int]):
    """Yield (i, j, out_rows, out_cols, in_rows, in_cols) slices for each tap that hits the image."""
    half = kernel_size // 2
    for i in range(kernel_size):
        dy = (i - half) * dilation
        y0, y1 = _valid_range(in_hw[0], out_hw[0], dy, stride)
        if y0 >= y1:
            continue
        for j in range(kernel_size):
            dx = (j - half) * dilation
            x0, x1 = _valid_range(in_hw[1], out_hw[1], dx, stride)
            if x0 >= x1:
                continue
            yield (i, j, slice(y0, y1), slice(x0, x1),
                   slice(y0 * stride + dy, (y1 - 1) * stride + dy + 1, stride),
                   slice(x0 * stride + dx, (x1 - 1) * stride + dx + 1, stride))


def ddf_forward_reference(input: Tensor, channel_filter: Tensor, spatial_filter: Tensor,
                          kernel_size: int, dilation: int, stride: int, kernel_combine: str) -> Tensor:
    """DDF forward (the formula of :func:`ddfnet.ddf`) by an explicit loop over the k*k taps; arguments are
    assumed valid."""
    height, width = input.shape[-2:]
    out_h, out_w = output_size(height, stride), output_size(width, stride)
    acc = accumulation_dtype(input.dtype)
    out = new_output(input, out_h, out_w, acc).zero_()
    channel = channel_filter.to(acc)
    for i, j, oy, ox, iy, ix in _taps(kernel_size, dilation, stride, (height, width), (out_h, out_w)):
        x_tap = input[:, :, iy, ix].to(acc)
        c_tap = channel[:, :, i, j, None, None]                          # (B, C, 1, 1)
        s_tap = spatial_filter[:, None, i * kernel_size + j, oy, ox].to(acc)  # (B, 1, h, w)
        if kernel_combine == 'mul':
            out[:, :, oy, ox].addcmul_(x_tap * c_tap, s_tap)
        else:
            out[:, :, oy, ox].addcmul_(x_tap, c_tap + s_tap)
    return out.to(input.dtype)


def ddf_backward_reference(grad_output: Tensor, input: Tensor, channel_filter: Tensor,
                           spatial_filter: Tensor, kernel_size: int, dilation: int, stride: int,
                           kernel_combine: str) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the DDF op w.r.t. input, channel_filter and spatial_filter (same loop as forward)."""
    height, width = input.shape[-2:]
    out_h, out_w = grad_output.shape[-2:]
    acc = accumulation_dtype(input.dtype)
    grad_out = grad_output.to(acc)
    channel = channel_filter.to(acc)
    grad_input = torch.zeros_like(input, dtype=acc)
    grad_channel = torch.zeros_like(channel_filter, dtype=acc)
    grad_spatial = torch.zeros_like(spatial_filter, dtype=acc)
    for i, j, oy, ox, iy, ix in _taps(kernel_size, dilation, stride, (height, width), (out_h, out_w)):
        tap = i * kernel_size + j
        g = grad_out[:, :, oy, ox]                                       # (B, C, h, w)
        x_tap = input[:, :, iy, ix].to(acc)
        c_tap = channel[:, :, i, j]                                      # (B, C)
        s_tap = spatial_filter[:, tap, oy, ox].to(acc)                   # (B, h, w)
        g_x = g * x_tap
        if kernel_combine == 'mul':
            grad_channel[:, :, i, j] = torch.einsum('bchw,bhw->bc', g_x, s_tap)
            grad_spatial[:, tap, oy, ox] = torch.einsum('bchw,bc->bhw', g_x, c_tap)
            grad_input[:, :, iy, ix].addcmul_(g * c_tap[:, :, None, None], s_tap[:, None])
        else:
            grad_channel[:, :, i, j] = g_x.sum(dim=(2, 3))
            grad_spatial[:, tap, oy, ox] = g_x.sum(dim=1)
            grad_input[:, :, iy, ix].addcmul_(g, c_tap[:, :, None, None] + s_tap[:, None])
    return (grad_input.to(input.dtype), grad_channel.to(channel_filter.dtype),
            grad_spatial.to(spatial_filter.dtype))
