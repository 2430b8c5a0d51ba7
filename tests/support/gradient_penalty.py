"""Parameter gradients of an input-gradient penalty on DDF layers, as JSON-able data, so that a run in a
subprocess (``python -m support.gradient_penalty`` with DDFNET_FORCE_REFERENCE=1: the reference
implementation) can be compared with one in the test process (the native kernels)."""
import json
import sys

import torch

import ddfnet
from ddfnet.layers import DDFBranchPack


def gradient_penalty_grads() -> dict:
    """Parameter gradients of an input-gradient penalty (R1 / WGAN-GP style) on DDF layers, float64."""
    torch.manual_seed(0)
    layers = {'ddf_mul': ddfnet.DDFPack(10, stride=2, head=2), 'ddf_add': ddfnet.DDFPack(10, kernel_combine='add'),
              'spatial': DDFBranchPack(10, branch='spatial'), 'channel': DDFBranchPack(10, branch='channel')}
    x = torch.randn(2, 10, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = {'implementation': ddfnet.ops.implementation('cpu')}
    for name, layer in layers.items():
        layer = layer.double()
        x_ = x.clone().requires_grad_()
        grad_x, = torch.autograd.grad(layer(x_).square().sum(), x_, create_graph=True)
        grad_x.square().sum().backward()
        result[name] = {k: p.grad.flatten().tolist() for k, p in layer.named_parameters()}
    return result


if __name__ == '__main__':
    json.dump(gradient_penalty_grads(), sys.stdout)
