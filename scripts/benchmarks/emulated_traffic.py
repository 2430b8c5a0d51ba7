"""Global-memory traffic of the CUDA kernels, counted on the CPU.

    python scripts/benchmarks/emulated_traffic.py --dtypes fp32 --json traffic.jsonl
    python scripts/benchmarks/emulated_traffic.py --shapes 1x32x12x12 --formats nhwc

Runs the op's CUDA entry points under the emulation's traffic build (tests/support/cuda_emulation, variant
'traffic', launch configurations sized for an H200) and prints, per kernel launch of one forward and one
backward:
  requested   bytes the threads load + store;
  sectors     32-byte sectors their warp instructions touch (what moves between L2 and the SMs);
  eff         requested / (sectors * 32), the coalescing efficiency (1 = every sector byte used; above 1
              when lanes of a warp read the same bytes, a broadcast, which costs one sector for all);
  distinct    distinct bytes touched (each byte once: the best any cache could do);
  floor       bytes the kernel must move: each tensor it reads or writes, once;
  x floor     sectors * 32 / floor: how far the L1/L2 traffic is above the floor (>1 means reuse the
              caches must catch; DRAM traffic lies between distinct and this).
Shapes default to the 3x3 DDF layers of DDF-ResNet-50 at 224 x 224, at --batch-size (default one sample:
the counts scale with the batch).
"""
from __future__ import annotations

import argparse
import json
import sys

from benchmark_common import add_op_arguments, check_op_arguments, parse_shape

RESNET50_LAYERS = [  # (C, H, W, stride) of the DDF layers (conv2 of each bottleneck)
    (64, 56, 56, 1), (128, 56, 56, 2), (128, 28, 28, 1), (256, 28, 28, 2), (256, 14, 14, 1), (512, 14, 14, 2),
    (512, 7, 7, 1)]


def kernel_floor(name: str, sizes: dict[str, int], mul: bool, nsplit_bytes: int) -> int:
    """Bytes kernel `name` must move: its operands once each (see the kernel files for which they are)."""
    if name.startswith('forward'):
        return sizes['x'] + sizes['cf'] + sizes['sf'] + sizes['out']
    if name.startswith('grad_input'):
        return sizes['out'] + sizes['cf'] + sizes['sf'] + sizes['x']
    if name.startswith('grad_cf'):
        return sizes['out'] + sizes['x'] + (sizes['sf'] if mul else 0) + sizes['cf']
    if name.startswith('grad_sf'):
        return sizes['out'] + sizes['x'] + (sizes['cf'] if mul else 0) + sizes['sf']
    return nsplit_bytes  # sum_partials: the split's workspace, read once, and the result


def measure(torch, emu, shape, k, dilation, stride, combine, dtype, layout):
    b, c, h, w = shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == 'nhwc' else torch.contiguous_format
    x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt)
    cf = torch.randn(b, c, k, k, generator=g).to(dtype)
    sf = torch.randn(b, k * k, ho, wo, generator=g).to(dtype).contiguous(memory_format=fmt)
    go = torch.randn(b, c, ho, wo, generator=g).to(dtype).contiguous(memory_format=fmt)
    item = x.element_size()
    sizes = {'x': x.numel() * item, 'cf': cf.numel() * item, 'sf': sf.numel() * item, 'out': go.numel() * item}
    emu.traffic_start()
    torch.ops.ddfnet_emu.ddf(x, cf, sf, k, dilation, stride, combine)
    torch.ops.ddfnet_emu.ddf_backward(go, x, cf, sf, k, dilation, stride, combine)
    rows = []
    for launch in emu.traffic_stop():
        name = launch['kernel'].split('<')[0]
        requested = launch['load_bytes'] + launch['store_bytes']
        sectors = launch['load_sectors'] + launch['store_sectors']
        distinct = launch['load_distinct_bytes'] + launch['store_distinct_bytes']
        floor = kernel_floor(name, sizes, combine == 'mul', distinct)
        rows.append(dict(shape='x'.join(map(str, shape)), stride=stride, layout=layout, dtype=str(dtype)[6:],
                         kernel=name, grid=launch['grid'], requested=requested, sectors=sectors,
                         efficiency=requested / max(1, 32 * sectors), distinct=distinct, floor=floor,
                         ratio=32 * sectors / max(1, floor)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n', 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shapes', nargs='+', type=parse_shape, metavar='BxCxHxW',
                        help="input shapes, at --stride (default: DDF-ResNet-50's DDF layers, each at its stride)")
    parser.add_argument('--batch-size', type=int, default=1, help='batch of the default layer shapes (default: 1)')
    add_op_arguments(parser)  # --stride applies to --shapes; the default layers each have their own
    parser.add_argument('--json', help='also write the JSON lines to this file')
    args = parser.parse_args(argv)
    check_op_arguments(parser, args)
    if args.batch_size < 1:
        parser.error(f'--batch-size must be positive, got {args.batch_size}')

    import os

    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'tests'))
    from support import cuda_emulation  # the emulation is test support: <repository>/tests/support

    emu = cuda_emulation.load('traffic')
    dtypes = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
    if args.shapes:
        cases = [(s, args.stride) for s in args.shapes]
    else:
        cases = [((args.batch_size, c, h, w), s) for c, h, w, s in RESNET50_LAYERS]
    mib = 2 ** 20
    print(f'{"shape":>15} {"s":>1} {"fmt":>4} {"dtype":>5} {"kernel":<20} {"grid":>5} {"requested":>10} '
          f'{"sectors*32":>10} {"eff":>5} {"distinct":>9} {"floor":>9} {"x floor":>7}   (MiB)')
    lines = []
    for shape, stride in cases:
        for dtype_name in args.dtypes:
            for layout in args.formats:
                for r in measure(torch, emu, shape, args.kernel_size, args.dilation, stride, args.combine,
                                 dtypes[dtype_name], layout):
                    print(f'{r["shape"]:>15} {stride:>1} {layout:>4} {r["dtype"]:>5} {r["kernel"]:<20} '
                          f'{r["grid"]:>5} {r["requested"] / mib:>10.2f} {32 * r["sectors"] / mib:>10.2f} '
                          f'{r["efficiency"]:>5.2f} {r["distinct"] / mib:>9.2f} {r["floor"] / mib:>9.2f} '
                          f'{r["ratio"]:>7.2f}', flush=True)
                    lines.append(json.dumps(r))
    print('\n'.join(lines))
    if args.json:
        from pathlib import Path
        Path(args.json).write_text('\n'.join(lines) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
