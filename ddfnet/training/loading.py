"""Building a model from a checkpoint for evaluation or inference (``validate.py``, ``scripts/inference.py``)."""
from __future__ import annotations

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn

from ..cli import UserError, rejected_as
from ..utils.weights import classifier_rows
from .checkpoint import load_weights


def classifier_size(model_name: str, state: dict[str, torch.Tensor]) -> int | None:
    """The number of classes of ``state``'s classifier (the model cfg's ``classifier`` layer), if it has one."""
    return classifier_rows(state, getattr(get_pretrained_cfg(model_name), 'classifier', None))


def create_model_with_weights(model_name: str, num_classes: int | None, model_kwargs: dict, state: dict | None,
                              path: str | None) -> nn.Module:
    """``timm.create_model(model_name, num_classes=..., **model_kwargs)`` (the model's own class count when
    ``num_classes`` is None) with ``state`` (read from ``path``) loaded strictly; an unknown model, bad kwargs
    or weights that do not fit raise :class:`UserError`."""
    if not timm.is_model(model_name):
        raise UserError(f"unknown model '{model_name}' (list them with timm.list_models('ddf*'))")
    option = f'--model-kwargs {model_kwargs}' if model_kwargs else f'--model {model_name}'
    with rejected_as(f'{option}: cannot build {model_name}'):
        model = timm.create_model(model_name, **({'num_classes': num_classes} if num_classes else {}), **model_kwargs)
    if state is not None:
        load_weights(model, state, path, model_name)
    return model
