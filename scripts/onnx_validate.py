#!/usr/bin/env python3
"""Score an ONNX classifier with onnxruntime (CPU): top-1, top-5 and loss, printed like validate.py.

    python scripts/onnx_validate.py /data/imagenet --onnx-input ddf_resnet50.onnx --results-file onnx.json

DATA is an image folder with a ``validation`` (or ``val``) split of ``<class>/<image>`` folders. Image size,
mean, std, crop and interpolation default to what ``onnx_export.py`` stored in the file (else 224, the
ImageNet mean/std, crop 0.875, bicubic); the flags override them. ``--results-file`` is checked before the
work: a JSON file is replaced only with ``--force``, a CSV table gets a row. The scoring loop is validate.py's
(:func:`ddfnet.training.engine.evaluate`). Bad input is one line, exit status 2.
"""
from __future__ import annotations

import os
import sys
import time

import torch
from timm.data import create_loader

from ddfnet.cli import OneLineArgumentParser, UserError, run_main
from ddfnet.data import class_count, create_split, resolve_data_root
from ddfnet.data.images import check_image_options, report_unreadable
from ddfnet.data.labels import match_labels, read_class_map
from ddfnet.export import OnnxRuntimeModel
from ddfnet.export.metadata import read_class_names, read_data_config
from ddfnet.training.engine import evaluate
from ddfnet.utils.io import check_output_file, write_results


def onnx_validate_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog='onnx_validate.py', description='Evaluate an ONNX classifier with onnxruntime.')
    add = parser.add_argument
    add('data', metavar='DATA', help='image folder with a validation split')
    add('--onnx-input', metavar='PATH', required=True, help='the .onnx file (from onnx_export.py)')
    add('--split', default='validation')
    add('--batch-size', '-b', type=int, default=32)
    add('--img-size', type=int)
    add('--crop-pct', type=float)
    add('--interpolation', default='')
    add('--workers', '-j', type=int, default=2)
    add('--class-map', metavar='FILE', help="the model's class names, one a line in output order (a run's "
        'classes.txt); default: those stored in the ONNX file')
    add('--threads', type=int, help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    add('--results-file', metavar='FILE', help='write the results as JSON (.json) or add a row to a CSV table (.csv)')
    add('--force', action='store_true', help='replace an existing JSON results file')
    return parser


def main(argv: list[str] | None = None) -> None:
    args = onnx_validate_parser().parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        raise UserError('--batch-size must be >= 1 and --workers >= 0')
    check_image_options(args.img_size, args.crop_pct, args.interpolation)
    if args.results_file:  # before the work, so that its results cannot be lost
        check_output_file(args.results_file, args.force, append=args.results_file.endswith('.csv'))
    if not os.path.isfile(args.onnx_input):
        raise UserError(f'no ONNX file {args.onnx_input}')
    try:
        model = OnnxRuntimeModel(args.onnx_input, threads=args.threads)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable or invalid files
        raise UserError(f'cannot load {args.onnx_input} in onnxruntime: {str(e).strip().splitlines()[0]}') from None
    config = read_data_config(model.metadata)
    size = args.img_size or config['input_size'][-1]
    dims = model.session.get_inputs()[0].shape  # ints for fixed axes, names for dynamic ones
    fixed = [d for d in dims[2:] if isinstance(d, int)]
    if fixed and fixed != [size, size]:
        raise UserError(f'{args.onnx_input} takes {dims[2]}x{dims[3]} images (exported without --dynamic-size), '
                        f'not {size}x{size}')
    model_classes = read_class_map(args.class_map) if args.class_map else read_class_names(model.metadata)
    dataset = create_split('', resolve_data_root('', args.data), args.split, is_training=False)
    for note in (*dataset.notes, match_labels(dataset, model_classes, f"split '{args.split}' of {args.data}")):
        if note:
            print(f'onnx_validate.py: {note}', file=sys.stderr)
    loader = create_loader(dataset, input_size=(3, size, size), batch_size=args.batch_size, is_training=False,
                           interpolation=args.interpolation or config['interpolation'],
                           crop_pct=args.crop_pct or config['crop_pct'], mean=tuple(config['mean']),
                           std=tuple(config['std']), num_workers=args.workers, device=torch.device('cpu'),
                           use_prefetcher=False, persistent_workers=False)
    start = time.perf_counter()
    metrics = evaluate(model, loader, torch.device('cpu'))
    seconds = time.perf_counter() - start
    unreadable = report_unreadable(dataset, lambda line: print(f'onnx_validate.py: {line}', file=sys.stderr),
                                   'validation')
    name = config['model'] or os.path.basename(args.onnx_input)
    results = {
        'model': name, 'onnx_input': args.onnx_input, 'split': args.split,
        'top1': round(metrics['top1'], 4), 'top5': round(metrics['top5'], 4), 'loss': round(metrics['loss'], 6),
        'images': len(dataset) - unreadable, 'classes': class_count(dataset),
        'images_per_sec': round(len(dataset) / seconds, 1),
        'img_size': size, 'crop_pct': args.crop_pct or config['crop_pct'],
        'interpolation': args.interpolation or config['interpolation'], 'runtime': 'onnxruntime-cpu',
    }
    print(f"{name}: top-1 {results['top1']:.2f} top-5 {results['top5']:.2f} loss {results['loss']:.4f} "
          f"{results['images_per_sec']:.1f} img/s ({results['images']} images, {size}px, crop {results['crop_pct']}, "
          f"{results['interpolation']}, onnxruntime cpu)")
    if args.results_file:
        write_results(results, args.results_file)


if __name__ == '__main__':
    run_main(main, 'onnx_validate.py')
