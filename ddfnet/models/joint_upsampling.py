"""Guided (joint) depth upsampling with DDF-Up: the network of the DDF paper's NYU Depth v2 experiment
(Zhou et al., CVPR 2021), and the bilinear baseline.

The DDF paper follows PAC's joint-upsampling network and protocol (Su et al., CVPR 2019): a target branch
(3 convs 5x5, 32 channels) on the low-resolution depth, a guide branch (3 convs 5x5) on the high-resolution
RGB image ending in 16 channels per x2 step, log2(scale) x2 upsampling steps, each guided by its 16-channel
slice of the guide features, then 2 convs 5x5. PAC upsamples with pixel-adaptive transposed convs; here
each step is a guided :class:`~ddfnet.layers.DDFUpPack` (``joint_channels=16``), whose spatial filters
come from the guide slice brought to the step's input resolution.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch import Tensor, nn

from ..layers import DDFUpPack

__all__ = ['DDFUpJointUpsamplingNet', 'BilinearJointUpsampling', 'SCALE_FACTORS']

SCALE_FACTORS = (2, 4, 8, 16)


def _check_inputs(name: str, target_low: Tensor, guide: Tensor, channels: int, guide_channels: int,
                  scale_factor: int) -> None:
    """A one-line ValueError unless ``target_low`` is (B, channels, h, w) and ``guide`` (B, guide_channels,
    h * scale_factor, w * scale_factor)."""
    if target_low.dim() != 4 or target_low.shape[1] != channels:
        got = '(' + ', '.join([str(n) for n in target_low.shape]) + ')'  # tuple(Size) does not script
        raise ValueError(f'{name}: the low-resolution input must be (B, {channels}, h, w), got {got}')
    height, width = target_low.shape[2] * scale_factor, target_low.shape[3] * scale_factor
    if guide.dim() != 4 or guide.shape[0] != target_low.shape[0] or guide.shape[1] != guide_channels \
            or guide.shape[2] != height or guide.shape[3] != width:
        got = '(' + ', '.join([str(n) for n in guide.shape]) + ')'
        raise ValueError(f'{name}: at x{scale_factor} the guide must be ({target_low.shape[0]}, {guide_channels}, '
                         f'{height}, {width}) for a {target_low.shape[2]}x{target_low.shape[3]} input, got {got}')


# A leaf for FX (plain symbolic_trace and timm's tracer): the checks compare sizes FX only knows symbolically.
torch.fx.wrap('_check_inputs')
register_notrace_function(_check_inputs)


def _conv_stack(channels: list[int], kernel_size: int) -> nn.Sequential:
    """5x5 convs through ``channels`` with ReLU between them (none after the last: the branches' outputs
    are features or depth, either sign)."""
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
        if i:
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2))
    return nn.Sequential(*layers)


def _check_scale(name: str, scale_factor: int) -> int:
    if scale_factor not in SCALE_FACTORS:
        raise ValueError(f'{name}: scale_factor must be one of {SCALE_FACTORS}, got {scale_factor}')
    return int(math.log2(scale_factor))


class DDFUpJointUpsamplingNet(nn.Module):
    """Low-resolution depth (B, channels, h, w) + RGB guide (B, guide_channels, h*s, w*s) -> depth (B, channels,
    h*s, w*s), s = ``scale_factor`` (2, 4, 8 or 16), in PAC's joint-upsampling frame with DDF-Up steps.

    ``ddf_kwargs`` go to each :class:`~ddfnet.layers.DDFUpPack` (default ``kernel_size=5``, PAC's filter
    size). ``residual=True`` adds the bilinear upsampling of the input to the output, so the network learns
    a correction to bilinear (not in PAC's network: it trains much faster on small data sets).
    """

    def __init__(self, scale_factor: int, channels: int = 1, guide_channels: int = 3, features: int = 32,
                 guide_features_per_step: int = 16, kernel_size: int = 5, residual: bool = False,
                 ddf_kwargs: dict[str, Any] | None = None):
        super().__init__()
        self.name = type(self).__name__  # for error messages: type(self) does not script
        steps = _check_scale(self.name, scale_factor)
        if min(channels, guide_channels, features, guide_features_per_step) < 1:
            raise ValueError(f'{self.name}: channel counts must be >= 1')
        self.scale_factor = scale_factor
        self.channels = channels
        self.guide_channels = guide_channels
        self.guide_features_per_step = guide_features_per_step
        self.residual = residual
        self.target_branch = _conv_stack([channels, features, features, features], kernel_size)
        self.guide_branch = _conv_stack([guide_channels, features, features, guide_features_per_step * steps],
                                        kernel_size)
        self.upsample_steps = nn.ModuleList([
            DDFUpPack(features, scale_factor=2, joint_channels=guide_features_per_step,
                      **{'kernel_size': 5, **(ddf_kwargs or {})}) for _ in range(steps)])
        # Step i runs at (h * 2**i, w * 2**i): the guide features are average-pooled by scale / 2**i to it.
        self.guide_pools = [scale_factor // 2 ** i for i in range(steps)]
        self.final_branch = _conv_stack([features, features, channels], kernel_size)

    def forward(self, target_low: Tensor, guide: Tensor) -> Tensor:
        _check_inputs(self.name, target_low, guide, self.channels, self.guide_channels, self.scale_factor)
        x = self.target_branch(target_low)
        guide_features = self.guide_branch(guide)
        width = self.guide_features_per_step
        for i, step in enumerate(self.upsample_steps):
            pool = self.guide_pools[i]
            guidance = F.avg_pool2d(guide_features[:, i * width:(i + 1) * width], pool, pool)
            x = F.relu(step(x, guidance))
        out = self.final_branch(x)
        if self.residual:
            out = out + F.interpolate(target_low, scale_factor=float(self.scale_factor), mode='bilinear',
                                      align_corners=False)
        return out


class BilinearJointUpsampling(nn.Module):
    """The bilinear baseline with the networks' interface: the guide is checked and otherwise ignored."""

    def __init__(self, scale_factor: int, channels: int = 1, guide_channels: int = 3):
        super().__init__()
        self.name = type(self).__name__
        _check_scale(self.name, scale_factor)
        self.scale_factor = scale_factor
        self.channels = channels
        self.guide_channels = guide_channels

    def forward(self, target_low: Tensor, guide: Tensor) -> Tensor:
        _check_inputs(self.name, target_low, guide, self.channels, self.guide_channels, self.scale_factor)
        return F.interpolate(target_low, scale_factor=float(self.scale_factor), mode='bilinear', align_corners=False)
