"""Process-group set-up for ``train.py`` under torchrun: bounded in time, and refused where an elastic
restart could not reconnect.

timm's ``init_distributed_device`` takes no timeout, so a set-up that cannot complete waits for torch's
default (30 minutes for gloo). Here every store wait, connection and collective of the process group
gives up after ``--dist-timeout`` seconds, and a failed set-up is one line (:class:`UserError`).

Restarts: torchrun (torch 2.14) hands its workers its own rendezvous TCPStore
(``TORCHELASTIC_USE_AGENT_STORE=True``) and keeps it across restarts, so the keys where the previous
attempt's workers published their addresses are still there. A restarted gloo worker may read a dead
peer's address: "Gloo connectFullMesh failed ... Connection refused", or a wait until the timeout.
Measured on CPU (docs/benchmarks.md): 4 of 4 restarts with an explicit c10d rendezvous failed that way
(``--standalone`` shares the store too), and 7 of 7 recovered, c10d and ``--standalone``, with
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment (a fresh store per attempt). So a
run that allows restarts on a shared store is refused at start, with that fix in the message, rather
than failing at its first restart.
"""
from __future__ import annotations

import argparse
import os
from datetime import timedelta
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from timm.utils import is_distributed_env, world_info_from_env

from ..cli import UserError, first_line

SHARED_STORE_FIX = 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1'


def check_elastic_store(environ: Mapping[str, str] = os.environ) -> None:
    """Raise :class:`UserError` when torchrun allows restarts (``--max-restarts`` > 0) but shares its
    rendezvous store with the workers, where restarted workers read stale addresses (module docstring)."""
    restarts = int(environ.get('TORCHELASTIC_MAX_RESTARTS', '0') or 0)
    if restarts > 0 and environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
        raise UserError(f'torchrun --max-restarts={restarts} shares its store with the workers, and restarted '
                        f'workers then fail to connect: start torchrun with {SHARED_STORE_FIX} in its '
                        'environment (docs/distributed.md, "Pre-emptible and elastic runs")')


def init_distributed(args: argparse.Namespace) -> torch.device:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo otherwise),
    waiting at most ``args.dist_timeout`` seconds for any step, and return this process's device.

    Sets ``args.distributed``, ``args.rank``, ``args.world_size`` and ``args.local_rank`` as timm's
    ``init_distributed_device`` does; outside torchrun it is a single process on ``args.device``. A
    set-up that fails or times out raises :class:`UserError` (one line), so no worker waits forever.
    """
    if not args.dist_timeout > 0:
        raise UserError(f'--dist-timeout must be a positive number of seconds, not {args.dist_timeout:g}')
    local_rank, rank, world_size = world_info_from_env()
    args.distributed = is_distributed_env()
    args.rank, args.world_size, args.local_rank = (rank, world_size, local_rank) if args.distributed else (0, 1, 0)
    device_type = args.device.split(':')[0]
    if not args.distributed:
        return torch.device(args.device)
    check_elastic_store()
    timeout = args.dist_timeout
    try:
        dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo', init_method='env://', rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:  # DistError and its store/network kinds are RuntimeErrors
        reason = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        raise UserError(f'rank {rank} of {world_size}: process group set-up failed or took over --dist-timeout '
                        f'{timeout:g} s ({reason})') from None
    if device_type == 'cuda':  # one GPU per process, by local rank (a given index is ignored, as timm does)
        torch.cuda.set_device(local_rank)
        args.device = f'cuda:{local_rank}'
    return torch.device(args.device)


def start_together(args: argparse.Namespace, start: Callable[[], None]) -> None:
    """Run ``start`` (work that only some ranks do and that can fail: rank 0 creating the run folder) and
    agree on its outcome before any rank goes on. A failure on one rank then stops every rank at once, with
    one line naming it, where the others would otherwise wait in their next collective (DDP's first
    broadcast) until ``--dist-timeout``: a rank on another node is not stopped by this node's torchrun."""
    error = None
    try:
        start()
    except Exception as e:  # any failure: the other ranks must hear of it before it is raised here
        error = e
    if args.distributed:
        outcomes: list = [None] * args.world_size
        dist.all_gather_object(outcomes, None if error is None else str(error) if isinstance(error, UserError)
                               else first_line(error))
        failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
        if failed:
            dist.destroy_process_group()
            if error is None:
                rank, outcome = failed[0]
                raise UserError(f'rank {rank} could not start ({outcome}); stopping rank {args.rank} too')
    if error is not None:
        raise error
