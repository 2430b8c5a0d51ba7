"""DDF-Up in object detection: an FPN whose top-down pathway upsamples with DDF-Up, and torchvision
Faster R-CNN builders for the DDF paper's detection setting (Zhou et al., CVPR 2021, Section 5.3).

:class:`DDFUpFeaturePyramidNetwork` is torchvision's ``FeaturePyramidNetwork`` (same constructor, same
submodule names, an ordered dict of backbone features in and the pyramid out) with each coarser level
upsampled x2 by a :class:`~ddfnet.layers.DDFUpPack` instead of nearest interpolation: the place CARAFE
takes in MMDetection's ``FPN_CARAFE``. It drops into torchvision's Faster R-CNN, Mask R-CNN and RetinaNet
through :class:`BackboneWithDDFUpFPN`. With ``upsample='nearest'`` it computes exactly torchvision's FPN,
and torchvision's ``fasterrcnn_resnet50_fpn`` weights load into :func:`fasterrcnn_resnet50_ddfup_fpn` with
``upsample='nearest'`` (with 'ddf', all but the DDF-Up layers').
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable

import timm
import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.models.detection import FasterRCNN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from ..layers import DDFUpPack
from ..cli import UserError
from ..utils.weights import WeightsFileError, load_checkpoint, load_weights, model_state_dict

__all__ = ['DDFUpFeaturePyramidNetwork', 'BackboneWithDDFUpFPN', 'fasterrcnn_resnet50_ddfup_fpn',
           'fasterrcnn_ddf_resnet50_ddfup_fpn']

UPSAMPLES = ('ddf', 'nearest')
# The ResNet stages an FPN can take, finest first; the first ones trained after a pretrained backbone's
# frozen stem are the last ones here (torchvision's trainable_backbone_layers).
_STAGES = ('layer1', 'layer2', 'layer3', 'layer4')
_TRAINABLE_ORDER = ('layer4', 'layer3', 'layer2', 'layer1', 'conv1')


def _crop_to(upsampled: Tensor, lateral: Tensor) -> Tensor:
    """``upsampled`` cut to ``lateral``'s height and width.

    A stride-2 layer maps a side of n to ceil(n / 2), so the x2-upsampled coarser level is n or n + 1
    long; the extra row or column lies past the image's bottom/right edge and is dropped, as MMDetection's
    FPN_CARAFE does, which keeps DDF-Up's pixels aligned with the finer level's.
    """
    height, width = lateral.shape[-2], lateral.shape[-1]
    if upsampled.shape[-2] < height or upsampled.shape[-1] < width:
        raise ValueError(f'DDFUpFeaturePyramidNetwork: a level of {height}x{width} needs the next coarser one to be '
                         f'at least half its size, got {upsampled.shape[-2] // 2}x{upsampled.shape[-1] // 2}')
    return upsampled[:, :, :height, :width]


# A leaf for FX (plain symbolic_trace and timm's tracer): its size check compares sizes FX only knows symbolically.
torch.fx.wrap('_crop_to')
register_notrace_function(_crop_to)


class DDFUpFeaturePyramidNetwork(FeaturePyramidNetwork):
    """torchvision's FPN with the top-down pathway's x2 upsampling done by DDF-Up.

    Arguments as torchvision's ``FeaturePyramidNetwork`` (``in_channels_list``, ``out_channels``,
    ``extra_blocks``, ``norm_layer``), plus ``upsample``: 'ddf' (one :class:`~ddfnet.layers.DDFUpPack`
    with ``scale_factor=2`` per top-down step, built with ``ddf_kwargs``) or 'nearest' (torchvision's FPN
    unchanged). :meth:`forward` takes an ordered dict of ``len(in_channels_list)`` feature maps, finest
    first, each level's side at most twice the next coarser one's (as stride-2 backbones give, odd sizes
    included), and returns the pyramid under the same names (plus the extra blocks').
    """

    def __init__(self, in_channels_list: list[int], out_channels: int, extra_blocks: ExtraFPNBlock | None = None,
                 norm_layer: Callable[..., nn.Module] | None = None, upsample: str = 'ddf',
                 ddf_kwargs: dict[str, Any] | None = None):
        if upsample not in UPSAMPLES:
            raise ValueError(f"DDFUpFeaturePyramidNetwork: upsample must be 'ddf' or 'nearest', got {upsample!r}")
        if not in_channels_list:
            raise ValueError('DDFUpFeaturePyramidNetwork: in_channels_list is empty')
        super().__init__(in_channels_list, out_channels, extra_blocks=extra_blocks, norm_layer=norm_layer)
        self.upsample = upsample
        # Built after torchvision's FPN initialised its convs, so DDFUpPack keeps its own initialisation.
        # Block i upsamples level i + 1 to level i.
        self.upsample_blocks = nn.ModuleList(
            [DDFUpPack(out_channels, scale_factor=2, **(ddf_kwargs or {})) for _ in in_channels_list[1:]]
            if upsample == 'ddf' else [])

    def _upsample(self, coarser: Tensor, lateral: Tensor, idx: int) -> Tensor:
        if self.upsample == 'nearest':
            return F.interpolate(coarser, size=lateral.shape[-2:], mode='nearest')
        out = coarser
        for i, block in enumerate(self.upsample_blocks):  # indexing a ModuleList by a variable does not script
            if i == idx:
                out = _crop_to(block(coarser), lateral)
        return out

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        names = list(x.keys())
        features = list(x.values())
        if len(features) != len(self.inner_blocks):
            raise ValueError(f'DDFUpFeaturePyramidNetwork: expected {len(self.inner_blocks)} feature maps '
                             f'(one per in_channels_list entry), got {len(features)}: {names}')
        last_inner = self.get_result_from_inner_blocks(features[-1], -1)
        results = [self.get_result_from_layer_blocks(last_inner, -1)]
        for idx in range(len(features) - 2, -1, -1):
            inner_lateral = self.get_result_from_inner_blocks(features[idx], idx)
            last_inner = inner_lateral + self._upsample(last_inner, inner_lateral, idx)
            results.insert(0, self.get_result_from_layer_blocks(last_inner, idx))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, features, names)
        return OrderedDict([(name, result) for name, result in zip(names, results)])


class BackboneWithDDFUpFPN(nn.Module):
    """A feature extractor ``body`` (an image in, an ordered dict of feature maps out) followed by a
    :class:`DDFUpFeaturePyramidNetwork`; what torchvision's detectors take as ``backbone``.

    Attribute names (``body``, ``fpn``, ``out_channels``) are those of torchvision's ``BackboneWithFPN``,
    so detector state dicts line up with torchvision's.
    """

    def __init__(self, body: nn.Module, in_channels_list: list[int], out_channels: int = 256,
                 upsample: str = 'ddf', extra_blocks: ExtraFPNBlock | None = None,
                 norm_layer: Callable[..., nn.Module] | None = None, ddf_kwargs: dict[str, Any] | None = None):
        super().__init__()
        self.body = body
        self.fpn = DDFUpFeaturePyramidNetwork(in_channels_list, out_channels, extra_blocks=extra_blocks,
                                              norm_layer=norm_layer, upsample=upsample, ddf_kwargs=ddf_kwargs)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.fpn(self.body(x))


def _returned_stages(returned_layers: list[int] | None) -> list[int]:
    returned = [1, 2, 3, 4] if returned_layers is None else list(returned_layers)
    if not returned or sorted(set(returned)) != returned or not set(returned) <= {1, 2, 3, 4}:
        raise ValueError(f'returned_layers must be increasing ResNet stages among 1, 2, 3, 4, got {returned_layers}')
    return returned


def _trainable_layers(pretrained: bool, trainable_backbone_layers: int | None) -> int:
    # torchvision's rule: a pretrained backbone trains its last 3 stages by default, a random one all 5.
    if trainable_backbone_layers is None:
        return 3 if pretrained else 5
    if not 0 <= trainable_backbone_layers <= 5:
        raise ValueError(f'trainable_backbone_layers must be in 0..5, got {trainable_backbone_layers}')
    if not pretrained and trainable_backbone_layers < 5:  # (torchvision warns and trains all 5)
        raise ValueError(f'trainable_backbone_layers={trainable_backbone_layers} would freeze randomly initialised '
                         'stages: pass backbone_checkpoint, or leave it at 5')
    return trainable_backbone_layers


def _load_backbone(body: nn.Module, path: str | os.PathLike, name: str) -> None:
    """Load an ImageNet classifier checkpoint (a released state_dict or a train.py checkpoint) into ``body``
    strictly, the classifier aside; FrozenBatchNorm2d keeps no ``num_batches_tracked``."""
    path = os.fspath(path)
    own = body.state_dict()
    state = {k: v for k, v in model_state_dict(load_checkpoint(path), path, use_ema=None).items()
             if not k.startswith('fc.') and (k in own or not k.endswith('.num_batches_tracked'))}
    try:
        load_weights(body, state, path, f'{name} backbone')
    except UserError as e:  # a ValueError too, as bad arguments to a builder are
        raise WeightsFileError(str(e)) from None


def _frozen_batch_norm(num_features: int, device=None, dtype=None) -> FrozenBatchNorm2d:
    # timm passes device and dtype to its norm layers; torchvision's FrozenBatchNorm2d takes neither.
    return FrozenBatchNorm2d(num_features)


def _freeze(body: nn.Module, trainable: int) -> None:
    layers = list(_TRAINABLE_ORDER[:trainable]) + (['bn1'] if trainable == 5 else [])
    for name, parameter in body.named_parameters():
        if not any(name.startswith(layer) for layer in layers):
            parameter.requires_grad_(False)


def _fasterrcnn(name: str, body: nn.Module, in_channels_list: list[int], upsample: str, num_classes: int,
                backbone_checkpoint: str | os.PathLike | None, trainable: int, fpn_channels: int,
                ddf_kwargs: dict[str, Any] | None, kwargs: dict[str, Any]) -> FasterRCNN:
    if backbone_checkpoint is not None:
        _load_backbone(body, backbone_checkpoint, name)
    _freeze(body, trainable)
    if fpn_channels < 1:
        raise ValueError(f'{name}: fpn_channels must be positive, got {fpn_channels}')
    backbone = BackboneWithDDFUpFPN(body, in_channels_list, fpn_channels, upsample=upsample, extra_blocks=LastLevelMaxPool(),
                                    ddf_kwargs=ddf_kwargs)
    levels = [str(i) for i in range(len(in_channels_list))]
    roi_pool = kwargs.get('box_roi_pool')
    if roi_pool is not None and not set(getattr(roi_pool, 'featmap_names', [])) <= set(levels):
        raise ValueError(f'{name}: box_roi_pool.featmap_names {list(roi_pool.featmap_names)} name levels the FPN '
                         f'does not output (it outputs {levels} and pool)')
    return FasterRCNN(backbone, num_classes=num_classes, **kwargs)


def fasterrcnn_resnet50_ddfup_fpn(*, upsample: str = 'ddf', num_classes: int = 91,
                                  backbone_checkpoint: str | os.PathLike | None = None,
                                  trainable_backbone_layers: int | None = None, returned_layers: list[int] | None = None,
                                  fpn_channels: int = 256, ddf_kwargs: dict[str, Any] | None = None,
                                  backbone_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> FasterRCNN:
    """torchvision's Faster R-CNN with a torchvision ResNet-50 and a DDF-Up FPN (``upsample='ddf'``) or its
    nearest-upsampling FPN (``upsample='nearest'``, torchvision's ``fasterrcnn_resnet50_fpn`` exactly).

    ``backbone_checkpoint``: an ImageNet ResNet-50 classifier's weights (torchvision key names), loaded
    strictly; then, as in torchvision, batch norm is frozen and ``trainable_backbone_layers`` (default 3)
    of the 5 stages train. Nothing is downloaded. ``returned_layers`` picks the stages (1-4) the FPN takes;
    ``fpn_channels`` is the pyramid's width (the paper's and torchvision's: 256); ``backbone_kwargs`` go to
    torchvision's ``ResNet`` (``layers``, default ResNet-50's ``(3, 4, 6, 3)``); ``kwargs`` go to
    ``FasterRCNN`` (``min_size``, ``max_size``, ``box_roi_pool``, ...).
    """
    pretrained = backbone_checkpoint is not None
    stages = _returned_stages(returned_layers)
    resnet_kwargs = {'layers': (3, 4, 6, 3), **(backbone_kwargs or {})}
    resnet = ResNet(Bottleneck, norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d, **resnet_kwargs)
    body = IntermediateLayerGetter(resnet, return_layers={f'layer{s}': str(i) for i, s in enumerate(stages)})
    return _fasterrcnn('fasterrcnn_resnet50_ddfup_fpn', body, [256 * 2 ** (s - 1) for s in stages], upsample,
                       num_classes, backbone_checkpoint, _trainable_layers(pretrained, trainable_backbone_layers),
                       fpn_channels, ddf_kwargs, kwargs)


def fasterrcnn_ddf_resnet50_ddfup_fpn(*, upsample: str = 'ddf', num_classes: int = 91,
                                      backbone_checkpoint: str | os.PathLike | None = None,
                                      trainable_backbone_layers: int | None = None,
                                      returned_layers: list[int] | None = None, fpn_channels: int = 256,
                                      ddf_kwargs: dict[str, Any] | None = None, backbone_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> FasterRCNN:
    """:func:`fasterrcnn_resnet50_ddfup_fpn` with a DDF-ResNet-50 backbone: timm's ``ddf_resnet50`` with
    ``features_only`` (``backbone_kwargs`` go to ``timm.create_model``, e.g. ``layers``).

    ``backbone_checkpoint``: a ``ddf_resnet50`` (= the release's ``ddf_mul_resnet50``) classifier's weights.
    """
    pretrained = backbone_checkpoint is not None
    stages = _returned_stages(returned_layers)
    body = timm.create_model('ddf_resnet50', features_only=True, out_indices=tuple(stages), feature_cls='dict',
                             feature_cfg=dict(out_map=[str(i) for i in range(len(stages))]),
                             norm_layer=_frozen_batch_norm if pretrained else nn.BatchNorm2d, **(backbone_kwargs or {}))
    return _fasterrcnn('fasterrcnn_ddf_resnet50_ddfup_fpn', body, body.feature_info.channels(), upsample,
                       num_classes, backbone_checkpoint, _trainable_layers(pretrained, trainable_backbone_layers),
                       fpn_channels, ddf_kwargs, kwargs)
