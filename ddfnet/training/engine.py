"""The training and evaluation loops of ``train.py``, and what makes them stoppable and resumable.

Resuming reproduces an uninterrupted run exactly (on a deterministic device) because
- every epoch starts by seeding all generators from ``(seed, epoch, rank)`` (:func:`seed_epoch`), so the
  sampling order, the data loader workers' seeds and the augmentations are a function of the epoch;
- a mid-epoch checkpoint records how many batches of the epoch are done and this process's generator
  states: a resumed epoch re-draws the same order, skips the done batches, then restores the generators.
"""
from __future__ import annotations

import argparse
import logging
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from timm.data.distributed_sampler import OrderedDistributedSampler
from timm.utils import dispatch_clip_grad
from torch import nn

from .checkpoint import set_rng_state

_logger = logging.getLogger('train')


@dataclass
class TrainState:
    """Where a run stands: ``step`` batches of ``epoch`` are done (0: the epoch has not started).

    ``loss_sum`` / ``loss_images`` are the epoch's training loss x images and images so far (all ranks), so a
    mid-epoch resume reports the whole epoch's mean loss, not the mean of the batches after the resume.
    """
    epoch: int = 0
    step: int = 0
    num_updates: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    loss_sum: float = 0.0
    loss_images: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainingStopped(Exception):
    """The run cannot go on (non-finite loss); the message says why."""


class StopRequested(Exception):
    """A SIGTERM/SIGINT arrived; the loop stopped at an optimizer-step boundary, ready to checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalFlag:
    """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint first (a context manager that
    restores the previous handlers). A second signal of the same kind gets the default behaviour, so an
    impatient user can still kill the run."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self) -> SignalFlag:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)
        _logger.warning(f'received {signal.Signals(signum).name}: saving a recovery checkpoint after this step')


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed python, numpy and torch (all devices) for ``epoch`` on process ``rank``."""
    value = (seed * 1_000_003 + epoch * 1_009 + rank) % 2**31
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                    args: argparse.Namespace, state: TrainState, *, device: torch.device, scheduler=None,
                    loss_scaler=None, amp_autocast=nullcontext, model_ema=None, mixup_fn=None,
                    stop: SignalFlag | None = None, resume_rng: dict | None = None, tensorboard=None) -> dict:
    """Train the rest of ``state.epoch`` (from batch ``state.step``); returns the epoch's mean training loss.

    Raises :class:`StopRequested` at the first optimizer-step boundary after a signal (``state`` then
    describes that point) and :class:`TrainingStopped` on a non-finite loss, before it reaches the weights.
    """
    model.train()
    accum = args.grad_accum_steps
    num_batches = len(loader)
    batches = iter(loader)
    for _ in range(state.step):  # a mid-epoch resume: same order (seeded epoch), skip what was trained
        next(batches)
    if state.step and resume_rng is not None:
        set_rng_state(resume_rng)
    world = _world()
    # Over the current accumulation window, on the device: sum of loss x images, images, non-finite
    # losses. The host reads it once per optimizer step (not per micro-batch), so accumulation steps
    # queue their work without waiting for the device.
    window = torch.zeros(3, device=device)
    window_start = state.step
    if state.step == 0:
        state.loss_sum = state.loss_images = 0.0
    epoch_start = interval_start = time.perf_counter()
    interval_images, first_batch = 0, state.step
    optimizer.zero_grad(set_to_none=True)
    for batch_idx in range(state.step, num_batches):
        images, targets = next(batches)
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        need_update = (batch_idx + 1) % accum == 0 or batch_idx + 1 == num_batches
        sync = nullcontext() if need_update or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            with amp_autocast():
                loss = loss_fn(model(images), targets)
            # Device-side only: a tensor made from a Python number would be a host-to-device copy, which
            # waits for the queue.
            detached, n = loss.detach().float(), images.shape[0]
            window += torch.stack([detached * n, torch.full_like(detached, n), (~torch.isfinite(detached)).float()])
            if need_update:
                # One small all-reduce per optimizer step, before the step's backward: the window's loss,
                # whether any rank had a non-finite loss in it and whether any rank got a stop signal, so all
                # ranks take the same decision at the same step. An earlier micro-batch's NaN has reached
                # the gradients by now, but never the weights: they change only below.
                status = torch.cat([window, window.new_full((1,), float(bool(stop and stop.signum)))])
                if world > 1:
                    dist.all_reduce(status)
                window_loss, window_images, nonfinite, stopping = status.tolist()
                if nonfinite:
                    steps = f'step {batch_idx}' if window_start == batch_idx else f'steps {window_start}-{batch_idx}'
                    raise TrainingStopped(f'non-finite loss at epoch {state.epoch} {steps}: stopping before '
                                          'it reaches the weights (the last good checkpoint is kept; lower --lr, '
                                          'add --clip-grad or use --amp-dtype bfloat16)')
            scaled = loss / accum
            if loss_scaler is not None:
                loss_scaler(scaled, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=model.parameters(), need_update=need_update)
            else:
                scaled.backward()
                if need_update:
                    if args.clip_grad is not None:
                        dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        interval_images += images.shape[0] * world
        state.step = batch_idx + 1
        if not need_update:
            continue
        window.zero_()
        window_start = batch_idx + 1
        state.loss_sum += window_loss
        state.loss_images += window_images
        optimizer.zero_grad(set_to_none=True)
        state.num_updates += 1
        if model_ema is not None:
            model_ema.update(model, step=state.num_updates)
        if scheduler is not None:
            scheduler.step_update(num_updates=state.num_updates)
        last = batch_idx + 1 == num_batches
        if state.num_updates % args.log_interval == 0 or last:
            now = time.perf_counter()
            lr = optimizer.param_groups[0]['lr']
            rate = interval_images / max(now - interval_start, 1e-9)
            per_batch = (now - epoch_start) / (batch_idx + 1 - first_batch)
            eta = time.strftime('%H:%M:%S', time.gmtime(per_batch * (num_batches - batch_idx - 1)))
            step_loss = window_loss / max(window_images, 1)  # this step's mean over its images and ranks
            _logger.info(f'epoch {state.epoch} [{batch_idx + 1:>{len(str(num_batches))}}/{num_batches}] '
                         f'loss {step_loss:.4f} ({state.loss_sum / state.loss_images:.4f}) lr {lr:.3e} '
                         f'{rate:.1f} img/s eta {eta}')
            if tensorboard is not None:
                tensorboard.add_scalar('train/loss', step_loss, state.num_updates)
                tensorboard.add_scalar('train/lr', lr, state.num_updates)
                tensorboard.add_scalar('train/images_per_sec', rate, state.num_updates)
            interval_start, interval_images = now, 0
        if stopping:
            raise StopRequested(stop.signum if stop and stop.signum else signal.SIGTERM)
    return {'loss': state.loss_sum / max(state.loss_images, 1)}


@torch.no_grad()
def autocast_context(enabled: bool, dtype: str, device: torch.device) -> Callable[[], Any]:
    """The ``--amp`` / ``--amp-dtype`` ('float16' or 'bfloat16') of the scripts as a context factory for the
    loops: ``torch.autocast`` on ``device``'s type, or ``nullcontext`` when AMP is off."""
    if not enabled:
        return nullcontext
    if dtype not in ('float16', 'bfloat16'):
        raise ValueError(f"AMP dtype must be 'float16' or 'bfloat16', not {dtype!r}")
    return partial(torch.autocast, device_type=device.type, dtype=getattr(torch, dtype))


