#!/usr/bin/env python3
"""Inference time of a model in onnxruntime (CPU) next to PyTorch eager, on the same input and thread count.

    python scripts/benchmarks/benchmark_onnx.py --model ddf_resnet50 --batch-size 8 --img-size 224 --threads 2

The model is exported with ``ddfnet.export_onnx`` to a temporary file; each runtime is timed in blocks of
``--rounds`` calls, alternating, twice over (2 x rounds samples each). Min and median ms per batch are reported
with the onnxruntime/PyTorch ratio, and the relative error of the outputs. One JSON line per runtime
(``--json PATH`` also writes them to a file).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='ddf_resnet50')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=2, help='intra-op threads of both runtimes')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--json', help='also write the JSON lines to this file')
    args = parser.parse_args(argv)
    if min(args.batch_size, args.img_size, args.rounds, args.threads) < 1 or args.warmup < 0:
        parser.error('--batch-size, --img-size, --rounds and --threads must be positive, --warmup non-negative')

    import timm
    import torch

    import ddfnet
    from ddfnet.export import OnnxRuntimeModel
    from benchmark_common import emit_json_lines, environment, timed

    if not timm.is_model(args.model):
        parser.error(f'unknown model {args.model!r}')
    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model).eval()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'model.onnx')
        export_s = timed(lambda: ddfnet.export_onnx(model, x, path))
        session = OnnxRuntimeModel(path, threads=args.threads)

        def run_torch():
            with torch.inference_mode():
                return model(x)

        runners = {'pytorch': run_torch, 'onnxruntime': lambda: session(x)}
        reference, onnx_out = run_torch(), session(x)
        rel_error = ((onnx_out - reference).abs().max() / reference.abs().max()).item()
        # Blocks of rounds, one runtime at a time, twice over: interleaving single calls makes each runtime's
        # idle worker threads (onnxruntime's spin-wait) compete with the other's on a small CPU (PyTorch
        # measured 10x slower that way on 2 cores).
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(2):
            for name, run in runners.items():
                for round_index in range(args.warmup + args.rounds):
                    elapsed = timed(run)
                    if round_index >= args.warmup:
                        times[name].append(elapsed * 1000)
    env = environment(torch.device('cpu'))
    rows = []
    for name, samples in times.items():
        rows.append(dict(model=args.model, runtime=name, batch_size=args.batch_size, img_size=args.img_size,
                         min_ms=round(min(samples), 2),
                         median_ms=round(statistics.median(samples), 2),
                         images_per_sec=round(args.batch_size * 1000 / min(samples), 1), rounds=len(samples), **env))
    ratio = rows[1]['min_ms'] / rows[0]['min_ms']
    print(f"{args.model} batch {args.batch_size} {args.img_size}x{args.img_size}, {args.threads} threads "
          f"(export {export_s:.0f} s, relative error {rel_error:.1e}):")
    for row in rows:
        print(f"  {row['runtime']:12s} min {row['min_ms']:9.1f} ms  median {row['median_ms']:9.1f} ms  "
              f"{row['images_per_sec']:7.1f} img/s")
    print(f'  onnxruntime / pytorch (min): {ratio:.2f}')
    rows[1].update(ratio_to_pytorch=round(ratio, 3), relative_error=rel_error, export_s=round(export_s, 1))
    emit_json_lines(rows, args.json)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
