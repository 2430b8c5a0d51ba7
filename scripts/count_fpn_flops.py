#!/usr/bin/env python3
"""Print one JSON line with the multiply-accumulates (GMACs) of a ResNet-50 detector's FPN with nearest and
with DDF-Up upsampling, and DDF-Up's extra cost: the DDF paper's "0.58 GFLOPs extra" (Section 5.3).

    python scripts/count_fpn_flops.py [--img-size 800 1333] [--size-divisible 32]

The FPN (256 channels, P2-P5 and the max-pooled P6 of torchvision's and MMDetection's Faster R-CNN) runs
on feature maps of the sizes a ResNet-50 gives for the image after the detector pads it to a multiple of
``--size-divisible`` (800x1333 runs as 800x1344); the backbone itself is the same in both and is not
counted. Counting as in scripts/count_flops.py (FlopCounterMode, the DDF op at 1.5 MACs per output element
and tap); nearest interpolation costs no MACs. MMDetection's counter, which the paper's figure comes from,
reports MACs under the name FLOPs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings

RESNET50_CHANNELS = (256, 512, 1024, 2048)  # layer1-layer4, at strides 4, 8, 16, 32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--img-size', type=int, nargs=2, default=(800, 1333), metavar=('HEIGHT', 'WIDTH'),
                        help='image size before padding (default 800 1333, the paper\'s test scale)')
    parser.add_argument('--size-divisible', type=int, default=32,
                        help='the detector pads images to a multiple of this (default 32, as torchvision and MMDetection)')
    args = parser.parse_args(argv)
    if min(args.img_size) < 32:
        parser.error(f'--img-size must be at least 32 32, got {" ".join(map(str, args.img_size))}')
    if args.size_divisible < 1:
        parser.error(f'--size-divisible must be positive, got {args.size_divisible}')

    import torch
    from torch import nn
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    from ddfnet.models import DDFUpFeaturePyramidNetwork, count_macs
    from ddfnet.ops import DDFSlowPathWarning

    class ResNet50Pyramid(nn.Module):
        """The FPN, fed zero feature maps of the sizes ResNet-50 gives for the input image (each stride-2
        layer maps n to ceil(n / 2)); making them costs no MACs."""

        def __init__(self, upsample: str):
            super().__init__()
            self.fpn = DDFUpFeaturePyramidNetwork(list(RESNET50_CHANNELS), 256, LastLevelMaxPool(), upsample=upsample)

        def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
            height, width = math.ceil(image.shape[2] / 4), math.ceil(image.shape[3] / 4)
            features = {}
            for i, channels in enumerate(RESNET50_CHANNELS):
                features[str(i)] = image.new_zeros(1, channels, height, width)
                height, width = math.ceil(height / 2), math.ceil(width / 2)
            return self.fpn(features)

    warnings.simplefilter('ignore', DDFSlowPathWarning)  # counting needs no speed
    size = tuple(math.ceil(n / args.size_divisible) * args.size_divisible for n in args.img_size)
    torch.manual_seed(0)
    counts = {upsample: count_macs(ResNet50Pyramid(upsample), img_size=size, in_chans=1)
              for upsample in ('nearest', 'ddf')}
    extra_by_op = {op: round(counts['ddf']['by_op'].get(op, 0.0) - counts['nearest']['by_op'].get(op, 0.0), 4)
                   for op in counts['ddf']['by_op']}
    print(json.dumps({
        'img_size': list(args.img_size), 'padded_size': list(size),
        'fpn_gmacs': {k: v['gmacs'] for k, v in counts.items()},
        'fpn_params_m': {k: v['params_m'] for k, v in counts.items()},
        'extra_gmacs': round(counts['ddf']['gmacs'] - counts['nearest']['gmacs'], 4),
        'extra_by_op': {op: v for op, v in extra_by_op.items() if v},
        'paper_extra_gflops': 0.58,
    }))
    return 0


if __name__ == '__main__':
    sys.exit(main())
