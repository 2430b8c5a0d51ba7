#!/usr/bin/env python3
"""Train an image classifier (the DDF models, or any timm model) from a YAML config.

    python train.py --config configs/demo.yaml                                    # CPU demo, minutes
    torchrun --nproc_per_node=8 train.py --config configs/ddf_resnet50_in1k.yaml --data-dir /data/imagenet

Every config value can be overridden on the command line (``--lr 0.2``). The run folder
(``OUTPUT/EXPERIMENT``) receives ``args.yaml``, ``log.txt``, ``summary.csv``, TensorBoard events and the
checkpoints; ``--resume auto`` continues it. SIGTERM/SIGINT write a recovery checkpoint and exit with
status 128 + signal number; errors in the input are one line and exit status 2.
"""
from __future__ import annotations

import argparse
import functools
import glob
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import timm
import torch
import torch.distributed as dist
from timm.data import FastCollateMixup, Mixup, create_loader, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, distribute_bn, update_summary

import ddfnet  # noqa: F401  (registers the DDF models with timm)
from ddfnet.cli import UserError, parse_args, rejected_as, resolved_config, run_main
from ddfnet.data import class_count, class_names, create_split, resolve_data_root
from ddfnet.data.images import check_image_options, report_unreadable
from ddfnet.data.labels import match_labels
from ddfnet.training import run_epoch_hooks
from ddfnet.training.args import train_parser
from ddfnet.training.checkpoint import (CLASS_NAMES_FILE, LAST, holds_checkpoint, newest_readable_checkpoint,
                                        remove_partial_files, rng_state, save_checkpoint)
from ddfnet.training.distributed import init_distributed, start_together
from ddfnet.training.engine import (SignalFlag, StopRequested, TrainingStopped, TrainState, autocast_context, evaluate,
                                    seed_epoch, train_one_epoch)
from ddfnet.training.resume import resume_step
from ddfnet.utils.device import resolve_device
from ddfnet.utils.io import atomic_write_text, write_yaml
from ddfnet.utils.weights import WeightsFileError, load_checkpoint, load_weights, model_state_dict

_logger = logging.getLogger('train')
SCHEDULE_KEYS = ('sched', 'sched_on_updates', 'lr', 'epochs', 'warmup_epochs', 'warmup_lr', 'min_lr',
                 'cooldown_epochs', 'decay_epochs', 'decay_milestones', 'decay_rate', 'batch_size', 'grad_accum_steps')


def check_args(args: argparse.Namespace) -> None:
    """Reject bad values that need no library to tell, before anything is created or written."""
    if not args.model:
        raise UserError('no model: give --model (or model in the config)')
    if not timm.is_model(args.model):
        raise UserError(f"unknown model '{args.model}' (list them with timm.list_models('ddf*'))")
    # (rule, options): a value outside these ranges crashes the run later, or silently trains something else
    # (a negative --clip-grad flips the gradients, a zero temperature gives NaN attention)
    ranges = (('must be at least 1', lambda v: v >= 1,
               ('batch_size', 'epochs', 'grad_accum_steps', 'log_interval', 'checkpoint_interval', 'demo_per_class',
                'validation_batch_size', 'num_classes', 'recount')),
              ('must not be negative', lambda v: v >= 0,
               ('workers', 'checkpoint_hist', 'warmup_epochs', 'cooldown_epochs', 'lr', 'min_lr', 'warmup_lr',
                'weight_decay', 'momentum', 'mixup', 'cutmix', 'drop_rate', 'color_jitter', 'decay_rate')),
              ('must be positive', lambda v: v > 0,
               ('crop_pct', 'opt_eps', 'clip_grad', 'decay_epochs', 'dyconv_temp_start', 'dyconv_temp_end')),
              ('must be between 0 and 1', lambda v: 0 <= v <= 1,
               ('reprob', 'hflip', 'mixup_prob', 'mixup_switch_prob', 'smoothing', 'drop_path', 'model_ema_decay')))
    for rule, ok, names in ranges:
        for name in names:
            value = getattr(args, name)
            if value is not None and not ok(value):
                raise UserError(f'--{name.replace("_", "-")} {rule}, not {value}')
    # the image options, before the trial forward builds its batch from them
    check_image_options(args.img_size, args.crop_pct)  # --interpolation: timm's own error names it (build_loaders)
    if not 0 < args.scale[0] <= args.scale[1] <= 1:
        raise UserError(f'--scale takes two area fractions 0 < MIN <= MAX <= 1, not {args.scale[0]} {args.scale[1]}')
    if not 0 < args.ratio[0] <= args.ratio[1]:
        raise UserError(f'--ratio takes two aspect ratios 0 < MIN <= MAX, not {args.ratio[0]} {args.ratio[1]}')
    args.device = resolve_device(args.device)
    if args.sync_bn and not args.device.startswith('cuda'):
        raise UserError('--sync-bn needs CUDA devices; on CPU use --dist-bn reduce')
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise UserError(f'mixup/cutmix pair up images: --batch-size must be even, not {args.batch_size}')
    if args.sched == 'plateau':  # timm's plateau schedule needs a metric at every step; we step by epoch
        raise UserError('--sched plateau is not supported; use cosine, step, multistep, poly or tanh')
    if args.torch_compile and args.torch_compile not in torch.compiler.list_backends(exclude_tags=()):
        raise UserError(f'--torch-compile {args.torch_compile}: not a torch.compile backend (e.g. inductor, '
                        'aot_eager, eager)')
    if args.pretrained_file and not os.path.isfile(args.pretrained_file):
        raise UserError(f'no pretrained file {args.pretrained_file}')


