"""Arguments of ``train.py``, and those the task scripts (scripts/train_detection.py,
scripts/train_joint_upsampling.py) share. Names follow timm's ``train.py`` where one exists; a config file's
keys are these names with underscores (``--batch-size`` -> ``batch_size``)."""
from __future__ import annotations

import argparse

from ..cli import OneLineArgumentParser, yaml_mapping
from ..data.datasets import default_workers


def add_run_arguments(parser: argparse.ArgumentParser, output: str, weights: str) -> None:
    """The task scripts' options for how a run goes, where it writes and what it scores: seed, workers, AMP,
    device, torchrun timeout, the run folder (default ``output``), resume, evaluate-only and the checkpoint it
    scores (``weights``: what that checkpoint holds, for the help)."""
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--amp', action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument('--amp-dtype', default='bfloat16', choices=('float16', 'bfloat16'))
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dist-timeout', type=float, default=600.0)
    parser.add_argument('--output', default=output, help='run folder')
    parser.add_argument('--resume', action='store_true', help="continue the run in --output from its 'last' checkpoint")
    parser.add_argument('--evaluate-only', action='store_true', help='score --checkpoint (or the untrained model)')
    parser.add_argument('--checkpoint', help=f'{weights} to score with --evaluate-only')


def train_parser() -> argparse.ArgumentParser:
    """The ``train.py`` argument parser (defaults are the paper's ImageNet recipe where it has one)."""
    parser = OneLineArgumentParser(prog='train.py', description='Train an image classifier (DDF models included).')
    add = parser.add_argument
    flag = dict(action=argparse.BooleanOptionalAction)
    add('--config', '-c', metavar='FILE', help='YAML config; keys are these argument names with underscores')

    group = parser.add_argument_group('data')
    add = group.add_argument
    add('--data-dir', metavar='DIR', help='dataset root (for an ImageFolder: holds the train/ and val/ folders)')
    add('--dataset', default='', help="timm dataset name ('' = image folder, 'torch/cifar10', ...), or 'demo'")
    add('--train-split', default='train')
    add('--val-split', default='validation')
    add('--num-classes', type=int, help='default: the number of classes found in the training split')
    add('--demo-per-class', type=int, default=256, help="training images per class of the 'demo' dataset")
    add('--img-size', type=int, help="image size (default: the model's pretrained cfg)")
    add('--crop-pct', type=float, help="evaluation crop fraction (default: the model's cfg)")
    add('--interpolation', default='', help="evaluation resize interpolation (default: the model's cfg)")
    add('--batch-size', '-b', type=int, default=128, help='per-process batch size')
    add('--validation-batch-size', type=int, help='default: --batch-size')
    add('--workers', '-j', type=int, default=default_workers(),
        help='data loading processes per training process (default: 4, or the cores available if fewer)')
    add('--pin-mem', **flag, default=False)

    group = parser.add_argument_group('model')
    add = group.add_argument
    add('--model', help='timm model name, e.g. ddf_resnet50')
    add('--model-kwargs', type=yaml_mapping, default={}, help="extra model arguments, e.g. '{layers: [1, 1, 1, 1]}'")
    add('--pretrained-file', metavar='FILE', help='start from these weights (fine-tuning); classifier dropped on a '
        'class-count mismatch')
    add('--drop-rate', type=float, default=0.0)
    add('--drop-path', type=float, help='stochastic depth rate')
    add('--channels-last', **flag, default=False)
    add('--torch-compile', nargs='?', const='inductor', help='compile the model with this torch.compile backend')
    add('--sync-bn', **flag, default=False, help='SyncBatchNorm across processes')
    add('--dist-bn', default='reduce', choices=['', 'broadcast', 'reduce'],
        help='before each evaluation, average (reduce) or copy from rank 0 (broadcast) the BatchNorm statistics')
    add('--model-ema', **flag, default=False, help='keep an exponential moving average of the weights')
    add('--model-ema-decay', type=float, default=0.9998)

    group = parser.add_argument_group('optimisation')
    add = group.add_argument
    add('--opt', default='sgd', help="timm optimizer name: sgd (Nesterov), momentum, adamw, lamb, ...")
    add('--opt-eps', type=float)
    add('--opt-betas', type=float, nargs='+')
    add('--momentum', type=float, default=0.9)
    add('--weight-decay', type=float, default=1e-4)
    add('--clip-grad', type=float, help='clip gradients to this norm (or value, see --clip-mode)')
    add('--clip-mode', default='norm', choices=['norm', 'value', 'agc'])
    add('--grad-accum-steps', type=int, default=1, help='micro-batches per optimizer step')
    add('--amp', **flag, default=False, help='mixed precision')
    add('--amp-dtype', default='float16', choices=['float16', 'bfloat16'],
        help='float16 uses a gradient scaler, bfloat16 does not need one')

    group = parser.add_argument_group('schedule')
    add = group.add_argument
    add('--sched', default='cosine', help='timm scheduler: cosine, step, multistep, poly, tanh')
    add('--sched-on-updates', **flag, default=False, help='update the lr every optimizer step, not every epoch')
    add('--lr', type=float, default=0.1, help='peak learning rate for the global batch')
    add('--epochs', type=int, default=120, help='epochs before the cool-down')
    add('--warmup-epochs', type=int, default=5)
    add('--warmup-lr', type=float, default=1e-4)
    add('--min-lr', type=float, default=1e-5)
    add('--cooldown-epochs', type=int, default=0, help='epochs at --min-lr after --epochs')
    add('--decay-epochs', type=float, default=30, help="'step' schedule period")
    add('--decay-milestones', type=int, nargs='+', default=[30, 60, 90], help="'multistep' schedule epochs")
    add('--decay-rate', type=float, default=0.1)
    add('--dyconv-temp-start', type=float, default=30.0, help='DyConv attention temperature at epoch 0')
    add('--dyconv-temp-end', type=float, default=1.0)
    add('--dyconv-temp-epochs', type=int, default=10, help='epochs of the linear temperature decrease')

    group = parser.add_argument_group('augmentation and regularisation')
    add = group.add_argument
    add('--smoothing', type=float, default=0.1, help='label smoothing')
    add('--aa', help="auto-augment policy, e.g. rand-m7-mstd0.5-inc1 (RandAugment)")
    add('--reprob', type=float, default=0.0, help='random erasing probability')
    add('--remode', default='pixel', choices=['const', 'rand', 'pixel'])
    add('--recount', type=int, default=1)
    add('--color-jitter', type=float, default=0.4)
    add('--scale', type=float, nargs=2, default=[0.08, 1.0], help='random-resized-crop area range')
    add('--ratio', type=float, nargs=2, default=[3 / 4, 4 / 3], help='random-resized-crop aspect range')
    add('--hflip', type=float, default=0.5)
    add('--train-interpolation', default='random')
    add('--mixup', type=float, default=0.0, help='mixup alpha (0: off)')
    add('--cutmix', type=float, default=0.0, help='cutmix alpha (0: off)')
    add('--mixup-prob', type=float, default=1.0)
    add('--mixup-switch-prob', type=float, default=0.5)
    add('--mixup-mode', default='batch', choices=['batch', 'pair', 'elem'])

    group = parser.add_argument_group('run')
    add = group.add_argument
    add('--device', default='auto', help="'cuda', 'cpu', or 'auto' (cuda when available)")
    add('--seed', type=int, default=42)
    add('--dist-timeout', type=float, default=600, metavar='SECONDS', help='give up (one-line error) when a '
        'process-group set-up, store wait or collective takes longer than this')
    add('--output', default='output', metavar='DIR', help='runs are written to OUTPUT/EXPERIMENT')
    add('--experiment', help="run folder name (default: the config file's name, else the model name)")
    add('--resume', metavar='auto|FILE', help="'auto': continue the run folder's latest checkpoint (start fresh if "
        "there is none); FILE: continue from that checkpoint")
    add('--checkpoint-hist', type=int, default=3, help='periodic checkpoints to keep')
    add('--checkpoint-interval', type=int, default=10, help='write a periodic checkpoint every N epochs')
    add('--log-interval', type=int, default=50, help='optimizer steps between progress lines')
    add('--eval-metric', default='top1', choices=['top1', 'top5', 'loss'], help="metric that picks 'best'")
    return parser
