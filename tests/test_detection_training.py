"""scripts/train_detection.py: the learning-rate schedule, one-line errors with nothing written, checkpoints and
resume, scoring with pycocotools, torchrun, and the demo config training a detector far above the untrained
one."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip('pycocotools')  # the detection extra
from support.runner import call_main, load_script, repo_env, script_path  # noqa: E402

from ddfnet.cli import parse_args  # noqa: E402
from ddfnet.data.detection import CocoDetectionFolder, collate_detection, ensure_detection_demo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROG = 'train_detection.py'
CONFIGS = sorted((ROOT / 'configs' / 'detection').glob('*.yaml'))


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory):
    return ensure_detection_demo(str(tmp_path_factory.mktemp('det')), train=8, val=4, size=64)


def _argv(root, output, *extra):
    return ['--data', root, '--output', str(output), '--backbone-layers', '1', '1', '1', '1', '--fpn-channels', '16',
            '--min-size', '64', '--max-size', '64', '--proposals', '50', '--test-proposals', '20',
            '--rpn-batch-size', '32', '--box-batch-size', '16', '--batch-size', '4', '--warmup-iters', '2',
            '--lr-steps', *extra]


def test_lr_warms_up_linearly_then_drops_tenfold_at_each_step():
    args = parse_args(load_script('scripts/train_detection').build_parser(),
                      ['--warmup-iters', '10', '--lr-steps', '2', '3', '--epochs', '4'])
    factor = load_script('scripts/train_detection').lr_factor
    assert factor(0, 5, args) == pytest.approx(1e-3) and factor(5, 5, args) == pytest.approx(1e-3 + 0.999 / 2)
    assert [factor(s, 5, args) for s in (9, 10, 14)] == pytest.approx([1e-3 + 0.999 * 0.9, 0.1, 0.1])
    assert [factor(s, 5, args) for s in (15, 19)] == pytest.approx([0.01, 0.01])  # epoch 3 starts at step 15


def _outside(root, tmp_path):
    import shutil
    folder = tmp_path / 'bad'
    shutil.copytree(root, folder)
    path = folder / 'val' / 'annotations.json'
    data = json.loads(path.read_text())
    data['annotations'][0]['bbox'] = [60.0, 10.0, 20.0, 5.0]
    path.write_text(json.dumps(data))
    return str(folder)


@pytest.mark.parametrize('extra, message', [
    (['5', '--epochs', '3'], r'--lr-steps must be increasing epochs between 1 and --epochs - 1 \(2\), got \[5\]'),
    (['--epochs', '0'], '--epochs must be positive, got 0'),
    (['--fpn-channels', '0'], '--fpn-channels must be positive, got 0'),
    (['--checkpoint', 'x.pth'], r'--checkpoint is for --evaluate-only'),
    (['--backbone-checkpoint', 'missing.pth'], '--backbone-checkpoint missing.pth: no such file'),
    (['--batch-size', '9'], '--batch-size 9 is larger than the 8 training images'),
    ('outside', r'.*annotations.json: annotation 1: box \[60.0, 10.0, 20.0, 5.0\] \(x, y, width, height\) is negative '
                r'or outside its image 00000.png of 64x64'),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_root, tmp_path, capsys, extra, message):
    import re
    output = tmp_path / 'run'
    root = _outside(tiny_root, tmp_path) if extra == 'outside' else tiny_root
    argv = _argv(root, output, *([] if extra == 'outside' else extra))
    code, _, err = call_main(load_script('scripts/train_detection'), PROG, argv, capsys)
    assert code == 2 and len(err) == 1 and re.match(f'{PROG}: error: {message}', err[0]), err
    assert not output.exists()


def test_scoring_without_pycocotools_is_one_line_before_anything_runs(tiny_root, tmp_path, capsys, monkeypatch):
    import importlib.util
    script = load_script('scripts/train_detection')
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'pycocotools' else find_spec(name, *a))
    code, _, err = call_main(script, PROG, _argv(tiny_root, tmp_path / 'run'), capsys)
    assert code == 2 and err == [f'{PROG}: error: scoring needs pycocotools: pip install "ddfnet[detection]"']
    assert not (tmp_path / 'run').exists()


def test_missing_or_malformed_data_folder_is_one_line(tmp_path, capsys):
    script = load_script('scripts/train_detection')
    code, _, err = call_main(script, PROG, _argv(str(tmp_path / 'nowhere'), tmp_path / 'run'), capsys)
    assert code == 2 and err == [f"{PROG}: error: --data {tmp_path / 'nowhere'}: no such folder (or pass 'detection-demo')"]
    code, _, err = call_main(script, PROG, _argv(str(tmp_path), tmp_path / 'run'), capsys)
    assert code == 2 and len(err) == 1 and "has no COCO-format 'train' split" in err[0]


def test_checkpoints_resume_and_scoring(tiny_root, tmp_path, capsys):
    script = load_script('scripts/train_detection')
    output, straight = tmp_path / 'run', tmp_path / 'straight'
    code, out, _ = call_main(script, PROG, _argv(tiny_root, output, '--epochs', '1'), capsys)
    assert code == 0 and out.startswith('untrained: box AP')
    assert {'last.pth.tar', 'best.pth.tar', 'results.json'} <= set(os.listdir(output))
    code, _, err = call_main(script, PROG, _argv(tiny_root, output, '--epochs', '2'), capsys)
    assert code == 2 and err == [f'{PROG}: error: {output} holds a run: pass --resume to continue it, or another --output']
    # A resumed run is the same run: a changed setting is refused, and so is a run with no epochs left.
    code, _, err = call_main(script, PROG, _argv(tiny_root, output, '--epochs', '2', '--resume', '--lr', '0.1'), capsys)
    assert code == 2 and err[0].startswith(f'{PROG}: error: --resume: the run in {output} has lr 0.02, not 0.1')
    code, _, err = call_main(script, PROG, _argv(tiny_root, output, '--resume', '--epochs', '1'), capsys)
    assert code == 2 and err == [f'{PROG}: error: --resume: the run in {output} has finished its 1 epochs; raise '
                                 '--epochs to continue it']
    first = torch.load(output / 'last.pth.tar', weights_only=True)
    code, out, _ = call_main(script, PROG, _argv(tiny_root, output, '--epochs', '2', '--resume'), capsys)
    assert code == 0 and out.startswith('epoch 1:') and 'epoch 0' not in out and 'untrained' not in out
    state = torch.load(output / 'last.pth.tar', weights_only=True)
    assert state['epoch'] == 1 and state['config']['fpn_channels'] == 16 and state['untrained'] == first['untrained']
    # Stopped after epoch 0 and resumed, the run ends where an uninterrupted one does, to the bit.
    assert call_main(script, PROG, _argv(tiny_root, straight, '--epochs', '2'), capsys)[0] == 0
    uninterrupted = torch.load(straight / 'last.pth.tar', weights_only=True)
    for key, value in uninterrupted['model'].items():
        assert torch.equal(state['model'][key], value), key
    buffers = [[s['momentum_buffer'] for s in run['optimizer']['state'].values()] for run in (state, uninterrupted)]
    assert len(buffers[0]) == len(buffers[1]) > 0 and all(map(torch.equal, *buffers))
    results = json.loads((output / 'results.json').read_text())
    assert results['untrained_map'] == first['untrained']['map'] and results['epochs'] == 2
    code, out, _ = call_main(script, PROG, _argv(tiny_root, tmp_path / 'unused', '--evaluate-only', '--checkpoint',
                                                 str(output / 'last.pth.tar')), capsys)
    assert code == 0 and out.strip() == (f"{output / 'last.pth.tar'}: box AP {results['map']:.2f}, "
                                         f"AP50 {results['map50']:.2f}, AP75 {results['map75']:.2f}")
    # A checkpoint of another detector: one line.
    code, _, err = call_main(script, PROG, _argv(tiny_root, tmp_path / 'unused', '--evaluate-only', '--upsample',
                                                 'nearest', '--checkpoint', str(output / 'last.pth.tar')), capsys)
    assert code == 2 and len(err) == 1 and 'does not fit model FasterRCNN: ' in err[0] and 'unexpected keys' in err[0]


def test_scoring_converts_detections_to_cocos_boxes(tiny_root):
    """A model that returns the true boxes (x0, y0, x1, y1) with full confidence scores 100 AP."""
    dataset = CocoDetectionFolder(tiny_root, 'val')

    class Oracle(torch.nn.Module):
        def forward(self, images):
            truth = [dataset[i][1] for i in range(len(dataset))]
            found = [t for image in images for t in truth if torch.equal(image, dataset[int(t['image_id']) - 1][0])]
            return [dict(boxes=t['boxes'], labels=t['labels'], scores=torch.ones(len(t['labels']))) for t in found]

    loader = torch.utils.data.DataLoader(dataset, 3, collate_fn=collate_detection)
    result = load_script('scripts/train_detection').score(Oracle(), loader, dataset.annotation_file,
                                                          torch.device('cpu'), contextlib.nullcontext)
    assert result['map'] == result['map75'] == 100.0


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_configs_resolve(path):
    script = load_script('scripts/train_detection')
    args = parse_args(script.build_parser(), ['--config', str(path)])
    script.check_args(args)
    assert args.model in script.MODELS and args.upsample == 'ddf'


@pytest.mark.slow  # the demo config with a shorter schedule: about 1.5 minutes on two idle cores
def test_demo_config_trains_far_above_the_untrained_detector(tmp_path, capsys):
    script = load_script('scripts/train_detection')
    output = tmp_path / 'run'
    argv = ['--config', str(ROOT / 'configs' / 'detection' / 'demo.yaml'), '--data-dir', str(tmp_path / 'cache'),
            '--output', str(output), '--epochs', '5', '--lr-steps', '4']
    assert call_main(script, PROG, argv, capsys)[0] == 0
    results = json.loads((output / 'results.json').read_text())
    assert results['map'] > results['untrained_map'] + 10 and results['map50'] > results['untrained_map50'] + 20, results


@pytest.mark.slow  # two torchrun worker processes
def test_torchrun_scores_like_one_process(tiny_root, tmp_path, capsys):
    # One image a batch, so both runs put every image through the same computation.
    argv = [*_argv(tiny_root, tmp_path / 'run'), '--evaluate-only', '--batch-size', '1']
    code, single, _ = call_main(load_script('scripts/train_detection'), PROG, argv, capsys)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2',
                           str(script_path('scripts/train_detection')), *argv],
                          capture_output=True, text=True, env=repo_env(OMP_NUM_THREADS='1'), timeout=300)
    assert code == 0 and proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == single.strip() and 'box AP' in single
    # Training under DDP: one epoch, 2 images a rank a step, checkpoints and results from rank 0.
    output = tmp_path / 'ddp'
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2',
                           str(script_path('scripts/train_detection')), *_argv(tiny_root, output, '--epochs', '1',
                                                                                '--batch-size', '2')],
                          capture_output=True, text=True, env=repo_env(OMP_NUM_THREADS='1'), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = torch.load(output / 'last.pth.tar', weights_only=True)
    assert state['epoch'] == 0 and state['steps_per_epoch'] == 2 and (output / 'results.json').is_file()
    assert proc.stdout.count('epoch 0: box AP') == 1  # rank 0 alone prints
    # Resumed by one process, an epoch would be twice the steps, and the lr schedule would move: refused.
    code, _, err = call_main(load_script('scripts/train_detection'), PROG,
                             _argv(tiny_root, output, '--epochs', '2', '--batch-size', '2', '--resume'), capsys)
    assert code == 2 and err == [f'{PROG}: error: --resume: the run in {output} took 2 steps an epoch, this one '
                                 'would take 4 (resume with as many processes)']
