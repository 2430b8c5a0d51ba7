"""The DDF op written with standard operators only, for ONNX export.

The op (out[b, c, y, x] = sum over the k*k taps (i, j) of the zero-padded input at (y*stride + (i - k//2)*
dilation, x*stride + (j - k//2)*dilation) times the combined filter cf[b, c, i, j] (*|+) sf[b, i*k + j, y, x])
is the k*k taps' strided slices of the zero-padded input, multiplied by the combined filter and summed over
the taps: ONNX ``Pad``, ``Unsqueeze``, ``Slice``, ``Concat``, ``Reshape``, ``Mul``/``Add`` and
``ReduceSum``, which every ONNX runtime has (no custom domain, nothing to build; the k*k-fold tensor it
holds is an inference-time cost only). One builder, :func:`_build_ddf`, emits that graph through one of
three small backends, so the three export routes cannot drift apart:

* eager torch ops (:func:`ddf_standard_ops`): while a plain ``torch.onnx.export(model, ...)`` traces a
  model, :func:`ddfnet.ddf` runs this instead of the custom op, so that call works with either exporter
  and needs nothing from the user;
* onnxscript (:func:`onnx_translation_table`): the dynamo exporter's ``custom_translation_table``, which
  :func:`ddfnet.export_onnx` passes (and keeps the op in the graph for, :func:`keep_op_for_translation`),
  and which graphs that already hold ``ddfnet::ddf`` (an ``ExportedProgram`` from ``torch.export.export``)
  need;
* the TorchScript exporter's symbolic (:func:`register_torchscript_symbolic`, registered with the op's
  other kernels), for traced or scripted modules that hold the op.

Slices end at a negative offset from the padded extent rather than at ``H + i*d``, so no ``Shape`` op is
needed and the graph works for any H and W (dynamic sizes). It lives with the op, not in
:mod:`ddfnet.export`, because :func:`ddfnet.ddf` switches to it under export.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .checks import check_ddf_args

__all__ = ['ddf_standard_ops', 'onnx_translation_table', 'register_torchscript_symbolic', 'keep_op_for_translation',
           'keeping_the_op']

_TORCHSCRIPT_MIN_OPSET = 13  # Pad, Slice, Unsqueeze and ReduceSum with their int lists as inputs
_INT64_MAX = 2 ** 63 - 1  # ONNX Slice's "to the end"


def _tap_slices(kernel_size: int, dilation: int, index: int) -> tuple[int, int]:
    """Start and end, on the padded axis, of the rows (or columns) that tap ``index`` reads.

    The padded axis has H + (k-1)*d entries; tap i reads H of them from i*d on (one per output at stride 1,
    every stride-th at stride s, giving (H-1)//s + 1 outputs). The end is written relative to the axis'
    end, -(k-1-i)*d, so it does not depend on H.
    """
    end = -(kernel_size - 1 - index) * dilation
    return index * dilation, end if end < 0 else _INT64_MAX


def _build_ddf(ops, input, channel_filter, spatial_filter, kernel_size: int, dilation: int, stride: int,
               kernel_combine: str):
    """The DDF op as standard ONNX nodes, emitted through ``ops`` (one of the backends below).

    The k*k taps' strided slices of the padded input are concatenated into (B, C, k*k, Ho, Wo), multiplied
    by the combined filter (B, C, k*k, Ho, Wo) and summed over the taps: k*k + 8 nodes per layer. (Few
    nodes matter: torch.export's symbolic shapes and the onnxscript optimizer cost time per node, and a
    node per tap for each filter and product made a DDF layer cost seconds to export.)
    """
    pad = (kernel_size - 1) // 2 * dilation
    padded = ops.unsqueeze(ops.pad(input, pad) if pad else input, 2)     # (B, C, 1, H + 2p, W + 2p)
    taps = []
    for i in range(kernel_size):
        row_start, row_end = _tap_slices(kernel_size, dilation, i)
        for j in range(kernel_size):
            col_start, col_end = _tap_slices(kernel_size, dilation, j)
            taps.append(ops.slice(padded, (row_start, col_start), (row_end, col_end), (3, 4), (stride, stride)))
    pixels = ops.concat(taps, 2) if len(taps) > 1 else taps[0]      # (B, C, k*k, Ho, Wo)
    channel = ops.channel_taps(channel_filter)                     # (B, C, k*k, 1, 1)
    spatial = ops.unsqueeze(spatial_filter, 1)                     # (B, 1, k*k, Ho, Wo)
    combined = ops.mul(channel, spatial) if kernel_combine == 'mul' else ops.add(channel, spatial)
    return ops.sum(ops.mul(pixels, combined), 2)


class _TorchOps:
    """Backend: eager torch ops (what the exporters trace into their standard translations)."""

    @staticmethod
    def pad(x: Tensor, pad: int) -> Tensor:
        return nn.functional.pad(x, (pad, pad, pad, pad))

    @staticmethod
    def slice(x: Tensor, starts, ends, axes, steps) -> Tensor:
        index: list[Any] = [slice(None)] * x.dim()
        for start, end, axis, step in zip(starts, ends, axes, steps):
            index[axis] = slice(start, None if end == _INT64_MAX else end, step)
        return x[tuple(index)]

    @staticmethod
    def unsqueeze(x: Tensor, axis: int) -> Tensor:
        return x.unsqueeze(axis)

    @staticmethod
    def concat(tensors: list[Tensor], axis: int) -> Tensor:
        return torch.cat(tensors, axis)

    @staticmethod
    def channel_taps(channel_filter: Tensor) -> Tensor:
        return channel_filter.flatten(2)[..., None, None]

    @staticmethod
    def sum(x: Tensor, axis: int) -> Tensor:
        return x.sum(axis)

    mul = staticmethod(torch.mul)
    add = staticmethod(torch.add)


class _GraphOps:
    """The ONNX backends' shared part; subclasses say how a node and an int64 constant are made."""

    def __init__(self):
        self._constants: dict[tuple[int, ...], Any] = {}

    def node(self, op_type: str, *inputs, **attributes):
        raise NotImplementedError

    def constant(self, values: list[int]):
        raise NotImplementedError

    def ints(self, values: Sequence[int]):
        # One node per distinct list: the taps share most of theirs, and every extra node costs the
        # onnxscript optimizer time (hundreds of seconds for a few thousand of them).
        key = tuple(values)
        if key not in self._constants:
            self._constants[key] = self.constant(list(key))
        return self._constants[key]

    def pad(self, x, pad: int):
        return self.node('Pad', x, self.ints([0, 0, pad, pad, 0, 0, pad, pad]))

    def slice(self, x, starts, ends, axes, steps):
        return self.node('Slice', x, self.ints(starts), self.ints(ends), self.ints(axes), self.ints(steps))

    def unsqueeze(self, x, axis: int):
        return self.node('Unsqueeze', x, self.ints([axis]))

    def concat(self, values: list, axis: int):
        return self.node('Concat', *values, axis=axis)

    def channel_taps(self, channel_filter):
        return self.node('Reshape', channel_filter, self.ints([0, 0, -1, 1, 1]))  # 0: keep B and C

    def sum(self, x, axis: int):
        return self.node('ReduceSum', x, self.ints([axis]), keepdims=0)

    def mul(self, a, b):
        return self.node('Mul', a, b)

    def add(self, a, b):
        return self.node('Add', a, b)


class _OnnxScriptOps(_GraphOps):
    """Backend: onnxscript ops, for the dynamo exporter's custom translation."""

    def __init__(self, opset):
        super().__init__()
        self.opset = opset

    def node(self, op_type: str, *inputs, **attributes):
        return getattr(self.opset, op_type)(*inputs, **attributes)

    def constant(self, values: list[int]):
        return self.opset.Constant(value_ints=values)


class _TorchScriptOps(_GraphOps):
    """Backend: TorchScript-exporter graph nodes (``g.op``), for the registered symbolic."""

    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def node(self, op_type: str, *inputs, **attributes):
        # g.op names an attribute's type by a suffix: _i for an int, _s for a string.
        suffixed = {f'{k}_{"s" if isinstance(v, str) else "i"}': v for k, v in attributes.items()}
        return self.graph.op(op_type, *inputs, **suffixed)

    def constant(self, values: list[int]):
        return self.graph.op('Constant', value_t=torch.tensor(values, dtype=torch.int64))


def ddf_standard_ops(input: Tensor, channel_filter: Tensor, spatial_filter: Tensor, kernel_size: int = 3,
                     dilation: int = 1, stride: int = 1, kernel_combine: str = 'mul') -> Tensor:
    """The DDF op (same arguments and result as :func:`ddfnet.ddf`) from pad, slice, mul and add only.

    :func:`ddfnet.ddf` calls this while ``torch.onnx.export`` runs, so the exported graph has standard ONNX
    operators only. It holds one output-sized temporary per tap and is slower than the native kernels:
    it is meant for export, not for training. Arguments are checked like the op's.
    """
    if not torch.jit.is_tracing():  # the TorchScript tracer would warn about each shape comparison
        check_ddf_args(input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine)
    return _build_ddf(_TorchOps, input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                      kernel_combine)


def onnx_translation_table() -> dict[Callable, Callable]:
    """``{torch.ops.ddfnet.ddf.default: translation}`` for ``torch.onnx.export(custom_translation_table=...)``.

    Only needed when the graph given to the dynamo exporter already holds the custom op, e.g.
    ``torch.onnx.export(torch.export.export(model, args), custom_translation_table=onnx_translation_table())``;
    :func:`ddfnet.export_onnx` passes it itself. Needs onnxscript (the ``onnx`` extra).
    """
    from onnxscript import opset18

    def ddf_translation(input, channel_filter, spatial_filter, kernel_size: int, dilation: int, stride: int,
                        kernel_combine: str):
        return _build_ddf(_OnnxScriptOps(opset18), input, channel_filter, spatial_filter, kernel_size, dilation,
                          stride, kernel_combine)

    return {torch.ops.ddfnet.ddf.default: ddf_translation}


def register_torchscript_symbolic() -> None:
    """The TorchScript exporter's symbolic for ``ddfnet::ddf``: traced or scripted modules hold the op."""
    from torch.onnx import register_custom_op_symbolic, symbolic_helper

    @symbolic_helper.parse_args('v', 'v', 'v', 'i', 'i', 'i', 's')
    def ddf_symbolic(g, input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine):
        return _build_ddf(_TorchScriptOps(g), input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                          kernel_combine)

    register_custom_op_symbolic('ddfnet::ddf', ddf_symbolic, _TORCHSCRIPT_MIN_OPSET)


_keep_op = False  # see keep_op_for_translation


def keeping_the_op() -> bool:
    """True inside :func:`keep_op_for_translation`: :func:`ddfnet.ddf` then leaves ``ddfnet::ddf`` in the
    graph under ONNX export instead of tracing :func:`ddf_standard_ops`."""
    return _keep_op


@contextlib.contextmanager
def keep_op_for_translation():
    """While active, an ONNX export keeps ``ddfnet::ddf`` as one node for :func:`onnx_translation_table`'s
    translation (what :func:`ddfnet.export_onnx` does: fewer nodes, several times faster to export)."""
    global _keep_op
    previous, _keep_op = _keep_op, True
    try:
        yield
    finally:
        _keep_op = previous
