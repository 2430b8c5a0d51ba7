"""DDF modules as the original release defines them (``ddf/ddf.py`` of github.com/theFoxofSky/ddfnet):
FilterNorm, DDFPack and the upsampling DDFUpPack.

Module and parameter names match the original release (``spatial_branch.0``, ``channel_branch.1``,
``channel_branch.3``, ``channel_branch.4.std``) so its checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import Tensor, nn
from torch.nn.init import calculate_gain

from ..ops import KERNEL_COMBINES, ddf

__all__ = ['FilterNorm', 'DDFPack', 'DDFUpPack']

_EPS = 1e-10  # added to the std, as in the original release (checkpoints were trained with it)


class FilterNorm(nn.Module):
    """Normalise generated filters: zero mean, unit (unbiased) std over each group of k*k taps.

    ``filter_type='spatial'``: input (B, groups*k*k, H, W); each pixel's k*k values per group (head) are
    normalised and scaled by the fixed ``gain(nonlinearity) / k``; no parameters.
    ``filter_type='channel'``: input (B, groups*k*k, ...) with ``groups = in_channels``; each channel's k*k
    values are normalised, then multiplied elementwise by the learned ``std`` of shape (C*k*k,)
    (initialised ``randn * gain / k``) when ``running_std``, else by ``gain / k``.
    The output has the input's shape.
    """

    def __init__(self, in_channels: int, kernel_size: int, filter_type: str, nonlinearity: str = 'linear',
                 running_std: bool = False, device=None, dtype=None):
        super().__init__()
        if filter_type not in ('spatial', 'channel'):
            raise ValueError(f"FilterNorm: filter_type must be 'spatial' or 'channel', got {filter_type!r}")
        if kernel_size < 2:
            raise ValueError(f'FilterNorm: kernel_size must be >= 2 (the std of one tap is undefined), '
                             f'got {kernel_size}')
        if in_channels < 1:
            raise ValueError(f'FilterNorm: in_channels must be >= 1, got {in_channels}')
        self.in_channels = in_channels
        self.kernel_size = kernel_size
        self.filter_type = filter_type
        self.gain = calculate_gain(nonlinearity) / kernel_size
        self.eps = _EPS  # an attribute: TorchScript cannot read module-level floats
        if running_std:
            self.std = nn.Parameter(torch.randn(in_channels * kernel_size ** 2, device=device, dtype=dtype)
                                    * self.gain)
        else:
            self.register_parameter('std', None)

    def forward(self, x: Tensor) -> Tensor:
        taps = self.kernel_size * self.kernel_size  # int ** int is a float in TorchScript
        # Statistics in at least float32: in float16 the 1e-10 epsilon underflows to 0 and nine equal
        # taps would give 0/0. The filters are k*k values per pixel or channel, so this costs little.
        grouped = x.unflatten(1, (self.in_channels, taps)).to(torch.promote_types(x.dtype, torch.float32))
        # Plain sums rather than mean()/std(): on CPU, PyTorch's std over this short, strided dimension
        # is ~25x slower than sum() (it was 5% of ddf_resnet50's inference time). Same unbiased std.
        centered = grouped - grouped.sum(dim=2, keepdim=True) / taps
        std = (centered.square().sum(dim=2, keepdim=True) / (taps - 1)).sqrt()
        if self.std is None:  # the fixed gain folds into the per-group factor: one full-size multiply
            return (centered * (self.gain / (std + self.eps))).flatten(1, 2).to(x.dtype)
        out = (centered / (std + self.eps)).flatten(1, 2).to(x.dtype)
        # std scales dim 1 whatever the rank (a list, not *-unpacking, so it scripts; a view, so ONNX
        # gets a Reshape rather than the negative Transpose permutation a movedim would export).
        return out * self.std.view([-1] + [1] * (x.dim() - 2))

    def extra_repr(self) -> str:
        return f'{self.in_channels}, kernel_size={self.kernel_size}, filter_type={self.filter_type!r}'


def _init_filter_conv(conv: nn.Conv2d) -> None:
    # timm's ResNet.init_weights applies kaiming_normal_(fan_out, relu) to every nn.Conv2d in the model,
    # these filter-generating convs included, and leaves biases at PyTorch's default. The original
    # release trained its ImageNet models with exactly that, so we initialise the same way here: a
    # standalone DDFPack then starts like one inside a DDF-ResNet, and re-running the model's init is a
    # no-op in distribution. Both branches end in FilterNorm, which removes the filters' scale, so the
    # weight scale matters only relative to the bias.
    nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')


def _channel_branch(in_channels: int, kernel_size: int, se_ratio: float, nonlinearity: str,
                    **factory) -> nn.Sequential:
    mid_channels = int(in_channels * se_ratio)
    if mid_channels < 1:
        raise ValueError(f'se_ratio={se_ratio} leaves no hidden channels for in_channels={in_channels}')
    branch = nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(in_channels, mid_channels, 1, **factory),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, in_channels * kernel_size ** 2, 1, **factory),
        FilterNorm(in_channels, kernel_size, 'channel', nonlinearity, running_std=True, **factory))
    _init_filter_conv(branch[1])
    _init_filter_conv(branch[3])
    return branch


def _check_common(in_channels: int, kernel_size: int, dilation: int, head: int, kernel_combine: str) -> None:
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f'kernel_size must be an odd int >= 3, got {kernel_size}')
    if dilation < 1:
        raise ValueError(f'dilation must be >= 1, got {dilation}')
    if head < 1 or in_channels % head:
        raise ValueError(f'head={head} must be >= 1 and divide in_channels={in_channels}')
    if kernel_combine not in KERNEL_COMBINES:
        raise ValueError(f"kernel_combine must be 'mul' or 'add', got {kernel_combine!r}")


def _ddf_heads(x: Tensor, channel_filter: Tensor, spatial_filter: Tensor, kernel_size: int, dilation: int,
               stride: int, head: int, kernel_combine: str) -> Tensor:
    """Run the op with channels split into ``head`` groups, group g using spatial filter g."""
    k = kernel_size
    # Reshapes that read no sizes (unflatten/flatten with -1): FX traces them with a symbolic batch,
    # torch.export keeps the batch dynamic, and they are views, not copies, where a view exists.
    out = ddf(x.unflatten(1, (head, -1)).flatten(0, 1),
              channel_filter.flatten(1).unflatten(1, (head, -1, k, k)).flatten(0, 1),
              spatial_filter.unflatten(1, (head, k * k)).flatten(0, 1),
              k, dilation, stride, kernel_combine)
    return out.unflatten(0, (-1, head)).flatten(1, 2)


# An FX leaf in timm's tracers (create_feature_extractor, features_only with feature_cls='fx'), like a
# conv: traced through, the filter generation and normalisation make a DDF-ResNet-152 graph of 3166
# nodes instead of 616, 13x slower to trace. It still traces through with plain torch.fx.symbolic_trace.
@register_notrace_module
class DDFPack(nn.Module):
    """Decoupled dynamic filter layer: a drop-in for a depth-wise k x k conv (C -> C channels).

    Spatial branch: 1x1 conv (stride ``stride``) to ``head*k*k`` per-pixel filters + spatial FilterNorm.
    Channel branch: global average pool, SE-style bottleneck (``int(C*se_ratio)`` hidden) to C*k*k
    per-channel filters + channel FilterNorm with learned ``std``. The two are applied by :func:`ddf`.
    Output: (B, C, (H-1)//stride + 1, (W-1)//stride + 1).
    """

    def __init__(self, in_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1,
                 head: int = 1, se_ratio: float = 0.2, nonlinearity: str = 'relu',
                 kernel_combine: str = 'mul', device=None, dtype=None):
        super().__init__()
        self._build(in_channels, kernel_size, stride, dilation, head, se_ratio, nonlinearity, kernel_combine,
                    ('spatial', 'channel'), dict(device=device, dtype=dtype))

    def _build(self, in_channels: int, kernel_size: int, stride: int, dilation: int, head: int, se_ratio: float,
               nonlinearity: str, kernel_combine: str, branches: tuple[str, ...], factory: dict) -> None:
        """Check the arguments and build the named branches (the others are ``None``)."""
        _check_common(in_channels, kernel_size, dilation, head, kernel_combine)
        if stride < 1:
            raise ValueError(f'stride must be >= 1, got {stride}')
        self.in_channels = in_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.head = head
        self.kernel_combine = kernel_combine
        self.spatial_branch = None
        self.channel_branch = None
        if 'spatial' in branches:
            self.spatial_branch = nn.Sequential(
                nn.Conv2d(in_channels, head * kernel_size ** 2, 1, stride=stride, **factory),
                FilterNorm(head, kernel_size, 'spatial', nonlinearity))
            _init_filter_conv(self.spatial_branch[0])
        if 'channel' in branches:
            self.channel_branch = _channel_branch(in_channels, kernel_size, se_ratio, nonlinearity, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return _ddf_heads(x, self.channel_branch(x), self.spatial_branch(x), self.kernel_size,
                          self.dilation, self.stride, self.head, self.kernel_combine)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'dilation={self.dilation}, head={self.head}, kernel_combine={self.kernel_combine!r}')


# An FX leaf (timm's tracers, create_feature_extractor): its guidance checks read sizes FX only knows
# symbolically.
@register_notrace_module
class DDFUpPack(nn.Module):
    """DDF-Up: content-aware x``scale_factor`` upsampling with ``scale_factor**2`` DDF branches.

    Each branch has its own channel branch (from the input) and spatial branch (from the guidance,
    which defaults to the input) and runs the op at stride 1; the ``scale_factor**2`` outputs are
    interleaved by pixel shuffle into (B, C, H*s, W*s). Without separate guidance
    (``joint_channels <= 0``) each spatial branch is a ``dw_kernel_size`` depth-wise conv, a 1x1 conv and
    FilterNorm, as in the original release; with guidance of ``joint_channels`` channels it is the 1x1 conv
    and FilterNorm. The guidance passed to :meth:`forward` must have the input's spatial size.
    """

    def __init__(self, in_channels: int, kernel_size: int = 3, scale_factor: int = 2, dilation: int = 1,
                 head: int = 1, se_ratio: float = 0.2, nonlinearity: str = 'linear', dw_kernel_size: int = 3,
                 joint_channels: int = -1, kernel_combine: str = 'mul', device=None, dtype=None):
        super().__init__()
        _check_common(in_channels, kernel_size, dilation, head, kernel_combine)
        if scale_factor < 1:
            raise ValueError(f'scale_factor must be a positive int, got {scale_factor}')
        if dw_kernel_size < 1 or dw_kernel_size % 2 == 0:
            raise ValueError(f'dw_kernel_size must be a positive odd int, got {dw_kernel_size}')
        factory = dict(device=device, dtype=dtype)
        self.in_channels = in_channels
        self.kernel_size = kernel_size
        self.scale_factor = scale_factor
        self.dilation = dilation
        self.head = head
        self.kernel_combine = kernel_combine
        self.joint_channels = joint_channels if joint_channels > 0 else None
        self.guide_channels = self.joint_channels or in_channels  # an int, for TorchScript
        guide_channels = self.guide_channels
        self.spatial_branch = nn.ModuleList()
        self.channel_branch = nn.ModuleList()
        for _ in range(scale_factor ** 2):
            layers: list[nn.Module] = []
            if self.joint_channels is None and dw_kernel_size > 1:
                layers.append(nn.Conv2d(guide_channels, guide_channels, dw_kernel_size,
                                        padding=dw_kernel_size // 2, groups=guide_channels, **factory))
            layers += [nn.Conv2d(guide_channels, head * kernel_size ** 2, 1, **factory),
                       FilterNorm(head, kernel_size, 'spatial', nonlinearity)]
            for layer in layers:
                if isinstance(layer, nn.Conv2d):
                    _init_filter_conv(layer)
            self.spatial_branch.append(nn.Sequential(*layers))
            self.channel_branch.append(_channel_branch(in_channels, kernel_size, se_ratio, nonlinearity,
                                                       **factory))

    def forward(self, x: Tensor, guidance: Tensor | None = None) -> Tensor:
        if guidance is None:
            if self.joint_channels is not None:
                raise ValueError(f'DDFUpPack was built with joint_channels={self.joint_channels}: '
                                 'pass the guidance tensor')
            guidance = x
        elif guidance.dim() != 4 or guidance.shape[0] != x.shape[0] or guidance.shape[2:] != x.shape[2:] \
                or guidance.shape[1] != self.guide_channels:
            got = '(' + ', '.join([str(n) for n in guidance.shape]) + ')'  # tuple(Size) does not script
            raise ValueError(f'guidance must have shape (B, {self.guide_channels}, H, W) = ({x.shape[0]}, '
                             f'{self.guide_channels}, {x.shape[2]}, {x.shape[3]}), got {got}')
        outs: list[Tensor] = []
        for spatial, channel in zip(self.spatial_branch, self.channel_branch):  # a loop TorchScript unrolls
            outs.append(_ddf_heads(x, channel(x), spatial(guidance), self.kernel_size, self.dilation, 1,
                                   self.head, self.kernel_combine))
        # pixel_shuffle reads channel c*s*s + (dy*s + dx): stack the branches right after the channel dim.
        out = torch.stack(outs, dim=2).flatten(1, 2)
        return F.pixel_shuffle(out, self.scale_factor)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, kernel_size={self.kernel_size}, scale_factor={self.scale_factor}, '
                f'dilation={self.dilation}, head={self.head}, kernel_combine={self.kernel_combine!r}')
