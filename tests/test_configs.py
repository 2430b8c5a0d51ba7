"""Config files: every shipped config resolves; precedence default < config < command line; bad files
are rejected with one line naming the problem."""
import glob
import os
from pathlib import Path

import pytest
import timm

from support.runner import load_script, run_script

import ddfnet  # noqa: F401
from ddfnet.cli import UserError, parse_args
from ddfnet.training.args import train_parser

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(glob.glob(str(ROOT / 'configs' / '*.yaml')))


def test_there_are_configs():
    names = {os.path.basename(p) for p in CONFIGS}
    for name in ('ddf_resnet50_in1k', 'ddf_resnet101_in1k', 'resnet50_in1k', 'resnet101_in1k', 'demo'):
        assert f'{name}.yaml' in names
        if name != 'demo':
            assert f'{name}_b256.yaml' in names


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_resolves(path):
    args = parse_args(train_parser(), ['--config', path])
    assert timm.is_model(args.model), args.model
    assert args.batch_size >= 1 and args.lr > 0 and args.epochs >= 1


@pytest.mark.parametrize('name, global_batch, lr', [('ddf_resnet50_in1k', 1024, 0.4), ('ddf_resnet101_in1k', 1024, 0.4),
                                                    ('resnet50_in1k', 1024, 0.4), ('ddf_resnet50_in1k_b256', 256, 0.1),
                                                    ('resnet101_in1k_b256', 256, 0.1)])
def test_imagenet_recipe(name, global_batch, lr):
    """The release's recipe (docs/design.md), point by point; the global batch is 8 GPUs x the per-GPU batch."""
    args = parse_args(train_parser(), ['--config', str(ROOT / 'configs' / f'{name}.yaml')])
    assert args.batch_size * 8 == global_batch and args.lr == pytest.approx(lr)
    assert lr / global_batch == pytest.approx(0.1 / 256)  # linear scaling rule
    assert (args.epochs, args.cooldown_epochs, args.warmup_epochs) == (120, 10, 5)
    assert (args.sched, args.opt, args.momentum, args.weight_decay) == ('cosine', 'sgd', 0.9, 1e-4)
    assert (args.warmup_lr, args.min_lr, args.smoothing) == (1e-4, 1e-5, 0.1)
    assert (args.aa, args.reprob, args.remode, args.recount) == ('rand-m7-mstd0.5-inc1', 0.4, 'pixel', 3)
    assert (args.color_jitter, args.scale, args.train_interpolation) == (0.4, [0.08, 1.0], 'random')
    assert args.amp and args.dist_bn == 'reduce' and not args.model_ema
    assert (args.mixup, args.cutmix, args.drop_path, args.img_size) == (0.0, 0.0, 0.0, 224)
    text = (ROOT / 'configs' / f'{name}.yaml').read_text()
    assert f'global batch {global_batch}' in text and 'per GPU' in text


def _write(tmp_path, text):
    path = tmp_path / 'c.yaml'
    path.write_text(text)
    return str(path)


def test_precedence(tmp_path):
    config = _write(tmp_path, 'model: ddf_resnet26\nlr: 0.5\nepochs: 7\namp: true\nscale: [0.3, 1]\n')
    args = parse_args(train_parser(), ['--config', config, '--lr', '0.25', '--no-amp'])
    assert args.lr == 0.25 and args.amp is False  # command line wins
    assert args.epochs == 7 and args.scale == [0.3, 1.0]  # config beats the default
    assert args.batch_size == 128  # the default where neither says
    assert parse_args(train_parser(), ['--lr', '0.3', '-c', config]).lr == 0.3  # order does not matter


def test_yaml_numbers_and_kwargs(tmp_path):
    # PyYAML reads 1e-4 as a string; the argument's type converts it as on the command line.
    config = _write(tmp_path, 'weight_decay: 1e-4\nmodel_kwargs: {layers: [1, 1, 1, 1]}\n')
    args = parse_args(train_parser(), ['-c', config])
    assert args.weight_decay == 1e-4 and args.model_kwargs == {'layers': [1, 1, 1, 1]}
    args = parse_args(train_parser(), ['--model-kwargs', '{layers: [1, 2, 1, 1]}'])
    assert args.model_kwargs == {'layers': [1, 2, 1, 1]}


def test_optional_value_flags_take_yaml_booleans(tmp_path):
    # `torch_compile: true` is the bare flag (the default backend), false leaves it off.
    args = parse_args(train_parser(), ['-c', _write(tmp_path, 'torch_compile: true\n')])
    assert args.torch_compile == 'inductor'
    assert parse_args(train_parser(), ['-c', _write(tmp_path, 'torch_compile: false\n')]).torch_compile is None
    assert parse_args(train_parser(), ['-c', _write(tmp_path, 'torch_compile: eager\n')]).torch_compile == 'eager'


def test_class_count_of_folder_and_torchvision_datasets():
    from types import SimpleNamespace

    from ddfnet.data import class_count
    assert class_count(SimpleNamespace(reader=SimpleNamespace(class_to_idx={'a': 0, 'b': 1}))) == 2
    assert class_count(SimpleNamespace(class_to_idx={'a': 0, 'b': 1, 'c': 2})) == 3  # torch/* datasets
    assert class_count(SimpleNamespace()) is None


@pytest.mark.parametrize('text, message', [
    ('model: ddf_resnet26\nlearning_rate: 0.1\n', "unknown key 'learning_rate'"),
    ('batch-size: 4\n', "unknown key 'batch-size'"),
    ('lr: fast\n', 'invalid value for lr'),
    ('amp: 1\n', 'amp must be true or false'),
    ('dist_bn: average\n', 'dist_bn must be one of'),
    ('scale: 0.5\n', 'scale must be a list'),
    ('epochs: 2.5\n', 'epochs must be an integer'),
    ('model: [unclosed\n', 'malformed YAML'),
    ('- just\n- a list\n', 'must be a mapping'),
])
def test_bad_config(tmp_path, text, message):
    with pytest.raises(UserError, match=message.replace('[', r'\[')):
        parse_args(train_parser(), ['--config', _write(tmp_path, text)])


@pytest.mark.slow  # a subprocess
def test_bad_config_is_one_line_from_the_script(tmp_path):
    config = _write(tmp_path, 'model: ddf_resnet26\nlearning_rate: 0.1\n')
    result = run_script('train', '--config', config, '--output', tmp_path, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"train.py: error: unknown key 'learning_rate' in config {config}"]
    assert os.listdir(tmp_path) == ['c.yaml']


def test_validate_takes_the_configs_val_split_unless_the_command_line_names_one(tmp_path):
    validate = load_script('validate')
    config = tmp_path / 'run.yaml'
    config.write_text('model: ddf_resnet26\nval_split: val\n')
    accepted = {a.dest for a in train_parser()._actions}

    def split(*argv):
        return parse_args(validate.validate_parser(), ['--config', str(config), *argv], accepted=accepted).val_split
    assert split() == 'val'
    assert split('--split', 'validation') == 'validation'  # explicit, even when it is the default's value
    assert split('--split', 'test') == 'test'
