"""torchrun on the CPU (gloo): a worker SIGKILLed mid-epoch under --max-restarts, two agents meeting at a c10d
rendezvous as two nodes, and the Slurm script on simulated nodes all end with the weights of an uninterrupted
2-rank run, bitwise; a process-group set-up that cannot complete is a one-line error within --dist-timeout.

The runs are train.py through tests/support/elastic_train.py (kill and weight-dump hooks) with a
one-block-per-stage DDF-ResNet-26 at 32x32, 64 demo images, batch 4 per rank: 2 epochs of 8 steps each. The
whole file: ~100-110 CPU seconds; 93 s and 125 s wall on the 2-core machine with other jobs running (load
average 2.4-3.9)."""
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ddfnet.cli import run_main
from support.runner import ROOT, load_script, repo_env, run_script
from support.tiny_run import tiny_args

pytestmark = [pytest.mark.slow,  # torchrun runs: kills, restarts, two agents, the Slurm script on simulated nodes
              pytest.mark.usefixtures('one_thread')]
STEPS = 8  # 64 images / (2 ranks x 4)
TIMEOUT = 300  # any torchrun run here takes seconds; a hang fails the test instead of blocking CI
# One thread per process (bitwise comparisons need equal thread counts); our ddfnet in every worker; a fresh
# rendezvous store per torchrun attempt (docs/distributed.md, "Pre-emptible and elastic runs").
ENV = repo_env(OMP_NUM_THREADS='1', TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def train_args(data_dir, output, *extra):
    return tiny_args(data_dir, output, '--epochs', '2', '--batch-size', '4', *extra)


def torchrun(*options, script_args, env=None):
    """``torchrun OPTIONS tests/support/elastic_train.py SCRIPT_ARGS`` started (not waited for)."""
    return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', *options,
                             str(ROOT / 'tests' / 'support' / 'elastic_train.py'), *script_args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env or ENV)


def finish(process) -> str:
    try:
        output = process.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        output = process.communicate()[0]
        raise AssertionError(f'still running after {TIMEOUT} s:\n{output}') from None
    assert process.returncode == 0, output
    return output


def weights(path):
    state = torch.load(path, map_location='cpu', weights_only=True)
    return state.get('model', state)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def single_node(port, *extra):
    return ('--nnodes=1', '--nproc-per-node=2', '--rdzv-backend=c10d', f'--rdzv-endpoint=127.0.0.1:{port}', *extra)


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory):
    """An uninterrupted 2-rank single-node run: the weights every other run must reach."""
    output = tmp_path_factory.mktemp('reference')
    log = finish(torchrun(*single_node(free_port()), script_args=train_args(data_dir, output),
                          env={**ENV, 'DDFNET_TEST_DUMP': str(output)}))
    assert '2 process(es) on cpu' in log and f'epoch 1 [{STEPS}/{STEPS}]' in log
    final = weights(output / 'run' / 'last.pth.tar')
    assert_same_weights(final, weights(output / 'rank1.pt'))
    return final


def test_worker_killed_mid_epoch_recovers_under_max_restarts_to_the_same_weights(reference, data_dir, tmp_path):
    # Rank 1 SIGKILLs itself before batch 3 of epoch 1 (epoch 0's checkpoint exists): torchrun restarts both
    # workers, which resume from that checkpoint and redo epoch 1.
    log = finish(torchrun(*single_node(free_port(), '--max-restarts=1'),
                          script_args=train_args(data_dir, tmp_path, '--resume', 'auto'),
                          env={**ENV, 'DDFNET_TEST_DUMP': str(tmp_path), 'DDFNET_TEST_KILL': '1:1:3'}))
    assert 'exitcode: -9' in log, log  # the kill happened, and torchrun saw it
    assert f'resuming from {tmp_path / "run" / "last.pth.tar"}: epoch 1, batch 0' in log
    final = torch.load(tmp_path / 'run' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert final['state']['epoch'] == 2 and final['state']['num_updates'] == 2 * STEPS
    assert_same_weights(final['model'], reference)
    assert_same_weights(weights(tmp_path / 'rank1.pt'), reference)  # the restarted rank 1 too


def test_two_agents_at_a_c10d_rendezvous_train_like_one_node(reference, data_dir, tmp_path):
    # docs/distributed.md's multi-node command on one machine: two torchrun agents (two "nodes", one worker each).
    port = free_port()
    env = {**ENV, 'DDFNET_TEST_DUMP': str(tmp_path)}
    agents = [torchrun('--nnodes=2', '--nproc-per-node=1', '--rdzv-backend=c10d', f'--rdzv-endpoint=127.0.0.1:{port}',
                       '--rdzv-id=two_nodes', script_args=train_args(data_dir, tmp_path), env=env) for _ in range(2)]
    logs = [finish(agent) for agent in agents]
    assert any('2 process(es) on cpu' in log for log in logs)
    assert_same_weights(weights(tmp_path / 'rank0.pt'), weights(tmp_path / 'rank1.pt'))
    assert_same_weights(weights(tmp_path / 'rank0.pt'), reference)
    assert_same_weights(weights(tmp_path / 'run' / 'last.pth.tar'), reference)


def test_process_group_setup_that_cannot_complete_is_one_line_within_the_timeout(data_dir, tmp_path, monkeypatch,
                                                                                capsys):
    # Rank 0 of 2 whose rank 1 never comes: the set-up gives up after --dist-timeout, before any file is written.
    for name, value in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                            MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    train = load_script('train')
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: train.main(train_args(data_dir, tmp_path, '--dist-timeout', '2')), 'train.py')
    elapsed = time.perf_counter() - start
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('train.py: error: rank 0 of 2: process group set-up failed or took over '
                              '--dist-timeout 2 s'), err
    assert not any('Traceback' in line for line in err)
    assert elapsed < 30, elapsed  # 2 s of waiting (plus the data set-up), not torch's 30-minute default
    assert not (tmp_path / 'run').exists()
    assert not torch.distributed.is_initialized()


