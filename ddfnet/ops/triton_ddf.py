"""The DDF op in Triton: GPU kernels that need no compiler at install time, autotuned on the user's GPU.

:func:`forward` and :func:`backward` take and return what ``torch.ops.ddfnet.ddf`` / ``ddf_backward`` do,
with the native kernels' layouts: the output follows the input's memory format
(:func:`~ddfnet.ops.reference.new_output`), each gradient the strides ``torch.empty_like`` gives its argument.
float16 and bfloat16 accumulate in float32, float64 in float64. The kernels live in
:mod:`ddfnet.ops._triton_kernels`, imported on first use only, so this module imports where triton is absent
(:func:`available` says whether it is). On CUDA tensors each kernel is autotuned over :data:`CONFIGS` per
channels, image size, k, dtype and layout; on CPU tensors, under triton's interpreter
(``TRITON_INTERPRET=1`` set before the first call), the first configuration runs, or the one asked for.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .checks import check_ddf_args
from .reference import new_output, output_size

__all__ = ['available', 'forward', 'backward', 'check_sizes', 'CONFIGS', 'KERNELS']

KERNELS = ('forward', 'grad_input', 'grad_channel_filter', 'grad_spatial_filter')
# Per kernel (BLOCK_P pixels, BLOCK_C channels, num_warps, num_stages). Tiles of 1024 elements: the forward
# kernel with a 128 x 64 tile of 4 warps spills (255 registers, 880 bytes of stack on sm_90). Wide in pixels
# suits NCHW (pixels contiguous), wide in channels channels_last. scripts/benchmarks/triton_resources.py reports every one's registers on sm_80 /
# sm_90, and tests/test_triton_compile.py fails on a spill.
_TILE_CONFIGS = ((64, 16, 4, 2), (16, 64, 4, 2), (32, 32, 4, 2), (128, 8, 4, 2))
CONFIGS = {name: _TILE_CONFIGS for name in KERNELS}


def available() -> bool:
    """Whether triton imports (the kernels still need a GPU, or its interpreter on CPU tensors)."""
    try:
        import triton  # noqa: F401
    except Exception:  # absent, or broken (a triton built for another torch, a missing libcuda stub)
        return False
    return True


@functools.cache
def _kernels() -> dict:
    """name -> (jit kernel, autotuned kernel)."""
    import triton

    from . import _triton_kernels as k
    kernels = {'forward': (k.ddf_forward_kernel, 'sxc'), 'grad_input': (k.ddf_grad_input_kernel, 'sgc'),
               'grad_channel_filter': (k.ddf_grad_channel_filter_kernel, 'sxc'),
               'grad_spatial_filter': (k.ddf_grad_spatial_filter_kernel, 'sxc')}
    tuned = {}
    for name, (kernel, channel_stride) in kernels.items():
        configs = [triton.Config({'BLOCK_P': p, 'BLOCK_C': c}, num_warps=w, num_stages=s)
                   for p, c, w, s in CONFIGS[name]]
        # The channel stride tells the layout apart (1 for channels_last); dtypes join the key by themselves.
        key = ['C', 'H', 'W', 'K', channel_stride]
        tuned[name] = (kernel, triton.autotune(configs, key=key)(kernel))
    return tuned


def _launch(name: str, grid, args: tuple, k: int, combine: str, dtype: torch.dtype, config: int | None,
            on_cuda: bool) -> None:
    import triton.language as tl
    kernel, tuned = _kernels()[name]
    constants = dict(K=k, MUL=combine == 'mul', ACC=tl.float64 if dtype == torch.float64 else tl.float32)
    if on_cuda and config is None:
        tuned[lambda meta: grid(meta['BLOCK_P'], meta['BLOCK_C'])](*args, **constants)
        return
    block_p, block_c, warps, stages = CONFIGS[name][config or 0]
    kernel[grid(block_p, block_c)](*args, **constants, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps,
                                    num_stages=stages)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


INDEX_LIMIT = 2 ** 31  # the kernels index within a sample in int32 (only the sample's offset is int64)
GRID_LIMIT = 65535  # programs along a CUDA grid's second and third axes


def check_sizes(kernel_size: int, *tensors: Tensor) -> None:
    """Raises ValueError unless the kernels' int32 index arithmetic holds for these tensors: per sample
    (dimensions 1-3) fewer than 2^31 elements and a farthest element, sum of (size - 1) * |stride|, below 2^31;
    and the grid fits: batch, k * k and channels / 8 (the narrowest channel block) at most 65535."""
    batch, channels = tensors[0].shape[:2]
    if max(batch, kernel_size * kernel_size, _cdiv(channels, 8)) > GRID_LIMIT:
        raise ValueError(f'ddf (Triton): batch, kernel_size ** 2 and channels / 8 must be at most {GRID_LIMIT}, '
                         f'got {batch}, {kernel_size ** 2} and {channels} channels')
    for t in tensors:
        elements = t.shape[1] * t.shape[2] * t.shape[3]
        farthest = sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:]) if n)
        if max(elements, farthest) >= INDEX_LIMIT:
            raise ValueError(f'ddf (Triton): a sample of each tensor must span fewer than 2^31 elements (int32 '
                             f'indexing), got sizes {tuple(t.shape)} with strides {t.stride()}')


def forward(input: Tensor, channel_filter: Tensor, spatial_filter: Tensor, kernel_size: int, dilation: int,
            stride: int, kernel_combine: str, *, config: int | None = None) -> Tensor:
    """The DDF op's output, by the Triton forward kernel (``config``: an index into ``CONFIGS['forward']``
    instead of autotuning)."""
    check_ddf_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine)
    check_sizes(kernel_size, input, channel_filter, spatial_filter)
    batch, channels, height, width = input.shape
    out_h, out_w = output_size(height, stride), output_size(width, stride)
    out = new_output(input, out_h, out_w, input.dtype)
    if out.numel():
        _launch('forward', lambda p, c: (_cdiv(out_h * out_w, p), _cdiv(channels, c), batch),
                (input, channel_filter, spatial_filter, out, channels, height, width, out_h, out_w, dilation, stride,
                 *input.stride(), *channel_filter.stride(), *spatial_filter.stride(), *out.stride()),
                kernel_size, kernel_combine, input.dtype, config, on_cuda=input.is_cuda)
    return out


def _check_grad_output(grad_output: Tensor, input: Tensor, stride: int) -> None:
    want = (input.shape[0], input.shape[1], output_size(input.shape[2], stride), output_size(input.shape[3], stride))
    if tuple(grad_output.shape) != want:
        raise ValueError(f'ddf_backward: grad_output must have shape {want}, got {tuple(grad_output.shape)}')
    if grad_output.dtype != input.dtype:
        raise TypeError(f"ddf_backward: grad_output must have the input's dtype {input.dtype}, got "
                        f'{grad_output.dtype}')
    if grad_output.device != input.device:
        raise ValueError(f'ddf_backward: grad_output must be on {input.device}, got {grad_output.device}')


def backward(grad_output: Tensor, input: Tensor, channel_filter: Tensor, spatial_filter: Tensor, kernel_size: int,
             dilation: int, stride: int, kernel_combine: str, *,
             config: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_channel_filter, grad_spatial_filter) by the three Triton gradient kernels, each
    deterministic (fixed-order sums, no atomics); ``config`` as in :func:`forward`."""
    check_ddf_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine)
    _check_grad_output(grad_output, input, stride)
    check_sizes(kernel_size, input, channel_filter, spatial_filter, grad_output)
    batch, channels, height, width = input.shape
    out_h, out_w = grad_output.shape[2:]
    taps = kernel_size * kernel_size
    grad_input = torch.empty_like(input)
    grad_channel = torch.empty_like(channel_filter)
    grad_spatial = torch.empty_like(spatial_filter)
    sizes = (channels, height, width, out_h, out_w, dilation, stride)
    g, x, cf, sf = (t.stride() for t in (grad_output, input, channel_filter, spatial_filter))
    launch = functools.partial(_launch, k=kernel_size, combine=kernel_combine, dtype=input.dtype, config=config,
                               on_cuda=input.is_cuda)
    if grad_input.numel():
        launch('grad_input', lambda p, c: (_cdiv(height * width, p), _cdiv(channels, c), batch),
               (grad_output, channel_filter, spatial_filter, grad_input, *sizes, *g, *cf, *sf, *grad_input.stride()))
    if grad_channel.numel():
        launch('grad_channel_filter', lambda p, c: (taps, _cdiv(channels, c), batch),
               (grad_output, input, spatial_filter, grad_channel, *sizes, *g, *x, *sf, *grad_channel.stride()))
    if grad_spatial.numel():
        launch('grad_spatial_filter', lambda p, c: (_cdiv(out_h * out_w, p), taps, batch),
               (grad_output, input, channel_filter, grad_spatial, *sizes, *g, *x, *cf, *grad_spatial.stride()))
    return grad_input, grad_channel, grad_spatial
