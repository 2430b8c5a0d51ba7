#!/usr/bin/env python3
"""Score an ONNX classifier with onnxruntime (CPU): top-1, top-5 and loss, printed like validate.py.

    python scripts/onnx_validate.py /data/imagenet --onnx-input ddf_resnet50.onnx --results-file onnx.json

DATA is an image folder with a ``validation`` (or ``val``) split of ``<class>/<image>`` folders. Image size,
mean, std, crop and interpolation default to what ``onnx_export.py`` stored in the file (else 224, the
ImageNet mean/std, crop 0.875, bicubic); the flags override them. The scoring loop is validate.py's
(:func:`ddfnet.training.engine.evaluate`). Bad input is one line, exit status 2.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_loader

from ddfnet.data import class_count, create_split, resolve_data_root
from ddfnet.data.images import report_unreadable
from ddfnet.data.labels import match_labels
from ddfnet.export import OnnxRuntimeModel
from ddfnet.training.config import OneLineArgumentParser, UserError, run_main
from ddfnet.training.engine import evaluate

METADATA_KEY = 'ddfnet.data_config'  # written by onnx_export.py
CLASS_NAMES_KEY = 'ddfnet.class_names'  # written by onnx_export.py from a checkpoint that names its classes
DEFAULTS = dict(input_size=(3, 224, 224), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=0.875,
                interpolation='bicubic', model=None, dynamic_size=False)


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _validate_module():
    """validate.py (the repository root's), for its results-file writer."""
    return _load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'validate.py'),
                 '_ddfnet_validate')


def _inference_module():
    """scripts/inference.py, for its class-map reader."""
    return _load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'inference.py'), '_ddfnet_inference')


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
    add('--results-file', metavar='FILE', help='write the results as JSON (.json) or a CSV row (.csv)')
    return parser


def main(argv: list[str] | None = None) -> None:
    args = onnx_validate_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError('--batch-size must be >= 1')
    if not os.path.isfile(args.onnx_input):
        raise UserError(f'no ONNX file {args.onnx_input}')
    try:
        model = OnnxRuntimeModel(args.onnx_input, threads=args.threads)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable or invalid files
        raise UserError(f'cannot load {args.onnx_input} in onnxruntime: {str(e).strip().splitlines()[0]}') from None
    stored = json.loads(model.metadata.get(METADATA_KEY, '{}'))
    config = dict(DEFAULTS, **stored)
    size = args.img_size or config['input_size'][-1]
    dims = model.session.get_inputs()[0].shape  # ints for fixed axes, names for dynamic ones
    fixed = [d for d in dims[2:] if isinstance(d, int)]
    if fixed and fixed != [size, size]:
        raise UserError(f'{args.onnx_input} takes {dims[2]}x{dims[3]} images (exported without --dynamic-size), '
                        f'not {size}x{size}')
    if args.class_map:
        model_classes = _inference_module().read_class_map(args.class_map)
    else:
        model_classes = json.loads(model.metadata[CLASS_NAMES_KEY]) if CLASS_NAMES_KEY in model.metadata else None
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
        _validate_module().write_results(results, args.results_file)


if __name__ == '__main__':
    run_main(main, 'onnx_validate.py')
