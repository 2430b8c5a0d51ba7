"""ONNX export of models with DDF / DynamicConv2d layers, using standard ONNX operators only.

:func:`export_onnx` runs torch's dynamo exporter with the DDF op kept as one node and translated by
:func:`ddfnet.ops.decomposition.onnx_translation_table` (Pad, Slice, Concat, Mul/Add and ReduceSum, which
every ONNX runtime has), checks that the graph has no other operator domain and writes the file
atomically. A plain ``torch.onnx.export`` of a ddfnet model works too (either exporter): :func:`ddfnet.ddf`
then traces the same decomposition (:func:`ddf_standard_ops`). ``DynamicConv2d`` aggregates its outputs
under export (see its ``resolved_aggregation``): a grouped conv with ``groups = batch`` would fix the
batch size in the graph. :class:`OnnxRuntimeModel` and :func:`onnxruntime_relative_error` run the files.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from ..ops.decomposition import ddf_standard_ops, keep_op_for_translation, onnx_translation_table
from ..utils.io import atomic_write

__all__ = ['export_onnx', 'check_output_path', 'ddf_standard_ops', 'onnx_translation_table', 'OnnxRuntimeModel',
           'onnxruntime_relative_error', 'STANDARD_DOMAINS']

STANDARD_DOMAINS = ('', 'ai.onnx')  # the default ONNX operator set, under either of its names


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
        with torch.no_grad(), keep_op_for_translation():
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
