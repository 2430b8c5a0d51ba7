#!/usr/bin/env python3
"""Export a timm model (DDF and DyConv models included) to ONNX with standard operators only.

    python scripts/onnx_export.py ddf_resnet50.onnx --model ddf_resnet50 --checkpoint ddf_mul_resnet50.pth
    python scripts/onnx_export.py tiny.onnx --model ddf_resnet26 --img-size 64 --dynamic-size --check-forward

The batch size is dynamic; ``--dynamic-size`` makes H and W dynamic too. The model's data config (input
size, mean, std, crop, interpolation) is stored in the file for ``onnx_validate.py``. ``--check-forward``
runs the file in onnxruntime and compares it with PyTorch (relative error <= 1e-4, else exit status 1).
Bad input (unknown model, missing checkpoint, unwritable or existing output without ``--force``) is one
line, exit status 2, before anything is written.
"""
from __future__ import annotations

import json
import os
import sys

import timm
import torch
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg

import ddfnet
from ddfnet.export import check_output_path, onnxruntime_relative_error
from ddfnet.training.checkpoint import load_checkpoint, load_weights, model_state_dict
from ddfnet.training.config import OneLineArgumentParser, UserError, run_main, yaml_mapping

TOLERANCE = 1e-4  # relative error of onnxruntime vs PyTorch eval output accepted by --check-forward
METADATA_KEY = 'ddfnet.data_config'  # onnx_validate.py reads its defaults from here


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
    try:
        output = check_output_path(args.output, overwrite=args.force)
    except FileExistsError:
        raise UserError(f'{args.output} exists (pass --force to replace it)') from None
    except OSError as e:
        raise UserError(f'cannot write {args.output}: {str(e).removeprefix("export_onnx: ")}') from None
    state, class_names = None, None
    if args.checkpoint:
        checkpoint = load_checkpoint(args.checkpoint)
        state = model_state_dict(checkpoint, args.checkpoint, use_ema=args.use_ema)
        class_names = checkpoint.get('class_names') if isinstance(checkpoint, dict) else None
        del checkpoint
    num_classes = args.num_classes
    if num_classes is None and state is not None:
        head = getattr(get_pretrained_cfg(args.model), 'classifier', None)
        num_classes = state[f'{head}.weight'].shape[0] if f'{head}.weight' in state else None
    kwargs = dict(args.model_kwargs, **({'num_classes': num_classes} if num_classes else {}))
    try:
        model = timm.create_model(args.model, **kwargs)
    except TypeError as e:
        raise UserError(f'cannot build {args.model} with {kwargs}: {e}') from None
    if state is not None:
        load_weights(model, state, args.checkpoint, args.model)
    model.eval()

    data_config = resolve_data_config(dict(img_size=args.img_size), model=model)
    channels, height, width = data_config['input_size']
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(args.batch_size, channels, height, width, generator=generator)
    metadata = {METADATA_KEY: json.dumps(dict(data_config, model=args.model, dynamic_size=args.dynamic_size))}
    if class_names:  # onnx_validate.py matches a split's labels to these by name
        metadata['ddfnet.class_names'] = json.dumps(class_names)
    ddfnet.export_onnx(model, example, output, dynamic_size=args.dynamic_size, opset=args.opset, overwrite=args.force,
                       metadata=metadata)
    print(f'{args.model}: wrote {output} ({os.path.getsize(output) / 2 ** 20:.1f} MiB, input (B, {channels}, '
          f'{"H, W" if args.dynamic_size else f"{height}, {width}"}), batch dynamic)')
    if args.check_forward:
        # The example's batch and, with --dynamic-size, a second batch and size: the dynamic axes work.
        checks = [example]
        if args.dynamic_size:
            checks.append(torch.randn(args.batch_size + 1, channels, height + 8, width + 4, generator=generator))
        else:
            checks.append(torch.randn(args.batch_size + 1, channels, height, width, generator=generator))
        worst = max(max(onnxruntime_relative_error(model, output, x)) for x in checks)
        shapes = ', '.join('x'.join(map(str, x.shape)) for x in checks)
        print(f'check forward: onnxruntime vs PyTorch, max relative error {worst:.2e} ({shapes})')
        if not worst <= TOLERANCE:
            print(f'onnx_export.py: check forward failed: relative error {worst:.2e} > {TOLERANCE}', file=sys.stderr)
            sys.exit(1)


if __name__ == '__main__':
    run_main(main, 'onnx_export.py')