def run_name(args: argparse.Namespace) -> str:
    """The run folder's name: --experiment, else the config file's name, else the model's."""
    return args.experiment or (os.path.splitext(os.path.basename(args.config))[0] if args.config else args.model)


def run_folder(args: argparse.Namespace) -> tuple[str, str | None]:
    """The run folder and the checkpoint to resume from (None: a fresh run).

    A folder holds a run when it holds a checkpoint: one without (a start that failed before its first epoch
    ended) is free for a new run, which replaces its files (:func:`start_run_folder`).
    """
    run_dir = os.path.join(args.output, run_name(args))
    parent = run_dir  # the run folder or its nearest existing ancestor must be a folder we may write to
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent or '.') or not os.access(parent or '.', os.W_OK | os.X_OK):
        raise UserError(f'cannot write the run folder {run_dir}: {parent} is not a writable folder')
    existing = holds_checkpoint(run_dir)
    last = os.path.join(run_dir, LAST)
    if args.resume == 'auto':
        if existing and not os.path.isfile(last):
            raise UserError(f'{run_dir} holds checkpoints but no {LAST}: resume one with --resume FILE')
        return run_dir, last if os.path.isfile(last) else None
    if args.resume:
        if not os.path.isfile(args.resume):
            raise UserError(f'no checkpoint file {args.resume} to resume from')
        if existing and os.path.dirname(os.path.abspath(args.resume)) != os.path.abspath(run_dir):
            raise UserError(f'{run_dir} already holds another run: resume {args.resume} into a new --experiment')
        return run_dir, args.resume
    if existing:
        raise UserError(f'{run_dir} already holds a run: continue it with --resume auto, or pick another '
                        '--experiment / --output')
    return run_dir, None


# What a start that failed before its first checkpoint may have left; the run that starts there replaces it.
FAILED_START_FILES = ('args.yaml', 'args-resume-*.yaml', 'log.txt', 'summary.csv', 'events.out.tfevents.*',
                      CLASS_NAMES_FILE)


def start_run_folder(run_dir: str, config: dict, resumed_at: dict | None) -> list[str]:
    """Create the run folder and write the run's config; returns the names of a failed start's files that were
    removed. ``args.yaml`` is the config of the run that trains there: a resumed run keeps its first one and
    records this launch's as ``args-resume-e<epoch>-s<step>.yaml``."""
    os.makedirs(run_dir, exist_ok=True)
    remove_partial_files(run_dir)
    removed = []
    if not holds_checkpoint(run_dir):
        for pattern in FAILED_START_FILES:
            for path in sorted(glob.glob(os.path.join(run_dir, pattern))):
                os.remove(path)
                removed.append(os.path.basename(path))
    config_file = os.path.join(run_dir, 'args.yaml')
    if resumed_at is not None and os.path.exists(config_file):
        config_file = os.path.join(run_dir, f'args-resume-e{resumed_at["epoch"]}-s{resumed_at["step"]}.yaml')
    write_yaml(config, config_file)
    return removed


