"""DDF-ResNets: timm ResNets whose Bottleneck 3x3 conv is a DDFPack in every block.

The architecture of the DDF paper (Zhou et al., CVPR 2021, Tables 4-5) and of the original release's
``models/ddf_resnet.py`` (github.com/theFoxofSky/ddfnet).

Stem, 1x1 convs, downsampling and head are timm's ResNet unchanged, so module names match the original
release (a timm 0.4.5 fork) and its checkpoints load strictly, e.g.::

    timm.create_model('ddf_mul_resnet50', pretrained=True, pretrained_cfg_overlay=dict(file='ddf_mul_r50.pth'))
"""
from __future__ import annotations

import math
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet

from ..layers import DDFBranchPack, DDFPack
from ..layers.ddf_branch import BRANCHES
from .builder import build_resnet

__all__ = ['DDFBottleneck']


class DDFBottleneck(Bottleneck):
    """timm's Bottleneck with ``conv2`` replaced by a :class:`~ddfnet.layers.DDFPack`.

    Extra arguments (pass them through ``block_args``): ``se_ratio`` of the channel branch,
    ``kernel_combine`` ('mul' or 'add') and, for the paper's ablations, ``branch``: 'both' (DDF),
    'spatial' or 'channel' (a :class:`~ddfnet.layers.DDFBranchPack` with only that branch).
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None, cardinality: int = 1,
                 base_width: int = 64, reduce_first: int = 1, dilation: int = 1, first_dilation=None,
                 aa_layer=None, se_ratio: float = 0.2, kernel_combine: str = 'mul', branch: str = 'both',
                 **kwargs: Any):
        if reduce_first != 1:
            raise ValueError('DDFBottleneck needs reduce_first=1: DDF keeps the channel count')
        if branch not in ('both', *BRANCHES):
            raise ValueError(f"DDFBottleneck: branch must be 'both', 'spatial' or 'channel', got {branch!r}")
        if branch != 'both' and kernel_combine != 'mul':
            raise ValueError(f"DDFBottleneck: a single branch is the 'mul' op with the other filter fixed to ones; "
                             f'kernel_combine={kernel_combine!r} has nothing to combine')
        super().__init__(inplanes, planes, stride=stride, downsample=downsample, cardinality=cardinality,
                         base_width=base_width, reduce_first=reduce_first, dilation=dilation,
                         first_dilation=first_dilation, aa_layer=aa_layer, **kwargs)
        width = int(math.floor(planes * (base_width / 64)) * cardinality)
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)
        common = dict(kernel_size=3, stride=1 if use_aa else stride, dilation=first_dilation, se_ratio=se_ratio,
                      device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        if branch == 'both':
            self.conv2 = DDFPack(width, kernel_combine=kernel_combine, **common)
        else:  # the absent filter is ones under 'mul', so kernel_combine has nothing to combine
            self.conv2 = DDFBranchPack(width, branch=branch, **common)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD, 'first_conv': 'conv1', 'classifier': 'fc',
        'paper_ids': 'arXiv:2104.14107', 'paper_name': 'Decoupled Dynamic Filter Networks',
        'origin_url': 'https://github.com/theFoxofSky/ddfnet', 'license': 'mit', **kwargs,
    }


_RELEASED = 'Released by the DDF authors (Google Drive); load a local copy with pretrained_cfg_overlay=dict(file=...).'

default_cfgs = generate_default_cfgs({
    'ddf_resnet26.untrained': _cfg(notes='No released weights.'),
    'ddf_resnet50.in1k': _cfg(notes=_RELEASED + ' Same weights as ddf_mul_resnet50. Top-1 79.1.'),
    'ddf_resnet101.in1k': _cfg(notes=_RELEASED + ' Same weights as ddf_mul_resnet101. Top-1 80.5.'),
    'ddf_resnet152.untrained': _cfg(notes='No released weights.'),
    'ddf_mul_resnet50.in1k': _cfg(notes=_RELEASED + ' Top-1 79.1.'),
    'ddf_mul_resnet101.in1k': _cfg(notes=_RELEASED + ' Top-1 80.5.'),
    'ddf_mul_resnet152.untrained': _cfg(notes='No released weights.'),
    'ddf_add_resnet50.in1k': _cfg(notes=_RELEASED + ' Top-1 78.8.'),
    'ddf_add_resnet101.in1k': _cfg(notes=_RELEASED + ' Top-1 79.9.'),
    'ddf_add_resnet152.untrained': _cfg(notes='No released weights.'),
    'ddf_spatial_resnet50.untrained': _cfg(notes='Ablation, spatial branch only. No released weights; '
                                                 'paper Table 3: 74.4 top-1.'),
    'ddf_channel_resnet50.untrained': _cfg(notes='Ablation, channel branch only. No released weights; '
                                                 'paper Table 3: 78.7 top-1.'),
})


def _args(layers: tuple[int, ...], kernel_combine: str, kwargs: dict[str, Any],
          branch: str = 'both') -> dict[str, Any]:
    # Caller kwargs override the variant's (timm's convention); caller block_args extend and override
    # ours (e.g. se_ratio) rather than replacing them and silently dropping kernel_combine.
    block_args = {'kernel_combine': kernel_combine, 'branch': branch, **(kwargs.pop('block_args', None) or {})}
    return {'block': DDFBottleneck, 'layers': layers, **kwargs, 'block_args': block_args}


@register_model
def ddf_resnet26(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-26 ('mul'): Bottleneck layers (2, 2, 2, 2)."""
    return build_resnet('ddf_resnet26', pretrained, **_args((2, 2, 2, 2), 'mul', kwargs))


