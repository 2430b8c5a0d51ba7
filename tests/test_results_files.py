"""Results files are never lost nor overwritten: validate.py, onnx_validate.py and inference.py check
``--results-file`` before the work, and replace an existing file only with ``--force``."""
import csv
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from support.runner import call_main as call, load_script

pytestmark = pytest.mark.usefixtures('one_thread')
MODEL = ['--model', 'ddf_resnet26', '--model-kwargs', '{layers: [1, 1, 1, 1]}', '--img-size', '32']


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A 2-class image folder (root/val/<class>/, 2 images each) and a 2-class checkpoint for it."""
    root = tmp_path_factory.mktemp('results')
    rng = np.random.default_rng(0)
    for name in ('cat', 'dog'):
        (root / 'data' / 'val' / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / 'data' / 'val' / name / f'{i}.png')
    torch.manual_seed(0)
    torch.save(timm.create_model('ddf_resnet26', num_classes=2, layers=[1, 1, 1, 1]).state_dict(), root / 'w.pth')
    return root


def validate_argv(files, results, *extra):
    return [*MODEL, '--checkpoint', str(files / 'w.pth'), '--data-dir', str(files / 'data'), '--split', 'val',
            '--device', 'cpu', '--workers', '0', '--results-file', str(results), *extra]


def inference_argv(files, results, *extra):
    return [*MODEL, '--checkpoint', str(files / 'w.pth'), '--data-dir', str(files / 'data'), '--device', 'cpu',
            '--workers', '0', '--results-file', str(results), *extra]


@pytest.mark.parametrize('prog', ['validate', 'inference', 'onnx_validate'])
def test_a_results_file_in_a_missing_folder_is_refused_before_the_work(prog, files, tmp_path, capsys):
    results = tmp_path / 'not' / 'made' / 'results.json'
    if prog == 'validate':
        module, argv = load_script('validate'), validate_argv(files, results)
    elif prog == 'inference':
        module, argv = load_script('scripts/inference'), inference_argv(files, results)
    else:  # the ONNX file does not exist either: the results folder is checked first
        module = load_script('scripts/onnx_validate')
        argv = [str(files / 'data'), '--onnx-input', str(tmp_path / 'm.onnx'), '--split', 'val',
                '--results-file', str(results)]
    code, out, err = call(module, f'{prog}.py', argv, capsys)
    assert code == 2 and out == ''  # nothing was scored
    assert err == [f'{prog}.py: error: cannot write {results}: the folder {results.parent} does not exist']


@pytest.mark.parametrize('prog', ['validate', 'onnx_validate'])
def test_an_existing_json_results_file_is_replaced_only_with_force(prog, files, tmp_path, capsys):
    results = tmp_path / 'results.json'
    results.write_text('{"keep": "me"}\n')
    if prog == 'validate':
        module, argv = load_script('validate'), validate_argv(files, results)
    else:
        module = load_script('scripts/onnx_validate')
        argv = [str(files / 'data'), '--onnx-input', str(tmp_path / 'm.onnx'), '--results-file', str(results)]
    code, out, err = call(module, f'{prog}.py', argv, capsys)
    assert code == 2 and out == '' and err == [f'{prog}.py: error: {results} exists: pass --force to replace it']
    assert results.read_text() == '{"keep": "me"}\n'
    if prog == 'validate':
        code, out, err = call(module, 'validate.py', argv + ['--force'], capsys)
        assert code == 0, err
        assert json.loads(results.read_text())['images'] == 4


def test_csv_results_add_rows_and_keep_every_column(files, tmp_path, capsys):
    """A CSV table grows by a row per run; a row with other columns widens the table, losing no value."""
    results = tmp_path / 'table.csv'
    with open(results, 'w', newline='') as f:
        f.write('model,note\nearlier,hand-written\n')
    module = load_script('validate')
    for _ in range(2):
        code, out, err = call(module, 'validate.py', validate_argv(files, results), capsys)
        assert code == 0, err
    with open(results, newline='') as f:
        rows = list(csv.DictReader(f))
    assert [r['model'] for r in rows] == ['earlier', 'ddf_resnet26', 'ddf_resnet26']
    assert rows[0]['note'] == 'hand-written' and rows[0]['top1'] == ''
    assert rows[1]['top1'] == rows[2]['top1'] != '' and rows[1]['note'] == ''


def test_inference_results_file_is_kept_without_force(files, tmp_path, capsys):
    results = tmp_path / 'p.csv'
    results.write_text('keep\n')
    code, out, err = call(load_script('scripts/inference'), 'inference.py', inference_argv(files, results), capsys)
    assert code == 2 and err == [f'inference.py: error: {results} exists: pass --force to replace it']
    assert results.read_text() == 'keep\n'
