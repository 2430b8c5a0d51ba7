#!/usr/bin/env python3
"""Export a timm model (DDF and DyConv models included) to ONNX with standard operators only.

    python scripts/onnx_export.py ddf_resnet50.onnx --model ddf_resnet50 --checkpoint ddf_mul_resnet50.pth
    python scripts/onnx_export.py tiny.onnx --model ddf_resnet26 --img-size 64 --dynamic-size --check-forward

The batch size is dynamic; ``--dynamic-size`` makes H and W dynamic too. The model's data config (input
size, mean, std, crop, interpolation) is stored in the file for ``onnx_validate.py``. ``--check-forward``
runs the file in onnxruntime and compares it with PyTorch (relative error <= 1e-4, else exit status 1 and
no file). An ``--opset`` the exporter cannot convert to is an error, and no file either.
Bad input (unknown model, missing checkpoint, unwritable or existing output without ``--force``) is one
line, exit status 2, before anything is written.
"""
from __future__ import annotations

import os
import sys

import timm
import torch
from timm.data import resolve_data_config

import ddfnet
from ddfnet.cli import OneLineArgumentParser, UserError, run_main, yaml_mapping
from ddfnet.export import onnxruntime_relative_error
from ddfnet.export.metadata import data_config_metadata
from ddfnet.utils.io import TMP_SUFFIX, check_output_file
from ddfnet.utils.weights import classifier_size, create_model_with_weights, load_checkpoint, model_state_dict

TOLERANCE = 1e-4  # relative error of onnxruntime vs PyTorch eval output accepted by --check-forward


def export_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog='onnx_export.py', description='Export a model to ONNX (standard operators).')
    add = parser.add_argument
    add('output', metavar='OUTPUT', help='the .onnx file to write')
    add('--model', required=True, help='timm model name, e.g. ddf_resnet50')
    add('--checkpoint', metavar='PATH', help="train.py's checkpoint or a state_dict (default: random weights)")
    add('--use-ema', action='store_true', help="export the checkpoint's EMA weights")
    add('--model-kwargs', type=yaml_mapping, default={}, help="e.g. '{layers: [1, 1, 1, 1]}'")
    add('--num-classes', type=int, help="default: the checkpoint's classifier size, else the model's")
    add('--img-size', type=int, help="default: the model's pretrained cfg")
    add('--batch-size', '-b', type=int, default=1, help='batch of the example input (the batch stays dynamic)')
    add('--dynamic-size', action='store_true', help='dynamic H and W')
    add('--opset', type=int, help="ONNX opset (default: the exporter's)")
    add('--check-forward', action='store_true', help='compare onnxruntime with PyTorch after exporting')
    add('--force', action='store_true', help='replace OUTPUT if it exists')
    return parser


def main(argv: list[str] | None = None) -> None:
    args = export_parser().parse_args(argv)
    if not timm.is_model(args.model):
        raise UserError(f"unknown model '{args.model}' (list them with timm.list_models('ddf*'))")
    if args.batch_size < 1 or (args.img_size is not None and args.img_size < 2):
        raise UserError('--batch-size must be >= 1 and --img-size >= 2')
    if args.num_classes is not None and args.num_classes < 1:
        raise UserError(f'--num-classes must be at least 1, not {args.num_classes}')
    if args.opset is not None:
        import onnx
        if not 1 <= args.opset <= onnx.defs.onnx_opset_version():
            raise UserError(f'--opset {args.opset}: this onnx package knows opsets 1 to {onnx.defs.onnx_opset_version()}')
    output = check_output_file(args.output, args.force)
    state, class_names = None, None
    if args.checkpoint:
        checkpoint = load_checkpoint(args.checkpoint)
        state = model_state_dict(checkpoint, args.checkpoint, use_ema=args.use_ema)
        class_names = checkpoint.get('class_names') if isinstance(checkpoint, dict) else None
        del checkpoint
    num_classes = args.num_classes or (classifier_size(args.model, state) if state is not None else None)
    model = create_model_with_weights(args.model, num_classes, args.model_kwargs, state, args.checkpoint)
    model.eval()

    data_config = resolve_data_config(dict(img_size=args.img_size), model=model)
    channels, height, width = data_config['input_size']
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(args.batch_size, channels, height, width, generator=generator)
    metadata = data_config_metadata(data_config, args.model, args.dynamic_size, class_names)
    # Exported to a temporary file, checked, then renamed over OUTPUT: a file that fails a check is never
    # left behind, and an existing OUTPUT (with --force) is replaced only by a file that passed.
    tmp = f'{output}.{os.getpid()}{TMP_SUFFIX}'
    try:
        ddfnet.export_onnx(model, example, tmp, dynamic_size=args.dynamic_size, opset=args.opset, overwrite=True,
                           metadata=metadata)
        if args.opset is not None and file_opset(tmp) != args.opset:
            # torch's exporter writes its own opset when it cannot convert to the one asked for
            raise UserError(f'--opset {args.opset}: the exporter cannot convert {args.model} to opset {args.opset} '
                            f'(it produced opset {file_opset(tmp)}); nothing written')
        if args.check_forward:
            # The example's batch and, with --dynamic-size, a second batch and size: the dynamic axes work.
            checks = [example]
            if args.dynamic_size:
                checks.append(torch.randn(args.batch_size + 1, channels, height + 8, width + 4, generator=generator))
            else:
                checks.append(torch.randn(args.batch_size + 1, channels, height, width, generator=generator))
            worst = max(max(onnxruntime_relative_error(model, tmp, x)) for x in checks)
            shapes = ', '.join('x'.join(map(str, x.shape)) for x in checks)
            print(f'check forward: onnxruntime vs PyTorch, max relative error {worst:.2e} ({shapes})')
            if not worst <= TOLERANCE:
                print(f'onnx_export.py: check forward failed: relative error {worst:.2e} > {TOLERANCE}; '
                      f'{output} not written', file=sys.stderr)
                sys.exit(1)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f'{args.model}: wrote {output} ({os.path.getsize(output) / 2 ** 20:.1f} MiB, input (B, {channels}, '
          f'{"H, W" if args.dynamic_size else f"{height}, {width}"}), batch dynamic)')


def file_opset(path: str) -> int | None:
    """The standard-domain opset an ONNX file declares."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    return next((entry.version for entry in model.opset_import if entry.domain in ('', 'ai.onnx')), None)


if __name__ == '__main__':
    run_main(main, 'onnx_export.py')
