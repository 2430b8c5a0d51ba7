"""DY-MobileNetV3-Small (Chen et al., CVPR 2020): timm's MobileNetV3-Small with dynamic convs in every block.

timm's EfficientNet builder creates each block's convs as plain ``nn.Conv2d`` attributes (``conv_pw``,
``conv_dw``, ``conv_pwl``, ``conv``) whose hyperparameters are all readable, so the swap is clean: build
timm's model, then replace each of those convs by a :class:`~ddfnet.layers.DynamicConv2d` with the same
shape. As in the DyConv paper the stem conv stays static, and so do the squeeze-excitation convs and the
head's 1x1 conv, which run on globally pooled 1x1 features where an input-dependent kernel adds nothing
a static one lacks. Weights (``pretrained=True`` with a local file) load after the swap.
"""
from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, load_pretrained, mobilenetv3, register_model
from timm.models._efficientnet_blocks import ConvBnAct, DepthwiseSeparableConv, InvertedResidual
from timm.models.mobilenetv3 import MobileNetV3, _gen_mobilenet_v3
from torch import nn

from ..layers import DynamicConv2d
from ..utils.weights import require_local_weights
from .dy_resnet import DYCONV_CFG

__all__ = ['make_block_convs_dynamic']

_BLOCKS = (ConvBnAct, DepthwiseSeparableConv, InvertedResidual)


def make_block_convs_dynamic(model: nn.Module, **dyconv_args: Any) -> int:
    """Replace every plain ``nn.Conv2d`` directly inside an EfficientNet-family block by a DynamicConv2d.

    Convs nested deeper (squeeze-excitation) and outside blocks (stem, head) are left alone. Returns how
    many convs were replaced; ``dyconv_args`` go to :meth:`DynamicConv2d.from_conv`.
    """
    replaced = 0
    for block in model.modules():
        if not isinstance(block, _BLOCKS):
            continue
        for name, child in list(block.named_children()):
            if type(child) is nn.Conv2d:
                setattr(block, name, DynamicConv2d.from_conv(child, **dyconv_args))
                replaced += 1
    return replaced


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return mobilenetv3._cfg(**DYCONV_CFG, **kwargs)


default_cfgs = generate_default_cfgs({'dy_mobilenetv3_small_100.untrained': _cfg()})


@register_model
def dy_mobilenetv3_small_100(pretrained: bool = False, num_kernels: int = 4, **kwargs) -> MobileNetV3:
    """DY-MobileNetV3-Small 1.0: every block conv dynamic, K=4 (paper: 70.3 top-1 vs 67.4 static)."""
    variant = 'dy_mobilenetv3_small_100'
    if kwargs.get('features_only') and ('feature_cls' in kwargs or 'feature_cfg' in kwargs):
        # timm would wrap the network before the swap below, and feature_cls='fx' traces it into a new
        # graph that keeps the static convs (silently a plain MobileNetV3): build and swap the network
        # first, then let timm's builder wrap that one.
        feature_args = {k: kwargs.pop(k) for k in ('features_only', 'feature_cls', 'feature_cfg', 'out_indices')
                        if k in kwargs}
        network = dy_mobilenetv3_small_100(pretrained, num_kernels, **kwargs)
        return build_model_with_cfg(lambda **_: network, variant, False, **feature_args)
    if pretrained:
        kwargs = require_local_weights(variant, kwargs)
    # timm picks the Small architecture from 'small' in the variant name; our cfg is resolved by name.
    model = _gen_mobilenet_v3(variant, 1.0, pretrained=False, **kwargs)
    if not make_block_convs_dynamic(model, num_kernels=num_kernels):
        raise RuntimeError(f'{variant}: found no block convs to make dynamic in {type(model).__name__}')
    if pretrained:
        # A features_only model has no head, so its checkpoint keys are a strict subset.
        load_pretrained(model, model.pretrained_cfg, num_classes=getattr(model, 'num_classes', 0),
                        in_chans=kwargs.get('in_chans', 3), strict=not kwargs.get('features_only', False))
    return model
