"""What the benchmark scripts share: a usable device or a one-line error, the one wall-clock timer, the
environment recorded next to each figure, the JSON-lines output, the ``BxCxHxW`` shape option and the
op arguments of the op benchmarks. It sits
beside them, where Python finds it for a script run as ``python scripts/benchmarks/benchmark_op.py``."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch is imported on first use: --help and argument errors stay fast
    import torch

__all__ = ['default_device', 'usable_device', 'timed', 'environment', 'emit_json_lines', 'parse_shape',
           'add_op_arguments', 'check_op_arguments']


def default_device() -> str:
    """The benchmark scripts' one convention for an unset ``--device``: cuda when available, else cpu."""
    import torch

    return 'cuda' if torch.cuda.is_available() else 'cpu'


def usable_device(name: str) -> torch.device:
    """``torch.device(name)`` after allocating on it; ValueError (one line) when it cannot be timed."""
    import torch

    try:
        device = torch.device(name)
        if device.type not in ('cpu', 'cuda'):
            raise RuntimeError('only cpu and cuda devices can be timed')
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f'device {name!r} is not usable: {e}'.splitlines()[0]) from None
    return device


def timed(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Wall-clock seconds of one ``fn()``. On a CUDA device the queued work is waited for before and after,
    so the figure is the call's, not its launch's."""
    import torch

    sync = device is not None and device.type == 'cuda'
    if sync:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def environment(device: torch.device) -> dict[str, Any]:
    """Where a figure was measured: device name, torch version, CPU threads, UTC date."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()
    return dict(device=str(device), device_name=name, torch=torch.__version__, threads=torch.get_num_threads(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))


def emit_json_lines(rows: list[dict[str, Any]], path: str | None = None) -> None:
    """Print one JSON line per row, and write them to ``path`` too when given."""
    text = '\n'.join(json.dumps(r) for r in rows)
    print(text)
    if path:
        with open(path, 'w') as f:
            f.write(text + '\n')


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """argparse ``type`` of a ``BxCxHxW`` input shape."""
    match = re.fullmatch(r'(\d+)x(\d+)x(\d+)x(\d+)', text.strip().lower())
    if not match or min(int(g) for g in match.groups()) < 1:
        raise argparse.ArgumentTypeError(f'shape must be BxCxHxW with positive sizes, e.g. 32x256x56x56, '
                                         f'got {text!r}')
    return tuple(int(g) for g in match.groups())  # type: ignore[return-value]


def add_op_arguments(parser: argparse.ArgumentParser) -> None:
    """The DDF op's arguments every op benchmark takes: --dtypes, --formats, --kernel-size, --stride,
    --dilation, --combine (checked by :func:`check_op_arguments`)."""
    add = parser.add_argument
    add('--dtypes', nargs='+', choices=('fp32', 'bf16', 'fp16'), default=['fp32', 'bf16'], help='(default: fp32 bf16)')
    add('--formats', nargs='+', choices=('nchw', 'nhwc'), default=['nchw', 'nhwc'],
        help='nhwc = channels_last (default: both)')
    add('--kernel-size', type=int, default=3, help='odd k of the DDF op (default: 3)')
    add('--stride', type=int, default=1, help='(default: 1)')
    add('--dilation', type=int, default=1, help='(default: 1)')
    add('--combine', choices=('mul', 'add'), default='mul', help="DDF kernel_combine (default: 'mul')")


def check_op_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.kernel_size < 1 or args.kernel_size % 2 == 0:
        parser.error(f'--kernel-size must be a positive odd int, got {args.kernel_size}')
    if min(args.stride, args.dilation) < 1:
        parser.error('--stride and --dilation must be positive')
