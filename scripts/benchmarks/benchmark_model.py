#!/usr/bin/env python3
"""Time whole models side by side: inference and/or a training step per batch.

    python scripts/benchmarks/benchmark_model.py --models ddf_resnet50 resnet50 --batch-size 8 --img-size 224
    python scripts/benchmarks/benchmark_model.py --models ddf_resnet50 resnet50 --mode train infer --amp bf16 \\
        --channels-last --compile --batch-size 256 --profile step.txt

Per mode, models are timed interleaved, round by round, so machine noise hits them alike; the median over
rounds is reported with images/s and the ratio to the last model. The first step of each model (with
--compile, its compilation) is untimed; its duration is the 'first_step_s' field. On CUDA,
'peak_memory_mb' is the model's own tensors (weights, buffers, optimizer state, the input batch) plus the
most one of its steps allocated on top of what was allocated before it (activations, gradients,
workspaces), so the other models held on the device do not count. --profile writes a torch.profiler
table (top operators and kernels by their own time) of one more step of the first model in the first
mode. One JSON line per (model, mode) follows the tables (``--json PATH`` also writes them to a file).
"""
from __future__ import annotations

import argparse
import statistics
import sys
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
    parser.add_argument('--mode', nargs='+', choices=('infer', 'train'), default=['infer'],
                        help='infer: a no-grad forward; train: forward, backward and an SGD step; several are '
                             'timed one after the other (default: infer)')
    parser.add_argument('--amp', choices=('none', 'bf16', 'fp16'), default='none',
                        help='autocast dtype (default: %(default)s)')
    parser.add_argument('--channels-last', action='store_true', help='channels_last model and input (default: off)')
    parser.add_argument('--compile', nargs='?', const='inductor', metavar='BACKEND',
                        help='torch.compile each model with this backend (inductor when none is named; '
                             'default: eager, no compile)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed rounds first (default: %(default)s)')
    parser.add_argument('--rounds', type=int, default=10,
                        help='timed rounds; the median is reported (default: %(default)s)')
    parser.add_argument('--profile', metavar='FILE', help='write a profiler table of one step of the first model')
    parser.add_argument('--json', help='also write the JSON lines to this file')
    args = parser.parse_args(argv)
    if min(args.batch_size, args.img_size, args.rounds) < 1 or args.warmup < 0:
        parser.error('--batch-size, --img-size and --rounds must be positive, --warmup non-negative')
    modes = list(dict.fromkeys(args.mode))

    import timm
    import torch

    import ddfnet  # noqa: F401  (registers the DDF models)
    from benchmark_common import default_device, emit_json_lines, environment, timed, usable_device

    for name in args.models:
        if not timm.is_model(name):
            parser.error(f'unknown model {name!r}')
    try:
        device = usable_device(args.device or default_device())
    except ValueError as e:
        parser.error(str(e))
    if args.compile is not None and args.compile not in torch.compiler.list_backends(exclude_tags=()):
        parser.error(f'unknown torch.compile backend {args.compile!r}')
    warnings.simplefilter('once')
    cuda = device.type == 'cuda'
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    models, optimizers, inputs = {}, {}, {}
    for name in args.models:
        model = timm.create_model(name).to(device, memory_format=memory_format)
        models[name] = model
        optimizers[name] = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if 'train' in modes else None
        inputs[name] = (torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device).to(
            memory_format=memory_format), torch.randint(0, 1000, (args.batch_size,), device=device))
    forwards = {name: torch.compile(m, backend=args.compile) if args.compile else m for name, m in models.items()}

    def make_step(name: str, mode: str):
        """One step of ``name`` in ``mode`` (the model is switched to that mode now)."""
        model, forward, optimizer, (x, target) = models[name], forwards[name], optimizers[name], inputs[name]
        model.train(mode == 'train')

        def step():
            autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
            if mode == 'infer':
                with torch.inference_mode(), autocast:
                    forward(x)
            else:
                with autocast:
                    loss = torch.nn.functional.cross_entropy(forward(x), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return step

    def own_bytes(name: str) -> int:
        """Weights, buffers, optimizer state and input batch of one model."""
        tensors = [*models[name].parameters(), *models[name].buffers(), *inputs[name]]
        if optimizers[name] is not None:
            tensors += [t for state in optimizers[name].state.values() for t in state.values()
                        if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    env = environment(device)
    rows = []
    for mode in modes:
        steps = {name: make_step(name, mode) for name in args.models}
        first_step = {}
        for name, step in steps.items():  # one untimed call each: a model that cannot run this input says so
            try:
                first_step[name] = timed(step, device)
            except (RuntimeError, ValueError) as e:
                parser.error(f'{name} cannot run this input: {str(e).strip().splitlines()[0]}')
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        times = {name: [] for name in steps}
        extra = dict.fromkeys(steps, 0)
        for _ in range(args.rounds):
            for name, step in steps.items():
                sync()
                if cuda:
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                times[name].append(timed(step, device))
                if cuda:
                    extra[name] = max(extra[name], torch.cuda.max_memory_allocated(device) - before)

        base = statistics.median(times[args.models[-1]])
        print(f'{"model":<22}{"ms/batch":>10}{"img/s":>10}{"ratio":>8}{"peak MB":>10}{"1st s":>8}   ({mode}, batch '
              f'{args.batch_size}, {args.img_size}px, {device}, amp={args.amp}, channels_last={args.channels_last}, '
              f'compile={args.compile or "no"})')
        for name, samples in times.items():
            median = statistics.median(samples)
            peak = round((own_bytes(name) + extra[name]) / 2 ** 20, 1) if cuda else None
            row = dict(model=name, mode=mode, batch_size=args.batch_size, img_size=args.img_size, amp=args.amp,
                       channels_last=args.channels_last, compile=args.compile, ms_per_batch=round(median * 1e3, 2),
                       images_per_s=round(args.batch_size / median, 2), ratio_to_last=round(median / base, 3),
                       peak_memory_mb=peak, first_step_s=round(first_step[name], 2), rounds=args.rounds, **env)
            rows.append(row)
            print(f'{name:<22}{row["ms_per_batch"]:>10.1f}{row["images_per_s"]:>10.1f}{row["ratio_to_last"]:>8.3f}'
                  f'{"-" if peak is None else f"{peak:.0f}":>10}{row["first_step_s"]:>8.1f}')

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        step = make_step(args.models[0], modes[0])
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            step()
            sync()
        sort_by = 'self_device_time_total' if cuda else 'self_cpu_time_total'
        table = prof.key_averages().table(sort_by=sort_by, row_limit=25)
        with open(args.profile, 'w') as f:
            f.write(f'# one {modes[0]} step of {args.models[0]}: batch {args.batch_size}, {args.img_size}px, '
                    f'{device}, amp={args.amp}, channels_last={args.channels_last}, compile={args.compile or "no"}; '
                    f'sorted by {sort_by}\n{table}\n')
        print(f'profile of one {modes[0]} step of {args.models[0]} written to {args.profile}')
    emit_json_lines(rows, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
