"""Reading weights files: ours, timm's and the original release's, one way everywhere.

A file is loaded without executing code (``torch.load(weights_only=True)``, or safetensors). Its model
weights are found under ``model`` / ``model_ema`` (train.py), ``state_dict`` / ``state_dict_ema`` (timm's
train.py) or are the file itself (a released state_dict); the ``module.`` (DDP) and ``_orig_mod.``
(torch.compile) prefixes are dropped. The models (``pretrained=True`` with a file), train.py, validate.py
and the scripts all read through here, so they agree on which weights a file holds.
"""
from __future__ import annotations

import os
import re
from typing import Any

import torch

from ..cli import UserError, short_reason

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
