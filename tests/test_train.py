"""train.py / validate.py end to end on the CPU, with a tiny DDF-ResNet (one block per stage, 32x32) on a
tiny copy of the demo dataset: a demo run validated, two ranks under torchrun, kills and resumes that
reach the very same weights, a non-finite loss, bad inputs, and a start error on rank 0 stopping the other
rank at once."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ddfnet.cli import run_main
from support.runner import ROOT, load_script, repo_env, run_script, script_command
from support.tiny_run import tiny_args

pytestmark = [pytest.mark.slow,  # train.py subprocesses, kills and resumes, two ranks under torchrun
              pytest.mark.usefixtures('one_thread')]
EPOCHS, STEPS = 3, 8  # 64 training images / batch 8


# One thread per process: runs compared for bitwise equality must use the same thread count, and on a busy
# two-core machine two threads per process make a run several times slower.
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


def run(*command, **kwargs):
    """Run ``python COMMAND`` (a script of the repository, or a wrapper) to completion."""
    script, *args = command
    return run_script(script, *args, cwd=ROOT, env=ENV, **kwargs)


def start(script, *args):
    return subprocess.Popen(script_command(script, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env=ENV)


def wait_for(process, text):
    """Read the process's output until a line contains ``text``; returns everything read."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return ''.join(seen)
    process.wait()
    raise AssertionError(f'{text!r} never printed; output:\n' + ''.join(seen))


