"""Bad input to train.py / validate.py is one line naming the option and writes nothing (image options are
checked before the trial forward; a damaged ``last.pth.tar`` names the run's intact checkpoint); a start that
failed does not block the corrected command; a finished run resumed says so; the README's training commands
run in the order shown; the small promises of the scripts' output (headers, logs, --help) hold; Ctrl-C exits
130 in one line, out-of-memory errors are not read as bad options, and long reasons are cut at a sentence or
a word. Runs in this process on a one-block-per-stage DDF-ResNet-26 at 32x32 with 4 demo images per class
(one epoch: 4 batches)."""
import os
import re
import shlex

import pytest
import torch
import yaml

from support import tiny_run
from support.runner import ROOT, call, load_script, run_script

from ddfnet.cli import UserError, rejected_as, run_main, short_reason
from ddfnet.data.datasets import default_workers
from ddfnet.utils.device import resolve_device

pytestmark = pytest.mark.usefixtures('one_thread')


def tiny_args(data_dir, output, *extra):
    return tiny_run.tiny_args(data_dir, output, *extra, per_class=4, epochs=1, warmup=0)


def fails(script, argv, capsys):
    """Run ``script``'s main in this process; returns its one error line (asserting exit status 2)."""
    module = load_script(script)
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: module.main(argv), f'{script}.py')
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and 'Traceback' not in error[0], error
    return error[0]


def train(argv):
    module = load_script('train')
    run_main(lambda: module.main(argv), 'train.py')


def snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob('*') if p.is_file()}


BAD_OPTIONS = [
    # builds, then fails in the first forward (timm's ResNet has no layer3): caught by the trial batch
    ('model kwargs', ['--model-kwargs', '{layers: [1, 1]}'],
     "--model-kwargs {'layers': [1, 1]}: ddf_resnet26 cannot run a batch of 3x32x32 images: AttributeError: "
     "'ResNet' object has no attribute 'layer3'"),
    ('model kwargs timm rejects', ['--model-kwargs', '{no_such_argument: 1}'],
     "--model-kwargs {'no_such_argument': 1}: cannot build ddf_resnet26: TypeError"),
    ('device name', ['--device', 'tpu'], "--device 'tpu' is not a device: use cpu, cuda, cuda:N or auto"),
    ('device type', ['--device', 'mps'], '--device mps: only cpu and cuda devices are supported'),
    ('optimizer', ['--opt', 'adamx'], '--opt adamx: ValueError: Optimizer adamx not found'),
    ('optimizer betas', ['--opt', 'adamw', '--opt-betas', '0.9'], '--opt adamw: '),
    ('scheduler', ['--sched', 'cosin'], "--sched cosin: ValueError: Unknown scheduler 'cosin'"),
    ('auto-augment', ['--aa', 'randaug'], '--aa randaug: AssertionError'),
    ('train interpolation', ['--train-interpolation', 'cubic'], "--train-interpolation cubic: KeyError: 'cubic'"),
    ('eval interpolation', ['--interpolation', 'cubic'], "--interpolation cubic: KeyError: 'cubic'"),
    ('compile backend', ['--torch-compile', 'inductr'], '--torch-compile inductr: not a torch.compile backend'),
    ('negative workers', ['--workers', '-1'], '--workers must not be negative, not -1'),
    ('probability', ['--reprob', '1.5'], '--reprob must be between 0 and 1, not 1.5'),
    ('step period', ['--sched', 'step', '--decay-epochs', '0'], '--decay-epochs must be positive, not 0.0'),
    ('negative clipping', ['--clip-grad', '-1'], '--clip-grad must be positive, not -1.0'),
    ('zero temperature', ['--dyconv-temp-end', '0'], '--dyconv-temp-end must be positive'),
    ('crop', ['--crop-pct', '0'], '--crop-pct must be positive'),
    ('too few classes', ['--num-classes', '5'], '--num-classes 5 is fewer than the 8 classes of the training split'),
    ('output is a file', ['--output', '{tmp}/file'], 'cannot write the run folder {tmp}/file/run: {tmp}/file is not'),
]


