"""Small defects, each fixed: range checks before train.py's trial forward, ONNX exports that cannot be
honoured leave no file, Ctrl-C exits 130, a damaged ``last.pth.tar`` names the run's intact checkpoint,
out-of-memory errors are not read as bad options, one-line errors are not cut mid-word."""
import pytest
import torch

from ddfnet.cli import UserError, rejected_as, run_main, short_reason
from support.runner import ROOT, load_script, repo_env, script_command
from support.tiny_run import tiny_args

pytestmark = pytest.mark.usefixtures('one_thread')


def script(name):
    return load_script(f'scripts/{name}')


def call(main, prog, capsys):
    try:
        run_main(main, prog)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


@pytest.mark.parametrize('extra, message', [
    (['--img-size', '-5'], '--img-size must be at least 1, not -5'),
    (['--img-size', '0'], '--img-size must be at least 1, not 0'),
    (['--crop-pct', '2'], '--crop-pct must be at most 1'),
    (['--scale', '0.5', '0.1'], '--scale takes two area fractions'),
    (['--ratio', '0', '1'], '--ratio takes two aspect ratios'),
])
def test_train_image_options_are_checked_before_the_trial_forward(data_dir, tmp_path, extra, message, capsys):
    train = load_script('train')
    code, out, err = call(lambda: train.main(tiny_args(data_dir, tmp_path, *extra)), 'train.py', capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f'train.py: error: {message}'), err
    assert not (tmp_path / 'run').exists()


def test_resume_auto_on_a_damaged_last_names_the_intact_checkpoint(data_dir, tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    torch.save({'model': {}, 'state': {}}, run / 'checkpoint-1.pth.tar')
    data = (run / 'checkpoint-1.pth.tar').read_bytes()
    (run / 'checkpoint-2.pth.tar').write_bytes(data[:len(data) // 2])  # newer, but truncated too
    (run / 'last.pth.tar').write_bytes(data[:len(data) // 2])
    train = load_script('train')
    code, out, err = call(lambda: train.main(tiny_args(data_dir, tmp_path, '--resume', 'auto')), 'train.py', capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f'train.py: error: --resume auto: cannot load checkpoint {run / "last.pth.tar"}: ')
    assert err[0].endswith(f'the newest readable checkpoint is {run / "checkpoint-1.pth.tar"}: continue from it with '
                           f'--resume {run / "checkpoint-1.pth.tar"}')


def test_ctrl_c_in_make_shards_exits_130_in_one_line(tmp_path, monkeypatch, capsys):
    make_shards = script('make_shards')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(make_shards, 'write_shards', interrupted)
    (tmp_path / 'src').mkdir()
    code, out, err = call(lambda: make_shards.main([str(tmp_path / 'src'), str(tmp_path / 'out')]), 'make_shards.py',
                          capsys)
    assert code == 130 and err == ['make_shards.py: interrupted']


def test_out_of_memory_is_not_read_as_a_bad_option():
    with pytest.raises(torch.OutOfMemoryError):
        with rejected_as('--batch-size 4096'):
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        with rejected_as('--batch-size 4096'):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    with pytest.raises(UserError, match='--opt adamx: ValueError: unknown optimizer'):
        with rejected_as('--opt adamx'):
            raise ValueError('unknown optimizer')


def test_long_reasons_are_cut_at_a_sentence_or_a_word():
    torch_message = ('Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` '
                     'argument in `torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` '
                     'set to `False` will likely succeed')
    assert short_reason(ValueError(torch_message), 160) == 'Weights only load failed. In PyTorch 2.6, we changed the ' \
        'default value of the `weights_only` argument in `torch.load` from `False` to `True`.'
    words = ValueError('word ' * 100)
    assert short_reason(words, 50) == ' '.join(['word'] * 10) + ' ...'  # whole words, then the mark


def _tiny_export_argv(out, *extra):
    return [str(out), '--model', 'dy_resnet18', '--model-kwargs', '{layers: [1, 1, 1, 1]}', '--img-size', '32',
            *extra]


def test_onnx_export_refuses_an_opset_it_cannot_honour_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / 'model.onnx'
    out.write_bytes(b'keep me')
    code, _, err = call(lambda: script('onnx_export').main(_tiny_export_argv(out, '--opset', '7', '--force')),
                        'onnx_export.py', capsys)
    assert code == 2 and err[-1].startswith('onnx_export.py: error: --opset 7: the exporter cannot convert dy_resnet18 '
                                            'to opset 7 (it produced opset 18); nothing written'), err
    assert out.read_bytes() == b'keep me' and sorted(p.name for p in tmp_path.iterdir()) == ['model.onnx']
    code, _, err = call(lambda: script('onnx_export').main(_tiny_export_argv(out, '--opset', '99', '--force')),
                        'onnx_export.py', capsys)
    assert code == 2 and err == ['onnx_export.py: error: --opset 99: this onnx package knows opsets 1 to '
                                 f'{__import__("onnx").defs.onnx_opset_version()}']


def test_onnx_export_removes_a_file_that_failed_the_forward_check(tmp_path, monkeypatch, capsys):
    export = script('onnx_export')
    monkeypatch.setattr(export, 'TOLERANCE', -1.0)  # any error is too large: the failing branch runs
    out = tmp_path / 'model.onnx'
    code, _, err = call(lambda: export.main(_tiny_export_argv(out, '--check-forward')), 'onnx_export.py', capsys)
    assert code == 1 and f'{out} not written' in err[-1]
    assert not list(tmp_path.iterdir())


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
