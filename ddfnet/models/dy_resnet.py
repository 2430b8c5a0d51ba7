"""DY-ResNets (Chen et al., CVPR 2020): timm ResNets whose 3x3 convs are :class:`~ddfnet.layers.DynamicConv2d`.

``dy_resnet18``: both 3x3 convs of every BasicBlock dynamic; ``dy_resnet50``: the Bottleneck's 3x3 conv
dynamic. Stem, 1x1 convs, downsampling and head stay static. Train with the temperature schedule
(``train.py`` applies it through its epoch hook; the paper's schedule: 30 -> 1 over the first 10 epochs).
"""
from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model, resnet
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..layers import DynamicConv2d
from .builder import build_resnet

__all__ = ['DyBasicBlock', 'DyBottleneck']


class DyBasicBlock(BasicBlock):
    """timm's BasicBlock with ``conv1`` and ``conv2`` dynamic (same shapes, ``num_kernels`` kernels each)."""

    def __init__(self, *args: Any, num_kernels: int = 4, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.conv1 = DynamicConv2d.from_conv(self.conv1, num_kernels=num_kernels)
        self.conv2 = DynamicConv2d.from_conv(self.conv2, num_kernels=num_kernels)


class DyBottleneck(Bottleneck):
    """timm's Bottleneck with the 3x3 ``conv2`` dynamic (``num_kernels`` kernels)."""

    def __init__(self, *args: Any, num_kernels: int = 4, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.conv2 = DynamicConv2d.from_conv(self.conv2, num_kernels=num_kernels)


# What every DyConv model's default cfg adds to timm's cfg of the static model.
DYCONV_CFG = {'paper_ids': 'arXiv:1912.03458', 'paper_name': 'Dynamic Convolution: Attention over Convolution Kernels',
              'notes': 'No released weights.'}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return resnet._cfg(**DYCONV_CFG, **kwargs)


default_cfgs = generate_default_cfgs({
    'dy_resnet18.untrained': _cfg(),
    'dy_resnet50.untrained': _cfg(),
})


@register_model
def dy_resnet18(pretrained: bool = False, **kwargs) -> ResNet:
    """DY-ResNet-18: every BasicBlock 3x3 conv dynamic, K=4 (paper: 72.7 top-1 vs 70.4 static)."""
    model_args = dict(block=DyBasicBlock, layers=(2, 2, 2, 2))
    return build_resnet('dy_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def dy_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """DY-ResNet-50: every Bottleneck 3x3 conv dynamic, K=4."""
    model_args = dict(block=DyBottleneck, layers=(3, 4, 6, 3))
    return build_resnet('dy_resnet50', pretrained, **dict(model_args, **kwargs))
