"""After training: averaging checkpoints (``scripts/avg_checkpoints.py``) and writing release files, a bare
state_dict named timm's way (``scripts/clean_checkpoint.py``, ``scripts/avg_checkpoints.py``)."""
from __future__ import annotations

import hashlib
import io

import torch

from ..cli import UserError


def average_state_dicts(states: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    """The mean of ``states`` (oldest first; ``names`` label them in errors): floating-point tensors,
    BatchNorm statistics included, are averaged in float64 and cast back; integer tensors (BatchNorm's
    ``num_batches_tracked``) are the newest state's, since a mean of counters is no count."""
    if not states:
        raise UserError('no checkpoints to average')
    first, newest = states[0], states[-1]
    for state, name in zip(states[1:], names[1:]):
        if state.keys() != first.keys():
            different = sorted(state.keys() ^ first.keys())
            raise UserError(f'{name} and {names[0]} hold different tensors (e.g. {different[0]}): not one model')
        for key, value in state.items():
            if value.shape != first[key].shape or value.dtype != first[key].dtype:
                raise UserError(f'{name} and {names[0]} differ in {key}: {tuple(value.shape)} {value.dtype} vs '
                                f'{tuple(first[key].shape)} {first[key].dtype}')
    averaged = {}
    for key, value in newest.items():
        if value.is_floating_point() or value.is_complex():
            total = sum(state[key].to(torch.float64 if value.is_floating_point() else torch.complex128)
                        for state in states)
            averaged[key] = (total / len(states)).to(value.dtype)
        else:
            averaged[key] = value.clone()
    return averaged


def release_bytes(state: dict[str, torch.Tensor], fmt: str) -> bytes:
    """``state`` serialised as a release file: ``fmt`` 'pth' (``torch.save`` of a plain state_dict) or
    'safetensors'. Tensors are made contiguous and given their own storage (safetensors refuses shared or
    strided ones; a slice saved by ``torch.save`` would carry its whole base tensor)."""
    state = {key: value.detach().contiguous().clone() for key, value in state.items()}
    if fmt == 'safetensors':
        from safetensors.torch import save
        return save(state)
    if fmt != 'pth':
        raise ValueError(f"release format must be 'pth' or 'safetensors', not {fmt!r}")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def release_name(data: bytes, base: str, ext: str, add_hash: bool = True) -> str:
    """``BASE-<first 8 hex digits of the SHA-256 of data>.EXT``, timm's release naming (``BASE.EXT``
    without ``add_hash``)."""
    return f'{base}-{hashlib.sha256(data).hexdigest()[:8]}.{ext}' if add_hash else f'{base}.{ext}'
