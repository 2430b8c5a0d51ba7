#!/usr/bin/env python3
"""Start torchrun on one node of a Slurm allocation, wired from Slurm's environment (see README.md here).

    srun --ntasks-per-node=1 python docs/slurm/torchrun_slurm.py [--max-restarts 3] train.py ARGS...

Slurm describes the job in SLURM_JOB_NODELIST (``gpu[01-04],big7``), SLURM_NNODES, SLURM_NODEID and
SLURM_JOB_ID; this turns them into torchrun's c10d rendezvous: the endpoint is the allocation's first
node (Slurm's node 0, which also hosts the rendezvous store), the rendezvous id is the job id (the same
after a requeue), and ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` gives each restart a fresh store (without
it restarted workers fail to connect; docs/distributed.md, "Pre-emptible and elastic runs"). ``--dry-run``
prints the command instead of running it.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Mapping

PROG = 'torchrun_slurm.py'


# This runs on every node before torchrun, so it imports neither torch nor ddfnet (seconds per node, and
# any Python works): these two mirror ddfnet.cli's UserError and OneLineArgumentParser.
class UserError(Exception):
    """A missing or inconsistent Slurm variable: printed as one line, exit status 2."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """Argument errors as one line (``prog: error: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message}\n')


def _split_top_level(text: str) -> list[str]:
    """Split ``text`` at the commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {'[': 1, ']': -1}.get(char, 0)
        if char == ',' and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list as host names, in Slurm's order: ``node[01-03,7],gpu5`` ->
    ``node01 node02 node03 node7 gpu5``; several bracket groups in one name give every combination."""
    hosts = []
    for name in _split_top_level(hostlist.strip()):
        match = re.match(r'([^\[]*)\[([^\]]*)\](.*)$', name)
        if match is None:
            if '[' in name or ']' in name:
                raise UserError(f'malformed Slurm host list {hostlist!r}')
            hosts.append(name)
            continue
        prefix, ranges, rest = match.groups()
        tails = expand_hostlist(rest) if rest else ['']
        for item in ranges.split(','):
            low, _, high = item.partition('-')
            if not low.isdigit() or (high and not high.isdigit()):
                raise UserError(f'malformed Slurm host list {hostlist!r}')
            width = len(low)  # Slurm keeps the zero padding of the range's first number
            for number in range(int(low), int(high or low) + 1):
                hosts.extend(f'{prefix}{number:0{width}d}{tail}' for tail in tails)
    return hosts


def allocation_hosts(hostlist: str) -> list[str]:
    """The allocation's host names: ``scontrol show hostnames`` where Slurm's tools exist, else our parser."""
    if shutil.which('scontrol'):
        result = subprocess.run(['scontrol', 'show', 'hostnames', hostlist], capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.split():
            return result.stdout.split()
    return expand_hostlist(hostlist)


def _env_int(environ: Mapping[str, str], *names: str) -> int:
    for name in names:
        if environ.get(name, '').strip():
            value = environ[name].strip()
            if not value.isdigit():
                raise UserError(f'{name}={value!r} is not a number')
            return int(value)
    raise UserError(f'{names[0]} is not set: run this inside a Slurm allocation, one task per node '
                    '(srun --ntasks-per-node=1)')


def parse_args(argv: list[str]) -> argparse.Namespace:
    """This script's arguments: its options, then the training script and that script's arguments."""
    parser = OneLineArgumentParser(prog=PROG, description='Run torchrun on this node of a Slurm allocation.')
    parser.add_argument('--nproc-per-node', help='processes on this node (default: SLURM_GPUS_ON_NODE, else 1)')
    parser.add_argument('--port', type=int, help='rendezvous port on the first node (default: 29500 + job id '
                        'modulo 10000, so two jobs sharing a node do not collide)')
    parser.add_argument('--max-restarts', type=int, default=3, help="torchrun's restarts of a failed worker group")
    parser.add_argument('--dry-run', action='store_true', help='print the command instead of running it')
    parser.add_argument('script', help='the training script, e.g. train.py')
    parser.add_argument('script_args', nargs=argparse.REMAINDER, help="the script's arguments")
    return parser.parse_args(argv)


def torchrun_command(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The torchrun command line and environment for this node, from :func:`parse_args`'s ``args`` and
    Slurm's variables in ``environ``. Missing or inconsistent variables raise :class:`UserError`."""
    hostlist = environ.get('SLURM_JOB_NODELIST') or environ.get('SLURM_NODELIST')
    if not hostlist:
        raise UserError('SLURM_JOB_NODELIST is not set: run this inside a Slurm allocation, one task per node '
                        '(srun --ntasks-per-node=1)')
    hosts = allocation_hosts(hostlist)
    nnodes = _env_int(environ, 'SLURM_NNODES', 'SLURM_JOB_NUM_NODES')
    node_id = _env_int(environ, 'SLURM_NODEID')
    job_id = _env_int(environ, 'SLURM_JOB_ID', 'SLURM_JOBID')
    if len(hosts) != nnodes:
        raise UserError(f'SLURM_JOB_NODELIST {hostlist!r} names {len(hosts)} hosts but SLURM_NNODES is {nnodes}')
    if not 0 <= node_id < nnodes:
        raise UserError(f'SLURM_NODEID {node_id} is outside the {nnodes} nodes of the allocation')
    port = args.port if args.port is not None else 29500 + job_id % 10000
    if not 0 < port < 65536:
        raise UserError(f'--port {port} is not a TCP port')
    nproc = args.nproc_per_node or environ.get('SLURM_GPUS_ON_NODE') or '1'
    command = [sys.executable, '-m', 'torch.distributed.run', f'--nnodes={nnodes}', f'--nproc-per-node={nproc}',
               '--rdzv-backend=c10d', f'--rdzv-endpoint={hosts[0]}:{port}', f'--rdzv-id={job_id}',
               # node 0 is hosts[0]: it serves the rendezvous store, the others connect to it
               f'--rdzv-conf=is_host={str(node_id == 0).lower()}', f'--max-restarts={args.max_restarts}',
               args.script, *args.script_args]
    return command, {**environ, 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}


def main(argv: list[str] | None = None) -> None:
    """Print (``--dry-run``) or replace this process with this node's torchrun."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command, env = torchrun_command(args, os.environ)
    if args.dry_run:
        print('TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 ' + shlex.join(command))
        return
    os.execve(command[0], command, env)


if __name__ == '__main__':
    try:
        main()
    except UserError as e:
        print(f'{PROG}: error: {e}', file=sys.stderr)
        sys.exit(2)
