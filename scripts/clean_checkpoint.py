#!/usr/bin/env python3
"""Turn a training checkpoint into a release: the model's state_dict only, as a file or a Hub folder.

    python scripts/clean_checkpoint.py --checkpoint output/demo/best.pth.tar --output release/ddf_resnet26_demo
    # -> release/ddf_resnet26_demo-<first 8 hex digits of the file's SHA-256>.pth
    python scripts/clean_checkpoint.py --checkpoint last.pth.tar --output r26 --use-ema --format both
    python scripts/clean_checkpoint.py --checkpoint output/demo/best.pth.tar --hf-dir release/ddf_resnet26_demo

Optimizer, scheduler, gradient scaler, random generator states, position and config are dropped, as are
DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes. When the checkpoint names its model (train.py's
do; ``--model``/``--model-kwargs`` otherwise), the weights are first loaded strictly into that model, so a
file that would not load is never written. The file loads with ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=...))`` and with ``validate.py --checkpoint``.

``--hf-dir DIR`` writes the Hugging Face Hub layout of ``timm.models.save_for_hf`` instead: ``config.json``
(architecture, ``model_args`` such as ``--model-kwargs``, ``num_classes``, ``label_names`` from the run's
class names, the run's image settings) and ``model.safetensors``. It loads with
``timm.create_model('local-dir:DIR', pretrained=True)``, and once uploaded (``huggingface-cli upload
user/name DIR``) with ``timm.create_model('hf-hub:user/name', pretrained=True)``.

Existing files (and a non-empty ``--hf-dir``) are kept unless ``--force``; everything is checked before
anything is written, and written atomically.
"""
from __future__ import annotations

import os
import shutil

from torch import nn

import ddfnet  # noqa: F401  (registers the DDF models with timm)
from ddfnet.cli import OneLineArgumentParser, UserError, run_main, yaml_mapping
from ddfnet.training.release import release_bytes, release_name
from ddfnet.utils.io import TMP_SUFFIX, atomic_write, check_output_file
from ddfnet.utils.weights import classifier_size, create_model_with_weights, load_checkpoint, model_state_dict

# The run config's image settings that a Hub config.json carries (timm reads them as the model's data config).
DATA_CONFIG_KEYS = ('img_size', 'crop_pct', 'interpolation', 'mean', 'std')


def clean_parser() -> OneLineArgumentParser:
    """The ``clean_checkpoint.py`` argument parser (timm's names: ``--checkpoint``, ``--output``,
    ``--use-ema``, ``--no-hash``, ``--safetensors``)."""
    parser = OneLineArgumentParser(prog='clean_checkpoint.py', description='Strip a checkpoint to its weights.')
    add = parser.add_argument
    add('--checkpoint', required=True, metavar='FILE', help="train.py's checkpoint (or any weights file)")
    add('--output', metavar='BASE', help='output name without the hash (an extension is dropped)')
    add('--hf-dir', metavar='DIR', help="write the Hugging Face Hub layout (config.json, model.safetensors) to DIR")
    add('--use-ema', action='store_true', help='release the EMA weights')
    add('--format', choices=['pth', 'safetensors', 'both'], default='pth')
    add('--safetensors', dest='format', action='store_const', const='safetensors', help='= --format safetensors')
    add('--no-hash', action='store_true', help='no SHA-256 prefix in the file name')
    add('--model', help="check the weights against this timm model (default: the checkpoint's model)")
    add('--model-kwargs', type=yaml_mapping, help="with --model (default: the checkpoint's model_kwargs)")
    add('--force', action='store_true', help='replace existing output files')
    return parser


def run_config(checkpoint) -> dict:
    """The training config stored in a train.py checkpoint ({} for other files)."""
    config = checkpoint.get('config') if isinstance(checkpoint, dict) else None
    return config if isinstance(config, dict) else {}


def check_loads(state: dict, checkpoint, args) -> tuple[str, dict, nn.Module] | None:
    """Load ``state`` strictly into the checkpoint's (or ``--model``'s) model; return the model name, its
    kwargs and the model, or None when no model is known."""
    config = run_config(checkpoint)
    name = args.model or (checkpoint.get('model_name') if isinstance(checkpoint, dict) else None) or config.get('model')
    if not name:
        return None
    kwargs = args.model_kwargs if args.model_kwargs is not None else config.get('model_kwargs') or {}
    model = create_model_with_weights(name, classifier_size(name, state) or 1000, kwargs, state, args.checkpoint)
    return name, kwargs, model


