"""Per-epoch hooks: how a model reacts to the training epoch.

``train.py`` calls :func:`run_epoch_hooks` at the start of every epoch (including the first epoch after
a resume), before any step of that epoch. A hook is ``fn(model, epoch, args)``: ``model`` is the
unwrapped model (no DDP/compile wrapper), ``epoch`` counts from 0, ``args`` is the resolved training
config (an ``argparse.Namespace``). Hooks must be idempotent functions of ``(epoch, args)``, so a resumed
run sees exactly what an uninterrupted one saw.
"""
from __future__ import annotations

import argparse
from typing import Callable

from torch import nn

EpochHook = Callable[[nn.Module, int, argparse.Namespace], None]

_HOOKS: list[EpochHook] = []


def register_epoch_hook(fn: EpochHook) -> EpochHook:
    """Add ``fn`` to the hooks run at every epoch start (usable as a decorator)."""
    if fn not in _HOOKS:
        _HOOKS.append(fn)
    return fn


def run_epoch_hooks(model: nn.Module, epoch: int, args: argparse.Namespace) -> None:
    """Run every registered hook for ``epoch``."""
    for fn in _HOOKS:
        fn(model, epoch, args)


def scheduled_temperature(epoch: int, start: float, end: float, epochs: int) -> float:
    """Temperature for ``epoch``: linear from ``start`` (epoch 0) to ``end`` (epoch ``epochs``), then ``end``.

    DyConv's schedule (Chen et al., CVPR 2020) is ``start=30, end=1, epochs=10``.
    """
    if epochs <= 0 or epoch >= epochs:
        return float(end)
    return float(start + (end - start) * epoch / epochs)


@register_epoch_hook
def temperature_hook(model: nn.Module, epoch: int, args: argparse.Namespace) -> None:
    """Set the attention temperature of every module with ``set_temperature`` (e.g. DynamicConv2d).

    Reads ``args.dyconv_temp_start`` / ``dyconv_temp_end`` / ``dyconv_temp_epochs`` (defaults 30, 1, 10).
    """
    modules = [m for m in model.modules() if callable(getattr(m, 'set_temperature', None))]
    if not modules:
        return
    temperature = scheduled_temperature(epoch, getattr(args, 'dyconv_temp_start', 30.0),
                                        getattr(args, 'dyconv_temp_end', 1.0),
                                        int(getattr(args, 'dyconv_temp_epochs', 10)))
    for module in modules:
        module.set_temperature(temperature)
