#!/usr/bin/env python3
"""Images/s of a training config's input pipelines on this machine, and the --workers that would feed it.

    python scripts/benchmarks/benchmark_loader.py --config configs/ddf_resnet50_in1k.yaml --data-dir /data/imagenet
    python scripts/benchmarks/benchmark_loader.py --config configs/ddf_resnet50_in1k.yaml --target 3000 --workers 1 2 4

Measures, on the first ``--images`` images of ``--split`` (an image folder, or shards with ``--dataset wds/NAME``):
decoding alone, then the config's train and eval pipelines as train.py builds them (timm's ``create_loader``;
``--prefetcher`` is the GPU layout, where normalisation and random erasing run on the GPU, ``--no-prefetcher``
the CPU one) in the main process (workers 0: one core) and with each ``--workers`` count; then the model's
training images/s on ``--model-device`` (one optimizer step at ``--model-batch``, after one warm-up). Each
figure is the best of ``--repeats`` passes (other jobs on the machine only slow a pass down). It prints a
table, a suggested ``--workers`` for ``--target`` images/s per training process (default: the measured
model rate), and one JSON line per figure (``--json PATH`` also writes them to a file).
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import numpy as np
from PIL import Image

from benchmark_common import emit_json_lines, environment, timed, usable_device
from ddfnet.data.demo import CLASSES, render

# --sample-jpegs: photo-sized JPEGs for timing input pipelines where no real data is at hand: the demo
# dataset's drawings upscaled (bicubic) to ImageNet's typical 500x375, with mild pixel noise so they compress
# like textured photos rather than flat drawings (about 55 KB each at quality 90; ImageNet averages ~110 KB).


def write_sample_jpegs(root: str, count: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> str:
    """Write ``count`` JPEGs of ``size`` (width, height) as an ImageFolder split ``root/train/<class>/``
    (classes round-robin) and return ``root``; the same arguments always give the same files."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        label = index % len(CLASSES)
        folder = os.path.join(root, 'train', CLASSES[label])
        os.makedirs(folder, exist_ok=True)
        image = Image.fromarray(render(label, rng)).resize(size, Image.Resampling.BICUBIC)
        noisy = np.asarray(image, np.float32) + rng.normal(0, 6, (size[1], size[0], 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(os.path.join(folder, f'{index:06d}.jpg'),
                                                                       quality=90)
    return root


def best_rate(run, count: int, repeats: int, warmup: bool = True) -> float:
    """Images/s of the fastest of ``repeats`` calls of ``run()``, each handling ``count`` images, after one
    untimed call (``warmup``: a reader's lazy set-up, first-use caches)."""
    if warmup:
        run()
    best = math.inf
    for _ in range(repeats):
        best = min(best, timed(run))
    return count / best


def main(argv: list[str] | None = None) -> None:
    from ddfnet.cli import OneLineArgumentParser, UserError

    parser = OneLineArgumentParser(prog='benchmark_loader.py', description=__doc__.split('\n\n')[0])
    add = parser.add_argument
    add('--config', default='configs/ddf_resnet50_in1k.yaml', help="a train.py config: its model, image size "
        'and augmentation are measured')
    add('--data-dir', help="image folder or shard folder (default: the config's)")
    add('--sample-jpegs', type=int, metavar='N', help='measure on N generated 500x375 JPEGs instead of --data-dir '
        '(write_sample_jpegs: upscaled demo drawings with noise)')
    add('--sample-size', type=int, nargs=2, default=[500, 375], metavar=('W', 'H'), help='their size')
    add('--dataset', help="'' (image folder) or wds/NAME (default: the config's)")
    add('--split', default='train', help='the images to measure both pipelines on')
    add('--images', type=int, default=256, help='images per pass')
    add('--workers', type=int, nargs='+', default=[1, 2], help='loader worker counts to measure')
    add('--prefetcher', action=argparse.BooleanOptionalAction, default=True,
        help="workers' share as on GPUs (default) or on CPU (--no-prefetcher: normalise and erase in the workers)")
    add('--batch-size', type=int, default=32, help='loader batch size')
    add('--repeats', type=int, default=3)
    add('--img-size', type=int, help="training/eval image size (default: the config's)")
    add('--model', help="default: the config's")
    add('--model-device', default='cpu')
    add('--model-batch', type=int, default=8, help='batch of the timed training step (0: skip the model)')
    add('--target', type=float, help='images/s one training process needs (default: the measured model rate)')
    add('--json', help='also write the JSON lines to this file')
    args = parser.parse_args(argv)
    if min(args.images, args.batch_size, args.repeats, *args.workers) < 1 or args.model_batch < 0:
        parser.error('--images, --batch-size, --repeats and --workers must be at least 1, --model-batch at least 0')
    if not os.path.isfile(args.config):
        parser.error(f'no config file {args.config}')

    import timm
    import torch
    from timm.data import create_loader, create_transform, resolve_data_config

    import ddfnet  # noqa: F401  (registers the DDF models)
    from ddfnet.cli import parse_args
    from ddfnet.data import class_count, create_split, resolve_data_root
    from ddfnet.training.args import train_parser

    config = parse_args(train_parser(), ['--config', args.config])
    dataset_name = config.dataset if args.dataset is None else args.dataset
    if args.sample_jpegs:
        dataset_name, scratch = '', tempfile.TemporaryDirectory(prefix='benchmark-loader-')
        data_root = write_sample_jpegs(scratch.name, args.sample_jpegs, tuple(args.sample_size))
    else:
        data_root = resolve_data_root(dataset_name, args.data_dir or config.data_dir, config.demo_per_class)
    model_name = args.model or config.model
    if not timm.is_model(model_name):
        raise UserError(f"unknown model '{model_name}'")
    model = timm.create_model(model_name, num_classes=config.num_classes or 1000, **config.model_kwargs)
    data_config = resolve_data_config(dict(img_size=args.img_size or config.img_size, crop_pct=config.crop_pct,
                                           interpolation=config.interpolation), model=model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per loader process, as in training
    rows = []

    def record(stage: str, workers: int, rate: float, **extra) -> None:
        rows.append(dict(stage=stage, workers=workers, images_per_sec=round(rate, 1),
                         images_per_sec_per_worker=round(rate / max(1, workers), 1), **extra))

    def loader(is_training: bool, workers: int):
        # The arguments train.py passes (train.py builds its loaders the same way).
        dataset = create_split(dataset_name, data_root, args.split, is_training, args.batch_size, workers=workers)
        common = dict(input_size=data_config['input_size'], batch_size=args.batch_size, mean=data_config['mean'],
                      std=data_config['std'], num_workers=workers, use_prefetcher=False, persistent_workers=False)
        if is_training:
            augment = dict(scale=config.scale, ratio=config.ratio, hflip=config.hflip, color_jitter=config.color_jitter,
                           auto_augment=config.aa, interpolation=config.train_interpolation)
            made = create_loader(dataset, is_training=True, re_prob=config.reprob, re_mode=config.remode,
                                 re_count=config.recount, **augment, **common)
        else:
            augment = dict(interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'])
            made = create_loader(dataset, is_training=False, **augment, **common)
        if args.prefetcher:  # timm's GPU layout: the workers stop at uint8 tensors (erasing runs on the GPU)
            made.dataset.transform = create_transform(data_config['input_size'], is_training=is_training,
                                                      use_prefetcher=True, **augment)
        return made

    def take(iterable, count: int) -> int:
        seen = 0
        for images, _ in iterable:
            seen += images.shape[0]
            if seen >= count:
                break
        return seen

    # Decoding alone: the raw samples of the dataset, no transform.
    raw = create_split(dataset_name, data_root, args.split, False, args.batch_size)
    count = min(args.images, len(raw))
    if hasattr(raw, 'reader') and hasattr(raw.reader, 'samples'):  # a folder: PIL open + convert, like timm
        paths = [path for path, _ in raw.reader.samples[:count]]
        record('decode', 1, best_rate(lambda: [Image.open(p).convert('RGB') for p in paths], count, args.repeats))
    else:
        record('decode', 1, best_rate(lambda: take(((torch.zeros(1), t) for _, t in raw), count), count,
                                      args.repeats))
    for stage, is_training in (('train', True), ('eval', False)):
        # One worker = the main process doing the work; the DataLoader's own worker start-up is not counted.
        single = loader(is_training, 0)
        record(stage, 0, best_rate(lambda: take(single, count), count, args.repeats))
        for workers in args.workers:
            made = loader(is_training, workers)

            def one_pass():
                batches = iter(made)
                next(batches)  # the workers are up and the first batch is ready: start the clock after it
                start = time.perf_counter()
                seen = take(batches, count)
                one_pass.rate = seen / (time.perf_counter() - start)
            rates = []
            for _ in range(args.repeats):
                one_pass()
                rates.append(one_pass.rate)
            record(stage, workers, max(rates))

    model_rate = None
    if args.model_batch:
        torch.set_num_threads(threads)  # the model trains with the machine's threads
        device = usable_device(args.model_device)
        model.to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        images = torch.randn(args.model_batch, *data_config['input_size'], device=device)
        targets = torch.randint(0, class_count(raw) or 2, (args.model_batch,), device=device) % 2

        def step():
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(images), targets).backward()
            optimizer.step()
            if device.type == 'cuda':
                torch.cuda.synchronize()
        step()  # warm-up
        model_rate = best_rate(step, args.model_batch, args.repeats)
        rows.append(dict(stage='model_train_step', model=model_name, model_device=str(device), batch=args.model_batch,
                         images_per_sec=round(model_rate, 1)))

    target = args.target or model_rate
    per_worker = max(r['images_per_sec_per_worker'] for r in rows if r['stage'] == 'train' and r['workers'] > 0)
    print(f'{"stage":<18}{"workers":>8}{"images/s":>11}{"per worker":>12}   (workers 0: in the main process)')
    for r in rows:
        print(f'{r["stage"]:<18}{r.get("workers", ""):>8}{r["images_per_sec"]:>11.1f}'
              f'{r.get("images_per_sec_per_worker", ""):>12}')
    if target:
        workers = math.ceil(target / per_worker)
        print(f'suggestion: {target:.0f} training images/s per process at {per_worker:.1f} images/s per train worker '
              f'needs --workers {workers} (and {workers} free cores per GPU process; 8 GPUs: {8 * workers} cores)')
        rows.append(dict(stage='suggestion', target_images_per_sec=round(target, 1), workers=workers))
    environment_row = environment(torch.device('cpu'))
    emit_json_lines([dict(r, config=args.config, img_size=data_config['input_size'][-1], prefetcher=args.prefetcher,
                          images=count,
                          **environment_row) for r in rows], args.json)


if __name__ == '__main__':
    from ddfnet.cli import run_main
    run_main(main, 'benchmark_loader.py')