def evaluate(model: nn.Module, loader, device: torch.device, amp_autocast=nullcontext,
             channels_last: bool = False, ema_model: nn.Module | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy over ``loader``, summed over all ranks.
    Samples with a negative target (images that could not be read) are left out.

    With ``ema_model``, it is scored on the same batches (one pass: the images are decoded once) and its
    figures are added with an ``ema_`` prefix.
    """
    models = [model] if ema_model is None else [model, ema_model]
    for m in models:
        m.eval()
    totals = torch.zeros(len(models), 4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    # A distributed eval sampler evens out the ranks by repeating images at the end: count each image once.
    sampler = getattr(loader, 'sampler', None)
    valid = None
    if isinstance(sampler, OrderedDistributedSampler):
        valid = (len(sampler.dataset) + sampler.num_replicas - 1 - sampler.rank) // sampler.num_replicas
    seen = 0
    for images, targets in loader:
        if valid is not None:
            keep = max(0, min(targets.shape[0], valid - seen))
            seen += targets.shape[0]
            if keep == 0:
                continue
            images, targets = images[:keep], targets[:keep]
        if (targets < 0).any():  # an image that could not be read (ddfnet.data.images.FolderImages): not scored
            readable = targets >= 0
            images, targets = images[readable], targets[readable]
            if targets.shape[0] == 0:
                continue
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        for i, m in enumerate(models):
            with amp_autocast():
                logits = m(images)
            logits = logits.float()
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
            totals[i] += torch.stack([nn.functional.cross_entropy(logits, targets, reduction='sum').double(),
                                      hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                                      totals.new_full((), targets.shape[0])])  # a fill, not a copy
    if _world() > 1:
        dist.all_reduce(totals)
    metrics = {}
    for prefix, (loss, top1, top5, count) in zip(('', 'ema_'), totals.tolist()):
        count = max(count, 1.0)
        metrics.update({f'{prefix}loss': loss / count, f'{prefix}top1': 100.0 * top1 / count,
                        f'{prefix}top5': 100.0 * top5 / count})
    return metrics
