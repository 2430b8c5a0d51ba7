"""Dynamic convolution (DyConv; Chen et al., "Dynamic Convolution: Attention over Convolution Kernels",
CVPR 2020): K kernels aggregated per sample by a softmax attention.

``y = conv(x, sum_k pi_k W_k) + sum_k pi_k b_k`` with ``pi = softmax(z / T)`` and ``z`` from
GAP -> 1x1 conv -> ReLU -> 1x1 conv. The sum can be formed on either side of the convolution, and which
side is cheaper in memory depends on the layer, not on the batch:

- ``'kernels'``: aggregate per-sample kernels (one matmul), then one grouped conv with ``groups = B *
  groups``. The per-sample kernels take ``B * Cout * Cin/groups * kh * kw`` elements.
- ``'outputs'``: one dense conv with the K kernels stacked as ``K * Cout`` output channels, then the
  attention-weighted sum of the K outputs. The stacked outputs take ``B * K * Cout * Ho * Wo`` elements
  and K times the conv's multiply-adds.

The common implementation ('kernels' with autograd saving the per-sample kernels) holds them for every
layer until backward, so training memory grows with batch x parameters and runs out at large batches
(docs/benchmarks.md). Here, while gradients are recorded, the aggregation runs under activation
checkpointing: backward keeps only what a static conv keeps (the input) plus the (B, K) attention, and
the per-sample intermediate exists for one layer at a time. ``'auto'`` (default) picks, per call, the
side whose intermediate is smaller: early high-resolution layers aggregate kernels (no extra conv
work), late low-resolution ones aggregate outputs; a batch of one always aggregates kernels (its kernel
is one static weight's size, and the conv a plain one: dy_resnet18 inference at batch 1 1.6x faster on
CPU, docs/benchmarks.md).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torch.utils.checkpoint import checkpoint

from ..ops._torch_internals import under_torch_func

__all__ = ['DynamicConv2d', 'AGGREGATIONS']

AGGREGATIONS = ('auto', 'kernels', 'outputs')
# The attention's hidden width is in_channels * attention_ratio, but never below this: with an RGB or a
# 4-channel input a ratio of 1/4 would leave a single ReLU unit, which can die and freeze the attention.
_MIN_ATTENTION_CHANNELS = 4

Pair = int | tuple[int, int]


def aggregate_kernels(x: Tensor, weight: Tensor, bias: Tensor | None, attention: Tensor,
                      stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                      groups: int) -> Tensor:
    """Per-sample kernels ``attention @ weight``, applied by one grouped conv over the whole batch."""
    # Sizes by index, not unpacked from shape slices: TorchScript must know a list's length to unpack it.
    batch, out_channels = x.shape[0], weight.shape[1]
    kernels = (attention @ weight.flatten(1)).unflatten(1, weight.shape[1:]).flatten(0, 1)
    biases = None if bias is None else (attention @ bias).reshape(-1)
    out = F.conv2d(x.flatten(0, 1).unsqueeze(0), kernels, biases, stride, padding, dilation, groups * batch)
    return out.reshape(batch, out_channels, out.shape[2], out.shape[3])


def aggregate_outputs(x: Tensor, weight: Tensor, bias: Tensor | None, attention: Tensor,
                      stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                      groups: int) -> Tensor:
    """One conv with the K kernels as K * Cout output channels, then the attention-weighted sum over K."""
    num_kernels, out_channels = weight.shape[0], weight.shape[1]
    per_group = out_channels // groups
    # A grouped conv gives group g the output channels [g * n, (g + 1) * n): order the stacked kernels
    # (group, kernel, channel) so each group's K kernels see that group's input channels.
    stacked = weight.unflatten(1, (groups, per_group)).transpose(0, 1)
    out = F.conv2d(x, stacked.flatten(0, 2), None, stride, padding, dilation, groups)
    out = out.unflatten(1, (groups, num_kernels, per_group))
    out = torch.einsum('bgkchw,bk->bgchw', out, attention.to(out.dtype)).flatten(1, 2)
    if bias is not None:
        out = out + (attention @ bias).to(out.dtype)[:, :, None, None]
    return out


# An FX leaf in timm's tracers (timm's FX feature extraction): the evaluation order depends on the batch
# and spatial sizes, which FX only knows symbolically, and checkpointing does not trace. Plain torch.fx
# (torchvision's create_feature_extractor) traces the size-independent order instead (forward).
@register_notrace_module
class DynamicConv2d(nn.Module):
    """Drop-in for ``nn.Conv2d`` with ``num_kernels`` kernels mixed per sample (Chen et al., CVPR 2020).

    Parameters: ``weight`` (K, Cout, Cin/groups, kh, kw) and ``bias`` (K, Cout), each kernel initialised
    like a conv (Kaiming normal, fan-out, ReLU gain) and biases zero; ``attention``: GAP, 1x1 conv to
    ``max(4, int(Cin * attention_ratio))`` channels, ReLU, 1x1 conv to K logits. The attention is
    ``softmax(logits / temperature)``; ``temperature`` is a persistent buffer (saved in checkpoints) set
    by :meth:`set_temperature`, e.g. by the training script's epoch hook (30 -> 1 over 10 epochs).
    ``aggregation`` ('auto', 'kernels', 'outputs') picks the evaluation order (module docstring); all
    three compute the same function. With K=1 the layer is a plain conv.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Pair, stride: Pair = 1,
                 padding: Pair = 0, dilation: Pair = 1, groups: int = 1, bias: bool = True,
                 num_kernels: int = 4, attention_ratio: float = 0.25, temperature: float = 1.0,
                 aggregation: str = 'auto', device=None, dtype=None):
        super().__init__()
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        if min(in_channels, out_channels, groups, num_kernels) < 1:
            raise ValueError(f'DynamicConv2d: in_channels={in_channels}, out_channels={out_channels}, '
                             f'groups={groups} and num_kernels={num_kernels} must be >= 1')
        if in_channels % groups or out_channels % groups:
            raise ValueError(f'DynamicConv2d: groups={groups} must divide in_channels={in_channels} and '
                             f'out_channels={out_channels}')
        if min(*self.kernel_size, *self.stride, *self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f'DynamicConv2d: kernel_size={kernel_size}, stride={stride} and dilation='
                             f'{dilation} must be >= 1 and padding={padding} >= 0')
        if not attention_ratio > 0:
            raise ValueError(f'DynamicConv2d: attention_ratio must be > 0, got {attention_ratio}')
        if aggregation not in AGGREGATIONS:
            raise ValueError(f'DynamicConv2d: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}')
        factory = dict(device=device, dtype=dtype)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.num_kernels = num_kernels
        self.aggregation = aggregation
        # False: autograd keeps the per-sample intermediate, as the common implementation does (the
        # memory benchmark's baseline); True (default) recomputes it in backward.
        self.recompute = True
        self.weight = nn.Parameter(torch.empty(num_kernels, out_channels, in_channels // groups,
                                               *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.zeros(num_kernels, out_channels, **factory)) if bias else None
        hidden = max(_MIN_ATTENTION_CHANNELS, int(in_channels * attention_ratio))
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, hidden, 1, **factory),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, num_kernels, 1, **factory))
        self.register_buffer('temperature', torch.empty((), dtype=torch.float32, device=device))
        self.set_temperature(temperature)
        # Each kernel on its own like a static conv (what timm's ResNet/EfficientNet init does: fan-out
        # counts the output channels one input channel feeds), so any aggregate starts at that scale.
        fan_out = out_channels // groups * math.prod(self.kernel_size)
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / fan_out))

    def _apply(self, fn, recurse=True):
        # Module.to(memory_format=torch.channels_last) converts every 4-D and 5-D tensor and fails on the
        # 5-D kernel bank (K, Cout, Cin/groups, kh, kw): hand it over as the (K * Cout, ...) conv weight it
        # is (converted like a conv weight), and keep the 5-D view. The layer's other tensors are < 5-D.
        def apply(t):
            return fn(t.flatten(0, 1)).unflatten(0, t.shape[:2]) if t.dim() == 5 else fn(t)
        return super()._apply(apply, recurse)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **kwargs) -> DynamicConv2d:
        """A DynamicConv2d with ``conv``'s hyperparameters (not its weights); kwargs set the DyConv ones."""
        if type(conv) is not nn.Conv2d or not isinstance(conv.padding, tuple) or conv.padding_mode != 'zeros':
            raise TypeError(f'DynamicConv2d.from_conv needs a plain nn.Conv2d with numeric zero padding, '
                            f'got {conv!r}')
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation, conv.groups, conv.bias is not None, device=conv.weight.device,
                   dtype=conv.weight.dtype, **kwargs)

    def set_temperature(self, temperature: float) -> None:
        """Set the softmax temperature of the attention (1 is a plain softmax; larger is flatter)."""
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f'DynamicConv2d: temperature must be a finite number > 0, got {temperature!r}')
        with torch.no_grad():
            self.temperature.fill_(float(temperature))

    def attention_weights(self, x: Tensor) -> Tensor:
        """The (B, K) per-sample kernel weights ``softmax(logits / temperature)``."""
        logits = self.attention(x).flatten(1)
        # At least float32: under float16 autocast, logits / T and the softmax would lose the small
        # differences a high temperature leaves.
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return torch.softmax(logits.to(dtype) / self.temperature.to(dtype), dim=1).to(logits.dtype)

    def _output_elements(self, height: int, width: int) -> int:
        size = [height, width]
        elements = 1
        for i in range(2):  # an indexed loop: TorchScript has neither zip over tuples nor math.prod
            elements *= (size[i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1) \
                // self.stride[i] + 1
        return elements

    def resolved_aggregation(self, x: Tensor) -> str:
        """'kernels' or 'outputs': the order used for input ``x`` (the smaller per-sample intermediate;
        'kernels' for a single sample; always 'outputs' under ONNX export)."""
        if not torch.jit.is_scripting():  # (nested: TorchScript cannot compile is_in_onnx_export)
            if torch.onnx.is_in_onnx_export():
                # ONNX export (ddfnet/export/onnx.py): 'kernels' runs a conv with groups = batch, and an ONNX
                # Conv's group count is fixed in the graph, so the batch could not be dynamic. 'outputs'
                # computes the same result with static groups (tests/test_onnx.py checks the parity).
                return 'outputs'
        if self.aggregation != 'auto':
            return self.aggregation
        if x.shape[0] == 0:  # groups = 0 is not a conv
            return 'outputs'
        if x.shape[0] == 1:  # one sample: the mixed kernel (one static weight's size) feeds a plain conv
            return 'kernels'
        kernel_elements = self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        output_elements = self.num_kernels * self._output_elements(x.shape[-2], x.shape[-1])
        return 'kernels' if kernel_elements <= output_elements else 'outputs'

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (nested: TorchScript must not compile the isinstance)
            if isinstance(x, torch.fx.Proxy):
                # Plain symbolic tracing (timm's tracers keep this module a leaf): a graph serves every
                # size, so no size checks and the order valid for any size, the same function.
                return aggregate_outputs(x, self.weight, self.bias, self.attention_weights(x), self.stride,
                                         self.padding, self.dilation, self.groups)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            got = '(' + ', '.join([str(n) for n in x.shape]) + ')'  # tuple(Size) does not script
            raise ValueError(f'DynamicConv2d: expected input (B, {self.in_channels}, H, W), got {got}')
        attention = self.attention_weights(x)
        kernels = self.resolved_aggregation(x) == 'kernels'
        if torch.jit.is_scripting():  # TorchScript cannot checkpoint: autograd keeps the intermediate
            if kernels:
                return aggregate_kernels(x, self.weight, self.bias, attention, self.stride, self.padding,
                                         self.dilation, self.groups)
            return aggregate_outputs(x, self.weight, self.bias, attention, self.stride, self.padding,
                                     self.dilation, self.groups)
        aggregate = aggregate_kernels if kernels else aggregate_outputs
        args = (x, self.weight, self.bias, attention, self.stride, self.padding, self.dilation, self.groups)
        if self.recompute and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad) \
                and not under_torch_func():  # torch.func rejects checkpointing's saved-tensor hooks
            # Recompute the per-sample kernels / stacked outputs in backward instead of keeping them. The
            # aggregation draws no random numbers, so the RNG state need not be saved and restored.
            return checkpoint(aggregate, *args, use_reentrant=False, preserve_rng_state=False)
        return aggregate(*args)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'padding={self.padding}, dilation={self.dilation}, groups={self.groups}, '
                f'bias={self.bias is not None}, num_kernels={self.num_kernels}, aggregation={self.aggregation!r}')
