"""What the benchmark scripts share: a usable device or a one-line error, the environment recorded next
to each figure, and the JSON-lines output."""
from __future__ import annotations

import datetime
import json
import platform
from typing import Any

import torch

__all__ = ['default_device', 'usable_device', 'environment', 'emit_json_lines']


def default_device() -> str:
    """The benchmark scripts' one convention for an unset ``--device``: cuda when available, else cpu."""
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def usable_device(name: str) -> torch.device:
    """``torch.device(name)`` after allocating on it; ValueError (one line) when it cannot be timed."""
    try:
        device = torch.device(name)
        if device.type not in ('cpu', 'cuda'):
            raise RuntimeError('only cpu and cuda devices can be timed')
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f'device {name!r} is not usable: {e}'.splitlines()[0]) from None
    return device


def environment(device: torch.device) -> dict[str, Any]:
    """Where a figure was measured: device name, torch version, CPU threads, UTC date."""
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()
    return dict(device=str(device), device_name=name, torch=torch.__version__, threads=torch.get_num_threads(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))


def emit_json_lines(rows: list[dict[str, Any]], path: str | None = None) -> None:
    """Print one JSON line per row, and write them to ``path`` too when given."""
    text = '\n'.join(json.dumps(r) for r in rows)
    print(text)
    if path:
        with open(path, 'w') as f:
            f.write(text + '\n')