@pytest.mark.parametrize('case, extra, message', BAD_OPTIONS, ids=[c[0] for c in BAD_OPTIONS])
def test_bad_option_is_one_line_naming_it_and_writes_nothing(data_dir, tmp_path, capsys, case, extra, message):
    (tmp_path / 'file').write_text('a file, not a folder')
    extra = [a.replace('{tmp}', str(tmp_path)) for a in extra]
    error = fails('train', tiny_args(data_dir, tmp_path / 'out', *extra), capsys)
    assert error.startswith('train.py: error: ' + message.replace('{tmp}', str(tmp_path))), error
    assert sorted(os.listdir(tmp_path)) == ['file'] and (tmp_path / 'file').read_text() == 'a file, not a folder'


@pytest.mark.parametrize('resume', [[], ['--resume', 'auto']], ids=['fresh', 'resume-auto'])
def test_a_failed_start_does_not_block_the_corrected_command(data_dir, tmp_path, resume):
    # What a start that died before its first checkpoint left (a crash in epoch 0): no checkpoint.
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'args.yaml').write_text('model: ddf_resnet26\nlr: 123.0\nmodel_kwargs: {layers: [1, 1]}\n')
    (run_dir / 'log.txt').write_text('the failed start\n')
    (run_dir / 'events.out.tfevents.1.failed').write_bytes(b'old')
    train(tiny_args(data_dir, tmp_path, *resume))
    config = yaml.safe_load((run_dir / 'args.yaml').read_text())
    assert config['lr'] == 4e-3 and config['model_kwargs'] == {'layers': [1, 1, 1, 1]}  # the run that trained
    assert not list(run_dir.glob('args-resume-*'))
    log = (run_dir / 'log.txt').read_text()
    assert 'the failed start' not in log and 'replaced the files of a failed start' in log
    assert not (run_dir / 'events.out.tfevents.1.failed').exists() and len(list(run_dir.glob('events.*'))) == 1
    assert (run_dir / 'last.pth.tar').exists()


def test_run_header_counter_compile_note_and_a_finished_resume(data_dir, tmp_path, monkeypatch, capsys):
    # torch.compile itself is too slow for this suite: the note must come whatever the backend does
    monkeypatch.setattr(torch, 'compile', lambda model, backend: model)
    train(tiny_args(data_dir, tmp_path, '--grad-accum-steps', '2', '--torch-compile', 'eager'))
    log = (tmp_path / 'run' / 'log.txt').read_text()
    # the header counts what the progress lines count: 32 images / batch 8 = 4 batches, 2 optimizer steps
    assert '4 batches of 8 images x 1 process(es) per epoch, an optimizer step every 2 batches (2 steps)' in log
    assert 'epoch 0 [2/4]' in log and 'epoch 0 [4/4]' in log
    assert log.count('compiling the model with torch.compile (backend eager)') == 1

    capsys.readouterr()
    before = snapshot(tmp_path)
    train(tiny_args(data_dir, tmp_path, '--grad-accum-steps', '2', '--resume', 'auto'))  # returns: exit status 0
    out = capsys.readouterr().out
    assert 'the run is complete (1 epochs trained, 1 asked for)' in out and 'training epochs' not in out
    assert snapshot(tmp_path) == before


def test_resume_with_an_optimizer_that_does_not_fit_is_one_line(data_dir, tmp_path, capsys):
    train(tiny_args(data_dir, tmp_path, '--opt', 'sgd'))  # weight decay 0.05: two parameter groups
    last = tmp_path / 'run' / 'last.pth.tar'
    before = snapshot(tmp_path)
    resume = ['--epochs', '2', '--resume', 'auto']
    error = fails('train', tiny_args(data_dir, tmp_path, '--opt', 'lamb', *resume), capsys)
    assert error == f'train.py: error: --opt lamb: {last} was trained with --opt sgd; resume with that one (or ' \
                    'start from its weights with --pretrained-file)'
    error = fails('train', tiny_args(data_dir, tmp_path, '--opt', 'sgd', '--weight-decay', '0', *resume), capsys)
    assert error.startswith(f'train.py: error: --resume {last}: its optimizer state does not fit these optimizer '
                            'settings: ValueError: ')
    assert snapshot(tmp_path) == before


