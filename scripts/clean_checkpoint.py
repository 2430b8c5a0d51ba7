#!/usr/bin/env python3
"""Turn a training checkpoint into a release file: the model's state_dict only.

    python scripts/clean_checkpoint.py --checkpoint output/demo/best.pth.tar --output release/ddf_resnet26_demo
    # -> release/ddf_resnet26_demo-<first 8 hex digits of the file's SHA-256>.pth
    python scripts/clean_checkpoint.py --checkpoint last.pth.tar --output r26 --use-ema --format both

Optimizer, scheduler, gradient scaler, random generator states, position and config are dropped, as are
DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes. When the checkpoint names its model (train.py's
do; ``--model``/``--model-kwargs`` otherwise), the weights are first loaded strictly into that model, so a
file that would not load is never written. The file loads with ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=...))`` and with ``validate.py --checkpoint``. Existing files are kept
unless ``--force``.
"""
from __future__ import annotations

import os

import ddfnet  # noqa: F401  (registers the DDF models with timm)
from ddfnet.cli import OneLineArgumentParser, UserError, run_main, yaml_mapping
from ddfnet.training.checkpoint import release_bytes, release_name
from ddfnet.training.loading import classifier_size, create_model_with_weights
from ddfnet.utils.io import atomic_write
from ddfnet.utils.weights import load_checkpoint, model_state_dict


def clean_parser() -> OneLineArgumentParser:
    """The ``clean_checkpoint.py`` argument parser (timm's names: ``--checkpoint``, ``--output``,
    ``--use-ema``, ``--no-hash``, ``--safetensors``)."""
    parser = OneLineArgumentParser(prog='clean_checkpoint.py', description='Strip a checkpoint to its weights.')
    add = parser.add_argument
    add('--checkpoint', required=True, metavar='FILE', help="train.py's checkpoint (or any weights file)")
    add('--output', required=True, metavar='BASE', help='output name without the hash (an extension is dropped)')
    add('--use-ema', action='store_true', help='release the EMA weights')
    add('--format', choices=['pth', 'safetensors', 'both'], default='pth')
    add('--safetensors', dest='format', action='store_const', const='safetensors', help='= --format safetensors')
    add('--no-hash', action='store_true', help='no SHA-256 prefix in the file name')
    add('--model', help="check the weights against this timm model (default: the checkpoint's model)")
    add('--model-kwargs', type=yaml_mapping, help="with --model (default: the checkpoint's model_kwargs)")
    add('--force', action='store_true', help='replace existing output files')
    return parser


def check_loads(state: dict, checkpoint, args) -> str | None:
    """Load ``state`` strictly into the checkpoint's (or ``--model``'s) model; return the model name, or
    None when no model is known."""
    config = checkpoint.get('config') if isinstance(checkpoint, dict) else None
    config = config if isinstance(config, dict) else {}
    name = args.model or (checkpoint.get('model_name') if isinstance(checkpoint, dict) else None) or config.get('model')
    if not name:
        return None
    kwargs = args.model_kwargs if args.model_kwargs is not None else config.get('model_kwargs') or {}
    create_model_with_weights(name, classifier_size(name, state) or 1000, kwargs, state, args.checkpoint)
    return name


def main(argv: list[str] | None = None) -> None:
    """Write the release file(s) as the command line asks (see the module docstring)."""
    args = clean_parser().parse_args(argv)
    base = args.output
    for extension in ('.pth.tar', '.pth', '.safetensors'):
        if base.endswith(extension):
            base = base[:-len(extension)]
    if os.path.dirname(base) and not os.path.isdir(os.path.dirname(base)):
        raise UserError(f'no folder {os.path.dirname(base)} for --output')
    checkpoint = load_checkpoint(args.checkpoint)
    state = model_state_dict(checkpoint, args.checkpoint, use_ema=args.use_ema)
    name = check_loads(state, checkpoint, args)
    formats = ('pth', 'safetensors') if args.format == 'both' else (args.format,)
    blobs = {fmt: release_bytes(state, fmt) for fmt in formats}
    paths = {fmt: release_name(data, base, fmt, add_hash=not args.no_hash) for fmt, data in blobs.items()}
    for path in paths.values():  # every name is checked before any is written, so a refusal writes nothing
        if os.path.exists(path) and not args.force:
            raise UserError(f'{path} exists: pass --force to replace it')
    for fmt, data in blobs.items():
        atomic_write(paths[fmt], lambda f: f.write(data), binary=True)
        print(f'{paths[fmt]}: {len(state)} tensors{" (EMA)" if args.use_ema else ""}, {len(data) / 2**20:.1f} MiB'
              + (f', loads strictly into {name}' if name else ', not checked against a model (give --model)'))

if __name__ == '__main__':
    run_main(main, 'clean_checkpoint.py')