def setup_logging(run_dir: str | None, primary: bool) -> None:
    """Log to stdout on rank 0 (warnings only elsewhere), and to RUN_DIR/log.txt."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and primary:
        handlers.append(logging.FileHandler(os.path.join(run_dir, 'log.txt')))
    logging.basicConfig(level=logging.INFO if primary else logging.WARNING, format='%(asctime)s %(message)s',
                        datefmt='%H:%M:%S', handlers=handlers, force=True)


def build_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    """The timm model; a value timm or the model rejects is one line naming the option."""
    option = f'--model-kwargs {args.model_kwargs}' if args.model_kwargs else f'--model {args.model}'
    with rejected_as(f'{option}: cannot build {args.model}'):
        return timm.create_model(args.model, num_classes=num_classes, drop_rate=args.drop_rate,
                                 **({'drop_path_rate': args.drop_path} if args.drop_path is not None else {}),
                                 **args.model_kwargs)


def check_forward(model: torch.nn.Module, input_size: tuple, args: argparse.Namespace, device: torch.device,
                  amp_autocast) -> None:
    """Run the model once on two black images in eval mode, so that settings it cannot run (kwargs that build
    but do not fit its forward, an image size too small) fail now, not after the run started. Eval mode and
    no_grad leave the weights, BatchNorm statistics and random generators as they were."""
    option = (f'--model-kwargs {args.model_kwargs}' if args.model_kwargs else
              f'--img-size {args.img_size}' if args.img_size else f'--model {args.model}')
    images = torch.zeros(2, *input_size, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad(), amp_autocast(), rejected_as(f'{option}: {args.model} cannot run a batch of '
                                                       f'{"x".join(map(str, input_size))} images'):
        model(images)
    model.train()


def build_loaders(args, dataset_train, dataset_eval, data_config: dict, num_classes: int, device: torch.device):
    """timm's training and evaluation loaders (and the mixup function when it runs on the host).

    Workers are restarted every epoch (persistent_workers=False) so their seeds come from the epoch's seed;
    the GPU prefetcher does normalisation, random erasing and mixup on the device. Each transform option is
    tried on its own first, so a value timm rejects names its option; then one image of each split goes
    through its transforms, so an image or transform that cannot load fails before the run starts.
    """
    input_size = data_config['input_size']
    for option, value, kwargs in (
            ('--aa', args.aa, dict(is_training=True, auto_augment=args.aa)),
            ('--train-interpolation', args.train_interpolation,
             dict(is_training=True, interpolation=args.train_interpolation)),
            ('--scale / --ratio', (args.scale, args.ratio), dict(is_training=True, scale=args.scale, ratio=args.ratio)),
            ('--interpolation', data_config['interpolation'],
             dict(is_training=False, interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct']))):
        with rejected_as(f'{option} {value}'):
            create_transform(input_size, **kwargs)
    prefetch = device.type == 'cuda'
    mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                      num_classes=num_classes)
    use_mixup = args.mixup > 0 or args.cutmix > 0
    with rejected_as('--mixup / --cutmix'):
        mixup_fn = Mixup(**mixup_args) if use_mixup and not prefetch else None
        collate_fn = FastCollateMixup(**mixup_args) if use_mixup and prefetch else None
    loader_args = dict(mean=data_config['mean'], std=data_config['std'], num_workers=args.workers,
                       distributed=args.distributed, pin_memory=args.pin_mem, device=device,
                       use_prefetcher=prefetch, persistent_workers=False)
    with rejected_as('training data options'):
        loader_train = create_loader(
            dataset_train, input_size=input_size, batch_size=args.batch_size, is_training=True,
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, scale=args.scale, ratio=args.ratio,
            hflip=args.hflip, color_jitter=args.color_jitter, auto_augment=args.aa,
            interpolation=args.train_interpolation, collate_fn=collate_fn, **loader_args)
    with rejected_as('evaluation data options'):
        loader_eval = create_loader(
            dataset_eval, input_size=input_size, batch_size=args.validation_batch_size or args.batch_size,
            is_training=False, interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
            **loader_args)
    if len(loader_train) == 0:
        raise UserError(f'{len(dataset_train)} training images per process do not fill one batch of {args.batch_size}')
    for split, dataset in ((args.train_split, dataset_train), (args.val_split, dataset_eval)):
        if isinstance(dataset, torch.utils.data.IterableDataset):  # streamed (WebDataset, TFDS): no cheap sample
            continue
        with rejected_as(f"cannot read an image of split '{split}' through its transforms"):
            dataset[0]
    return loader_train, loader_eval, mixup_fn


def read_resume_checkpoint(args: argparse.Namespace, resume_path: str | None) -> dict | None:
    """The training checkpoint to resume from (None: a fresh run), checked to be one this run can continue."""
    try:
        checkpoint = load_checkpoint(resume_path) if resume_path else None
    except WeightsFileError as e:
        if args.resume != 'auto':
            raise
        intact = newest_readable_checkpoint(os.path.dirname(resume_path))
        raise UserError(f'--resume auto: {e}; ' + (f'the newest readable checkpoint is {intact}: continue from it with '
                                                   f'--resume {intact}' if intact else
                                                   'no other checkpoint of the run folder is readable')) from None
    if checkpoint is not None and not (isinstance(checkpoint, dict)
                                       and all(k in checkpoint for k in ('optimizer', 'state', 'config'))):
        raise UserError(f'{resume_path} is not a training checkpoint of train.py (use --pretrained-file for weights)')
    if checkpoint is not None and checkpoint['config'].get('opt', args.opt) != args.opt:
        # another optimizer would load the state dict but read its own keys: training would silently differ
        raise UserError(f"--opt {args.opt}: {resume_path} was trained with --opt {checkpoint['config']['opt']}; "
                        'resume with that one (or start from its weights with --pretrained-file)')
    return checkpoint


def load_initial_weights(model: torch.nn.Module, args: argparse.Namespace, checkpoint: dict | None,
                         resume_path: str | None, num_classes: int) -> list[str]:
    """The resumed checkpoint's weights, or --pretrained-file's (classifier dropped when it does not fit);
    returns the notes to log."""
    notes = []
    if checkpoint is not None:
        load_weights(model, model_state_dict(checkpoint, resume_path), resume_path, args.model)
    elif args.pretrained_file:
        weights = model_state_dict(load_checkpoint(args.pretrained_file), args.pretrained_file)
        left = load_weights(model, weights, args.pretrained_file, args.model, drop_classifier=True)
        total = len(model.state_dict())
        notes.append(f'--pretrained-file {args.pretrained_file}: loaded {total - len(left)} of {total} tensors'
                     + (f'; dropped the classifier ({", ".join(left)}: kept at its initial values, '
                        f'{num_classes} classes here)' if left else ' (the classifier too)'))
    return notes


def restore_training(checkpoint: dict, resume_path: str, args: argparse.Namespace, config: dict, state: TrainState,
                     batches_per_epoch: int, optimizer, loss_scaler, model_ema, notes: list[str]):
    """Load the optimizer, loss scaler and EMA states of ``checkpoint`` and move ``state.step`` to the same
    images in batches of this run's size (or refuse); returns this rank's saved random generator states (None
    when the world size changed) and appends what to log to ``notes``."""
    with rejected_as(f'--resume {resume_path}: its optimizer state does not fit these optimizer settings'):
        optimizer.load_state_dict(checkpoint['optimizer'])
    # timm's schedules (plateau is rejected) are functions of (epoch, step) and their settings, which
    # is all their state holds: the scheduler built from this config is the resumed one. Say so when
    # the settings differ from the checkpoint's, e.g. a resume with a new --epochs.
    changed = [k for k in SCHEDULE_KEYS if checkpoint['config'].get(k) != config[k]]
    if changed:
        notes.append(f'schedule settings changed since the checkpoint ({", ".join(changed)}): '
                     'the learning rate follows the new ones')
    if loss_scaler is not None and checkpoint.get('scaler'):
        loss_scaler.load_state_dict(checkpoint['scaler'])
    if model_ema is not None and checkpoint.get('model_ema'):
        load_weights(model_ema.module, model_state_dict(checkpoint, resume_path, use_ema=True),
                     resume_path, args.model)
    rngs = checkpoint.get('rng') or []
    saved_batch_size = checkpoint['config'].get('batch_size', args.batch_size)
    step = resume_step(state.step, saved_batch_size, args.batch_size, len(rngs) or None, args.world_size,
                       batches_per_epoch)
    if step != state.step:
        notes.append(f'--batch-size {args.batch_size} (the checkpoint\'s: {saved_batch_size}): continuing the '
                     f'epoch after the {state.step * saved_batch_size} images per process trained, at batch {step}')
        state.step = step
    notes.append(f'resuming from {resume_path}: epoch {state.epoch}, batch {state.step}')
    return rngs[args.rank] if len(rngs) == args.world_size else None


def open_run(run_dir: str, config: dict, checkpoint: dict | None, names: list[str] | None, primary: bool) -> None:
    """The run starts: on rank 0, create the run folder, its config and class names, and log into it."""
    if not primary:
        return
    try:
        removed = start_run_folder(run_dir, config, checkpoint['state'] if checkpoint is not None else None)
        if names:  # one name a line, index order: the format of inference.py's --class-map
            atomic_write_text(''.join(f'{name}\n' for name in names), os.path.join(run_dir, CLASS_NAMES_FILE))
    except OSError as e:
        raise UserError(f'cannot write the run folder {run_dir}: {e}') from None
    setup_logging(run_dir, primary)
    if removed:
        _logger.info(f'{run_dir} held no checkpoint: replaced the files of a failed start ({", ".join(removed)})')


@dataclass
class Run:
    """Everything the epoch loop works on, built by :func:`main`."""
    args: argparse.Namespace
    run_dir: str
    primary: bool
    config: dict
    names: list[str] | None
    device: torch.device
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model as trained: DDP-wrapped and/or compiled
    model_ema: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_scaler: Any
    amp_autocast: Callable
    train_loss: torch.nn.Module
    mixup_fn: Any
    loader_train: Any
    loader_eval: Any
    dataset_train: Any
    dataset_eval: Any
    state: TrainState
    num_epochs: int
    updates_per_epoch: int
    resume_rng: Any
    tensorboard: Any = None

    def save(self, is_best: bool = False, periodic_epoch: int | None = None) -> None:
        """Checkpoint the run (rank 0 writes; every rank's generator states go into the file, so each rank
        resumes its own stream)."""
        args, model_ema, loss_scaler = self.args, self.model_ema, self.loss_scaler
        rngs = [None] * args.world_size if args.distributed else [rng_state()]
        if args.distributed:
            dist.all_gather_object(rngs, rng_state())
        if not self.primary:
            return
        save_checkpoint(self.run_dir, {
            'model': self.model.state_dict(), 'model_ema': model_ema.module.state_dict() if model_ema else None,
            'optimizer': self.optimizer.state_dict(), 'scheduler': self.scheduler.state_dict(),
            'scaler': loss_scaler.state_dict() if loss_scaler else None, 'state': self.state.as_dict(),
            'config': self.config, 'rng': rngs, 'model_name': args.model, 'class_names': self.names, 'version': 1,
        }, is_best=is_best, periodic_epoch=periodic_epoch, keep=args.checkpoint_hist)


def train_epochs(run: Run) -> None:
    """The epoch loop: train, evaluate, checkpoint and log each epoch until ``run.num_epochs``; a signal
    writes a recovery checkpoint and exits with status 128 + signal number."""
    args, state, model, model_ema, device = run.args, run.state, run.model, run.model_ema, run.device
    key = f'ema_{args.eval_metric}' if model_ema is not None else args.eval_metric
    # The progress lines count batches ([batch/batches]); an optimizer step may take several of them.
    per_step = ('one optimizer step per batch' if args.grad_accum_steps == 1 else
                f'an optimizer step every {args.grad_accum_steps} batches ({run.updates_per_epoch} steps)')
    _logger.info(f'training epochs {state.epoch}..{run.num_epochs - 1} ({args.epochs} + {args.cooldown_epochs} '
                 f'cool-down), {len(run.loader_train)} batches of {args.batch_size} images x {args.world_size} '
                 f'process(es) per epoch, {per_step}')
    with SignalFlag() as stop:
        try:
            while state.epoch < run.num_epochs:
                epoch = state.epoch
                seed_epoch(args.seed, epoch, args.rank)
                if hasattr(run.loader_train.sampler, 'set_epoch'):
                    run.loader_train.sampler.set_epoch(epoch)
                if hasattr(run.dataset_train, 'set_epoch'):  # WebDataset shards: the epoch's shard order
                    run.dataset_train.set_epoch(epoch)
                for hooked in (model, model_ema.module) if model_ema is not None else (model,):
                    run_epoch_hooks(hooked, epoch, args)  # the EMA copy evaluates with the epoch's settings too
                run.scheduler.step(epoch)
                if state.step:
                    run.scheduler.step_update(num_updates=state.num_updates)
                train_metrics = train_one_epoch(
                    run.train_model, run.loader_train, run.optimizer, run.train_loss, args, state, device=device,
                    scheduler=run.scheduler, loss_scaler=run.loss_scaler, amp_autocast=run.amp_autocast,
                    model_ema=model_ema, mixup_fn=run.mixup_fn, stop=stop,
                    resume_rng=run.resume_rng if state.step else None, tensorboard=run.tensorboard)
                report_unreadable(run.dataset_train, _logger.warning, f'epoch {epoch} training')
                if args.distributed and args.dist_bn:
                    distribute_bn(model, args.world_size, args.dist_bn == 'reduce')
                eval_metrics = evaluate(model, run.loader_eval, device, run.amp_autocast, args.channels_last,
                                        ema_model=model_ema.module if model_ema is not None else None)
                report_unreadable(run.dataset_eval, _logger.warning, f'epoch {epoch} validation')
                value = eval_metrics[key]
                better = state.best_metric is None or (value < state.best_metric if args.eval_metric == 'loss'
                                                       else value > state.best_metric)
                if better:
                    state.best_metric, state.best_epoch = value, epoch
                state.epoch, state.step = epoch + 1, 0
                # checkpoint-<epoch> is named after the epoch it ends, numbered from 0 as in the log
                run.save(is_best=better, periodic_epoch=epoch if state.epoch % args.checkpoint_interval == 0 else None)
                _logger.info(f'epoch {epoch}: train loss {train_metrics["loss"]:.4f}, '
                             f'val loss {eval_metrics["loss"]:.4f} '
                             f'top-1 {eval_metrics["top1"]:.2f} top-5 {eval_metrics["top5"]:.2f}'
                             + (f' (EMA top-1 {eval_metrics["ema_top1"]:.2f})' if model_ema else '')
                             + f'; best {key} {state.best_metric:.2f} (epoch {state.best_epoch})')
                if run.primary:
                    summary = os.path.join(run.run_dir, 'summary.csv')
                    update_summary(epoch, train_metrics, eval_metrics, summary,
                                   lr=run.optimizer.param_groups[0]['lr'], write_header=not os.path.exists(summary))
                    for name, value in eval_metrics.items():
                        run.tensorboard.add_scalar(f'val/{name}', value, epoch)
                    run.tensorboard.flush()
        except StopRequested as request:
            run.save()
            _logger.warning(f'stopped by {request} at epoch {state.epoch}, batch {state.step}; recovery checkpoint '
                            f'{os.path.join(run.run_dir, LAST)} written: rerun with --resume auto to continue')
            sys.exit(128 + request.signum)
        except TrainingStopped as e:
            raise UserError(str(e)) from None
        finally:
            if run.tensorboard is not None:
                run.tensorboard.close()
            if args.distributed:
                dist.destroy_process_group()
    _logger.info(f'done: best {key} {state.best_metric} at epoch {state.best_epoch}; checkpoints in {run.run_dir}')


def main(argv: list[str] | None = None) -> None:
    parser = train_parser()
    args = parse_args(parser, argv)
    # args.yaml is itself a valid --config (so it leaves out 'config'); taken before check_args resolves
    # --device, so that it holds the device asked for ('auto' runs anywhere, the 'cuda' it became does not)
    config = resolved_config(args, [a.dest for a in parser._actions if a.dest not in ('help', 'config')])
    check_args(args)
    run_dir, resume_path = run_folder(args)
    # Everything that can fail is built and tried before the first write to the run folder (open_run),
    # so bad input changes nothing on disk and a failed start leaves no run behind.
    checkpoint = read_resume_checkpoint(args, resume_path)
    data_root = resolve_data_root(args.dataset, args.data_dir, args.demo_per_class)

    device = init_distributed(args)  # torchrun's env vars: NCCL on GPUs, gloo on CPU; bounded by --dist-timeout
    primary = args.rank == 0
    setup_logging(None, primary)
    seed_epoch(args.seed, -1, 0)  # identical initial weights everywhere (DDP also broadcasts rank 0's)

    # batch size, ranks and workers matter to timm's iterable datasets (TFDS, WebDataset) only
    split_layout = dict(batch_size=args.batch_size, world_size=args.world_size, workers=args.workers)
    dataset_train = create_split(args.dataset, data_root, args.train_split, True, **split_layout)
    dataset_eval = create_split(args.dataset, data_root, args.val_split, False, **split_layout)
    found = class_count(dataset_train)
    num_classes = args.num_classes or found
    if num_classes is None:
        raise UserError('cannot tell the number of classes of this dataset: give --num-classes')
    if found is not None and num_classes < found:  # the loss would fail on the first label past the classifier
        raise UserError(f'--num-classes {num_classes} is fewer than the {found} classes of the training split')
    # Saved with the checkpoints for inference; a --num-classes that differs from the folder's count
    # means the names would not line up with the outputs.
    names = class_names(dataset_train)
    # Evaluation labels are matched to the model's classes by name (a resumed run's are the checkpoint's), so a
    # val split lacking a class is scored right and a class only in val fails now, before any training.
    model_classes = (checkpoint or {}).get('class_names') or names
    notes = [*dataset_train.notes, *dataset_eval.notes]  # said once the run folder's log.txt exists
    if checkpoint is not None and checkpoint.get('class_names'):
        notes.append(match_labels(dataset_train, model_classes, f"training split '{args.train_split}'"))
        names = model_classes  # the outputs' names, even if the training split now lacks a class
    notes.append(match_labels(dataset_eval, model_classes, f"val split '{args.val_split}'"))
    notes = [note for note in notes if note]
    names = names if names is not None and len(names) == num_classes else None
    model = build_model(args, num_classes)
    notes += load_initial_weights(model, args, checkpoint, resume_path, num_classes)

    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    with rejected_as(f'--opt {args.opt}'):
        optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                        momentum=args.momentum,
                                        **{k: v for k, v in (('eps', args.opt_eps), ('betas', args.opt_betas)) if v})
    amp_autocast = autocast_context(args.amp, args.amp_dtype, device)
    loss_scaler = NativeScaler(device=device.type) if args.amp and args.amp_dtype == 'float16' else None

    with rejected_as('--img-size / --crop-pct / --interpolation'):
        data_config = resolve_data_config(dict(img_size=args.img_size, crop_pct=args.crop_pct,
                                               interpolation=args.interpolation), model=model)
    check_forward(model, data_config['input_size'], args, device, amp_autocast)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay, device=device) if args.model_ema else None
    loader_train, loader_eval, mixup_fn = build_loaders(args, dataset_train, dataset_eval, data_config,
                                                        num_classes, device)
    if args.mixup > 0 or args.cutmix > 0:
        train_loss = SoftTargetCrossEntropy()
    else:
        train_loss = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else torch.nn.CrossEntropyLoss()

    updates_per_epoch = math.ceil(len(loader_train) / args.grad_accum_steps)
    with rejected_as(f'--sched {args.sched}'):
        scheduler, num_epochs = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            decay_milestones=args.decay_milestones, cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate,
            min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
            step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch)

    state = TrainState(**checkpoint['state']) if checkpoint is not None else TrainState()
    if state.epoch >= num_epochs:
        _logger.info(f'{run_dir}: the run is complete ({state.epoch} epochs trained, {num_epochs} asked for); '
                     'nothing to do (raise --epochs to train on)')
        if args.distributed:
            dist.destroy_process_group()
        return
    resume_rng = None
    if checkpoint is not None:
        resume_rng = restore_training(checkpoint, resume_path, args, config, state, len(loader_train), optimizer,
                                      loss_scaler, model_ema, notes)

    # from here on files are written; a rank 0 that cannot write them stops every rank
    start_together(args, functools.partial(open_run, run_dir, config, checkpoint, names, primary))
    _logger.info(f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters, '
                 f'{num_classes} classes, {len(dataset_train)} training images; {args.world_size} process(es) on '
                 f'{device.type}; run folder {run_dir}')
    for note in notes:
        _logger.info(note)
    del checkpoint

    train_model = model
    if args.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.torch_compile:  # after DDP, so the compiler sees DDP's buckets (PyTorch's recommended order)
        _logger.info(f'compiling the model with torch.compile (backend {args.torch_compile}): the first training '
                     'and evaluation steps are slow while it compiles (a minute or more on a CPU)')
        train_model = torch.compile(train_model, backend=args.torch_compile)
    tensorboard = None
    if primary:
        from torch.utils.tensorboard import SummaryWriter
        tensorboard = SummaryWriter(run_dir)
    train_epochs(Run(args, run_dir, primary, config, names, device, model, train_model, model_ema, optimizer, scheduler,
                     loss_scaler, amp_autocast, train_loss, mixup_fn, loader_train, loader_eval, dataset_train,
                     dataset_eval, state, num_epochs, updates_per_epoch, resume_rng, tensorboard))


if __name__ == '__main__':
    run_main(main, 'train.py')
