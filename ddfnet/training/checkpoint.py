"""Checkpoints that survive a kill at any moment and can never execute code when loaded.

A file is written to a temporary name in the same folder, flushed to disk, then renamed over the
target (``os.replace`` is atomic), so a reader sees the old complete file or the new complete one.
Loading uses ``torch.load(weights_only=True)`` (or safetensors), which refuses anything but tensors and
plain containers (:mod:`ddfnet.utils.weights`). A run folder holds ``last.pth.tar`` (the latest state: an epoch end, or a recovery
point mid-epoch), ``best.pth.tar`` and ``checkpoint-<epoch>.pth.tar`` every few epochs, named after the
epoch it ends, numbered from 0 like the log and ``summary.csv`` (``checkpoint-4`` follows epoch 4, the fifth).
"""
from __future__ import annotations

import glob
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch

from ..cli import UserError
from ..utils.io import TMP_SUFFIX as _TMP_SUFFIX
from ..utils.io import atomic_write
from ..utils.weights import WeightsFileError, load_checkpoint

LAST, BEST = 'last.pth.tar', 'best.pth.tar'
CLASS_NAMES_FILE = 'classes.txt'  # a run folder's class names, one a line in label order


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` via a temporary file and a rename: never a truncated ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def _link_or_copy(src: str, dst: str) -> None:
    """Make ``dst`` hold ``src``'s bytes, atomically. A hard link costs no write; ``src`` is later
    replaced by a rename (a new inode), so ``dst`` keeps these bytes."""
    tmp = f'{dst}.{os.getpid()}{_TMP_SUFFIX}'
    try:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (some network file systems)
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def holds_checkpoint(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a checkpoint of a run (a folder without one holds no training to lose)."""
    return (any(os.path.isfile(os.path.join(run_dir, name)) for name in (LAST, BEST))
            or bool(glob.glob(os.path.join(run_dir, 'checkpoint-*.pth.tar'))))


def periodic_checkpoints(run_dir: str) -> list[str]:
    """The run folder's ``checkpoint-<epoch>.pth.tar`` files, oldest epoch first."""
    return sorted(glob.glob(os.path.join(run_dir, 'checkpoint-*.pth.tar')),
                  key=lambda p: int(re.findall(r'checkpoint-(\d+)\.pth\.tar$', p)[0]))


def newest_readable_checkpoint(run_dir: str) -> str | None:
    """The newest periodic checkpoint of ``run_dir`` that loads (a resume point when ``last`` is damaged)."""
    for path in reversed(periodic_checkpoints(run_dir)):
        try:
            load_checkpoint(path, mmap=True)
        except WeightsFileError:
            continue
        return path
    return None


def remove_partial_files(run_dir: str) -> None:
    """Delete temporary files left by a save that was killed (they are never read)."""
    for path in glob.glob(os.path.join(run_dir, f'*{_TMP_SUFFIX}')):
        os.remove(path)


def save_checkpoint(run_dir: str, state: dict[str, Any], *, is_best: bool = False,
                    periodic_epoch: int | None = None, keep: int = 3) -> None:
    """Write ``state`` as the run's ``last`` checkpoint, and as ``best`` / ``checkpoint-<periodic_epoch>``
    when asked, keeping the ``keep`` newest periodic ones."""
    last = os.path.join(run_dir, LAST)
    atomic_save(state, last)
    if is_best:
        _link_or_copy(last, os.path.join(run_dir, BEST))
    if periodic_epoch is not None:
        _link_or_copy(last, os.path.join(run_dir, f'checkpoint-{periodic_epoch}.pth.tar'))
        periodic = periodic_checkpoints(run_dir)
        for path in periodic[:-keep] if keep > 0 else periodic:
            os.remove(path)


def start_or_resume(run_dir: str, resume: bool, config: dict[str, Any] | None = None,
                    may_change: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The state a training script starts from: with ``resume``, the run's ``last`` checkpoint; otherwise
    ``None`` for a new run, after checking that ``run_dir`` holds no run a new one would overwrite.

    A resumed run must be the same run: each value of ``config`` but those named in ``may_change`` must equal
    the one the checkpoint saved under ``'config'``, and the run must have epochs left (``config['epochs']``
    beyond the checkpoint's ``'epoch'``). Anything else is a :class:`UserError` in one line.
    """
    last = os.path.join(run_dir, LAST)
    if not resume:
        if os.path.isfile(last):
            raise UserError(f'{run_dir} holds a run: pass --resume to continue it, or another --output')
        return None
    if not os.path.isfile(last):
        raise UserError(f'--resume: no {LAST} in {run_dir}')
    state = load_checkpoint(last)
    saved = state.get('config', {})
    for key, value in (config or {}).items():
        if key not in may_change and key in saved and saved[key] != value:
            raise UserError(f'--resume: the run in {run_dir} has {key} {saved[key]!r}, not {value!r} '
                            f'(only {", ".join(may_change) or "nothing"} may change when resuming)')
    if config and 'epochs' in config and state['epoch'] + 1 >= config['epochs']:
        raise UserError(f'--resume: the run in {run_dir} has finished its {state["epoch"] + 1} epochs; raise --epochs '
                        'to continue it')
    return state


def rng_state() -> dict[str, Any]:
    """This process's random number generator states, as weights-only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {'python': random.getstate(), 'numpy': [kind, keys.tolist(), pos, has_gauss, gauss],
            'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by :func:`rng_state`."""
    random.setstate(state['python'])
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
