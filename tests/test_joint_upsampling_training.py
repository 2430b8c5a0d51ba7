"""The generated RGB-D set (ddfnet/data/rgbd.py) and scripts/train_joint_upsampling.py: deterministic scenes
whose depth edges are image edges, one-line errors with nothing written, checkpoints and resume, and the
demo config's training beating bilinear upsampling."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support.runner import call_main, load_script

from ddfnet.cli import parse_args
from ddfnet.data.rgbd import RGBDFolder, center_sample, ensure_rgbd_demo, render_scene

ROOT = Path(__file__).resolve().parents[1]
PROG = 'train_joint_upsampling.py'
CONFIGS = sorted((ROOT / 'configs' / 'joint_upsampling').glob('*.yaml'))


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory):
    return ensure_rgbd_demo(str(tmp_path_factory.mktemp('rgbd')), train=8, val=4, size=32)


def test_generated_set_is_deterministic_16_bit_and_its_depth_edges_are_image_edges(tiny_root, tmp_path):
    again = ensure_rgbd_demo(str(tmp_path), train=8, val=4, size=32)
    for split, kind in (('train', 'rgb'), ('val', 'depth')):
        for name in sorted(os.listdir(os.path.join(tiny_root, split, kind))):
            assert Path(tiny_root, split, kind, name).read_bytes() == Path(again, split, kind, name).read_bytes()
    with Image.open(os.path.join(tiny_root, 'train', 'depth', '00000.png')) as depth:
        assert depth.mode.startswith('I;16') or depth.mode == 'I'
    rgb, depth = render_scene(np.random.default_rng(0), 64)
    assert 0.5 <= depth.min() and depth.max() <= 5.0
    depth_edges = np.abs(np.diff(depth, axis=1)) > 0.1
    image_edges = np.abs(np.diff(rgb.astype(float), axis=1)).sum(-1) > 90  # well above the pixel noise
    assert depth_edges.any() and (image_edges[depth_edges]).mean() > 0.9  # depth edges follow image edges
    assert (image_edges & ~depth_edges).sum() > depth_edges.sum() / 2  # and the image has edges of its own


def test_folder_pairs_crop_to_the_factor_and_refuse_unpaired_files(tiny_root, tmp_path):
    rgb, depth = RGBDFolder(tiny_root, 'val', multiple=3)[0]
    assert rgb.shape == (3, 30, 30) and depth.shape == (1, 30, 30) and rgb.max() <= 1
    assert center_sample(depth, 3).shape == (1, 10, 10)
    folder = tmp_path / 'pairs' / 'train'
    (folder / 'rgb').mkdir(parents=True)
    (folder / 'depth').mkdir()
    Image.new('RGB', (8, 8)).save(folder / 'rgb' / 'a.png')
    with pytest.raises(ValueError, match=r'1 images without their pair \(e.g. a.png\)'):
        RGBDFolder(str(tmp_path / 'pairs'), 'train')
    Image.fromarray(np.zeros((6, 8), np.uint16)).save(folder / 'depth' / 'a.png')
    with pytest.raises(ValueError, match=r'a.png: depth \(6, 8\) and rgb \(8, 8\) must be one-channel and of one size'):
        RGBDFolder(str(tmp_path / 'pairs'), 'train')[0]
    with pytest.raises(ValueError, match='needs rgb/ and depth/ folders'):
        RGBDFolder(str(tmp_path), 'val')


def _argv(root, output, *extra):
    return ['--data', root, '--output', str(output), '--features', '8', '--kernel-size', '3', '--border', '2',
            '--batch-size', '4', '--residual', *extra]


@pytest.mark.parametrize('extra, message', [
    (['--crop-size', '30'], '--crop-size 30 must be a multiple of --scale-factor 4'),
    (['--epochs', '0'], '--epochs must be positive, got 0'),
    (['--checkpoint', 'x.pth'], '--checkpoint is for --evaluate-only'),
    (['--batch-size', '9'], '--batch-size 9 is larger than the 8 training pairs'),
    (['--kernel-size', '4'], '--features / --kernel-size: kernel_size must be an odd int >= 3, got 4'),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_root, tmp_path, capsys, extra, message):
    output = tmp_path / 'run'
    code, _, err = call_main(load_script('scripts/train_joint_upsampling'), PROG, _argv(tiny_root, output, *extra), capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f'{PROG}: error: {message}'), err
    assert not output.exists()


def test_missing_data_folder_is_one_line(tmp_path, capsys):
    code, _, err = call_main(load_script('scripts/train_joint_upsampling'), PROG,
                             _argv(str(tmp_path / 'nowhere'), tmp_path / 'run'), capsys)
    assert code == 2 and err == [f"{PROG}: error: --data {tmp_path / 'nowhere'}: no such folder (or pass 'rgbd-demo')"]


def test_checkpoints_resume_and_scoring(tiny_root, tmp_path, capsys):
    script = load_script('scripts/train_joint_upsampling')
    output = tmp_path / 'run'
    assert call_main(script, PROG, _argv(tiny_root, output, '--epochs', '1'), capsys)[0] == 0
    assert {'last.pth.tar', 'best.pth.tar', 'results.json'} <= set(os.listdir(output))
    # The same run folder again without --resume would overwrite it: refused.
    code, _, err = call_main(script, PROG, _argv(tiny_root, output, '--epochs', '2'), capsys)
    assert code == 2 and err == [f'{PROG}: error: {output} holds a run: pass --resume to continue it, or another --output']
    code, out, _ = call_main(script, PROG, _argv(tiny_root, output, '--epochs', '2', '--resume'), capsys)
    assert code == 0 and out.startswith('epoch 1:') and 'epoch 0' not in out  # continues after epoch 0
    state = torch.load(output / 'last.pth.tar', weights_only=True)
    assert state['epoch'] == 1 and state['config']['features'] == 8
    results = json.loads((output / 'results.json').read_text())
    code, out, _ = call_main(script, PROG, _argv(tiny_root, tmp_path / 'unused', '--evaluate-only', '--checkpoint',
                                                 str(output / 'last.pth.tar')), capsys)
    assert code == 0 and out.strip() == (f"x4: RMSE (x1e-2) {results['rmse']:.3f}, "
                                         f"bilinear {results['bilinear_rmse']:.3f}")


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_configs_resolve(path):
    args = parse_args(load_script('scripts/train_joint_upsampling').build_parser(), ['--config', str(path)])
    assert args.scale_factor in (4, 8, 16) and args.epochs >= 1 and args.lr > 0


@pytest.mark.slow  # the demo config as the README runs it: about 2.5 minutes on two idle cores
def test_demo_config_beats_bilinear_clearly(tmp_path, capsys):
    # Not shortened: the RMSE stays near bilinear's for about 300 steps before it drops, whatever the lr.
    script = load_script('scripts/train_joint_upsampling')
    output = tmp_path / 'run'
    argv = ['--config', str(ROOT / 'configs' / 'joint_upsampling' / 'demo.yaml'), '--data-dir', str(tmp_path / 'cache'),
            '--output', str(output)]
    assert call_main(script, PROG, argv, capsys)[0] == 0
    results = json.loads((output / 'results.json').read_text())
    assert results['rmse'] < 0.8 * results['bilinear_rmse'], results


@pytest.mark.slow  # two torchrun worker processes
def test_torchrun_scores_like_one_process(tiny_root, tmp_path, capsys):
    import subprocess
    import sys

    from support.runner import repo_env, script_path
    argv = [*_argv(tiny_root, tmp_path / 'run'), '--evaluate-only']
    code, single, _ = call_main(load_script('scripts/train_joint_upsampling'), PROG, argv, capsys)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2',
                           str(script_path('scripts/train_joint_upsampling')), *argv],
                          capture_output=True, text=True, env=repo_env(OMP_NUM_THREADS='1'), timeout=300)
    assert code == 0 and proc.returncode == 0, proc.stderr[-2000:]
    # The 4 validation pairs split 2 + 2 over the ranks; the same model on every rank, sums all-reduced.
    assert proc.stdout.strip() == single.strip()
