#!/usr/bin/env python3
"""Average the weights of several checkpoints of one run into a weights file validate.py can score.

    python scripts/avg_checkpoints.py --input output/demo -n 3 --output output/demo/avg3.pth.tar
    python scripts/avg_checkpoints.py --input output/demo -n 3 --best --output output/demo/best3.pth.tar
    python scripts/avg_checkpoints.py --checkpoints a.pth.tar b.pth.tar c.pth.tar --output avg.pth.tar --use-ema

With ``--input``, the run folder's periodic checkpoints (``checkpoint-<epoch>.pth.tar``) are the candidates:
the newest N, or with ``--best`` the best N by the run's ``summary.csv`` (``--metric``, default the run's
``eval_metric``). Floating-point tensors (BatchNorm statistics included) are averaged; integer buffers are
the newest checkpoint's. The output (``.pth``/``.pth.tar``: the weights plus model name, config and class
names; ``.safetensors``: the weights) is written atomically and never replaces a file without ``--force``.
"""
from __future__ import annotations

import csv
import glob
import os
import re

from ddfnet.cli import OneLineArgumentParser, UserError, run_main
from ddfnet.training.checkpoint import atomic_save
from ddfnet.training.release import average_state_dicts, release_bytes
from ddfnet.utils.io import atomic_write, check_output_file
from ddfnet.utils.weights import load_checkpoint, model_state_dict


def avg_parser() -> OneLineArgumentParser:
    """The ``avg_checkpoints.py`` argument parser (timm's names: ``--input``, ``-n``, ``--output``)."""
    parser = OneLineArgumentParser(prog='avg_checkpoints.py', description='Average checkpoint weights.')
    add = parser.add_argument
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--input', metavar='RUN_DIR', help="a train.py run folder")
    source.add_argument('--checkpoints', nargs='+', metavar='FILE', help='these files, oldest first')
    add('-n', type=int, default=3, help='how many of the run folder\'s checkpoints to average (default 3)')
    add('--best', action='store_true', help='the best N by --metric in summary.csv instead of the newest N')
    add('--metric', help="summary.csv column, e.g. eval_top1 or eval_loss (default: the run's eval_metric); "
        'lower is better for losses')
    add('--use-ema', action='store_true', help='average the EMA weights')
    add('--output', required=True, metavar='FILE', help='.pth, .pth.tar or .safetensors')
    add('--force', action='store_true', help='replace an existing output file')
    return parser


def _metric_by_epoch(run_dir: str, metric: str) -> dict[int, float]:
    """``metric`` of every epoch in the run's summary.csv, keyed by its epoch index."""
    path = os.path.join(run_dir, 'summary.csv')
    try:
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UserError(f'cannot read {path} for --best: {e.strerror}') from None
    if rows and metric not in rows[0]:
        raise UserError(f'no column {metric!r} in {path} (it has {", ".join(rows[0])})')
    # summary.csv's row 'epoch' is the epoch index, as in the name of the checkpoint written at its end
    return {int(row['epoch']): float(row[metric]) for row in rows if row.get(metric)}


def select_checkpoints(args) -> list[tuple[str, dict]]:
    """The (path, checkpoint) pairs to average, oldest first. A run folder's ``checkpoint-<E>.pth.tar`` is
    the state at the end of epoch E, numbered from 0 (train.py names them so); only the chosen ones are loaded."""
    if args.checkpoints:
        return [(path, load_checkpoint(path)) for path in args.checkpoints]
    if not os.path.isdir(args.input):
        raise UserError(f'no run folder {args.input}')
    by_epoch = {}
    for path in glob.glob(os.path.join(args.input, 'checkpoint-*.pth.tar')):
        match = re.fullmatch(r'checkpoint-(\d+)\.pth\.tar', os.path.basename(path))
        if match:
            by_epoch[int(match.group(1))] = path
    if len(by_epoch) < args.n:
        raise UserError(f'{args.input} holds {len(by_epoch)} periodic checkpoints (checkpoint-<epoch>.pth.tar), '
                        f'fewer than -n {args.n} (train with a smaller --checkpoint-interval or a larger '
                        '--checkpoint-hist)')
    epochs = sorted(by_epoch)
    if args.best:
        newest = load_checkpoint(by_epoch[epochs[-1]])
        config = newest.get('config') if isinstance(newest, dict) else None
        metric = args.metric or ('eval_' + ('ema_' if args.use_ema else '')
                                 + (config or {}).get('eval_metric', 'top1'))
        values = _metric_by_epoch(args.input, metric)
        missing = [by_epoch[e] for e in epochs if e not in values]
        if missing:
            raise UserError(f'{missing[0]} has no row in summary.csv')
        ranked = sorted(epochs, key=lambda e: values[e], reverse='loss' not in metric)[:args.n]
        print(f'best {args.n} by {metric}: '
              + ', '.join(f'{os.path.basename(by_epoch[e])} {values[e]:.4f}' for e in ranked))
        epochs = sorted(ranked)
    else:
        epochs = epochs[-args.n:]
    return [(by_epoch[e], load_checkpoint(by_epoch[e])) for e in epochs]


def main(argv: list[str] | None = None) -> None:
    """Average checkpoints as the command line asks (see the module docstring)."""
    args = avg_parser().parse_args(argv)
    if args.n < 1:
        raise UserError('-n must be at least 1')
    if not args.output.endswith(('.pth', '.pth.tar', '.safetensors')):
        raise UserError(f'--output {args.output}: name a .pth, .pth.tar or .safetensors file')
    check_output_file(args.output, args.force)
    selected = select_checkpoints(args)
    paths = [path for path, _ in selected]
    states = [model_state_dict(checkpoint, path, use_ema=args.use_ema) for path, checkpoint in selected]
    averaged = average_state_dicts(states, paths)
    newest = selected[-1][1] if isinstance(selected[-1][1], dict) else {}
    if args.output.endswith('.safetensors'):
        data = release_bytes(averaged, 'safetensors')
        atomic_write(args.output, lambda f: f.write(data), binary=True)
    else:  # a weights file validate.py and inference.py read like a training checkpoint
        config = newest.get('config')
        atomic_save({'model': averaged, 'model_name': newest.get('model_name'),
                     'config': config if isinstance(config, dict) else None,
                     'class_names': newest.get('class_names'), 'averaged_from': paths, 'ema': args.use_ema},
                    args.output)
    print(f'averaged {len(paths)} checkpoints{" (EMA weights)" if args.use_ema else ""}: '
          + ', '.join(os.path.basename(p) for p in paths) + f' -> {args.output}')


if __name__ == '__main__':
    run_main(main, 'avg_checkpoints.py')
