#!/usr/bin/env python3
"""Train and score guided depth upsampling (DDF-Up network vs bilinear), config-driven like train.py.

    python scripts/train_joint_upsampling.py --config configs/joint_upsampling/demo.yaml
    python scripts/train_joint_upsampling.py --config configs/joint_upsampling/demo.yaml --evaluate-only \\
        --checkpoint output/joint_upsampling_demo/best.pth.tar
    torchrun --nproc-per-node 2 scripts/train_joint_upsampling.py --config configs/joint_upsampling/nyu_depth_v2.yaml

Data: 'rgbd-demo' (the embedded generated set, written on first use) or a folder of RGB-D pairs
(``<split>/rgb/*.png``, ``<split>/depth/*.png`` in millimetres; :class:`ddfnet.data.rgbd.RGBDFolder`). The
low-resolution input is PAC's 'center' sampling of the depth; the loss is L2 on depth divided by
``max_depth``; the score is RMSE in units of 1e-2 of the depth unit (cm for metres, as the DDF and PAC papers
report NYU Depth v2), ``border`` pixels excluded, next to bilinear upsampling's on the same images. Each
epoch ends with a checkpoint (``last``, ``best`` by RMSE) in ``output``; ``--resume`` continues the run
there. ``results.json`` holds the final scores.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ddfnet.cli import OneLineArgumentParser, UserError, parse_args, resolved_config, run_main
from ddfnet.data.rgbd import RGBDFolder, center_sample, ensure_rgbd_demo
from ddfnet.models import BilinearJointUpsampling, DDFUpJointUpsamplingNet
from ddfnet.models.joint_upsampling import SCALE_FACTORS
from ddfnet.training.args import add_run_arguments
from ddfnet.training.checkpoint import save_checkpoint, start_or_resume
from ddfnet.training.distributed import init_distributed
from ddfnet.training.engine import autocast_context
from ddfnet.utils.io import write_results
from ddfnet.utils.weights import load_checkpoint, load_weights, model_state_dict

CONFIG_KEYS = ('data', 'data_dir', 'scale_factor', 'features', 'kernel_size', 'residual', 'epochs', 'batch_size', 'lr', 'crop_size',
               'max_depth', 'border', 'seed', 'workers', 'amp', 'amp_dtype', 'device', 'output')

# What a resumed run may set anew; the rest must be what the run was started with.
RESUME_MAY_CHANGE = ('data_dir', 'epochs', 'workers', 'device', 'output')


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', '-c', help='YAML file of these options (command line wins)')
    parser.add_argument('--data', default='rgbd-demo', help="'rgbd-demo' or a folder with train/ and val/ pairs")
    parser.add_argument('--data-dir', help='cache folder of the generated set (default $DDFNET_CACHE or ~/.cache/ddfnet)')
    parser.add_argument('--scale-factor', type=int, default=4, choices=SCALE_FACTORS)
    parser.add_argument('--features', type=int, default=32, help="the network's width (PAC's: 32)")
    parser.add_argument('--kernel-size', type=int, default=5, help="its convs' and DDF-Up filters' size (PAC's: 5)")
    parser.add_argument('--residual', action=argparse.BooleanOptionalAction, default=False,
                        help='learn a correction to bilinear upsampling (DDFUpJointUpsamplingNet(residual=True))')
    parser.add_argument('--epochs', type=int, default=10)
    parser.add_argument('--batch-size', type=int, default=8, help='per process')
    parser.add_argument('--lr', type=float, default=1e-3, help='Adam, cosine-annealed to 0 over the run')
    parser.add_argument('--crop-size', type=int, default=0, help='random square training crops (0: whole images)')
    parser.add_argument('--max-depth', type=float, default=10.0, help='depth is divided by this for the loss')
    parser.add_argument('--border', type=int, default=6, help='pixels left out of the RMSE at each side')
    add_run_arguments(parser, output='output/joint_upsampling', weights='weights')
    return parser


def check_args(args: argparse.Namespace) -> None:
    for name in ('epochs', 'batch_size', 'max_depth'):
        if not getattr(args, name) > 0:
            raise UserError(f'--{name.replace("_", "-")} must be positive, got {getattr(args, name)}')
    if args.border < 0 or args.crop_size < 0 or args.lr <= 0:
        raise UserError('--border and --crop-size must be >= 0 and --lr positive')
    if args.crop_size and args.crop_size % args.scale_factor:
        raise UserError(f'--crop-size {args.crop_size} must be a multiple of --scale-factor {args.scale_factor}')
    if args.checkpoint and not args.evaluate_only:
        raise UserError('--checkpoint is for --evaluate-only (--resume continues a run in --output)')


def data_root(args: argparse.Namespace) -> str:
    if args.data == 'rgbd-demo':
        return ensure_rgbd_demo(args.data_dir)
    if not os.path.isdir(args.data):
        raise UserError(f"--data {args.data}: no such folder (or pass 'rgbd-demo')")
    return args.data


def random_crop(rgb: torch.Tensor, depth: torch.Tensor, size: int, generator: torch.Generator):
    """The same random ``size`` x ``size`` window of a batch of guides and depths (whole images if smaller)."""
    height, width = depth.shape[-2:]
    if size == 0 or size >= min(height, width):
        return rgb, depth
    top = int(torch.randint(height - size + 1, (1,), generator=generator))
    left = int(torch.randint(width - size + 1, (1,), generator=generator))
    return rgb[..., top:top + size, left:left + size], depth[..., top:top + size, left:left + size]


@torch.no_grad()
def score(model: torch.nn.Module, loader, args: argparse.Namespace, device: torch.device, amp_autocast) -> dict:
    """RMSE (x1e-2) of ``model`` and of bilinear upsampling over ``loader``, border excluded, summed over ranks."""
    model.eval()
    bilinear = BilinearJointUpsampling(args.scale_factor)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # squared errors: model, bilinear; pixel count
    for rgb, depth in loader:
        rgb, depth = rgb.to(device), depth.to(device)
        low = center_sample(depth, args.scale_factor)
        with amp_autocast():
            pred = model(low / args.max_depth, rgb).float() * args.max_depth
        b = args.border
        inner = (slice(None), slice(None), slice(b, depth.shape[2] - b), slice(b, depth.shape[3] - b))
        for i, out in enumerate((pred, bilinear(low, rgb))):
            totals[i] += (out - depth)[inner].double().square().sum()
        totals[2] += depth[inner].numel()
    if dist.is_initialized():
        dist.all_reduce(totals)
    if totals[2] == 0:
        raise UserError(f'--border {args.border} leaves no pixels of the validation images')
    rmse, bilinear_rmse = (100 * math.sqrt(totals[i].item() / totals[2].item()) for i in range(2))
    return {'rmse': round(rmse, 4), 'bilinear_rmse': round(bilinear_rmse, 4)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    check_args(args)
    device = init_distributed(args)
    torch.manual_seed(args.seed)  # one initialisation on every rank (what DDP would broadcast anyway)
    root = data_root(args)
    train_set = RGBDFolder(root, 'train', args.scale_factor)
    val_set = RGBDFolder(root, 'val', args.scale_factor)
    sampler = DistributedSampler(train_set, seed=args.seed) if args.distributed else None
    if args.distributed:  # every rank scores its own share of the images, none twice (no padding sampler)
        val_set = Subset(val_set, range(args.rank, len(val_set), args.world_size))
    train_loader = DataLoader(train_set, args.batch_size, shuffle=sampler is None, sampler=sampler,
                              num_workers=args.workers, drop_last=True)
    val_loader = DataLoader(val_set, args.batch_size, num_workers=args.workers)
    try:
        model = DDFUpJointUpsamplingNet(args.scale_factor, features=args.features, kernel_size=args.kernel_size,
                                        residual=args.residual, ddf_kwargs=dict(kernel_size=args.kernel_size))
    except ValueError as e:
        raise UserError(f'--features / --kernel-size: {e}') from None
    model = model.to(device)
    amp_autocast = autocast_context(args.amp, args.amp_dtype, device)
    say = print if args.rank == 0 else (lambda *a, **k: None)

    if args.evaluate_only:
        if args.checkpoint:
            load_weights(model, model_state_dict(load_checkpoint(args.checkpoint), args.checkpoint), args.checkpoint,
                         type(model).__name__)
        result = {'scale_factor': args.scale_factor, **score(model, val_loader, args, device,
                                                                                     amp_autocast)}
        say(f"x{args.scale_factor}: RMSE (x1e-2) {result['rmse']:.3f}, bilinear {result['bilinear_rmse']:.3f}")
        if dist.is_initialized():  # an exit with the group alive can abort in gloo's threads
            dist.destroy_process_group()
        return 0

    if len(train_loader) == 0:
        raise UserError(f'--batch-size {args.batch_size} is larger than the {len(train_set)} training pairs')
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * len(train_loader))
    start_epoch, best = 0, math.inf
    state = start_or_resume(args.output, args.resume, resolved_config(args, CONFIG_KEYS), RESUME_MAY_CHANGE)
    if state is not None:
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        start_epoch, best = state['epoch'] + 1, state['best_rmse']
    os.makedirs(args.output, exist_ok=True)
    trained = DistributedDataParallel(model) if args.distributed else model
    generator = torch.Generator().manual_seed(args.seed + args.rank)
    result = {}
    for epoch in range(start_epoch, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        trained.train()
        started, loss_sum = time.time(), 0.0
        for rgb, depth in train_loader:
            rgb, depth = random_crop(rgb.to(device), depth.to(device), args.crop_size, generator)
            target = depth / args.max_depth
            with amp_autocast():
                loss = F.mse_loss(trained(center_sample(target, args.scale_factor), rgb).float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item()
        result = score(model, val_loader, args, device, amp_autocast)
        is_best = result['rmse'] < best
        best = min(best, result['rmse'])
        if args.rank == 0:
            save_checkpoint(args.output, {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                                          'scheduler': scheduler.state_dict(), 'epoch': epoch, 'best_rmse': best,
                                          'config': resolved_config(args, CONFIG_KEYS)}, is_best=is_best)
        say(f'epoch {epoch}: loss {loss_sum / len(train_loader):.5f}, RMSE (x1e-2) {result["rmse"]:.3f} '
            f'(bilinear {result["bilinear_rmse"]:.3f}), {time.time() - started:.1f} s')
    if args.rank == 0:
        write_results({'scale_factor': args.scale_factor, 'epochs': args.epochs, 'best_rmse': best, **result},
                      os.path.join(args.output, 'results.json'))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == '__main__':
    run_main(lambda: sys.exit(main()), os.path.basename(__file__))
