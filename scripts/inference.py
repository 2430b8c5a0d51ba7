#!/usr/bin/env python3
"""Predict the classes of images with a trained model: top-k class names and probabilities per image.

    python scripts/inference.py --config output/demo/args.yaml --checkpoint output/demo/best.pth.tar \\
        --data-dir photos/ --results-file predictions.csv
    python scripts/inference.py --model ddf_resnet50 --checkpoint ddf_r50.pth --data-dir list.txt --topk 3

``PATH`` (or ``--data-dir PATH``) is an image, a folder (searched recursively), a text file of image paths
(one a line, relative to the file's folder; ``#`` starts a comment), or with ``--split`` the root of an
image folder dataset (``ROOT/SPLIT/<class>/<image>``; its folder names are reported as labels). Image
size, crop, interpolation and mean/std come from the model's cfg, or from a training config (``--config``,
e.g. a run's args.yaml); only its model and image settings are used, never its data. Class names come from
the checkpoint (train.py stores them) or ``--class-map`` (one name a line); a 1000-class model without
them gets timm's ImageNet names, any other model class indices. ``--topk`` defaults to 5, or all classes
of a smaller model. A file that cannot be read as an image is reported and skipped; results go to
``--results-file`` as CSV, JSON or JSON lines, and a short table to stdout. Every option is checked before
any image is read; bad input is one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time

import torch
from timm.data import ImageNetInfo, create_transform, resolve_data_config
from timm.data.readers.img_extensions import get_img_extensions

import ddfnet  # noqa: F401  (registers the DDF models with timm)
from ddfnet.cli import OneLineArgumentParser, UserError, parse_args, run_main, yaml_mapping
from ddfnet.data import create_split
from ddfnet.data.images import READ_EXTENSIONS, check_image_options, data_path, open_rgb
from ddfnet.data.labels import label_table, missing_note, read_class_map
from ddfnet.training.args import train_parser
from ddfnet.training.engine import autocast_context
from ddfnet.utils.device import resolve_device
from ddfnet.utils.io import atomic_write_text, check_output_file
from ddfnet.utils.weights import classifier_size, create_model_with_weights, load_checkpoint, model_state_dict

FORMATS = ('csv', 'json', 'jsonl')
TABLE_ROWS = 20  # rows of the stdout table when the results also go to a file
DEFAULT_TOPK = 5
IMAGENET_CLASSES = 1000  # a model with this many classes and no stored names gets timm's ImageNet names


def inference_parser() -> argparse.ArgumentParser:
    """The ``inference.py`` argument parser (validate.py's and timm's names where they have one)."""
    parser = OneLineArgumentParser(prog='inference.py', description='Top-k predictions for images.')
    add = parser.add_argument
    add('--config', '-c', metavar='FILE', help="a training config (a run's args.yaml): its model and image "
        'settings are used')
    add('--model', help='timm model name, e.g. ddf_resnet50')
    add('--model-kwargs', type=yaml_mapping, default={})
    add('--checkpoint', metavar='FILE', help="train.py's checkpoint or a state_dict (.pth, .pth.tar, .safetensors)")
    add('--use-ema', action='store_true', help="use the checkpoint's EMA weights")
    # dest 'input', not 'data_dir': a training config's data_dir must not become the images to predict
    add('input_path', nargs='?', metavar='PATH', help='as --data-dir (timm\'s positional form)')
    add('--data-dir', '--input', dest='input', metavar='PATH',
        help='an image, a folder of images (recursive), a text file of image paths, or with --split a dataset root')
    add('--split', help='read the image folder split DATA_DIR/SPLIT/<class>/<image> (labels reported)')
    add('--class-map', metavar='FILE', help="class names, one a line in label order (a run's classes.txt)")
    add('--num-classes', type=int, help="default: the checkpoint's classifier size")
    add('--img-size', type=int)
    add('--crop-pct', type=float)
    add('--interpolation', default='')
    add('--mean', type=float, nargs=3, metavar='M', help="default: the model's cfg")
    add('--std', type=float, nargs=3, metavar='S', help="default: the model's cfg")
    add('--topk', type=int, help=f'classes reported per image (default: {DEFAULT_TOPK}, or all if the model has fewer)')
    add('--batch-size', '-b', type=int, default=32)
    add('--workers', '-j', type=int, default=2)
    add('--amp', action=argparse.BooleanOptionalAction, default=False)
    add('--amp-dtype', default='float16', choices=['float16', 'bfloat16'])
    add('--channels-last', action=argparse.BooleanOptionalAction, default=False)
    add('--torch-compile', nargs='?', const='inductor', help='compile the model with this torch.compile backend')
    add('--device', default='auto', help="'cuda', 'cpu' or 'auto'")
    add('--results-file', metavar='FILE', help='write every prediction here')
    add('--results-format', choices=FORMATS, help="csv, json or jsonl (default: from the file's extension, else csv)")
    add('--force', action='store_true', help='replace an existing results file')
    return parser


def list_inputs(path: str, split: str | None) -> tuple[list[str], list[str | None], list[tuple[str, str]]]:
    """The image paths to predict for ``--data-dir PATH [--split SPLIT]``, their labels (folder names with
    a split, else None) and the files skipped up front as (path, reason)."""
    if split:
        dataset = create_split('', path, split, is_training=False)
        reader = getattr(dataset, 'reader', None)
        if not hasattr(reader, 'samples'):
            raise UserError(f'--split reads image folders; {path} is not one')
        names = {index: name for name, index in reader.class_to_idx.items()}
        return [p for p, _ in reader.samples], [names[t] for _, t in reader.samples], []
    if os.path.isdir(path):
        images, skipped, extensions = [], [], set(READ_EXTENSIONS)
        for folder, subfolders, files in os.walk(path):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith('.'))
            for name in sorted(f for f in files if not f.startswith('.')):
                file = os.path.join(folder, name)
                if os.path.splitext(name)[1].lower() in extensions:
                    images.append(file)
                else:
                    skipped.append((file, 'not an image file (extension)'))
        return images, [None] * len(images), skipped
    if os.path.isfile(path) and os.path.splitext(path)[1].lower() in get_img_extensions():
        return [path], [None], []  # one image, not a list of them
    if os.path.isfile(path):
        try:
            with open(path, encoding='utf-8') as f:
                lines = [line.split('#', 1)[0].strip() for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f'cannot read the list of images {path}: {e}') from None
        base = os.path.dirname(os.path.abspath(path))
        images = [os.path.join(base, line) for line in lines if line]
        return images, [None] * len(images), []
    raise UserError(f'no file or folder {path}')


class ImageFiles(torch.utils.data.Dataset):
    """Images by path; one that cannot be decoded yields ``(None, index, reason)`` instead of raising."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform(open_rgb(self.paths[index])), index, ''
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...: any is a skip
            reason = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            return None, index, reason[:160]