@register_model
def ddf_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-50 ('mul'), the paper's main model; same architecture as ddf_mul_resnet50."""
    return build_resnet('ddf_resnet50', pretrained, **_args((3, 4, 6, 3), 'mul', kwargs))


@register_model
def ddf_resnet101(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-101 ('mul'); same architecture as ddf_mul_resnet101."""
    return build_resnet('ddf_resnet101', pretrained, **_args((3, 4, 23, 3), 'mul', kwargs))


@register_model
def ddf_resnet152(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-152 ('mul'); same architecture as ddf_mul_resnet152."""
    return build_resnet('ddf_resnet152', pretrained, **_args((3, 8, 36, 3), 'mul', kwargs))


@register_model
def ddf_mul_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-50 with 'mul' filter combination (original release name)."""
    return build_resnet('ddf_mul_resnet50', pretrained, **_args((3, 4, 6, 3), 'mul', kwargs))


@register_model
def ddf_mul_resnet101(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-101 with 'mul' filter combination (original release name)."""
    return build_resnet('ddf_mul_resnet101', pretrained, **_args((3, 4, 23, 3), 'mul', kwargs))


@register_model
def ddf_mul_resnet152(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-152 with 'mul' filter combination (original release name)."""
    return build_resnet('ddf_mul_resnet152', pretrained, **_args((3, 8, 36, 3), 'mul', kwargs))


@register_model
def ddf_add_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-50 with 'add' filter combination (original release name)."""
    return build_resnet('ddf_add_resnet50', pretrained, **_args((3, 4, 6, 3), 'add', kwargs))


@register_model
def ddf_add_resnet101(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-101 with 'add' filter combination (original release name)."""
    return build_resnet('ddf_add_resnet101', pretrained, **_args((3, 4, 23, 3), 'add', kwargs))


@register_model
def ddf_add_resnet152(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-152 with 'add' filter combination (original release name)."""
    return build_resnet('ddf_add_resnet152', pretrained, **_args((3, 8, 36, 3), 'add', kwargs))


@register_model
def ddf_spatial_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-50 ablation with the spatial branch only (channel filter fixed to ones)."""
    return build_resnet('ddf_spatial_resnet50', pretrained, **_args((3, 4, 6, 3), 'mul', kwargs, 'spatial'))


@register_model
def ddf_channel_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """DDF-ResNet-50 ablation with the channel branch only (spatial filter fixed to ones)."""
    return build_resnet('ddf_channel_resnet50', pretrained, **_args((3, 4, 6, 3), 'mul', kwargs, 'channel'))
