"""Where a mid-epoch resume continues when the run's batch size differs from the checkpoint's.

A checkpoint counts the epoch's finished batches (``TrainState.step``). Each epoch's image order is a
function of the seed and the epoch, not of the batch size, so the images trained so far are the first
``step x batch size`` of this process's share: a resume with another batch size continues exactly there
when that count is a whole number of its batches, and otherwise cannot (it would retrain or skip images).
Another process count changes each process's share, so no position carries over.
"""
from __future__ import annotations

from ..cli import UserError


def resume_step(step: int, saved_batch_size: int, batch_size: int, saved_world_size: int | None,
                world_size: int, batches_per_epoch: int) -> int:
    """The batch (of ``batch_size`` images) to continue the epoch from, for a checkpoint taken after ``step``
    batches of ``saved_batch_size`` on ``saved_world_size`` processes (None: not recorded); a position that
    does not carry over raises :class:`UserError` saying how to resume instead."""
    if step == 0:  # an epoch boundary: nothing to skip, any batch size and process count will do
        return 0
    how = 'or resume from a checkpoint taken at an epoch boundary (checkpoint-N.pth.tar, best.pth.tar)'
    if saved_world_size is not None and saved_world_size != world_size:
        raise UserError(f'the checkpoint stopped mid-epoch (batch {step}) on {saved_world_size} process(es), this run '
                        f'has {world_size}: the images already trained cannot be told apart; resume on '
                        f'{saved_world_size} process(es), {how}')
    images = step * saved_batch_size
    if batch_size == saved_batch_size:
        new_step = step
    elif images % batch_size:
        raise UserError(f'--batch-size {batch_size}: the checkpoint stopped mid-epoch after {images} images per '
                        f'process ({step} batches of {saved_batch_size}), not a whole number of batches of {batch_size}; '
                        f'resume with --batch-size {saved_batch_size}, {how}')
    else:
        new_step = images // batch_size
    if new_step > batches_per_epoch:
        raise UserError(f'the checkpoint stopped mid-epoch after {images} images per process, more than this run\'s '
                        f'epoch of {batches_per_epoch} batches of {batch_size}; resume with the checkpoint\'s '
                        f'settings (--batch-size {saved_batch_size}, the same data), {how}')
    return new_step