def checkpoint(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run: the weights every interrupted run must reach."""
    output = tmp_path_factory.mktemp('reference')
    result = run('train.py', *tiny_args(data_dir, output))
    assert result.returncode == 0, result.stdout + result.stderr
    return output / 'run', result.stdout


def test_demo_run_validates_to_the_logged_top1(reference, data_dir, tmp_path):
    run_dir, log = reference
    files = set(os.listdir(run_dir))
    assert {'args.yaml', 'log.txt', 'summary.csv', 'last.pth.tar', 'best.pth.tar'} <= files
    assert any(f.startswith('events.out.tfevents') for f in files)
    assert not any(f.endswith('.partial') for f in files)
    assert 'img/s eta' in log and 'lr ' in log
    with open(run_dir / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['epoch']) for r in rows] == list(range(EPOCHS))
    state = checkpoint(run_dir / 'last.pth.tar')
    assert state['state']['epoch'] == EPOCHS and state['state']['step'] == 0
    assert state['config']['model'] == 'ddf_resnet26' and state['optimizer'] and state['rng']

    # validate.py with the run's resolved config (args.yaml is a valid --config) on the final checkpoint
    results = tmp_path / 'results.json'
    result = run('validate.py', '--config', str(run_dir / 'args.yaml'), '--checkpoint', str(run_dir / 'last.pth.tar'),
                 '--results-file', str(results))
    assert result.returncode == 0, result.stderr
    assert results.read_text().endswith('}\n')
    top1 = json.loads(results.read_text())['top1']
    assert top1 == pytest.approx(float(rows[-1]['eval_top1']), abs=1e-3)
    assert f'top-1 {top1:.2f}' in result.stdout and 'img/s' in result.stdout and 'params' in result.stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(run_dir)).Reload().Tags()['scalars']
    assert {'train/loss', 'train/lr', 'train/images_per_sec', 'val/top1', 'val/top5'} <= set(tags)


def test_kill_mid_epoch_then_resume_reaches_the_same_weights(reference, data_dir, tmp_path):
    # SIGKILL leaves no chance to save: the resume starts from the last epoch end and redoes the epoch.
    args = tiny_args(data_dir, tmp_path)
    process = start('train.py', *args)
    wait_for(process, f'epoch 1 [3/{STEPS}]')
    process.kill()
    process.wait()
    state = checkpoint(tmp_path / 'run' / 'last.pth.tar')['state']
    assert state['step'] == 0 and 1 <= state['epoch'] < EPOCHS  # an epoch end before the last (epoch 1's, normally)
    result = run('train.py', *args, '--resume', 'auto')
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'resuming from' in result.stdout
    assert_same_weights(checkpoint(tmp_path / 'run' / 'last.pth.tar')['model'],
                        checkpoint(reference[0] / 'last.pth.tar')['model'])


def test_sigterm_saves_a_mid_epoch_recovery_point_that_resumes_exactly(reference, data_dir, tmp_path):
    args = tiny_args(data_dir, tmp_path)
    process = start('train.py', *args)
    wait_for(process, f'epoch 1 [3/{STEPS}]')
    process.send_signal(signal.SIGTERM)
    output = process.communicate()[0]
    assert process.returncode == 128 + signal.SIGTERM, output
    assert 'Traceback' not in output and 'recovery checkpoint' in output
    state = checkpoint(tmp_path / 'run' / 'last.pth.tar')['state']
    # a mid-epoch point (batch 3-5 of epoch 1 normally; later if this process was slow to send the signal)
    assert 1 <= state['epoch'] < EPOCHS and 1 <= state['step'] <= STEPS
    result = run('train.py', *args, '--resume', 'auto')
    assert result.returncode == 0, result.stdout + result.stderr
    assert f'resuming from {tmp_path / "run" / "last.pth.tar"}: epoch {state["epoch"]}, batch {state["step"]}' \
        in result.stdout
    final = checkpoint(tmp_path / 'run' / 'last.pth.tar')
    reference_final = checkpoint(reference[0] / 'last.pth.tar')
    assert_same_weights(final['model'], reference_final['model'])
    assert final['state']['num_updates'] == reference_final['state']['num_updates'] == EPOCHS * STEPS
    # the interrupted epoch's train_loss is the mean over all its batches, as in the uninterrupted run
    rows = [(r['epoch'], r['train_loss']) for r in csv.DictReader(open(tmp_path / 'run' / 'summary.csv'))]
    assert rows == [(r['epoch'], r['train_loss']) for r in csv.DictReader(open(reference[0] / 'summary.csv'))]


def test_kill_while_writing_a_checkpoint_keeps_the_last_good_one(reference, data_dir, tmp_path):
    # The process dies half-way through writing epoch 1's checkpoint (the write itself is interrupted).
    wrapper = tmp_path / 'dying_save.py'
    wrapper.write_text(textwrap.dedent(f'''
        import io, os, runpy, signal, sys, torch
        real_save, calls = torch.save, []
        def dying_save(obj, f, *args, **kwargs):
            calls.append(1)
            if len(calls) < 2:
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        sys.argv = ['train.py'] + sys.argv[1:]
        sys.path.insert(0, {str(ROOT)!r})
        runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')
    '''))
    args = tiny_args(data_dir, tmp_path)
    result = run(wrapper, *args)
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    run_dir = tmp_path / 'run'
    assert any(f.endswith('.partial') for f in os.listdir(run_dir))  # the kill did land inside the write
    assert checkpoint(run_dir / 'last.pth.tar')['state']['epoch'] == 1  # epoch 0's, intact
    result = run('train.py', *args, '--resume', 'auto')
    assert result.returncode == 0, result.stdout + result.stderr
    assert not any(f.endswith('.partial') for f in os.listdir(run_dir))
    assert_same_weights(checkpoint(run_dir / 'last.pth.tar')['model'],
                        checkpoint(reference[0] / 'last.pth.tar')['model'])


def test_two_ranks_under_torchrun_end_with_identical_weights(data_dir, tmp_path):
    # Each rank dumps the weights it evaluates at every epoch end (after the BatchNorm reduce).
    wrapper = tmp_path / 'spy.py'
    wrapper.write_text(textwrap.dedent(f'''
        import os, sys, torch
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
        sys.argv[0] = {str(ROOT / 'train.py')!r}
        from support.runner import load_script
        train = load_script('train')
        evaluate = train.evaluate
        def spy(model, *args, **kwargs):
            torch.save(model.state_dict(), os.path.join({str(tmp_path)!r}, f'rank{{os.environ["RANK"]}}.pt'))
            return evaluate(model, *args, **kwargs)
        train.evaluate = spy
        train.run_main(lambda: train.main(sys.argv[1:]), 'train.py')
    '''))
    args = tiny_args(data_dir, tmp_path, '--epochs', '1', '--batch-size', '4', '--workers', '1')
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             str(wrapper), *args], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '2 process(es) on cpu' in result.stdout
    assert f'[{STEPS}/{STEPS}]' in result.stdout  # 64 images / (2 ranks x 4) = 8 steps
    rank0, rank1 = torch.load(tmp_path / 'rank0.pt'), torch.load(tmp_path / 'rank1.pt')
    assert_same_weights(rank0, rank1)
    assert_same_weights(rank0, checkpoint(tmp_path / 'run' / 'last.pth.tar')['model'])
    assert len([f for f in os.listdir(tmp_path / 'run') if f.startswith('events')]) == 1  # only rank 0 writes


@pytest.mark.parametrize('accum, where', [(1, 'step 2'), (2, 'steps 2-3')])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch, capsys, accum,
                                                                   where):
    # One NaN loss, at epoch 1's third batch; with accumulation 2 that batch does not step the optimizer,
    # and the run must stop at the step that ends its window.
    train = load_script('train')
    calls = []

    class PoisonedLoss(torch.nn.CrossEntropyLoss):
        def forward(self, logits, target):
            calls.append(1)
            loss = super().forward(logits, target)
            return loss * float('nan') if len(calls) == STEPS + 3 else loss

    monkeypatch.setattr(train, 'LabelSmoothingCrossEntropy', lambda smoothing: PoisonedLoss())
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: train.main(tiny_args(data_dir, tmp_path, '--grad-accum-steps', str(accum))), 'train.py')
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f'train.py: error: non-finite loss at epoch 1 {where}: stopping before it reaches the weights '
                     '(the last good checkpoint is kept; lower --lr, add --clip-grad or use --amp-dtype bfloat16)']
    saved = checkpoint(tmp_path / 'run' / 'last.pth.tar')
    assert saved['state'] == {**saved['state'], 'epoch': 1, 'step': 0}
    assert all(torch.isfinite(v).all() for v in saved['model'].values() if v.is_floating_point())


def _snapshot(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob('*') if p.is_file()}


@pytest.fixture()
def bad_input(reference, tmp_path):
    """Files for the bad-input cases: an existing run, checkpoints that must be refused."""
    good = reference[0] / 'last.pth.tar'
    (tmp_path / 'truncated.pth.tar').write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    (tmp_path / 'corrupt.pth.tar').write_bytes(os.urandom(4096))
    shutil.copy(good, tmp_path / 'elsewhere.pth.tar')
    existing = tmp_path / 'out' / 'run'
    shutil.copytree(reference[0], existing)
    (tmp_path / 'bad.yaml').write_text('model: ddf_resnet26\nlr: [0.1\n')
    (tmp_path / 'unknown.yaml').write_text('model: ddf_resnet26\nlearning_rate: 0.1\n')
    return tmp_path


BAD_INPUTS = [
    ('missing data dir', ['--dataset', '', '--data-dir', '{tmp}/nowhere', '--experiment', 'new'],
     'data dir {tmp}/nowhere does not exist'),
    ('unknown model', ['--model', 'ddf_resnet27', '--experiment', 'new'], "unknown model 'ddf_resnet27'"),
    ('malformed yaml', ['--config', '{tmp}/bad.yaml', '--experiment', 'new'],
     'malformed YAML in config {tmp}/bad.yaml line 3'),
    ('unknown key', ['--config', '{tmp}/unknown.yaml', '--experiment', 'new'],
     "unknown key 'learning_rate' in config {tmp}/unknown.yaml"),
    ('truncated checkpoint', ['--resume', '{tmp}/truncated.pth.tar', '--experiment', 'new'],
     'cannot load checkpoint {tmp}/truncated.pth.tar: truncated, corrupt'),
    ('corrupt checkpoint', ['--resume', '{tmp}/corrupt.pth.tar', '--experiment', 'new'],
     'cannot load checkpoint {tmp}/corrupt.pth.tar: truncated, corrupt'),
    ('other architecture', ['--resume', '{tmp}/out/run/last.pth.tar', '--experiment', 'new', '--model-kwargs', '{{}}'],
     'checkpoint {tmp}/out/run/last.pth.tar does not fit model ddf_resnet26: '),
    ('existing run', [], '{tmp}/out/run already holds a run: continue it with --resume auto'),
    ('resume into another run', ['--resume', '{tmp}/elsewhere.pth.tar'], '{tmp}/out/run already holds another run'),
    ('odd batch with mixup', ['--mixup', '0.2', '--batch-size', '7', '--experiment', 'new'],
     'mixup/cutmix pair up images: --batch-size must be even'),
    ('plateau schedule', ['--sched', 'plateau', '--experiment', 'new'], '--sched plateau is not supported'),
]


@pytest.mark.parametrize('case, extra, message', BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_changes_nothing(bad_input, data_dir, case, extra, message, monkeypatch, capsys):
    tmp = str(bad_input)
    argv = tiny_args(data_dir, bad_input / 'out') + [a.format(tmp=tmp) for a in extra]
    before = _snapshot(bad_input)
    train = load_script('train')
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: train.main(argv), 'train.py')
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith('train.py: error: ' + message.format(tmp=tmp)), error
    assert _snapshot(bad_input) == before


@pytest.mark.parametrize('checkpoint_name, extra, message', [
    ('truncated.pth.tar', [], 'cannot load checkpoint {tmp}/truncated.pth.tar: truncated, corrupt'),
    ('out/run/last.pth.tar', ['--model-kwargs', '{}'], 'does not fit model ddf_resnet26'),
    ('out/run/last.pth.tar', ['--use-ema'], 'has no EMA weights'),
], ids=['truncated', 'other architecture', 'no EMA'])
def test_validate_bad_checkpoint(bad_input, checkpoint_name, extra, message, capsys):
    tmp = str(bad_input)
    validate = load_script('validate')
    argv = ['--config', f'{tmp}/out/run/args.yaml', '--checkpoint', f'{tmp}/{checkpoint_name}', *extra]
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: validate.main(argv), 'validate.py')
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message.format(tmp=tmp) in error[0], error


def test_validate_reads_released_state_dicts_and_appends_csv(reference, tmp_path, capsys):
    """A bare state_dict with DDP's ``module.`` prefixes and a safetensors file give the same top-1 as the
    training checkpoint; a .csv results file gains one row per run."""
    from safetensors.torch import save_file
    run_dir = reference[0]
    weights = checkpoint(run_dir / 'last.pth.tar')['model']
    torch.save({f'module.{k}': v for k, v in weights.items()}, tmp_path / 'released.pth')
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / 'released.safetensors'))
    validate = load_script('validate')
    results = tmp_path / 'results.csv'
    for name in ('last.pth.tar', 'released.pth', 'released.safetensors'):
        path = run_dir / name if name == 'last.pth.tar' else tmp_path / name
        run_main(lambda: validate.main(['--config', str(run_dir / 'args.yaml'), '--checkpoint', str(path),
                                        '--results-file', str(results)]), 'validate.py')
    with open(results) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and len({r['top1'] for r in rows}) == 1
    assert rows[0]['params_m'] and rows[0]['img_size'] == '32'
    assert capsys.readouterr().out.count('top-1') == 3


def test_a_start_error_on_rank_0_stops_the_other_rank_at_once(data_dir, tmp_path):
    """Two ranks started without torchrun (as a cluster's launcher starts them: RANK, WORLD_SIZE,
    MASTER_ADDR in the environment, so no agent stops the others): rank 0 cannot write the run folder (a
    folder where its args.yaml goes), and rank 1 stops too instead of waiting in DDP's first broadcast
    until --dist-timeout (300 s here; the test allows 150)."""
    import socket
    import subprocess
    (tmp_path / 'run' / 'args.yaml').mkdir(parents=True)
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    argv = tiny_args(data_dir, tmp_path, '--epochs', '1', '--batch-size', '4', '--dist-timeout', '300')
    ranks = []
    for rank in range(2):
        env = repo_env(OMP_NUM_THREADS='1', RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2',
                       MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
        ranks.append(subprocess.Popen(script_command('train', *argv), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env))
    logs = []
    try:
        for process in ranks:
            logs.append(process.communicate(timeout=150)[0])
    finally:
        for process in ranks:
            process.kill()
    assert [process.returncode for process in ranks] == [2, 2], logs
    assert logs[0].strip().splitlines()[-1].startswith(f'train.py: error: cannot write the run folder {tmp_path / "run"}: ')
    assert logs[1].strip().splitlines()[-1].startswith('train.py: error: rank 0 could not start (cannot write the run '
                                                       'folder')
    assert logs[1].strip().endswith('stopping rank 1 too')
