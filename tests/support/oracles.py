"""The tests' oracles and inputs: a naive loop implementation of the DDF op (differentiable), and the one
input maker every op test uses."""
import torch


def naive_ddf(x, channel_filter, spatial_filter, kernel_size, dilation=1, stride=1, kernel_combine='mul'):
    b, c, h, w = x.shape
    k, half = kernel_size, kernel_size // 2
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
    rows = []
    for y in range(out_h):
        cols = []
        for xo in range(out_w):
            acc = x.new_zeros(b, c)
            for i in range(k):
                for j in range(k):
                    yy, xx = y * stride + (i - half) * dilation, xo * stride + (j - half) * dilation
                    if not (0 <= yy < h and 0 <= xx < w):
                        continue
                    s = spatial_filter[:, i * k + j, y, xo][:, None]
                    f = channel_filter[:, :, i, j] * s if kernel_combine == 'mul' else channel_filter[:, :, i, j] + s
                    acc = acc + x[:, :, yy, xx] * f
            cols.append(acc)
        rows.append(torch.stack(cols, dim=-1))
    return torch.stack(rows, dim=-2)


def random_inputs(b, c, h, w, k, stride=1, dtype=torch.float64, requires_grad=False, seed=0, *, device='cpu',
                  memory_format=torch.contiguous_format, grad_output=False):
    """input, channel_filter, spatial_filter (and a grad_output when asked) of the op, drawn in float64 and
    rounded to ``dtype`` on ``device``, so every dtype sees the same values up to one rounding; the input,
    spatial filter and grad_output in ``memory_format`` ('nchw' / 'nhwc' name the two formats too)."""
    memory_format = {'nchw': torch.contiguous_format, 'nhwc': torch.channels_last}.get(memory_format, memory_format)
    g = torch.Generator().manual_seed(seed)
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
    sizes = [(b, c, h, w), (b, c, k, k), (b, k * k, out_h, out_w)] + ([(b, c, out_h, out_w)] if grad_output else [])
    tensors = [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in sizes]
    tensors = [t if i == 1 else t.contiguous(memory_format=memory_format) for i, t in enumerate(tensors)]
    return tuple(t.requires_grad_(requires_grad and i < 3) for i, t in enumerate(tensors))
