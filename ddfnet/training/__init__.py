"""Reusable pieces of ``train.py`` / ``validate.py``: argument definitions, checkpoints, the training and
evaluation loops, after-training helpers (``release``), epoch hooks, distributed set-up."""
from .hooks import register_epoch_hook, run_epoch_hooks, scheduled_temperature

__all__ = ['register_epoch_hook', 'run_epoch_hooks', 'scheduled_temperature']
