"""Building the DDF- and DY-ResNets with timm; ``pretrained=True`` goes through
:func:`ddfnet.utils.weights.require_local_weights`, as for every model family here."""
from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg
from timm.models.resnet import ResNet

from ..utils.weights import require_local_weights

__all__ = ['build_resnet']


def build_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNet:
    """timm's ``ResNet`` for ``variant`` (block and layers in ``kwargs``), weights checked by ``require_local_weights``."""
    if pretrained:
        kwargs = require_local_weights(variant, kwargs)
    return build_model_with_cfg(ResNet, variant, pretrained, **kwargs)