def check_hf_dir(path: str, force: bool) -> None:
    """``--hf-dir`` can be written: a new or empty folder (a non-empty one only with ``force``) whose
    parent exists and is writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f'--hf-dir {path} is a file, not a folder')
    if os.path.isdir(path) and os.listdir(path) and not force:
        raise UserError(f'{path} is not empty: pass --force to replace it')
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f'cannot write --hf-dir {path}: {parent} is not a writable folder')


def write_hf_dir(path: str, model: nn.Module, kwargs: dict, checkpoint, force: bool) -> list[str]:
    """``timm.models.save_for_hf`` into a temporary sibling folder, then moved into place (an existing
    folder, with ``force``, is replaced only once the new one is complete); returns the names of the
    class labels written (or [])."""
    from timm.models import save_for_hf

    names = checkpoint.get('class_names') if isinstance(checkpoint, dict) else None
    names = list(names) if names and len(names) == model.num_classes else []
    config = run_config(checkpoint)
    data_config = {key: config[key] for key in DATA_CONFIG_KEYS if config.get(key) not in (None, '', [])}
    path = os.path.abspath(path)
    tmp, old = f'{path}.{os.getpid()}{TMP_SUFFIX}', f'{path}.{os.getpid()}.old{TMP_SUFFIX}'
    try:
        save_for_hf(model, tmp, model_config={'label_names': names} if names else None,
                    model_args=dict(kwargs, num_classes=model.num_classes), safe_serialization=True,
                    data_config=data_config or None)
        if os.path.exists(path):  # --force (checked): swap the folders, then delete the old one
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            if os.path.exists(leftover):
                shutil.rmtree(leftover)
    return names


def main(argv: list[str] | None = None) -> None:
    """Write the release file(s) as the command line asks (see the module docstring)."""
    args = clean_parser().parse_args(argv)
    if not args.output and not args.hf_dir:
        raise UserError('give --output BASE (a release file) and/or --hf-dir DIR (a Hub folder)')
    base = args.output or ''
    for extension in ('.pth.tar', '.pth', '.safetensors'):
        if base.endswith(extension):
            base = base[:-len(extension)]
    if base:
        check_output_file(base, force=True)  # its folder; the names (with the hash) are checked below
    if args.hf_dir:
        check_hf_dir(args.hf_dir, args.force)
    checkpoint = load_checkpoint(args.checkpoint)
    state = model_state_dict(checkpoint, args.checkpoint, use_ema=args.use_ema)
    loaded = check_loads(state, checkpoint, args)
    if args.hf_dir and loaded is None:
        raise UserError(f'--hf-dir needs the model: {args.checkpoint} does not name it, give --model')
    paths, blobs = {}, {}
    if base:
        formats = ('pth', 'safetensors') if args.format == 'both' else (args.format,)
        blobs = {fmt: release_bytes(state, fmt) for fmt in formats}
        paths = {fmt: release_name(data, base, fmt, add_hash=not args.no_hash) for fmt, data in blobs.items()}
        for path in paths.values():  # every name is checked before any is written, so a refusal writes nothing
            check_output_file(path, args.force)
    loads = f', loads strictly into {loaded[0]}' if loaded else ', not checked against a model (give --model)'
    for fmt, data in blobs.items():
        atomic_write(paths[fmt], lambda f: f.write(data), binary=True)
        print(f'{paths[fmt]}: {len(state)} tensors{" (EMA)" if args.use_ema else ""}, {len(data) / 2**20:.1f} MiB'
              + loads)
    if args.hf_dir:
        name, kwargs, model = loaded
        names = write_hf_dir(args.hf_dir, model, kwargs, checkpoint, args.force)
        print(f'{args.hf_dir}: config.json and model.safetensors for {name} ({model.num_classes} classes'
              + (', with their names' if names else ', no class names in the checkpoint')
              + f"{', EMA' if args.use_ema else ''}): load it with timm.create_model('local-dir:{args.hf_dir}', "
              'pretrained=True)')


if __name__ == '__main__':
    run_main(main, 'clean_checkpoint.py')
