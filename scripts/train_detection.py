#!/usr/bin/env python3
"""Train and score a Faster R-CNN with a DDF-Up (or nearest-upsampling) FPN, config-driven like train.py.

    python scripts/train_detection.py --config configs/detection/demo.yaml
    python scripts/train_detection.py --config configs/detection/demo.yaml --evaluate-only \\
        --checkpoint output/detection_demo/best.pth.tar
    torchrun --nproc-per-node 8 scripts/train_detection.py --config configs/detection/coco_faster_rcnn_r50_ddfup_fpn_1x.yaml

Data: 'detection-demo' (the embedded generated set, written on first use) or a COCO-format folder with train
and val splits (``<split>/annotations.json`` + ``<split>/images/``, or COCO 2017's ``annotations/`` +
``train2017/`` + ``val2017/``; :class:`ddfnet.data.detection.CocoDetectionFolder`, which checks the
annotations before anything runs). Training is torchvision's detection recipe: SGD with momentum, a linear
warm-up, the learning rate divided by 10 after each of ``lr_steps`` epochs, random horizontal flips; the
score is COCO box AP (pycocotools' COCOeval) on the val split. A new run first scores the untrained model,
the baseline its results are shown next to. Each epoch ends with a checkpoint (``last``, ``best`` by AP) in
``output``; ``--resume`` continues the run there. ``results.json`` holds the final scores.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ddfnet.cli import OneLineArgumentParser, UserError, parse_args, rejected_as, resolved_config, run_main
from ddfnet.data.detection import CocoDetectionFolder, coco_scores, collate_detection, ensure_detection_demo
from ddfnet.models import fasterrcnn_ddf_resnet50_ddfup_fpn, fasterrcnn_resnet50_ddfup_fpn
from ddfnet.training.args import add_run_arguments
from ddfnet.training.checkpoint import save_checkpoint, start_or_resume
from ddfnet.training.distributed import init_distributed
from ddfnet.training.engine import autocast_context
from ddfnet.utils.io import write_results
from ddfnet.utils.weights import load_checkpoint, load_weights, model_state_dict

MODELS = {'fasterrcnn_resnet50_ddfup_fpn': fasterrcnn_resnet50_ddfup_fpn,
          'fasterrcnn_ddf_resnet50_ddfup_fpn': fasterrcnn_ddf_resnet50_ddfup_fpn}
CONFIG_KEYS = ('data', 'data_dir', 'model', 'upsample', 'backbone_checkpoint', 'backbone_layers',
               'trainable_backbone_layers', 'fpn_channels', 'min_size', 'max_size', 'proposals', 'test_proposals',
               'rpn_batch_size', 'box_batch_size', 'epochs', 'batch_size', 'lr', 'momentum', 'weight_decay',
               'lr_steps', 'warmup_iters', 'hflip', 'seed', 'workers', 'amp', 'amp_dtype', 'device', 'output')

# What a resumed run may set anew; the rest must be what the run was started with.
RESUME_MAY_CHANGE = ('data_dir', 'epochs', 'workers', 'device', 'output')


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', '-c', help='YAML file of these options (command line wins)')
    parser.add_argument('--data', default='detection-demo', help="'detection-demo' or a COCO-format folder")
    parser.add_argument('--data-dir', help='cache folder of the generated set (default $DDFNET_CACHE or ~/.cache/ddfnet)')
    parser.add_argument('--model', default='fasterrcnn_resnet50_ddfup_fpn', choices=sorted(MODELS))
    parser.add_argument('--upsample', default='ddf', choices=('ddf', 'nearest'), help="the FPN's top-down upsampling")
    parser.add_argument('--backbone-checkpoint', help="an ImageNet classifier checkpoint for the backbone (ours or "
                        "the original release's); without it the backbone starts from random weights")
    parser.add_argument('--backbone-layers', type=int, nargs=4, metavar='N',
                        help="blocks per ResNet stage (default ResNet-50's 3 4 6 3)")
    parser.add_argument('--trainable-backbone-layers', type=int,
                        help='backbone stages trained, 0-5 (default: 3 with a checkpoint, else 5)')
    parser.add_argument('--fpn-channels', type=int, default=256)
    parser.add_argument('--min-size', type=int, default=800, help="images are resized so their short side is this")
    parser.add_argument('--max-size', type=int, default=1333, help='... and their long side at most this')
    parser.add_argument('--proposals', type=int, default=2000, help='RPN proposals per image in training')
    parser.add_argument('--test-proposals', type=int, default=1000, help='RPN proposals per image in scoring')
    parser.add_argument('--rpn-batch-size', type=int, default=256, help='anchors sampled per image for the RPN loss')
    parser.add_argument('--box-batch-size', type=int, default=512, help='proposals sampled per image for the box head')
    parser.add_argument('--epochs', type=int, default=12)
    parser.add_argument('--batch-size', type=int, default=2, help='images per process')
    parser.add_argument('--lr', type=float, default=0.02, help='SGD learning rate (torchvision: 0.02 for 16 images)')
    parser.add_argument('--momentum', type=float, default=0.9)
    parser.add_argument('--weight-decay', type=float, default=1e-4)
    parser.add_argument('--lr-steps', type=int, nargs='*', default=[8, 11], help='epochs after which lr is divided by 10')
    parser.add_argument('--warmup-iters', type=int, default=500, help='linear warm-up from lr / 1000, in steps')
    parser.add_argument('--hflip', action=argparse.BooleanOptionalAction, default=True,
                        help='random horizontal flips of the training images')
    add_run_arguments(parser, output='output/detection', weights='detector weights')
    return parser


def check_args(args: argparse.Namespace) -> None:
    for name in ('epochs', 'batch_size', 'lr', 'min_size', 'max_size', 'proposals', 'test_proposals',
                 'rpn_batch_size', 'box_batch_size', 'fpn_channels'):
        if not getattr(args, name) > 0:
            raise UserError(f'--{name.replace("_", "-")} must be positive, got {getattr(args, name)}')
    if args.warmup_iters < 0 or args.weight_decay < 0 or args.workers < 0:
        raise UserError('--warmup-iters, --weight-decay and --workers must be >= 0')
    if args.lr_steps != sorted(args.lr_steps) or any(not 0 < s < args.epochs for s in args.lr_steps):
        raise UserError(f'--lr-steps must be increasing epochs between 1 and --epochs - 1 ({args.epochs - 1}), '
                        f'got {args.lr_steps}')
    if args.checkpoint and not args.evaluate_only:
        raise UserError('--checkpoint is for --evaluate-only (--resume continues a run in --output)')
    if importlib.util.find_spec('pycocotools') is None:
        raise UserError('scoring needs pycocotools: pip install "ddfnet[detection]"')
    if args.backbone_checkpoint and not os.path.isfile(args.backbone_checkpoint):
        raise UserError(f'--backbone-checkpoint {args.backbone_checkpoint}: no such file')


def datasets(args: argparse.Namespace) -> tuple[CocoDetectionFolder, CocoDetectionFolder]:
    if args.data == 'detection-demo':
        root = ensure_detection_demo(args.data_dir)
    elif not os.path.isdir(args.data):
        raise UserError(f"--data {args.data}: no such folder (or pass 'detection-demo')")
    else:
        root = args.data
    try:
        train_set, val_set = CocoDetectionFolder(root, 'train', hflip=args.hflip), CocoDetectionFolder(root, 'val')
    except ValueError as e:
        raise UserError(str(e)) from None
    if not set(val_set.categories) <= set(train_set.categories):
        raise UserError(f'--data {args.data}: the val split has categories the train split lacks: '
                        f'{sorted(set(val_set.categories) - set(train_set.categories))}')
    return train_set, val_set


def build_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    with rejected_as('--model / --backbone-*'):
        return MODELS[args.model](
            upsample=args.upsample, num_classes=num_classes, backbone_checkpoint=args.backbone_checkpoint,
            trainable_backbone_layers=args.trainable_backbone_layers, fpn_channels=args.fpn_channels,
            backbone_kwargs={'layers': tuple(args.backbone_layers)} if args.backbone_layers else None,
            min_size=args.min_size, max_size=args.max_size, rpn_pre_nms_top_n_train=args.proposals,
            rpn_post_nms_top_n_train=args.proposals, rpn_pre_nms_top_n_test=args.test_proposals,
            rpn_post_nms_top_n_test=args.test_proposals, rpn_batch_size_per_image=args.rpn_batch_size,
            box_batch_size_per_image=args.box_batch_size)


@torch.no_grad()
def score(model: torch.nn.Module, loader, annotation_file: str, device: torch.device, amp_autocast) -> dict:
    """COCO box AP (percent) of ``model`` on the images of ``loader``, gathered over the ranks."""
    model.eval()
    detections = []
    for images, targets in loader:
        with amp_autocast():
            outputs = model([image.to(device) for image in images])
        for target, out in zip(targets, outputs):
            boxes = out['boxes'].float().cpu()
            boxes[:, 2:] -= boxes[:, :2]  # COCO's [x, y, width, height]
            detections += [{'image_id': int(target['image_id']), 'category_id': label, 'bbox': box, 'score': s}
                           for box, label, s in zip(boxes.tolist(), out['labels'].tolist(),
                                                    out['scores'].float().tolist())]
    if not dist.is_initialized():
        return coco_scores(annotation_file, detections)
    # Rank 0 scores every rank's detections and tells the others the result.
    gathered: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(detections, gathered)
    result = [coco_scores(annotation_file, [d for part in gathered for d in part]) if gathered else None]
    dist.broadcast_object_list(result)
    return result[0]


def lr_factor(step: int, steps_per_epoch: int, args: argparse.Namespace) -> float:
    """The learning rate at optimizer step ``step`` over ``args.lr``: linear warm-up from 1/1000, then /10 at
    each of ``args.lr_steps``."""
    warmup = 1.0 if step >= args.warmup_iters else 1e-3 + (1 - 1e-3) * step / args.warmup_iters
    return warmup * 0.1 ** sum(step >= s * steps_per_epoch for s in args.lr_steps)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    check_args(args)
    device = init_distributed(args)
    torch.manual_seed(args.seed)  # one initialisation on every rank (what DDP would broadcast anyway)
    train_set, val_set = datasets(args)
    model = build_model(args, num_classes=max(train_set.categories) + 1).to(device)
    annotation_file = val_set.annotation_file
    sampler = DistributedSampler(train_set, seed=args.seed) if args.distributed else None
    if args.distributed:  # every rank scores its own share of the images, none twice
        val_set = Subset(val_set, range(args.rank, len(val_set), args.world_size))
    train_loader = DataLoader(train_set, args.batch_size, shuffle=sampler is None, sampler=sampler,
                              num_workers=args.workers, drop_last=True, collate_fn=collate_detection)
    val_loader = DataLoader(val_set, args.batch_size, num_workers=args.workers, collate_fn=collate_detection)
    amp_autocast = autocast_context(args.amp, args.amp_dtype, device)
    say = print if args.rank == 0 else (lambda *a, **k: None)

    def report(name: str, result: dict) -> None:
        say(f"{name}: box AP {result['map']:.2f}, AP50 {result['map50']:.2f}, AP75 {result['map75']:.2f}")

    if args.evaluate_only:
        if args.checkpoint:
            load_weights(model, model_state_dict(load_checkpoint(args.checkpoint), args.checkpoint), args.checkpoint,
                         type(model).__name__)
        report(args.checkpoint or 'untrained', score(model, val_loader, annotation_file, device, amp_autocast))
        if dist.is_initialized():
            dist.destroy_process_group()
        return 0

    if len(train_loader) == 0:
        raise UserError(f'--batch-size {args.batch_size} is larger than the {len(train_set)} training images')
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, args))
    # float16 autocast needs loss scaling (bfloat16 has float32's range); a disabled scaler is a no-op.
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and args.amp_dtype == 'float16')
    state = start_or_resume(args.output, args.resume, resolved_config(args, CONFIG_KEYS), RESUME_MAY_CHANGE)
    if state is not None:
        if state['steps_per_epoch'] != steps_per_epoch:  # the schedule counts steps: a new world size moves it
            raise UserError(f"--resume: the run in {args.output} took {state['steps_per_epoch']} steps an epoch, "
                            f'this one would take {steps_per_epoch} (resume with as many processes)')
        for name, part in (('model', model), ('optimizer', optimizer), ('scheduler', scheduler), ('scaler', scaler)):
            part.load_state_dict(state[name])
        start_epoch, best, untrained = state['epoch'] + 1, state['best_map'], state['untrained']
    else:
        start_epoch, best = 0, -math.inf
        untrained = score(model, val_loader, annotation_file, device, amp_autocast)  # the baseline
        report('untrained', untrained)
    os.makedirs(args.output, exist_ok=True)
    trained = DistributedDataParallel(model) if args.distributed else model
    result = {}
    for epoch in range(start_epoch, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        # The flips' random numbers, from (seed, epoch, rank) alone: a resumed run draws what it would have.
        torch.manual_seed(int(np.random.SeedSequence([args.seed, epoch, args.rank]).generate_state(1)[0]))
        trained.train()
        started, sums = time.time(), {}
        for step, (images, targets) in enumerate(train_loader):
            images = [image.to(device) for image in images]
            targets = [{k: v.to(device) for k, v in target.items()} for target in targets]
            with amp_autocast():
                losses = trained(images, targets)
            loss = sum(losses.values())
            # Every rank takes the same decision on a non-finite loss (one small all-reduce), before the step.
            finite = torch.isfinite(loss.detach()).float()
            if dist.is_initialized():
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite:
                raise UserError(f'non-finite loss at epoch {epoch} step {step}: stopping before it reaches the '
                                'weights (the last checkpoint is kept; lower --lr or raise --warmup-iters)')
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.item()
        result = score(model, val_loader, annotation_file, device, amp_autocast)
        is_best = result['map'] > best
        best = max(best, result['map'])
        if args.rank == 0:
            save_checkpoint(args.output, {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                                          'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict(),
                                          'epoch': epoch, 'best_map': best, 'untrained': untrained,
                                          'steps_per_epoch': steps_per_epoch,
                                          'config': resolved_config(args, CONFIG_KEYS)}, is_best=is_best)
        mean = ', '.join(f'{k.removeprefix("loss_")} {v / steps_per_epoch:.3f}' for k, v in sums.items())
        say(f'epoch {epoch}: loss {mean}; {time.time() - started:.1f} s')
        report(f'epoch {epoch}', result)
    if args.rank == 0:
        write_results({'epochs': args.epochs, 'best_map': best, **result,
                       **{f'untrained_{k}': v for k, v in untrained.items()}},
                      os.path.join(args.output, 'results.json'))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == '__main__':
    run_main(lambda: sys.exit(main()), os.path.basename(__file__))
