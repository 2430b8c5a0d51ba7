"""Building the ddfnet models with timm, and loading their weights from wherever timm loads weights.

Shared by every model family here: :func:`build_resnet` (the DDF- and DY-ResNets) and
:func:`require_local_weights` (``pretrained=True`` of every model).
"""
from __future__ import annotations

import os
import warnings
from typing import Any

from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from timm.models.resnet import ResNet

from ..utils.weights import WeightsFileError, file_classifier_rows

__all__ = ['build_resnet', 'fit_classes_to_file', 'require_local_weights']

# The weights file names timm's local-dir: route reads from a folder (timm.models.save_for_hf writes the first).
HF_WEIGHTS_FILES = ('model.safetensors', 'pytorch_model.bin')


def require_local_weights(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Raise unless the pretrained cfg (with the caller's overlay) names weights we can load; return
    ``kwargs`` with the class count fitted to a local file's classifier (:func:`fit_classes_to_file`).

    Every timm route is accepted: ``pretrained_cfg_overlay=dict(file=...)`` (a file; its classifier sets the
    class count), ``local-dir:DIR`` and ``hf-hub:NAME`` (a ``config.json`` whose ``num_classes`` and
    ``label_names`` timm puts into the cfg), a ``state_dict`` or ``url`` in the cfg.
    """
    # timm would warn and hand back a randomly initialised model; no released DDF weights can be
    # downloaded automatically, so insist on a local file instead of failing silently.
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if not any(getattr(cfg, key, None) for key in ('file', 'url', 'hf_hub_id', 'state_dict')):
        raise ValueError(f'{variant}: no weights can be downloaded for this model; pass a local '
                         "checkpoint with pretrained_cfg_overlay=dict(file='path/to/weights.pth')")
    if cfg.source == 'local-dir':  # cfg.file is the folder; timm reads its weights file and config.json
        if not any(os.path.isfile(os.path.join(cfg.file, name)) for name in HF_WEIGHTS_FILES):
            raise WeightsFileError(f'{variant}: folder {cfg.file} holds no {" or ".join(HF_WEIGHTS_FILES)}')
        return kwargs
    if cfg.source != 'hf-hub' and cfg.file and isinstance(cfg.classifier, str):
        return fit_classes_to_file(variant, cfg.file, cfg.classifier, kwargs)
    return kwargs


def fit_classes_to_file(variant: str, path: str, head: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` for loading weights file ``path`` whose classifier ``head`` may have any class count.

    timm compares the model's ``num_classes`` with the cfg's (1000), not with the file: an 8-class
    checkpoint failed with a size mismatch, and ``num_classes=8`` silently re-initialised the classifier.
    Here the cfg takes the file's count, so ``num_classes`` defaults to it and loads strictly; a different
    ``num_classes`` still re-initialises the classifier (fine-tuning) but says so with a warning. A file that
    is missing or not a weights file raises :class:`~ddfnet.utils.weights.WeightsFileError` (a ValueError).
    """
    if not os.path.isfile(path):
        raise WeightsFileError(f'{variant}: no weights file {path}')
    found = file_classifier_rows(path, head)
    if found is None:
        return kwargs
    wanted = kwargs.get('num_classes', found)
    if wanted != found and wanted and not kwargs.get('features_only'):
        warnings.warn(f'{variant}: {path} has a {found}-class classifier and the model {wanted} classes: {head} is '
                      're-initialised (random weights), the rest is loaded', UserWarning, stacklevel=3)
    overlay = {**(kwargs.get('pretrained_cfg_overlay') or {}), 'num_classes': found}
    return {**kwargs, 'num_classes': wanted, 'pretrained_cfg_overlay': overlay}


def build_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNet:
    """timm's ``ResNet`` for ``variant`` (block and layers in ``kwargs``), weights checked as above."""
    if pretrained:
        kwargs = require_local_weights(variant, kwargs)
    return build_model_with_cfg(ResNet, variant, pretrained, **kwargs)
