#!/usr/bin/env python3
"""Time whole models side by side: inference (and optionally a training step) per batch.

    python scripts/benchmark_model.py --models ddf_resnet50 resnet50 --batch-size 8 --img-size 224

Models are timed interleaved, round by round, so machine noise hits them alike; the median over rounds is
reported with images/s and the ratio to the last model. One JSON line per model follows the table
(``--json PATH`` also writes them to a file).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from contextlib import nullcontext


def main(argv: list[str] | None = None) -> int:
    # Every option shows its default in --help; --device follows benchmark_op.py (cuda when available).
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=['ddf_resnet50', 'resnet50'],
                        help='timm model names; ratios are to the last one (default: ddf_resnet50 resnet50)')
    parser.add_argument('--batch-size', type=int, default=8, help='images per batch (default: %(default)s)')
    parser.add_argument('--img-size', type=int, default=224, help='square input size (default: %(default)s)')
    parser.add_argument('--device', help='device to time on (default: cuda if available, else cpu)')
    parser.add_argument('--mode', choices=('infer', 'train'), default='infer',
                        help='infer: a no-grad forward; train: forward, backward and an SGD step (default: %(default)s)')
    parser.add_argument('--amp', choices=('none', 'bf16', 'fp16'), default='none',
                        help='autocast dtype (default: %(default)s)')
    parser.add_argument('--channels-last', action='store_true', help='channels_last model and input (default: off)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed rounds first (default: %(default)s)')
    parser.add_argument('--rounds', type=int, default=10,
                        help='timed rounds; the median is reported (default: %(default)s)')
    parser.add_argument('--json', help='also write the JSON lines to this file')
    args = parser.parse_args(argv)
    if min(args.batch_size, args.img_size, args.rounds) < 1 or args.warmup < 0:
        parser.error('--batch-size, --img-size and --rounds must be positive, --warmup non-negative')

    import timm
    import torch

    import ddfnet  # noqa: F401  (registers the DDF models)
    from ddfnet.utils.bench import default_device, emit_json_lines, environment, usable_device

    for name in args.models:
        if not timm.is_model(name):
            parser.error(f'unknown model {name!r}')
    try:
        device = usable_device(args.device or default_device())
    except ValueError as e:
        parser.error(str(e))
    warnings.simplefilter('once')
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    runners = {}
    for name in args.models:
        model = timm.create_model(name).to(device, memory_format=memory_format)
        model.train(args.mode == 'train')
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device).to(
            memory_format=memory_format)
        target = torch.randint(0, 1000, (args.batch_size,), device=device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if args.mode == 'train' else None

        def step(model=model, x=x, target=target, optimizer=optimizer):
            autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
            if optimizer is None:
                with torch.inference_mode(), autocast:
                    model(x)
            else:
                with autocast:
                    loss = torch.nn.functional.cross_entropy(model(x), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        runners[name] = step

    for name, step in runners.items():  # one untimed call each: a model that cannot run this input says so
        try:
            step()
        except (RuntimeError, ValueError) as e:
            parser.error(f'{name} cannot run this input: {str(e).strip().splitlines()[0]}')
    for _ in range(args.warmup):
        for step in runners.values():
            step()
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, step in runners.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)

    base = statistics.median(times[args.models[-1]])
    env = environment(device)
    rows = []
    print(f'{"model":<22}{"ms/batch":>10}{"img/s":>10}{"ratio":>8}   ({args.mode}, batch {args.batch_size}, '
          f'{args.img_size}px, {device}, amp={args.amp}, channels_last={args.channels_last})')
    for name, samples in times.items():
        median = statistics.median(samples)
        row = dict(model=name, mode=args.mode, batch_size=args.batch_size, img_size=args.img_size, amp=args.amp, channels_last=args.channels_last,
                   ms_per_batch=round(median * 1e3, 2), images_per_s=round(args.batch_size / median, 2),
                   ratio_to_last=round(median / base, 3), rounds=args.rounds, **env)
        rows.append(row)
        print(f'{name:<22}{row["ms_per_batch"]:>10.1f}{row["images_per_s"]:>10.1f}{row["ratio_to_last"]:>8.3f}')
    emit_json_lines(rows, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
