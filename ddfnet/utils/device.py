"""The scripts' ``--device``."""
from __future__ import annotations

import torch

from ..cli import UserError


def resolve_device(name: str) -> str:
    """``--device`` checked: ``'auto'`` becomes cuda when available, else cpu; anything that is not cpu or an
    available cuda device raises :class:`UserError` (torch would fail later, with a traceback)."""
    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if device.type not in ('cpu', 'cuda'):
        raise UserError(f'--device {name}: only cpu and cuda devices are supported')
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError(f'--device {name} asked for, but no CUDA device is available (use --device cpu)')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f'--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)')
    return name
