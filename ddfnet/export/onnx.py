"""ONNX export of models with DDF / DynamicConv2d layers, using standard ONNX operators only.

The DDF op (SPEC §1) is written as the k*k taps' strided slices of the zero-padded input, multiplied by
the combined filter and summed over the taps: ONNX ``Pad``, ``Unsqueeze``, ``Slice``, ``Concat``,
``Reshape``, ``Mul``/``Add`` and ``ReduceSum``, which every ONNX runtime has (no custom domain, nothing to
build; the k*k-fold tensor it holds is an inference-time cost only). One builder, :func:`_build_ddf`, emits that graph
through one of three small backends, so the three export routes cannot drift apart:

* eager torch ops (:func:`ddf_standard_ops`): while a plain ``torch.onnx.export(model, ...)`` traces a
  model, :func:`ddfnet.ddf` runs this instead of the custom op, so that call works with either exporter
  and needs nothing from the user;
* onnxscript (:func:`onnx_translation_table`): the dynamo exporter's ``custom_translation_table``, which
  :func:`export_onnx` passes (and keeps the op in the graph for), and which graphs that already hold
  ``ddfnet::ddf`` (an ``ExportedProgram`` from ``torch.export.export``) need;
* the TorchScript exporter's symbolic, registered for ``ddfnet::ddf`` when this module is imported (by
  ``import ddfnet``), for traced or scripted modules that hold the op.

Slices end at a negative offset from the padded extent rather than at ``H + i*d``, so no ``Shape`` op is
needed and the graph works for any H and W (dynamic sizes). ``DynamicConv2d`` aggregates its outputs
under export (see its ``resolved_aggregation``): a grouped conv with ``groups = batch`` would fix the
batch size in the graph.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..ops import check_ddf_args
from ..utils.io import atomic_write

__all__ = ['export_onnx', 'check_output_path', 'ddf_standard_ops', 'onnx_translation_table', 'OnnxRuntimeModel',
           'onnxruntime_relative_error', 'STANDARD_DOMAINS']

STANDARD_DOMAINS = ('', 'ai.onnx')  # the default ONNX operator set, under either of its names
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
    :func:`export_onnx` passes it itself. Needs onnxscript (the ``onnx`` extra).
    """
    from onnxscript import opset18

    def ddf_translation(input, channel_filter, spatial_filter, kernel_size: int, dilation: int, stride: int,
                        kernel_combine: str):
        return _build_ddf(_OnnxScriptOps(opset18), input, channel_filter, spatial_filter, kernel_size, dilation,
                          stride, kernel_combine)

    return {torch.ops.ddfnet.ddf.default: ddf_translation}


def _register_torchscript_symbolic() -> None:
    from torch.onnx import register_custom_op_symbolic, symbolic_helper

    @symbolic_helper.parse_args('v', 'v', 'v', 'i', 'i', 'i', 's')
    def ddf_symbolic(g, input, channel_filter, spatial_filter, kernel_size, dilation, stride, kernel_combine):
        return _build_ddf(_TorchScriptOps(g), input, channel_filter, spatial_filter, kernel_size, dilation, stride,
                          kernel_combine)

    register_custom_op_symbolic('ddfnet::ddf', ddf_symbolic, _TORCHSCRIPT_MIN_OPSET)


_register_torchscript_symbolic()


_translating = False  # True while export_onnx runs: ddfnet.ddf then keeps the custom op for the translation


def translating_the_op() -> bool:
    """True while :func:`export_onnx` exports: :func:`ddfnet.ddf` then leaves ``ddfnet::ddf`` in the graph for
    the onnxscript translation instead of tracing :func:`ddf_standard_ops`."""
    return _translating


