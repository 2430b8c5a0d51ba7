#!/usr/bin/env python3
"""Training memory and time of DynamicConv2d implementations in dy_resnet18, against resnet18.

    python scripts/benchmarks/benchmark_dyconv.py --batch-size 32 --img-size 224 --steps 3

Each configuration runs in its own process: build the model, then time ``--steps`` SGD steps (forward,
backward, momentum update) after one warm-up step. Reported per configuration:

- ``saved_mib``: bytes autograd keeps for backward during one forward (unique storages, parameters
  excluded), counted with ``torch.autograd.graph.saved_tensors_hooks``: deterministic.
- ``peak_mib``: peak resident memory during the steps above the resident memory before them (the
  process's high-water mark is reset first; glibc is told to return large blocks to the OS at once, so
  resident memory follows live tensors). Includes gradients, momentum buffers and transients.
- ``ms_per_step``: median step time.

Configurations: ``resnet18`` (static); ``grouped`` (the common DyConv implementation: per-sample kernels,
one grouped conv, autograd keeps the kernels); ``outputs_saved`` (K stacked outputs kept for backward);
``kernels``, ``outputs``, ``auto``: ddfnet's DynamicConv2d with that ``aggregation`` (recomputed in
backward; ``auto`` is the default). Prints a table, then one JSON line per configuration.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

CONFIGS = ('resnet18', 'grouped', 'outputs_saved', 'kernels', 'outputs', 'auto')


def _rss_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} not in /proc/self/status')


def _worker(config: str, batch_size: int, img_size: int, steps: int) -> dict:
    import timm
    import torch
    import torch.nn.functional as F

    import ddfnet  # noqa: F401  (registers the models)
    from ddfnet.layers import DynamicConv2d
    from benchmark_common import timed

    torch.manual_seed(0)
    model = timm.create_model('resnet18' if config == 'resnet18' else 'dy_resnet18').train()
    for module in model.modules():
        if isinstance(module, DynamicConv2d):
            # 'grouped' / 'outputs_saved': no recomputation, autograd keeps the intermediate
            module.aggregation = {'grouped': 'kernels', 'outputs_saved': 'outputs'}.get(config, config)
            module.recompute = config in ('kernels', 'outputs', 'auto')
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, img_size, img_size)
    target = torch.randint(0, 1000, (batch_size,))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def step() -> None:
        loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), target)
    del loss
    optimizer.zero_grad(set_to_none=True)
    before = _rss_kib('VmRSS')
    try:  # reset the high-water mark so the peak is this phase's
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        peak = lambda: _rss_kib('VmHWM')  # noqa: E731
    except OSError:
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    times = []
    for i in range(steps + 1):
        elapsed = timed(step)
        if i:  # the first step allocates momentum buffers and warms up kernels
            times.append(elapsed)
    return {'config': config, 'batch_size': batch_size, 'img_size': img_size,
            'params_m': round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
            'saved_mib': round(sum(saved.values()) / 2 ** 20, 1),
            'peak_mib': round((peak() - before) / 1024, 1),
            'ms_per_step': round(1000 * statistics.median(times), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--configs', nargs='+', choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[8, 16],
                        help='with two or more, peak memory is also extrapolated linearly to --extrapolate-to')
    parser.add_argument('--extrapolate-to', type=int, default=256)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--json', help='also write the JSON lines to this file')
    parser.add_argument('--worker', choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(*args.batch_sizes, args.img_size, args.steps, args.extrapolate_to) < 1:
        parser.error('batch sizes, --img-size, --steps and --extrapolate-to must be positive')
    if args.worker:
        print(json.dumps(_worker(args.worker, args.batch_sizes[0], args.img_size, args.steps)))
        return 0

    # Large blocks go straight back to the OS on free, so resident memory tracks live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536')
    results = []
    for batch_size in args.batch_sizes:
        for config in args.configs:
            proc = subprocess.run([sys.executable, __file__, '--worker', config, '--batch-sizes', str(batch_size),
                                   '--img-size', str(args.img_size), '--steps', str(args.steps)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f'{args.img_size}x{args.img_size}, median of {args.steps} steps; ratios against resnet18 at the same batch')
    print(f"{'config':<14}{'batch':>6}{'params M':>10}{'saved MiB':>11}{'peak MiB':>10}{'ms/step':>10}"
          f"{'saved/r18':>11}{'peak/r18':>10}{'time/r18':>10}")
    for r in results:
        base = next((b for b in results if b['config'] == 'resnet18' and b['batch_size'] == r['batch_size']), r)
        print(f"{r['config']:<14}{r['batch_size']:>6}{r['params_m']:>10}{r['saved_mib']:>11}{r['peak_mib']:>10}"
              f"{r['ms_per_step']:>10}{r['saved_mib'] / base['saved_mib']:>10.2f}x"
              f"{r['peak_mib'] / base['peak_mib']:>9.2f}x{r['ms_per_step'] / base['ms_per_step']:>9.2f}x")
    if len(set(args.batch_sizes)) >= 2:
        # Peak memory is an affine function of the batch (parameters, gradients and momentum are fixed;
        # activations and per-sample intermediates scale with it): fit it per configuration.
        lo, hi = min(args.batch_sizes), max(args.batch_sizes)
        fits = {}
        for config in args.configs:
            peaks = {r['batch_size']: r['peak_mib'] for r in results if r['config'] == config}
            slope = (peaks[hi] - peaks[lo]) / (hi - lo)
            fits[config] = peaks[lo] + slope * (args.extrapolate_to - lo)
        print(f'peak MiB extrapolated to batch {args.extrapolate_to} from batches {lo} and {hi}:')
        for config, value in fits.items():
            ratio = f" ({value / fits['resnet18']:.2f}x resnet18)" if 'resnet18' in fits else ''
            print(f'  {config:<14}{value:>10.0f}{ratio}')
    import torch

    from benchmark_common import emit_json_lines, environment
    emit_json_lines([dict(r, **environment(torch.device('cpu'))) for r in results], args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
