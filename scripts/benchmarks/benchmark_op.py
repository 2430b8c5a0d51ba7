#!/usr/bin/env python3
"""Time the DDF op against a depth-wise conv (the paper's cost reference) and the reference path.

    python scripts/benchmarks/benchmark_op.py --dtypes fp32 bf16 --formats nchw nhwc --json ddf_op.jsonl
    python scripts/benchmarks/benchmark_op.py --model-layers ddf_resnet50 --layer-batch 256 --peak-gbps 4800
    python scripts/benchmarks/benchmark_op.py --model-layers ddf_resnet50 --layer-batch 256 --triton

Problems: each --shapes entry at --kernel-size / --stride / --dilation / --combine, and with
--model-layers MODEL the op calls of that timm model's DDF layers (found by running it once on the meta
device at --layer-img-size, so no weights or compute), each distinct (input shape, k, stride, dilation,
combine) once at batch --layer-batch; its 'layers' field names the blocks that share it. Without
either option, the default shapes below.

Contenders, per (shape, dtype, memory format), forward and forward+backward:
  ddf        ddfnet.ddf, whatever implementation the device runs (the 'implementation' field says which);
             forward+backward is torch.autograd.grad for input, channel filter and spatial filter.
  dwconv     F.conv2d with groups=C and a k x k weight at the same dilation/stride ('same' padding), cuDNN
             on GPU (autotuned: cudnn.benchmark is on); forward+backward is the grads of input and weight.
  reference  ddf_forward_reference (+ ddf_backward_reference), called directly. It is slow, so it is
             skipped with --no-reference, and on CPU when B*C*Ho*Wo*k*k exceeds 1e8 ('skip' in the table).
  triton     with --triton: the Triton kernels (ddfnet.ops.triton_ddf.forward, + backward), called
             directly, whatever ddf runs; autotuned on CUDA tensors, triton's interpreter on CPU tensors
             (TRITON_INTERPRET=1 set for the process). Its first call per configuration, untimed by the
             rounds, is reported apart ('1st call': compiling and autotuning; fwd+bwd's first call comes
             after the forward's, so it is the backward kernels' tuning plus one forward).
NHWC puts the input, the spatial filter and grad_out in channels_last. Contenders run interleaved
round by round so noise hits them alike; times are medians over --rounds after --warmup rounds, taken
with CUDA events on GPU (L2 flushed before each call, so data starts in device memory) and
time.perf_counter on CPU.

Bandwidth model: the minimum bytes the DDF op must move, each tensor touched once.
  forward:          read x, channel filter, spatial filter; write out.
  forward+backward: the forward's bytes, plus read grad_out, x, channel filter, spatial filter and write
                    grad_x, grad_channel_filter, grad_spatial_filter.
GB/s = bytes / median time (1 GB = 1e9 B); % peak is against --peak-gbps, else the device's memory
clock and bus width, else a small table by device name; unknown on CPU unless --peak-gbps is given.
A table row per (problem, dtype, format, mode) is followed by one JSON line per row (--json also writes
them to a file).
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import warnings
from collections.abc import Callable
from typing import NamedTuple

from benchmark_common import add_op_arguments, check_op_arguments, parse_shape

DEFAULT_SHAPES = [(32, 256, s, s) for s in (7, 14, 28, 56, 112)] + [(2, 256, 200, 300)]
REFERENCE_CPU_LIMIT = 10 ** 8  # B*C*Ho*Wo*k*k above which the CPU reference takes minutes per shape
# Peak HBM bandwidth (GB/s) by device-name substring, for when the device properties lack the memory
# clock; first match wins, so the more specific names come first.
PEAK_GBPS = (('H200', 4800.0), ('H100 PCIe', 2000.0), ('H100', 3350.0), ('A100-SXM4-80GB', 2039.0),
             ('A100 80GB PCIe', 1935.0),
             ('A100 80GB', 2039.0), ('A100', 1555.0))


class Problem(NamedTuple):
    """One op configuration to time: the input shape (B, C, H, W) and the op's other arguments."""
    shape: tuple[int, int, int, int]
    kernel_size: int
    dilation: int
    stride: int
    combine: str
    layers: tuple[str, ...] = ()  # the model blocks that call the op so (--model-layers)