def test_restarts_on_torchruns_shared_store_are_refused_in_one_line(data_dir, tmp_path, monkeypatch, capsys):
    # What torchrun --max-restarts=2 tells its workers without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.
    for name, value in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT='1',
                            TORCHELASTIC_MAX_RESTARTS='2', TORCHELASTIC_USE_AGENT_STORE='True').items():
        monkeypatch.setenv(name, value)
    train = load_script('train')
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: train.main(train_args(data_dir, tmp_path)), 'train.py')
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('train.py: error: torchrun --max-restarts=2 shares its store')
    assert 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1' in err
    assert not (tmp_path / 'run').exists()
    # a fresh store per attempt (the variable set), or no restarts: accepted (checked without joining a group)
    from ddfnet.training.distributed import check_elastic_store
    check_elastic_store({'TORCHELASTIC_MAX_RESTARTS': '2', 'TORCHELASTIC_USE_AGENT_STORE': 'False'})
    check_elastic_store({'TORCHELASTIC_MAX_RESTARTS': '0', 'TORCHELASTIC_USE_AGENT_STORE': 'True'})


def test_dist_timeout_must_be_positive(data_dir, tmp_path, capsys):
    train = load_script('train')
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: train.main(train_args(data_dir, tmp_path, '--dist-timeout', '0')), 'train.py')
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == 'train.py: error: --dist-timeout must be a positive number of seconds, not 0\n'


# --- Slurm: docs/slurm/torchrun_slurm.py and docs/slurm/train.sbatch -------------------------------------------

def slurm_helper():
    return load_script('docs/slurm/torchrun_slurm')


@pytest.mark.parametrize('hostlist, hosts', [
    ('gpu07', ['gpu07']),
    ('node[01-03,7],gpu5', ['node01', 'node02', 'node03', 'node7', 'gpu5']),
    ('x[9-11]', ['x9', 'x10', 'x11']),
    ('r[1-2]-n[08-09]', ['r1-n08', 'r1-n09', 'r2-n08', 'r2-n09']),
    ('127.0.0.[1-2]', ['127.0.0.1', '127.0.0.2']),
])
def test_slurm_host_lists_expand_in_slurms_order(hostlist, hosts):
    assert slurm_helper().expand_hostlist(hostlist) == hosts


SLURM_ENV = dict(SLURM_JOB_NODELIST='gpu-a[07-08],gpu-b3', SLURM_NNODES='3', SLURM_NODEID='1', SLURM_JOB_ID='4321',
                 SLURM_GPUS_ON_NODE='8')


def test_slurm_variables_become_the_torchrun_command():
    helper = slurm_helper()
    args = helper.parse_args(['train.py', '--config', 'c.yaml', '--lr', '0.8', '--resume', 'auto'])
    command, env = helper.torchrun_command(args, SLURM_ENV)
    assert command[:3] == [sys.executable, '-m', 'torch.distributed.run']
    assert command[3:] == ['--nnodes=3', '--nproc-per-node=8', '--rdzv-backend=c10d', '--rdzv-endpoint=gpu-a07:33821',
                           '--rdzv-id=4321', '--rdzv-conf=is_host=false', '--max-restarts=3',
                           'train.py', '--config', 'c.yaml', '--lr', '0.8', '--resume', 'auto']
    assert env['TORCH_DISABLE_SHARE_RDZV_TCP_STORE'] == '1' and env['SLURM_JOB_ID'] == '4321'
    command, _ = helper.torchrun_command(helper.parse_args(['--port', '1234', '--nproc-per-node', '2',
                                                            '--max-restarts', '0', 'train.py']),
                                         {**SLURM_ENV, 'SLURM_NODEID': '0'})
    assert command[3:] == ['--nnodes=3', '--nproc-per-node=2', '--rdzv-backend=c10d', '--rdzv-endpoint=gpu-a07:1234',
                           '--rdzv-id=4321', '--rdzv-conf=is_host=true', '--max-restarts=0', 'train.py']


