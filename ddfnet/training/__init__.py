"""Reusable pieces of ``train.py`` / ``validate.py``: configs, checkpoints, epoch hooks, demo data."""
from .hooks import register_epoch_hook, run_epoch_hooks, scheduled_temperature

__all__ = ['register_epoch_hook', 'run_epoch_hooks', 'scheduled_temperature']