def collate_readable(batch):
    """Stack the images that decoded; pass on the indices of those and the failures."""
    good = [(image, index) for image, index, _ in batch if image is not None]
    failed = [(index, reason) for image, index, reason in batch if image is None]
    images = torch.stack([image for image, _ in good]) if good else None
    return images, [index for _, index in good], failed


def write_predictions(records: list[dict], path: str, fmt: str, topk: int) -> None:
    """``records`` as CSV (one row per image, columns ``topN_index/topN_class/topN_prob``), a JSON list or
    JSON lines, written atomically."""
    if fmt == 'json':
        text = json.dumps(records, indent=1) + '\n'
    elif fmt == 'jsonl':
        text = ''.join(json.dumps(record) + '\n' for record in records)
    else:
        buffer = io.StringIO()
        columns = ['path'] + (['label'] if 'label' in records[0] else [])
        columns += [f'top{n}_{field}' for n in range(1, topk + 1) for field in ('index', 'class', 'prob')]
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator='\n')
        writer.writeheader()
        for record in records:
            row = {key: record[key] for key in ('path', 'label') if key in record}
            for n, prediction in enumerate(record['topk'], 1):
                row.update({f'top{n}_{field}': prediction[field] for field in ('index', 'class', 'prob')})
            writer.writerow(row)
        text = buffer.getvalue()
    atomic_write_text(text, path)


