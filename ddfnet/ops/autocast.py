"""The DDF op's autocast rule, applied by its autocast kernel and, under torch.func, before its Function.

Under autocast for the input's device type (CUDA or CPU) the floating tensors except float64 ones are cast
to the autocast dtype, as autocast itself does, and the op runs in that dtype, accumulating in float32.
The original release cast float16 to float32 without a word; outside autocast the three tensors must share
one dtype instead.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_autocast_dtypes


def autocast_inputs(input: Tensor, channel_filter: Tensor, spatial_filter: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The three tensors as the op computes with them under the autocast state of the moment."""
    device_type = input.device.type
    if device_type not in ('cuda', 'cpu') or not torch.is_autocast_enabled(device_type):
        return input, channel_filter, spatial_filter
    dtype = torch.get_autocast_dtype(device_type)
    input, channel_filter, spatial_filter = (
        t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
        for t in (input, channel_filter, spatial_filter))
    check_autocast_dtypes(input, channel_filter, spatial_filter, dtype)
    return input, channel_filter, spatial_filter