def test_readme_training_commands_run_in_the_order_shown():
    """No command of the demo and Training sections starts a fresh run in a folder an earlier one filled."""
    text = (ROOT / 'README.md').read_text().split('## Multi-node training')[0]
    train = load_script('train')
    used = {}
    for block in re.findall(r'```bash\n(.*?)```', text, re.S):
        for line in block.replace('\\\n', ' ').splitlines():
            words = shlex.split(line, comments=True)
            if 'train.py' not in words:
                continue
            argv = [str(ROOT / w) if w.startswith('configs/') else w for w in words[words.index('train.py') + 1:]]
            args = train.parse_args(train.train_parser(), argv)
            folder = os.path.join(args.output, train.run_name(args))
            assert args.resume or folder not in used, f'{line!r} starts a run in {folder}, filled by {used[folder]!r}'
            used.setdefault(folder, line)
    assert len(used) >= 3


def test_validate_refuses_to_score_random_weights(data_dir, capsys):
    argv = ['--config', str(ROOT / 'configs' / 'demo.yaml'), '--data-dir', data_dir, '--demo-per-class', '4']
    error = fails('validate', argv, capsys)
    assert error.startswith('validate.py: error: no --checkpoint: give the weights to evaluate')


@pytest.mark.parametrize('extra, message', [(['--device', 'tpu'], "--device 'tpu' is not a device"),
                                            (['--crop-pct', '0'], '--crop-pct must be positive, not 0.0'),
                                            (['--workers', '-2'], '--workers must not be negative')])
def test_validate_rejects_bad_values_before_reading_anything(tmp_path, capsys, extra, message):
    error = fails('validate', ['--model', 'resnet18', '--checkpoint', str(tmp_path / 'x.pth'), *extra], capsys)
    assert error.startswith(f'validate.py: error: {message}')


def test_missing_split_names_every_folder_it_accepts(tmp_path):
    from ddfnet.data import create_split
    (tmp_path / 'train' / 'a').mkdir(parents=True)
    with pytest.raises(UserError, match=r"no 'validation' folder in data dir .*one of val, valid, validation, eval"):
        create_split('', str(tmp_path), 'validation', is_training=False)


def test_worker_default_fits_the_cores_available():
    cores = len(os.sched_getaffinity(0))
    assert default_workers() == min(4, cores)
    validate = load_script('validate')
    assert validate.validate_parser().get_default('workers') == default_workers()
    assert load_script('train').train_parser().get_default('workers') == default_workers()


def test_resolve_device():
    assert resolve_device('cpu') == 'cpu'
    assert resolve_device('auto') == ('cuda' if torch.cuda.is_available() else 'cpu')
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match='no CUDA device is available'):
            resolve_device('cuda:0')


def test_benchmark_scripts_share_the_device_default_and_show_defaults():
    default_device = load_script('scripts/benchmarks/benchmark_common').default_device
    assert default_device() == ('cuda' if torch.cuda.is_available() else 'cpu')
    helps = {}
    for script in ('benchmark_model.py', 'benchmark_op.py'):
        proc = run_script(f'scripts/benchmarks/{script}', '--help')
        assert proc.returncode == 0, proc.stderr
        helps[script] = ' '.join(proc.stdout.split())
        assert 'default: cuda if available, else cpu' in helps[script]
    for shown in ('(default: ddf_resnet50 resnet50)', 'images per batch (default: 8)', '(default: 224)',
                  '(default: infer)', '(default: none)', '(default: 2)', '(default: 10)'):
        assert shown in helps['benchmark_model.py'], shown


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
    make_shards = load_script('scripts/make_shards')

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
