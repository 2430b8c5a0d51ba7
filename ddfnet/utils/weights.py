"""Loading weights, one way everywhere: reading files (ours, timm's, the original release's), applying a
state_dict to a model, building a model with a checkpoint's weights, and the guard that makes
``pretrained=True`` load a local file.

A file is loaded without executing code (``torch.load(weights_only=True)``, or safetensors). Its model
weights are found under ``model`` / ``model_ema`` (train.py), ``state_dict`` / ``state_dict_ema`` (timm's
train.py) or are the file itself (a released state_dict); the ``module.`` (DDP) and ``_orig_mod.``
(torch.compile) prefixes are dropped. The models (``pretrained=True`` with a file), train.py, validate.py
and the scripts all read through here, so they agree on which weights a file holds.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg, resolve_pretrained_cfg
from torch import nn

from ..cli import UserError, rejected_as, short_reason

_PREFIXES = re.compile(r'^(module\.|_orig_mod\.)+')


class WeightsFileError(UserError, ValueError):
    """A weights file that is missing, unreadable or holds no model weights. A :class:`~ddfnet.cli.UserError`
    (a script prints it as one line) and a ``ValueError`` (what timm's ``create_model`` callers expect)."""


def load_checkpoint(path: str, mmap: bool = False) -> Any:
    """Load a checkpoint or state_dict without executing code; a missing, corrupt or unsafe file raises
    :class:`WeightsFileError`. ``mmap`` maps a zip-format file instead of reading it (to look at one tensor)."""
    if not os.path.isfile(path):
        raise WeightsFileError(f'no checkpoint file {path}')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path, device='cpu')
        try:
            return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            # files in torch's legacy (pre-zip) format cannot be memory-mapped
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, KeyError... depending on the damage
        raise WeightsFileError(f'cannot load checkpoint {path}: truncated, corrupt or not a weights-only checkpoint '
                               f'({short_reason(e, 160)})') from None


def model_state_dict(checkpoint: Any, path: str, use_ema: bool | None = False) -> dict[str, torch.Tensor]:
    """The model weights in ``checkpoint`` (read from ``path``, which errors name), prefixes dropped.

    ``use_ema``: True takes the EMA weights (an error if there are none), False the trained ones, None
    the EMA weights when the file has them (what timm's pretrained loading does).
    """
    if not isinstance(checkpoint, dict):
        raise WeightsFileError(f'checkpoint {path} holds a {type(checkpoint).__name__}, not a state_dict')
    ema, plain = ('model_ema', 'state_dict_ema'), ('model', 'state_dict')
    keys = ema if use_ema else plain if use_ema is False else ('state_dict_ema', 'model_ema', 'state_dict', 'model')
    found = next((checkpoint[k] for k in keys if isinstance(checkpoint.get(k), dict)), None)
    if found is None and use_ema:
        raise WeightsFileError(f'checkpoint {path} has no EMA weights (trained without --model-ema?)')
    state = found if found is not None else checkpoint
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsFileError(f'checkpoint {path} holds no model state_dict')
    return {_PREFIXES.sub('', k): v for k, v in state.items()}


def classifier_rows(state: dict[str, torch.Tensor], head: str | None) -> int | None:
    """The class count of ``state``'s classifier ``head`` (e.g. 'fc'), if it has that layer."""
    weight = state.get(f'{head}.weight') if isinstance(head, str) else None
    return weight.shape[0] if isinstance(weight, torch.Tensor) else None


def file_classifier_rows(path: str, head: str) -> int | None:
    """:func:`classifier_rows` of a weights file as ``pretrained=True`` loads it (EMA preferred), read
    without loading the whole file where possible (a safetensors header, a memory-mapped zip file)."""
    if path.endswith('.safetensors') and os.path.isfile(path):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, 'pt') as f:
                return f.get_slice(f'{head}.weight').get_shape()[0] if f'{head}.weight' in f.keys() else None
        except (SafetensorError, OSError) as e:
            raise WeightsFileError(f'cannot load checkpoint {path}: not a safetensors file ({e})') from None
    return classifier_rows(model_state_dict(load_checkpoint(path, mmap=True), path, use_ema=None), head)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str, model_name: str,
                 drop_classifier: bool = False) -> list[str]:
    """Load ``state`` into ``model`` strictly; a mismatch raises :class:`UserError` in one line.

    ``drop_classifier`` (fine-tuning) skips the classifier's tensors when their shapes differ (or when the
    file has none); returns the names of the model's tensors that were left at their initial values.
    """
    own = model.state_dict()
    if drop_classifier:
        head = getattr(model, 'pretrained_cfg', {}).get('classifier', 'fc')
        state = {k: v for k, v in state.items()
                 if not (k.startswith(head + '.') and k in own and own[k].shape != v.shape)}
        missing_ok = {k for k in own if k.startswith(head + '.')}
    else:
        missing_ok = set()
    missing = [k for k in own if k not in state and k not in missing_ok]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}'
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f'{len(items)} {what} (e.g. {items[0]})' for what, items in
                 (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', shapes)) if items]
        raise UserError(f'checkpoint {path} does not fit model {model_name}: ' + ', '.join(parts))
    model.load_state_dict(state, strict=not missing_ok)
    return [k for k in own if k not in state]


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
    is missing or not a weights file raises :class:`WeightsFileError` (a ValueError).
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