@pytest.mark.parametrize('change, message', [
    (dict(SLURM_NNODES='2'), "'gpu-a[07-08],gpu-b3' names 3 hosts but SLURM_NNODES is 2"),
    (dict(SLURM_NODEID='3'), 'SLURM_NODEID 3 is outside the 3 nodes'),
    (dict(SLURM_JOB_ID='abc'), "SLURM_JOB_ID='abc' is not a number"),
    (dict(SLURM_JOB_NODELIST='gpu[01-'), 'malformed Slurm host list'),
])
def test_slurm_helper_rejects_an_inconsistent_environment(change, message):
    helper = slurm_helper()
    with pytest.raises(helper.UserError, match=re.escape(message)):
        helper.torchrun_command(helper.parse_args(['train.py']), {**SLURM_ENV, **change})


def test_slurm_helper_outside_an_allocation_is_one_line(tmp_path):
    env = {k: v for k, v in ENV.items() if not k.startswith('SLURM_')}
    result = run_script('docs/slurm/torchrun_slurm', 'train.py', env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr == ('torchrun_slurm.py: error: SLURM_JOB_NODELIST is not set: run this inside a Slurm '
                             'allocation, one task per node (srun --ntasks-per-node=1)\n')


def test_sbatch_script_on_two_simulated_nodes_requeues_and_resumes_to_the_same_weights(reference, data_dir,
                                                                                      tmp_path):
    # docs/slurm/train.sbatch run as Slurm would on 2 nodes (127.0.0.1 and 127.0.0.2), with stand-ins for srun
    # (the step's command once per node, with that node's SLURM_NODEID, as srun --ntasks-per-node=1 starts it;
    # it passes SIGTERM on, as srun does) and scontrol (expands the host list, records the rest). Near the
    # "time limit" (USR1, sent while every worker waits before batch 3 of epoch 1) the script stops the workers
    # with a recovery checkpoint and requeues the job; the requeued job (the same script again) resumes to
    # the same weights.
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name, text in {'srun': '''\
            #!/bin/bash
            while [[ $1 == --* ]]; do shift; done
            pids=()
            for ((node = 0; node < SLURM_NNODES; node++)); do
                SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
                pids+=($!)
            done
            trap 'kill -TERM "${pids[@]}"' TERM
            status=0
            for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
            exit $status
            ''', 'scontrol': f'''\
            #!/bin/bash
            if [[ $1 == show && $2 == hostnames ]]; then printf '127.0.0.1\\n127.0.0.2\\n'; exit; fi
            echo "$@" >> {tmp_path / 'scontrol.log'}
            '''}.items():
        path = bin_dir / name
        path.write_text(textwrap.dedent(text))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in ENV.items() if k != 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE'}  # the helper sets it
    env.update(PATH=os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), env['PATH']]),
               PYTHON=sys.executable, SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_NODELIST='127.0.0.[1-2]', SLURM_NNODES='2',
               SLURM_NTASKS='2', SLURM_JOB_ID='77', SLURM_GPUS_ON_NODE='1', RDZV_PORT=str(free_port()),
               TRAIN_SCRIPT='tests/support/elastic_train.py', DDFNET_TEST_DUMP=str(tmp_path))
    command = ['bash', str(ROOT / 'docs' / 'slurm' / 'train.sbatch'), *train_args(data_dir, tmp_path)]

    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                           env={**env, 'DDFNET_TEST_PAUSE': '1:3'})
    deadline = time.monotonic() + TIMEOUT
    while not all((tmp_path / f'paused-rank{r}').exists() for r in (0, 1)):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0] if job.poll() else 'timeout'
        time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)
    first = finish(job)
    assert 'time limit near' in first and 'recovery checkpoint' in first, first
    assert (tmp_path / 'scontrol.log').read_text() == 'requeue 77\n'
    state = torch.load(tmp_path / 'run' / 'last.pth.tar', map_location='cpu', weights_only=True)['state']
    assert (state['epoch'], state['step']) == (1, 4), state  # right after the batch the workers waited before

    requeued = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=TIMEOUT,
                              env={**env, 'SLURM_RESTART_COUNT': '1'})
    assert requeued.returncode == 0, requeued.stdout + requeued.stderr
    assert 'job 77 (restart 1) on 127.0.0.[1-2]' in requeued.stdout
    assert '2 process(es) on cpu' in requeued.stdout and 'epoch 1, batch 4' in requeued.stdout
    assert_same_weights(weights(tmp_path / 'run' / 'last.pth.tar'), reference)
