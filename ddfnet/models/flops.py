"""FLOP/MAC accounting with PyTorch's own ``FlopCounterMode``.

The DDF op has a registered FLOP formula (:mod:`ddfnet.ops.registrations`), so it is counted like any aten op.
FlopCounterMode reports FLOPs (a multiply-add is 2); we report MACs = FLOPs / 2, like timm's tables.
A :class:`~ddfnet.layers.DynamicConv2d` is counted as it runs: its attention (two 1x1 convs on pooled
features), the aggregation (kernel mixing matmul or weighted sum of outputs) and its conv(s), which a
``dyconv`` breakdown separates.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..layers import DynamicConv2d

__all__ = ['count_macs']

# aten/custom op name -> part of the breakdown
_OP_PARTS = {'convolution': 'conv', 'mm': 'linear', 'addmm': 'linear', 'bmm': 'matmul', 'ddf': 'ddf_op'}


def count_macs(model: nn.Module, img_size: int | tuple[int, int] = 224, in_chans: int = 3,
               batch_size: int = 1) -> dict[str, Any]:
    """Count one forward pass of ``model`` on a (batch_size, in_chans, img_size, img_size) input, per image
    (``img_size`` may be a (height, width) pair: detectors run on 800x1333 images).

    The batch size matters only for layers that choose their evaluation order by it: a DynamicConv2d
    mixes kernels for a single sample and, in its default 'auto' order, mixes outputs in late stages of
    larger batches.

    Returns ``params_m``, ``gmacs`` and two breakdowns in GMACs: ``by_op`` (conv, linear, ddf_op, ...) and
    ``by_module`` (the model's top-level children: stem, stages, head); models with DynamicConv2d layers
    get a third, ``dyconv``: the total over those layers split into ``attention``, ``aggregation`` and
    ``conv``.
    """
    if batch_size < 1:
        raise ValueError(f'count_macs: batch_size must be >= 1, got {batch_size}')
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    model = model.eval()
    x = torch.zeros(batch_size, in_chans, height, width)
    counter = FlopCounterMode(display=False, depth=1)
    with counter, torch.no_grad():
        model(x)
    total = counter.get_total_flops()
    per_image = 2e9 * batch_size  # FLOPs -> GMACs per image
    by_op: dict[str, float] = defaultdict(float)
    by_module: dict[str, float] = {}
    counts = counter.get_flop_counts()
    for module_name, ops in counts.items():
        if module_name == 'Global':
            for op, flops in ops.items():
                name = str(op).split('.')[-1]  # 'aten.convolution' -> 'convolution'
                by_op[_OP_PARTS.get(name, name)] += flops / per_image
        elif module_name.count('.') == 1:  # 'ResNet.layer1' -> 'layer1'
            by_module[module_name.split('.', 1)[1]] = sum(ops.values()) / per_image
    result = {
        'params_m': round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        'gmacs': round(total / per_image, 3),
        'by_op': {k: round(v, 4) for k, v in sorted(by_op.items())},
        'by_module': {k: round(v, 4) for k, v in by_module.items()},
    }
    # FlopCounterMode keys modules by '<root class>.<qualified name>' and counts nested modules' ops in
    # their parents too, so a layer's own work is its total minus its attention's.
    root = type(model).__name__
    dyconv = dict(attention=0.0, aggregation=0.0, conv=0.0)
    for name, module in model.named_modules():
        if isinstance(module, DynamicConv2d):
            ops = {str(op).split('.')[-1]: flops for op, flops in counts.get(f'{root}.{name}', {}).items()}
            attention = sum(counts.get(f'{root}.{name}.attention', {}).values())
            dyconv['attention'] += attention / per_image
            dyconv['conv'] += (ops.pop('convolution', 0) - attention) / per_image
            dyconv['aggregation'] += sum(ops.values()) / per_image
    if any(dyconv.values()):
        result['dyconv'] = {k: round(v, 4) for k, v in dyconv.items()}
    return result