@contextlib.contextmanager
def _translate_the_op():
    global _translating
    previous, _translating = _translating, True
    try:
        yield
    finally:
        _translating = previous


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> str:
    """``path`` as a str if a file can be written there: its folder exists and is writable, and it is not a
    folder, nor an existing file unless ``overwrite``; otherwise IsADirectoryError, FileExistsError,
    FileNotFoundError or PermissionError (all OSError) with a one-line message."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f'export_onnx: {path} is a folder, not a file name')
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f'export_onnx: {path} exists (pass overwrite=True to replace it)')
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'export_onnx: the folder {folder} does not exist')
    if not os.access(folder, os.W_OK):
        raise PermissionError(f'export_onnx: cannot write to the folder {folder}')
    return path


def export_onnx(model: nn.Module, example_input: Tensor, path: str | os.PathLike, dynamic_size: bool = False,
                opset: int | None = None, *, overwrite: bool = False, metadata: dict[str, str] | None = None) -> None:
    """Export ``model`` (in eval mode) to an ONNX file that uses standard ONNX operators only.

    Works for any module taking one (B, C, H, W) tensor, DDF and DynamicConv2d layers included (torch's
    dynamo exporter; the DDF op through ddfnet's onnxscript translation). The batch size is always dynamic; with ``dynamic_size``
    H and W are too (the file then runs at any input size the model accepts); ``opset`` defaults to the
    exporter's. The file is written atomically (a temporary file renamed into place, weights embedded, so
    models must stay below protobuf's 2 GB) and an existing file is replaced only with ``overwrite=True``.
    ``metadata`` goes into the file's ``metadata_props``. The model's training mode is restored afterwards. Raises TypeError/ValueError for a bad model or input,
    FileExistsError/FileNotFoundError/PermissionError for the path (all before exporting anything), and
    RuntimeError if the graph still held a non-standard operator.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'export_onnx: model must be a torch.nn.Module, got {type(model).__name__}')
    if not isinstance(example_input, Tensor) or example_input.dim() != 4 or example_input.shape[0] < 1:
        raise ValueError('export_onnx: example_input must be a (B, C, H, W) tensor with B >= 1, got '
                         f'{tuple(example_input.shape) if isinstance(example_input, Tensor) else type(example_input).__name__}')
    if dynamic_size and min(example_input.shape[2:]) < 2:
        raise ValueError('export_onnx: dynamic_size needs an example input of at least 2x2 (a size of 1 would '
                         'be fixed in the graph)')
    path = check_output_path(path, overwrite)
    # torch.export fixes a dimension whose example value is 1 (size-1 broadcasting), so a batch of one
    # is traced as two copies of it; the values do not matter, only the shapes.
    traced_input = example_input.expand(2, -1, -1, -1) if example_input.shape[0] == 1 else example_input
    dims: dict[int, Any] = {0: torch.export.Dim('batch')}
    if dynamic_size:
        dims.update({2: torch.export.Dim('height'), 3: torch.export.Dim('width')})
    was_training = model.training
    model.eval()
    try:
        # The traced formulation would work too, but torch.export writes each of its slices with symbolic
        # bounds (about ten ONNX nodes apiece before optimisation): translating the op is several times faster.
        with torch.no_grad(), _translate_the_op():
            program = torch.onnx.export(model, (traced_input.contiguous(),), None, dynamo=True, opset_version=opset,
                                        verbose=False,
                                        input_names=['input'], dynamic_shapes=(dims,),
                                        custom_translation_table=onnx_translation_table())
    finally:
        model.train(was_training)
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        proto.metadata_props.add(key=key, value=value)
    foreign = sorted({n.domain for n in proto.graph.node if n.domain not in STANDARD_DOMAINS}
                     | {f.domain for f in proto.functions if f.domain not in STANDARD_DOMAINS})
    if foreign:
        raise RuntimeError(f'export_onnx: the exported graph uses non-standard operator domains {foreign}')
    atomic_write(path, lambda f: f.write(proto.SerializeToString()), binary=True)


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by onnxruntime on the CPU behind the ``nn.Module`` interface.

    ``forward(x)`` feeds ``x`` to the graph's one input and returns its output as a float tensor (a tuple
    when the graph has several), so :func:`ddfnet.training.engine.evaluate` and other PyTorch code can
    score it unchanged. ``threads`` sets onnxruntime's intra-op threads (default: its own choice);
    ``metadata`` holds the file's ``metadata_props``. Needs onnxruntime (the ``onnx`` extra).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(os.fspath(path), options, providers=['CPUExecutionProvider'])
        self.input_name = self.session.get_inputs()[0].name
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        outputs = self.session.run(None, {self.input_name: x.detach().cpu().float().contiguous().numpy()})
        tensors = tuple(torch.from_numpy(o) for o in outputs)
        return tensors[0] if len(tensors) == 1 else tensors


def onnxruntime_relative_error(model: nn.Module, path: str | os.PathLike, inputs: Tensor,
                               threads: int | None = None) -> list[float]:
    """Run the ONNX file at ``path`` in onnxruntime (CPU) and ``model`` in eval mode on ``inputs``; return,
    per output, ``max |onnx - torch| / max |torch|`` (the relative error the export tests bound by 1e-4).

    A shape or output-count mismatch raises RuntimeError. Needs onnxruntime.
    """
    got = OnnxRuntimeModel(path, threads)(inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(inputs)
    finally:
        model.train(was_training)
    got = [got] if isinstance(got, Tensor) else list(got)
    expected = [expected] if isinstance(expected, Tensor) else list(expected)
    if len(got) != len(expected):
        raise RuntimeError(f'onnxruntime gave {len(got)} outputs, the model {len(expected)}')
    errors = []
    for onnx_out, torch_out in zip(got, expected):
        torch_out = torch_out.detach().cpu().float()
        if onnx_out.shape != torch_out.shape:
            raise RuntimeError(f'onnxruntime output shape {tuple(onnx_out.shape)} != model output shape '
                               f'{tuple(torch_out.shape)}')
        scale = torch_out.abs().max().item() if torch_out.numel() else 1.0
        errors.append((onnx_out - torch_out).abs().max().item() / (scale or 1.0) if torch_out.numel() else 0.0)
    return errors
