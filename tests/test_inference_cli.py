"""inference.py (and validate.py) take what timm's scripts take, and check every value before the work."""
import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from support.runner import call_main as call, load_script
from support.tiny_run import tiny_args

pytestmark = pytest.mark.usefixtures('one_thread')
MODEL = ['--model', 'ddf_resnet26', '--model-kwargs', '{layers: [1, 1, 1, 1]}', '--img-size', '32']


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Two images, a 3-class checkpoint with class names (train.py's format) and a 1000-class state_dict."""
    root = tmp_path_factory.mktemp('inference')
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / f'{i}.png')
    torch.manual_seed(0)
    model = timm.create_model('ddf_resnet26', num_classes=3, layers=[1, 1, 1, 1])
    torch.save({'model': model.state_dict(), 'class_names': ['ant', 'bee', 'cow']}, root / 'three.pth.tar')
    torch.save(timm.create_model('ddf_resnet26', layers=[1, 1, 1, 1]).state_dict(), root / 'in1k.pth')
    return root


def argv(files, checkpoint='three.pth.tar', *extra):
    return [*MODEL, '--checkpoint', str(files / checkpoint), '--device', 'cpu', '--workers', '0', *extra]


@pytest.mark.parametrize('extra, message', [
    (['--img-size', '0'], '--img-size must be at least 1, not 0'),
    (['--img-size', '-5'], '--img-size must be at least 1, not -5'),
    (['--crop-pct', '0'], '--crop-pct must be positive, not 0.0'),
    (['--crop-pct', '-1'], '--crop-pct must be positive, not -1.0'),
    (['--crop-pct', '2'], '--crop-pct must be at most 1'),
    (['--interpolation', 'foo'], "--interpolation 'foo': use one of nearest, bilinear, bicubic"),
    (['--std', '0', '1', '1'], '--std must be positive'),
    (['--topk', '4'], "--topk 4 is more than the model's 3 classes"),
])
def test_bad_values_are_one_line_before_any_image_is_read(files, extra, message, capsys):
    code, out, err = call(load_script('scripts/inference'), 'inference.py', argv(files, 'three.pth.tar', str(files), *extra), capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f'inference.py: error: {message}'), err
    assert 'skipped' not in out + ''.join(err)


def test_one_image_positional_and_topk_up_to_the_class_count(files, capsys):
    """A single image file (positional, like timm's) is predicted; the default top-5 of a 3-class model is 3."""
    code, out, err = call(load_script('scripts/inference'), 'inference.py', argv(files, 'three.pth.tar', str(files / '0.png')), capsys)
    assert code == 0, err
    assert '1 images predicted, 0 files skipped' in out
    table = out.splitlines()[0]
    assert sum(name in table for name in ('ant', 'bee', 'cow')) == 3  # the table shows the top 3 of 3


def test_a_1000_class_model_without_names_prints_imagenet_names(files, tmp_path, capsys):
    results = tmp_path / 'p.json'
    code, out, err = call(load_script('scripts/inference'), 'inference.py',
                          argv(files, 'in1k.pth', '--data-dir', str(files / '1.png'), '--results-file', str(results)),
                          capsys)
    assert code == 0, err
    import json
    record, = json.loads(results.read_text())
    names = timm.data.ImageNetInfo().label_descriptions()
    assert len(record['topk']) == 5 and all(p['class'] == names[p['index']] for p in record['topk'])


def test_validate_takes_the_data_positionally_and_checks_the_crop(files, tmp_path, capsys):
    val = tmp_path / 'data' / 'validation'
    for name in ('ant', 'bee', 'cow'):
        (val / name).mkdir(parents=True)
        Image.open(files / '0.png').save(val / name / 'x.png')
    validate = load_script('validate')
    base = [*MODEL, '--checkpoint', str(files / 'three.pth.tar'), '--device', 'cpu', '--workers', '0']
    code, out, err = call(validate, 'validate.py', [str(tmp_path / 'data'), *base], capsys)
    assert code == 0, err
    assert '(3 images, 32px' in out
    code, out, err = call(validate, 'validate.py', [str(tmp_path / 'data'), *base, '--crop-pct', '2'], capsys)
    assert code == 2 and err[0].startswith('validate.py: error: --crop-pct must be at most 1')


def test_args_yaml_stores_the_device_asked_for(data_dir, tmp_path, monkeypatch):
    """A run with --device auto records 'auto' (not the device it resolved to), so that its args.yaml works as
    --config on a machine with other devices."""
    train = load_script('train')
    monkeypatch.setattr(train, 'train_epochs', lambda run: None)  # args.yaml is written before the epochs
    argv = tiny_args(data_dir, tmp_path, per_class=2)
    argv[argv.index('--device') + 1] = 'auto'
    train.main(argv)
    assert yaml.safe_load((tmp_path / 'run' / 'args.yaml').read_text())['device'] == 'auto'