def main(argv: list[str] | None = None) -> None:
    """Run inference as the command line asks (see the module docstring)."""
    parser = inference_parser()
    args = parse_args(parser, argv, accepted={a.dest for a in train_parser()._actions})
    if not args.model:
        raise UserError('no model: give --model (or --config)')
    if not args.checkpoint:
        raise UserError('no weights: give --checkpoint (a model without trained weights predicts noise)')
    args.input = data_path(args.input_path, args.input)
    if not args.input:
        raise UserError('no images: give PATH or --data-dir (an image, a folder, a text file of paths, or a '
                        'dataset root with --split)')
    if (args.topk is not None and args.topk < 1) or args.batch_size < 1 or args.workers < 0:
        raise UserError('--topk and --batch-size must be at least 1, --workers at least 0')
    check_image_options(args.img_size, args.crop_pct, args.interpolation)
    for name in ('mean', 'std'):
        if getattr(args, name) is not None and len(getattr(args, name)) != 3:
            raise UserError(f'--{name} takes 3 values (R G B)')
    if args.std is not None and min(args.std) <= 0:
        raise UserError(f'--std must be positive, not {" ".join(map(str, args.std))}')
    extension = os.path.splitext(args.results_file or '')[1].lstrip('.').lower()
    fmt = args.results_format or (extension if extension in FORMATS else 'csv')
    if args.results_file:  # before the work, so that its results cannot be lost
        check_output_file(args.results_file, args.force)
    device = torch.device(resolve_device(args.device))
    checkpoint = load_checkpoint(args.checkpoint)
    state = model_state_dict(checkpoint, args.checkpoint, use_ema=args.use_ema)
    num_classes = args.num_classes or classifier_size(args.model, state)
    if num_classes is None:
        raise UserError(f'cannot tell the number of classes of {args.checkpoint}: give --num-classes')
    names = read_class_map(args.class_map) if args.class_map else checkpoint.get('class_names') or None
    if names is None and num_classes == IMAGENET_CLASSES:  # the released ImageNet models store no names
        names = ImageNetInfo().label_descriptions()
    if names is not None and len(names) != num_classes:
        raise UserError(f'{len(names)} class names ({args.class_map or args.checkpoint}) for a model with '
                        f'{num_classes} classes')
    if args.topk is None:
        args.topk = min(DEFAULT_TOPK, num_classes)
    elif args.topk > num_classes:
        raise UserError(f'--topk {args.topk} is more than the model\'s {num_classes} classes')
    paths, labels, skipped = list_inputs(args.input, args.split)
    if args.split:  # folder labels are compared with the predictions by class name
        where = f"split '{args.split}' of {args.input}"
        folder_classes = sorted(set(labels))
        if names is None:
            print(f'inference.py: the model has no class names (give --class-map): the labels of {where} are '
                  'reported, not compared with the predictions', file=sys.stderr)
        else:
            label_table(folder_classes, names, where)
            note = missing_note(folder_classes, names, where)
            if note:
                print(f'inference.py: {note}', file=sys.stderr)
    if not paths:
        raise UserError(f'no images in {args.input}' + (f' ({len(skipped)} other files)' if skipped else ''))

    model = create_model_with_weights(args.model, num_classes, args.model_kwargs, state, args.checkpoint)
    del checkpoint, state
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    forward = torch.compile(model, backend=args.torch_compile) if args.torch_compile else model
    overrides = dict(img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation,
                     mean=args.mean, std=args.std)
    data_config = resolve_data_config({k: v for k, v in overrides.items() if v is not None and v != ''}, model=model)
    transform = create_transform(**data_config, is_training=False)
    loader = torch.utils.data.DataLoader(ImageFiles(paths, transform), batch_size=args.batch_size,
                                         num_workers=args.workers, collate_fn=collate_readable,
                                         pin_memory=device.type == 'cuda')
    amp_autocast = autocast_context(args.amp, args.amp_dtype, device)

    for path, reason in skipped:
        print(f'inference.py: skipped {path}: {reason}', file=sys.stderr)
    records: dict[int, dict] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for images, indices, failed in loader:
            for index, reason in failed:
                skipped.append((paths[index], reason))
                print(f'inference.py: skipped {paths[index]}: cannot read the image ({reason})', file=sys.stderr)
            if images is None:
                continue
            images = images.to(device, non_blocking=True)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                logits = forward(images)
            probs, classes = logits.float().softmax(dim=-1).topk(args.topk, dim=-1)
            for index, prob_row, class_row in zip(indices, probs.tolist(), classes.tolist()):
                record = {'path': paths[index], **({'label': labels[index]} if labels[index] is not None else {})}
                record['topk'] = [{'index': c, 'class': names[c] if names else str(c), 'prob': round(p, 6)}
                                  for c, p in zip(class_row, prob_row)]
                records[index] = record
    seconds = time.perf_counter() - start
    ordered = [records[i] for i in sorted(records)]

    shown = ordered if not args.results_file else ordered[:TABLE_ROWS]
    width = min(60, max((len(r['path']) for r in shown), default=4))
    for record in shown:
        guesses = ', '.join(f"{p['class']} {p['prob']:.3f}" for p in record['topk'][:3])
        label = f"  [{record['label']}]" if 'label' in record else ''
        print(f"{record['path'][-width:]:<{width}}  {guesses}{label}")
    if len(shown) < len(ordered):
        print(f'... {len(ordered) - len(shown)} more in {args.results_file}')
    if not ordered:
        raise UserError(f'none of the {len(paths)} files in {args.input} could be read as an image')
    if args.results_file:
        write_predictions(ordered, args.results_file, fmt, args.topk)
    agreement = ''
    if any('label' in r for r in ordered) and names:
        hits = sum(r['topk'][0]['class'] == r.get('label') for r in ordered)
        agreement = f'; top-1 equals the folder label for {hits} ({100 * hits / len(ordered):.2f}%)'
    print(f'{len(ordered)} images predicted, {len(skipped)} files skipped{agreement}; '
          f'{len(ordered) / seconds:.1f} img/s on {device.type}'
          + (f'; results in {args.results_file} ({fmt})' if args.results_file else ''))


if __name__ == '__main__':
    run_main(main, 'inference.py')