def model_problems(model_name: str, batch: int, img_size: int) -> list[Problem]:
    """The distinct op calls of ``model_name``'s DDF layers for a batch of ``img_size`` square images.

    One forward on the meta device (shapes only) with a hook on every DDFPack records the input each layer
    hands the op: (B * head, C / head, H, W), since a layer of ``head`` heads runs the op on C / head
    channels per head."""
    import timm
    import torch

    from ddfnet.layers import DDFPack

    with torch.device('meta'):
        model = timm.create_model(model_name)
    found: dict[tuple, list[str]] = {}

    def record(name: str, module: DDFPack, inputs: tuple) -> None:
        _, channels, height, width = inputs[0].shape
        key = ((batch * module.head, channels // module.head, height, width), module.kernel_size,
               module.dilation, module.stride, module.kernel_combine)
        found.setdefault(key, []).append(name)

    packs = [(n, m) for n, m in model.named_modules() if isinstance(m, DDFPack)]
    if not packs:
        raise ValueError(f'{model_name} has no DDF layers')
    for name, module in packs:
        module.register_forward_pre_hook(lambda m, inputs, name=name: record(name, m, inputs))
    with torch.no_grad():
        model.eval()(torch.empty(1, 3, img_size, img_size, device='meta'))
    return [Problem(*key, layers=tuple(names)) for key, names in found.items()]


def peak_bandwidth(torch, device, override: float | None) -> tuple[float | None, str]:
    """(peak GB/s or None, where it came from)."""
    if override is not None:
        return override, '--peak-gbps'
    if device.type != 'cuda':
        return None, 'unknown'
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, 'memory_clock_rate', 0), getattr(props, 'memory_bus_width', 0)
    if clock_khz and bus_bits:  # double data rate: two transfers per clock over the whole bus
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, 'device properties'
    for name, gbps in PEAK_GBPS:
        if name in props.name:
            return gbps, 'table by device name'
    return None, 'unknown'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n', 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shapes', nargs='+', type=parse_shape, metavar='BxCxHxW',
                        help='input shapes (default, unless --model-layers is given: 32x256 at 7, 14, 28, 56, '
                             '112 square, and 2x256x200x300)')
    parser.add_argument('--model-layers', nargs='+', default=[], metavar='MODEL',
                        help="also time the op calls of these timm models' DDF layers, e.g. ddf_resnet50")
    parser.add_argument('--layer-batch', type=int, default=32, help='batch of the --model-layers problems (default: 32)')
    parser.add_argument('--layer-img-size', type=int, default=224,
                        help='image size that gives the --model-layers shapes (default: 224)')
    add_op_arguments(parser)
    parser.add_argument('--device', help='device to time on (default: cuda if available, else cpu)')
    parser.add_argument('--warmup', type=int, default=5, help='untimed rounds first (default: 5)')
    parser.add_argument('--rounds', type=int, default=20, help='timed rounds; the median is reported (default: 20)')
    parser.add_argument('--no-reference', action='store_true', help='skip the (slow) reference path')
    parser.add_argument('--triton', action='store_true',
                        help='also time the Triton kernels and their first call (compile + autotune); on CPU '
                             'needs TRITON_INTERPRET=1')
    parser.add_argument('--peak-gbps', type=float, help='peak memory bandwidth in GB/s (default: from the device)')
    parser.add_argument('--json', help='also write the JSON lines to this file')
    args = parser.parse_args(argv)
    check_op_arguments(parser, args)
    if min(args.rounds, args.layer_batch, args.layer_img_size) < 1 or args.warmup < 0:
        parser.error('--rounds, --layer-batch and --layer-img-size must be positive, --warmup non-negative')
    if args.peak_gbps is not None and args.peak_gbps <= 0:
        parser.error(f'--peak-gbps must be positive, got {args.peak_gbps}')
    import torch
    import torch.nn.functional as F

    import ddfnet
    from ddfnet.ops import DDFSlowPathWarning, ddf_backward_reference, ddf_forward_reference
    from benchmark_common import default_device, emit_json_lines, environment, timed, usable_device

    try:
        device = usable_device(args.device or default_device())
    except ValueError as e:
        parser.error(str(e))
    if args.triton:
        from ddfnet.ops import triton_ddf
        if not triton_ddf.available():
            parser.error('--triton: triton does not import')
        if device.type != 'cuda' and os.environ.get('TRITON_INTERPRET', '') != '1':
            parser.error("--triton on a CPU device needs TRITON_INTERPRET=1 (triton's interpreter)")
    k, dil, stride, combine = args.kernel_size, args.dilation, args.stride, args.combine
    shapes = args.shapes if args.shapes or args.model_layers else DEFAULT_SHAPES
    problems = [Problem(shape, k, dil, stride, combine) for shape in shapes or []]
    for name in args.model_layers:
        import timm
        if not timm.is_model(name):
            parser.error(f'unknown model {name!r}')
        try:
            problems += model_problems(name, args.layer_batch, args.layer_img_size)
        except ValueError as e:
            parser.error(str(e))
    # The 'implementation' field records a reference fallback; the once-per-process warning adds nothing.
    warnings.simplefilter('ignore', DDFSlowPathWarning)
    cuda = device.type == 'cuda'
    torch.backends.cudnn.benchmark = True  # the dw-conv gets cuDNN's fastest algorithm, as training would
    peak, peak_source = peak_bandwidth(torch, device, args.peak_gbps)
    flush = None
    if cuda:
        torch.cuda.set_device(device)  # events and launches go to the current device's stream
        # Writing a buffer of twice the L2 size before each timed call evicts the previous call's data.
        l2 = getattr(torch.cuda.get_device_properties(device), 'L2_cache_size', 0) or 64 << 20
        flush = torch.empty(2 * l2, dtype=torch.int8, device=device)

    def time_ms(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
        """Median milliseconds per callable, the callables run interleaved within each round."""
        for _ in range(args.warmup):
            for fn in fns.values():
                fn()
        samples: dict[str, list] = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                if cuda:
                    flush.zero_()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    samples[name].append((start, end))
                else:
                    samples[name].append(timed(fn) * 1e3)
        if cuda:  # one sync at the end: the events carry the GPU timeline, no host stalls in between
            torch.cuda.synchronize(device)
            samples = {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in samples.items()}
        return {name: statistics.median(times) for name, times in samples.items()}

    def bench(problem: Problem, dtype, fmt: str, with_reference: bool) -> tuple[dict, dict]:
        """Median ms per (mode, contender) for one configuration, and ms of the Triton kernels' first call per
        mode (empty without --triton); its tensors die on return."""
        shape, k, dil, stride, combine = problem[:5]
        batch, channels, height, width = shape
        out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
        memory_format = torch.channels_last if fmt == 'nhwc' else torch.contiguous_format

        def make(*size: int) -> torch.Tensor:
            return torch.randn(size, device=device, dtype=dtype).contiguous(memory_format=memory_format)
        x, sf, grad_out = make(*shape), make(batch, k * k, out_h, out_w), make(batch, channels, out_h, out_w)
        cf = torch.randn(batch, channels, k, k, device=device, dtype=dtype)
        weight = torch.randn(channels, 1, k, k, device=device, dtype=dtype)
        x_g, cf_g, sf_g, w_g = (t.detach().requires_grad_() for t in (x, cf, sf, weight))
        ddf_args = (k, dil, stride, combine)
        conv_kw = dict(stride=stride, padding=dil * (k // 2), dilation=dil, groups=channels)  # 'same' output

        def ddf_fwd() -> object:
            with torch.no_grad():
                return ddfnet.ddf(x, cf, sf, *ddf_args)

        def ddf_fwd_bwd() -> object:
            return torch.autograd.grad(ddfnet.ddf(x_g, cf_g, sf_g, *ddf_args), (x_g, cf_g, sf_g), grad_out)

        def conv_fwd() -> object:
            with torch.no_grad():
                return F.conv2d(x, weight, **conv_kw)

        def conv_fwd_bwd() -> object:
            return torch.autograd.grad(F.conv2d(x_g, w_g, **conv_kw), (x_g, w_g), grad_out)

        def ref_fwd() -> object:
            return ddf_forward_reference(x, cf, sf, *ddf_args)

        def ref_fwd_bwd() -> object:
            ddf_forward_reference(x, cf, sf, *ddf_args)
            return ddf_backward_reference(grad_out, x, cf, sf, *ddf_args)

        fns = {('forward', 'ddf'): ddf_fwd, ('forward', 'dwconv'): conv_fwd,
               ('fwd+bwd', 'ddf'): ddf_fwd_bwd, ('fwd+bwd', 'dwconv'): conv_fwd_bwd}
        if with_reference:
            fns.update({('forward', 'reference'): ref_fwd, ('fwd+bwd', 'reference'): ref_fwd_bwd})
        first = {}
        if args.triton:
            def triton_fwd() -> object:
                return triton_ddf.forward(x, cf, sf, *ddf_args)

            def triton_fwd_bwd() -> object:
                triton_ddf.forward(x, cf, sf, *ddf_args)
                return triton_ddf.backward(grad_out, x, cf, sf, *ddf_args)

            first = {'forward': timed(triton_fwd, device) * 1e3, 'fwd+bwd': timed(triton_fwd_bwd, device) * 1e3}
            fns.update({('forward', 'triton'): triton_fwd, ('fwd+bwd', 'triton'): triton_fwd_bwd})
        return time_ms(fns), first

    env = dict(environment(device), implementation=ddfnet.ops.implementation(device.type),
               peak_gbps=None if peak is None else round(peak, 1), peak_source=peak_source, cudnn_benchmark=cuda,
               l2_flushed=cuda, warmup=args.warmup, rounds=args.rounds)
    print(f'DDF op on {env["device_name"]} ({device}); '
          f'ddf runs {env["implementation"]}; torch {torch.__version__}; peak '
          f'{"unknown" if peak is None else f"{peak:.0f} GB/s ({peak_source})"}; medians of {args.rounds} '
          f'rounds after {args.warmup} warm-up, ms')
    header = (f'{"shape":<16}{"k/s/d comb":<12}{"dtype":<6}{"fmt":<6}{"mode":<9}{"ddf":>10}{"dwconv":>10}{"reference":>11}'
              f'{"ddf/dw":>8}{"GB/s":>9}{"%peak":>7}'
              + (f'{"triton":>10}{"tr/dw":>8}{"tr %peak":>9}{"1st call":>10}' if args.triton else ''))
    print(header + '\n' + '-' * len(header))
    rows, skipped_note = [], ''
    dtypes = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
    for problem, dtype_name, fmt in itertools.product(problems, args.dtypes, args.formats):
        shape, k, dil, stride, combine, layers = problem
        batch, channels, height, width = shape
        out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
        x, cf = batch * channels * height * width, batch * channels * k * k  # element counts
        sf, out = batch * k * k * out_h * out_w, batch * channels * out_h * out_w
        skip = '--no-reference' if args.no_reference else None
        if skip is None and not cuda and out * k * k > REFERENCE_CPU_LIMIT:
            skip = f'CPU and B*C*Ho*Wo*k*k > {REFERENCE_CPU_LIMIT:,}'
        medians, first = bench(problem, dtypes[dtype_name], fmt, with_reference=skip is None)
        # The bandwidth model of the docstring: backward re-reads x and both filters and reads grad_out.
        elements = {'forward': x + cf + sf + out, 'fwd+bwd': (x + cf + sf + out) + out + 2 * (x + cf + sf)}
        for mode, count in elements.items():
            ddf_ms, conv_ms, ref_ms, tr_ms = (medians.get((mode, c)) for c in ('ddf', 'dwconv', 'reference', 'triton'))
            nbytes = count * dtypes[dtype_name].itemsize
            gbps = nbytes / (ddf_ms * 1e-3) / 1e9
            pct = None if peak is None else 100 * gbps / peak
            tr_gbps = None if tr_ms is None else nbytes / (tr_ms * 1e-3) / 1e9
            tr_pct = None if tr_gbps is None or peak is None else 100 * tr_gbps / peak
            triton = dict(triton_ms=None if tr_ms is None else round(tr_ms, 4),
                          triton_first_call_ms=round(first[mode], 4) if first else None,
                          ratio_triton_dwconv=None if tr_ms is None else round(tr_ms / conv_ms, 3),
                          triton_gbps=None if tr_gbps is None else round(tr_gbps, 1),
                          triton_pct_peak=None if tr_pct is None else round(tr_pct, 1))
            rows.append(dict(shape='x'.join(map(str, shape)), batch=batch, channels=channels, height=height,
                             width=width, kernel_size=k, dilation=dil, stride=stride, combine=combine,
                             dtype=dtype_name, format=fmt, mode=mode, ddf_ms=round(ddf_ms, 4),
                             dwconv_ms=round(conv_ms, 4), reference_ms=None if ref_ms is None else round(ref_ms, 4),
                             reference_skipped=skip, ratio_ddf_dwconv=round(ddf_ms / conv_ms, 3),
                             ddf_bytes=nbytes, ddf_gbps=round(gbps, 1),
                             ddf_pct_peak=None if pct is None else round(pct, 1), **triton, layers=list(layers),
                             **env))
            skipped_note = f'skip: reference not run ({skip})' if skip else skipped_note
            print(f'{rows[-1]["shape"]:<16}{f"{k}/{stride}/{dil} {combine}":<12}{dtype_name:<6}{fmt:<6}{mode:<9}'
                  f'{ddf_ms:>10.3f}{conv_ms:>10.3f}'
                  f'{"skip" if ref_ms is None else f"{ref_ms:.3f}":>11}{ddf_ms / conv_ms:>8.2f}'
                  f'{gbps:>9.1f}{"-" if pct is None else f"{pct:.1f}":>7}'
                  + (f'{tr_ms:>10.3f}{tr_ms / conv_ms:>8.2f}{"-" if tr_pct is None else f"{tr_pct:.1f}":>9}'
                     f'{first[mode]:>10.1f}' if first else ''), flush=True)
    if skipped_note:
        print(skipped_note)
    emit_json_lines(rows, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
