#!/usr/bin/env python3
"""Evaluate a checkpoint: top-1, top-5, loss, parameter count and images/s.

    python validate.py --config configs/demo.yaml --checkpoint output/demo/best.pth.tar
    python validate.py /data/imagenet --model ddf_resnet50 --checkpoint ddf_mul_resnet50.pth

``--checkpoint`` takes train.py's checkpoints (``--use-ema`` for the EMA weights) or a released
state_dict. Image size, crop and interpolation default to the model's pretrained cfg; ``--config`` (a
training config) sets them, the data and the model as in training. ``--results-file`` is checked before
the work: a JSON file is replaced only with ``--force``, a CSV table gets a row. Bad input is one line,
exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time

import timm
import torch
from timm.data import create_loader, resolve_data_config

import ddfnet  # noqa: F401  (registers the DDF models with timm)
from ddfnet.cli import OneLineArgumentParser, UserError, parse_args, rejected_as, run_main, yaml_mapping
from ddfnet.data import class_count, create_split, resolve_data_root
from ddfnet.data.datasets import default_workers
from ddfnet.data.images import check_image_options, data_path, report_unreadable
from ddfnet.data.labels import match_labels
from ddfnet.training.args import train_parser
from ddfnet.training.engine import autocast_context, evaluate
from ddfnet.utils.device import resolve_device
from ddfnet.utils.io import check_output_file, write_results
from ddfnet.utils.weights import classifier_size, create_model_with_weights, load_checkpoint, model_state_dict


def validate_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog='validate.py', description='Evaluate an image classifier checkpoint.')
    add = parser.add_argument
    add('--config', '-c', metavar='FILE', help="a training config: its model, data and image settings are used")
    add('--model', help='timm model name, e.g. ddf_resnet50')
    add('--model-kwargs', type=yaml_mapping, default={})
    add('--checkpoint', metavar='FILE', help="the weights to evaluate (required): train.py's checkpoint or a "
        "state_dict (.pth, .pth.tar, .safetensors)")
    add('--use-ema', action='store_true', help="evaluate the checkpoint's EMA weights")
    add('data', nargs='?', metavar='DATA', help='the dataset root, as --data-dir (timm\'s positional form)')
    add('--data-dir', metavar='DIR')
    add('--dataset', default='', help="timm dataset name ('' = image folder), or 'demo'")
    add('--demo-per-class', type=int, default=256)
    add('--split', '--val-split', dest='val_split', default='validation',
        help="split to evaluate (a training config's val_split applies; the command line wins)")
    add('--num-classes', type=int, help="default: the checkpoint's classifier size, else the dataset's classes")
    add('--img-size', type=int)
    add('--crop-pct', type=float)
    add('--interpolation', default='')
    add('--batch-size', '-b', type=int, default=128)
    add('--validation-batch-size', type=int, help='alias of --batch-size (the training config key)')
    add('--workers', '-j', type=int, default=default_workers(),
        help='data loading processes (default: 4, or the cores available if fewer)')
    add('--amp', action=argparse.BooleanOptionalAction, default=False)
    add('--amp-dtype', default='float16', choices=['float16', 'bfloat16'])
    add('--channels-last', action=argparse.BooleanOptionalAction, default=False)
    add('--device', default='auto', help="'cuda', 'cpu' or 'auto'")
    add('--results-file', metavar='FILE', help='write the results as JSON (.json) or add a row to a CSV table (.csv)')
    add('--force', action='store_true', help='replace an existing JSON results file')
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = validate_parser()
    training_keys = {a.dest for a in train_parser()._actions}
    args = parse_args(parser, argv, accepted=training_keys)  # a training config's other keys are fine here
    args.data_dir = data_path(args.data, args.data_dir)
    if not args.model:
        raise UserError('no model: give --model (or --config)')
    if not timm.is_model(args.model):
        raise UserError(f"unknown model '{args.model}' (list them with timm.list_models('ddf*'))")
    if not args.checkpoint:  # a model with random weights scores chance, a figure nobody should read
        raise UserError('no --checkpoint: give the weights to evaluate (a state_dict or a train.py checkpoint)')
    for name in ('batch_size', 'validation_batch_size', 'num_classes', 'img_size', 'demo_per_class'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f'--{name.replace("_", "-")} must be at least 1')
    if args.workers < 0:
        raise UserError('--workers must not be negative')
    check_image_options(args.img_size, args.crop_pct, args.interpolation)
    if args.results_file:  # before the work, so that its results cannot be lost
        check_output_file(args.results_file, args.force, append=args.results_file.endswith('.csv'))
    device = torch.device(resolve_device(args.device))
    checkpoint = load_checkpoint(args.checkpoint)
    state = model_state_dict(checkpoint, args.checkpoint, use_ema=args.use_ema)
    # train.py's checkpoints name their classes: the split's labels are matched to them by name
    model_classes = checkpoint.get('class_names') if isinstance(checkpoint, dict) else None
    del checkpoint
    data_root = resolve_data_root(args.dataset, args.data_dir, args.demo_per_class)
    dataset = create_split(args.dataset, data_root, args.val_split, is_training=False)
    notes = [*dataset.notes, match_labels(dataset, model_classes, f"split '{args.val_split}' of {data_root}")]

    num_classes = args.num_classes
    if num_classes is None:
        num_classes = classifier_size(args.model, state)
    num_classes = num_classes or class_count(dataset) or 1000
    if model_classes is not None and len(model_classes) != num_classes:
        raise UserError(f'{args.checkpoint} names {len(model_classes)} classes, the model has {num_classes}')
    for note in notes:
        if note:
            print(f'validate.py: {note}', file=sys.stderr)
    model = create_model_with_weights(args.model, num_classes, args.model_kwargs, state, args.checkpoint)
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    with rejected_as('--img-size / --crop-pct / --interpolation'):
        data_config = resolve_data_config(dict(img_size=args.img_size, crop_pct=args.crop_pct,
                                               interpolation=args.interpolation), model=model)
    with rejected_as(f'--interpolation {data_config["interpolation"]} / --crop-pct {data_config["crop_pct"]}'):
        loader = create_loader(dataset, input_size=data_config['input_size'],
                               batch_size=args.validation_batch_size or args.batch_size, is_training=False,
                               interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'],
                               mean=data_config['mean'], std=data_config['std'], num_workers=args.workers,
                               device=device, use_prefetcher=device.type == 'cuda', persistent_workers=False)
    amp_autocast = autocast_context(args.amp, args.amp_dtype, device)
    start = time.perf_counter()
    metrics = evaluate(model, loader, device, amp_autocast, args.channels_last)
    seconds = time.perf_counter() - start
    unreadable = report_unreadable(dataset, lambda line: print(f'validate.py: {line}', file=sys.stderr), 'validation')
    results = {
        'model': args.model, 'checkpoint': args.checkpoint, 'ema': args.use_ema, 'split': args.val_split,
        'top1': round(metrics['top1'], 4), 'top5': round(metrics['top5'], 4), 'loss': round(metrics['loss'], 6),
        'params_m': round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        'images': len(dataset) - unreadable, 'images_per_sec': round(len(dataset) / seconds, 1),
        'img_size': data_config['input_size'][-1], 'crop_pct': data_config['crop_pct'],
        'interpolation': data_config['interpolation'], 'device': device.type,
    }
    print(f"{args.model}: top-1 {results['top1']:.2f} top-5 {results['top5']:.2f} loss {results['loss']:.4f} "
          f"params {results['params_m']:.3f}M {results['images_per_sec']:.1f} img/s "
          f"({results['images']} images, {results['img_size']}px, crop {results['crop_pct']}, "
          f"{results['interpolation']}, {device.type})")
    if args.results_file:
        write_results(results, args.results_file)


if __name__ == '__main__':
    run_main(main, 'validate.py')
