#!/usr/bin/env python3
"""Print one JSON line with a model's parameter count and multiply-accumulates (GMACs).

    python scripts/count_flops.py --model ddf_resnet50 [--img-size 224]

Counting uses torch.utils.flop_counter.FlopCounterMode; the DDF op is counted through its registered
FLOP formula (3 FLOPs = 1.5 MACs per output element and tap: filter combination, multiply, add).
DynamicConv2d layers are counted as they run (attention, aggregation and conv; a ``dyconv`` breakdown
says which is which), which depends on the batch: a single image mixes kernels (the paper's order), a
batch of several mixes outputs in late stages (``--batch-size 2``); ``--dyconv-aggregation kernels``
forces the paper's order. Figures are per image.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', required=True, help='timm model name, e.g. ddf_resnet50')
    parser.add_argument('--img-size', type=int, default=224, help='square input resolution (default 224)')
    parser.add_argument('--batch-size', type=int, default=1,
                        help='images per forward (default 1); GMACs are reported per image')
    parser.add_argument('--dyconv-aggregation', choices=('auto', 'kernels', 'outputs'),
                        help="count DynamicConv2d layers in this order (default: the model's own, 'auto'); "
                             "'kernels' is the DyConv paper's cost: one conv plus kernel mixing")
    args = parser.parse_args(argv)
    if args.img_size < 1:
        parser.error(f'--img-size must be positive, got {args.img_size}')
    if args.batch_size < 1:
        parser.error(f'--batch-size must be positive, got {args.batch_size}')

    import timm

    import ddfnet  # noqa: F401  (registers the DDF models)
    from ddfnet import DynamicConv2d
    from ddfnet.ops import DDFSlowPathWarning
    from ddfnet.models import count_macs

    if not timm.is_model(args.model):
        parser.error(f'unknown model {args.model!r}; see timm.list_models()')
    # Counting needs no speed: the reference-path notice would only clutter the JSON output.
    warnings.simplefilter('ignore', DDFSlowPathWarning)
    model = timm.create_model(args.model)
    if args.dyconv_aggregation:
        for module in model.modules():
            if isinstance(module, DynamicConv2d):
                module.aggregation = args.dyconv_aggregation
    result = count_macs(model, img_size=args.img_size, batch_size=args.batch_size)
    extra = {'dyconv_aggregation': args.dyconv_aggregation} if args.dyconv_aggregation else {}
    print(json.dumps({'model': args.model, 'img_size': args.img_size, 'batch_size': args.batch_size, **extra,
                      **result}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
