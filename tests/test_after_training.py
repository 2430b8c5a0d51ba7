"""After training: scripts/inference.py, scripts/avg_checkpoints.py, scripts/clean_checkpoint.py and loading
train.py's checkpoints with timm, on one tiny run (a one-block-per-stage DDF-ResNet-26, 32x32, 3 epochs of the
demo data with a periodic checkpoint every epoch)."""
import csv
import hashlib
import json
import os
import shutil

import pytest
import timm
import torch
import yaml

from ddfnet.data import DEMO_CLASSES
from support.runner import call_main as call, load_script
from support.tiny_run import tiny_args

pytestmark = [pytest.mark.slow,  # a 3-epoch training run, then the after-training scripts on it
              pytest.mark.usefixtures('one_thread')]
TINY = dict(layers=[1, 1, 1, 1])


def script(name):
    """A script of scripts/ imported as a module."""
    return load_script(f'scripts/{name}')


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def run(data_dir, tmp_path_factory):
    """The tiny run folder, with checkpoint-0/1/2.pth.tar."""
    output = tmp_path_factory.mktemp('after')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_script('train').main(tiny_args(data_dir, output, '--checkpoint-interval', '1', '--checkpoint-hist', '3'))
    finally:
        torch.set_num_threads(threads)
    return output / 'run'


def demo_root(run):
    """The demo image folder the run trained on."""
    from ddfnet.data import ensure_demo_dataset
    config = yaml.safe_load((run / 'args.yaml').read_text())
    return ensure_demo_dataset(config['data_dir'], config['demo_per_class'])


def test_run_records_its_class_names_and_args_yaml_stays_a_config(run):
    from ddfnet.cli import config_defaults
    from ddfnet.training.args import train_parser
    assert (run / 'classes.txt').read_text().splitlines() == list(DEMO_CLASSES)
    assert load(run / 'last.pth.tar')['class_names'] == list(DEMO_CLASSES)
    assert 'class_names' not in config_defaults(train_parser(), str(run / 'args.yaml'))
    assert sorted(f for f in os.listdir(run) if f.startswith('checkpoint-')) == [
        f'checkpoint-{e}.pth.tar' for e in (0, 1, 2)]


@pytest.fixture(scope='module')
def images(run, tmp_path_factory):
    """A folder with four demo images (two in a subfolder), a broken .png and a text file."""
    folder = tmp_path_factory.mktemp('images')
    val = os.path.join(demo_root(run), 'val')
    (folder / 'nested').mkdir()
    for name, target in (('circle', 'a.png'), ('stripes', 'b.png'), ('ring', 'nested/c.png'),
                         ('cross', 'nested/d.png')):
        shutil.copy(os.path.join(val, name, '00000.png'), folder / target)
    (folder / 'nested' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + os.urandom(64))
    (folder / 'notes.txt').write_text('not an image\n')
    return folder


def test_inference_on_a_folder_skips_broken_files_and_writes_csv(run, images, tmp_path, capsys):
    results = tmp_path / 'predictions.csv'
    argv = ['--config', str(run / 'args.yaml'), '--checkpoint', str(run / 'last.pth.tar'), '--data-dir', str(images),
            '--topk', '3', '--workers', '0', '--results-file', str(results)]
    code, out, err = call(script('inference'), 'inference.py', argv, capsys)
    assert code == 0, err
    assert sorted(err) == sorted([f'inference.py: skipped {images}/notes.txt: not an image file (extension)',
                                  next(line for line in err if 'broken.png' in line)])
    assert err[-1].startswith(f'inference.py: skipped {images}/nested/broken.png: cannot read the image (')
    assert '4 images predicted, 2 files skipped' in out and 'Traceback' not in out
    with open(results) as f:
        rows = list(csv.DictReader(f))
    assert [r['path'] for r in rows] == [f'{images}/{p}' for p in ('a.png', 'b.png', 'nested/c.png', 'nested/d.png')]
    for row in rows:
        probs = [float(row[f'top{n}_prob']) for n in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
        assert row['top1_class'] == DEMO_CLASSES[int(row['top1_index'])]
        assert row['top1_class'] in out  # the stdout table
    # the same images again, but nothing replaces the existing results file without --force
    before = results.read_bytes()
    code, _, err = call(script('inference'), 'inference.py', argv, capsys)
    assert code == 2 and err == [f'inference.py: error: {results} exists: pass --force to replace it']
    assert results.read_bytes() == before


def test_inference_on_a_list_of_paths_writes_json_lines(run, images, tmp_path, capsys):
    listing = images / 'list.txt'
    listing.write_text('# two images and one that is not there\na.png\nnested/c.png\n\nmissing.png\n')
    results = tmp_path / 'predictions.jsonl'
    code, out, err = call(script('inference'), 'inference.py', [
        '--model', 'ddf_resnet26', '--model-kwargs', '{layers: [1, 1, 1, 1]}', '--img-size', '32',
        '--checkpoint', str(run / 'last.pth.tar'), '--data-dir', str(listing), '--workers', '0', '--channels-last',
        '--amp', '--amp-dtype', 'bfloat16', '--results-file', str(results)], capsys)
    listing.unlink()
    assert code == 0, err
    assert len(err) == 1 and f'skipped {images}/missing.png: cannot read the image' in err[0]
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r['path'] for r in records] == [f'{images}/a.png', f'{images}/nested/c.png']
    assert all(len(r['topk']) == 5 and {p['class'] for p in r['topk']} <= set(DEMO_CLASSES) for r in records)
    assert '2 images predicted, 1 files skipped' in out


def test_inference_on_a_split_agrees_with_validate(run, tmp_path, capsys):
    """The same checkpoint, split and preprocessing: inference's top-1 hit rate is validate.py's top-1."""
    root = demo_root(run)
    validate_results = tmp_path / 'validate.json'
    code, _, err = call(load_script('validate'), 'validate.py', [
        '--config', str(run / 'args.yaml'), '--checkpoint', str(run / 'last.pth.tar'), '--workers', '0',
        '--results-file', str(validate_results)], capsys)
    assert code == 0, err
    top1 = json.loads(validate_results.read_text())['top1']
    results = tmp_path / 'split.json'
    code, out, err = call(script('inference'), 'inference.py', [
        '--config', str(run / 'args.yaml'), '--checkpoint', str(run / 'last.pth.tar'), '--data-dir', root,
        '--split', 'val', '--workers', '0', '--results-file', str(results)], capsys)
    assert code == 0, err
    records = json.loads(results.read_text())
    assert len(records) == 16 and {r['label'] for r in records} == set(DEMO_CLASSES)
    hits = sum(r['topk'][0]['class'] == r['label'] for r in records)
    assert 100 * hits / len(records) == pytest.approx(top1, abs=1e-3)
    assert f'top-1 equals the folder label for {hits} ({top1:.2f}%)' in out


def test_inference_without_class_names_prints_indices(run, images, tmp_path, capsys):
    checkpoint = load(run / 'last.pth.tar')
    del checkpoint['class_names']
    torch.save(checkpoint, tmp_path / 'nameless.pth.tar')
    argv = ['--config', str(run / 'args.yaml'), '--checkpoint', str(tmp_path / 'nameless.pth.tar'), '--topk', '2',
            '--data-dir', str(images / 'nested'), '--workers', '0']
    code, out, err = call(script('inference'), 'inference.py', [*argv, '--results-file', str(tmp_path / 'p.json')],
                          capsys)
    assert code == 0, err
    records = json.loads((tmp_path / 'p.json').read_text())
    assert len(records) == 2
    assert [p['class'] for p in records[0]['topk']] == [str(p['index']) for p in records[0]['topk']]
    # --class-map (the run's classes.txt) gives the names back
    code, out, err = call(script('inference'), 'inference.py', [
        *argv, '--class-map', str(run / 'classes.txt'), '--results-file', str(tmp_path / 'q.json')], capsys)
    assert code == 0, err
    named = json.loads((tmp_path / 'q.json').read_text())
    assert [p['class'] for p in named[0]['topk']] == [DEMO_CLASSES[p['index']] for p in records[0]['topk']]


@pytest.mark.parametrize('case, extra, message', [
    ('empty folder', ['--data-dir', '{tmp}/empty'], 'no images in {tmp}/empty'),
    ('only other files', ['--data-dir', '{tmp}/text'], 'no images in {tmp}/text (1 other files)'),
    ('missing input', ['--data-dir', '{tmp}/nowhere'], 'no file or folder {tmp}/nowhere'),
    ('no checkpoint', ['--data-dir', '{tmp}/text', '--checkpoint', ''], 'no weights: give --checkpoint'),
    ('topk too large', ['--data-dir', '{tmp}/text', '--topk', '9'], "--topk 9 is more than the model's 8 classes"),
    ('class map size', ['--data-dir', '{tmp}/text', '--class-map', '{tmp}/text/notes.txt'],
     '1 class names ({tmp}/text/notes.txt) for a model with 8 classes'),
])
def test_inference_bad_input_is_one_line(run, tmp_path, capsys, case, extra, message):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'text').mkdir()
    (tmp_path / 'text' / 'notes.txt').write_text('hello\n')
    argv = ['--config', str(run / 'args.yaml'), '--checkpoint', str(run / 'last.pth.tar'), '--workers', '0',
            *[a.format(tmp=tmp_path) for a in extra]]
    code, out, err = call(script('inference'), 'inference.py', argv, capsys)
    expected = f'inference.py: error: {message.format(tmp=tmp_path)}'
    assert code == 2 and len(err) == 1 and err[0].startswith(expected), err


def test_averaging_three_checkpoints_is_the_mean_of_their_tensors(run, tmp_path, capsys):
    output = tmp_path / 'avg.pth.tar'
    code, out, err = call(script('avg_checkpoints'), 'avg_checkpoints.py',
                          ['--input', str(run), '-n', '3', '--output', str(output)], capsys)
    assert code == 0, err
    states = [load(run / f'checkpoint-{e}.pth.tar')['model'] for e in (0, 1, 2)]
    averaged = load(output)
    assert averaged['class_names'] == list(DEMO_CLASSES) and averaged['model_name'] == 'ddf_resnet26'
    assert averaged['model'].keys() == states[0].keys()
    floats = 0
    for key, value in averaged['model'].items():
        if value.is_floating_point():
            floats += 1
            expected = torch.stack([s[key].double() for s in states]).mean(0).to(value.dtype)
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        else:  # num_batches_tracked: the newest checkpoint's
            assert torch.equal(value, states[-1][key]), key
    assert floats > 50 and any(k.endswith('running_var') for k in averaged['model'])
    assert not torch.equal(averaged['model']['fc.weight'], states[-1]['fc.weight'])
    # validate.py scores the averaged weights
    code, out, err = call(load_script('validate'), 'validate.py', [
        '--config', str(run / 'args.yaml'), '--checkpoint', str(output), '--workers', '0'], capsys)
    assert code == 0 and 'top-1' in out, err
    # listed files give the same average; the output is never replaced without --force
    code, out, err = call(script('avg_checkpoints'), 'avg_checkpoints.py', [
        '--checkpoints', *[str(run / f'checkpoint-{e}.pth.tar') for e in (0, 1, 2)], '--output', str(output)], capsys)
    assert code == 2 and err == [f'avg_checkpoints.py: error: {output} exists: pass --force to replace it']
    listed = tmp_path / 'listed.safetensors'
    code, out, err = call(script('avg_checkpoints'), 'avg_checkpoints.py', [
        '--checkpoints', *[str(run / f'checkpoint-{e}.pth.tar') for e in (0, 1, 2)], '--output', str(listed)], capsys)
    assert code == 0, err
    from safetensors.torch import load_file
    assert all(torch.equal(v, averaged['model'][k]) for k, v in load_file(str(listed)).items())


def test_averaging_the_best_by_summary_metric(run, tmp_path, capsys):
    with open(run / 'summary.csv') as f:
        losses = {int(r['epoch']): float(r['eval_loss']) for r in csv.DictReader(f)}
    best = sorted(sorted(losses, key=losses.get)[:2])
    output = tmp_path / 'best2.pth.tar'
    code, out, err = call(script('avg_checkpoints'), 'avg_checkpoints.py', [
        '--input', str(run), '-n', '2', '--best', '--metric', 'eval_loss', '--output', str(output)], capsys)
    assert code == 0, err
    assert load(output)['averaged_from'] == [str(run / f'checkpoint-{e}.pth.tar') for e in best]
    code, out, err = call(script('avg_checkpoints'), 'avg_checkpoints.py', [
        '--input', str(run), '-n', '4', '--output', str(tmp_path / 'x.pth')], capsys)
    assert code == 2 and 'holds 3 periodic checkpoints' in err[0] and not (tmp_path / 'x.pth').exists()


def test_averaging_different_models_is_refused(run, tmp_path, capsys):
    other = load(run / 'checkpoint-0.pth.tar')
    other['model'] = {k: v for k, v in other['model'].items() if not k.startswith('fc.')}
    torch.save(other, tmp_path / 'headless.pth.tar')
    code, out, err = call(script('avg_checkpoints'), 'avg_checkpoints.py', [
        '--checkpoints', str(run / 'checkpoint-1.pth.tar'), str(tmp_path / 'headless.pth.tar'),
        '--output', str(tmp_path / 'avg.pth')], capsys)
    assert code == 2 and len(err) == 1 and 'hold different tensors (e.g. fc.bias): not one model' in err[0]
    assert not (tmp_path / 'avg.pth').exists()


def _logits(model, seed=0):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def _trained(run):
    model = timm.create_model('ddf_resnet26', num_classes=8, **TINY)
    model.load_state_dict(load(run / 'last.pth.tar')['model'])
    return model


def test_clean_checkpoint_release_files_load_in_timm_and_validate_with_the_same_logits(run, tmp_path, capsys):
    code, out, err = call(script('clean_checkpoint'), 'clean_checkpoint.py', [
        '--checkpoint', str(run / 'last.pth.tar'), '--output', str(tmp_path / 'ddf_resnet26_tiny'),
        '--format', 'both'], capsys)
    assert code == 0, err
    files = sorted((p for p in tmp_path.iterdir() if p.name.startswith('ddf_resnet26_tiny-')), key=lambda p: p.suffix)
    assert [p.suffix for p in files] == ['.pth', '.safetensors']
    expected = _logits(_trained(run))
    for path in files:
        assert path.name == f'ddf_resnet26_tiny-{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}{path.suffix}'
        assert f'{path}: ' in out and 'loads strictly into ddf_resnet26' in out
        model = timm.create_model('ddf_resnet26', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY)
        assert model.num_classes == 8
        assert torch.equal(_logits(model), expected)
    released = load(files[0])
    assert released.keys() == load(run / 'last.pth.tar')['model'].keys()  # a bare state_dict, nothing else
    tops = []
    for path in (run / 'last.pth.tar', *files):
        code, out, err = call(load_script('validate'), 'validate.py', [
            '--config', str(run / 'args.yaml'), '--checkpoint', str(path), '--workers', '0'], capsys)
        assert code == 0, err
        tops.append(out.split('top-1 ')[1].split()[0])
    assert len(set(tops)) == 1
    # the same name again: refused without --force, nothing written
    before = {p: p.read_bytes() for p in files}
    code, out, err = call(script('clean_checkpoint'), 'clean_checkpoint.py', [
        '--checkpoint', str(run / 'last.pth.tar'), '--output', str(tmp_path / 'ddf_resnet26_tiny.pth')], capsys)
    assert code == 2 and err == [f'clean_checkpoint.py: error: {files[0]} exists: pass --force to replace it']
    assert {p: p.read_bytes() for p in files} == before


def test_clean_checkpoint_refuses_weights_that_do_not_fit(run, tmp_path, capsys):
    code, out, err = call(script('clean_checkpoint'), 'clean_checkpoint.py', [
        '--checkpoint', str(run / 'last.pth.tar'), '--output', str(tmp_path / 'r'), '--model-kwargs', '{}'], capsys)
    assert code == 2 and len(err) == 1 and 'does not fit model ddf_resnet26' in err[0]
    assert not list(tmp_path.iterdir())


def test_train_checkpoint_loads_from_python(run):
    """train.py's own checkpoint through timm: the classifier size comes from the file, or checkpoint_path=."""
    expected = _logits(_trained(run))
    best = str(run / 'last.pth.tar')
    model = timm.create_model('ddf_resnet26', pretrained=True, pretrained_cfg_overlay=dict(file=best), **TINY)
    assert model.num_classes == 8 and torch.equal(_logits(model), expected)
    model = timm.create_model('ddf_resnet26', num_classes=8, checkpoint_path=best, **TINY)
    assert torch.equal(_logits(model), expected)
    with pytest.warns(UserWarning, match='has a 8-class classifier and the model 5 classes: fc is re-initialised'):
        model = timm.create_model('ddf_resnet26', pretrained=True, pretrained_cfg_overlay=dict(file=best),
                                  num_classes=5, **TINY)
    assert torch.equal(model.conv1.weight, _trained(run).conv1.weight)
    with pytest.raises(ValueError, match='no weights file'):
        timm.create_model('ddf_resnet26', pretrained=True, pretrained_cfg_overlay=dict(file=best + '.x'), **TINY)


def test_ema_weights_are_averaged_and_released(run, tmp_path, capsys):
    """--use-ema in both scripts reads model_ema (here: a checkpoint whose EMA is its weights doubled)."""
    paths = []
    for epoch in (1, 2):
        checkpoint = load(run / f'checkpoint-{epoch}.pth.tar')
        checkpoint['model_ema'] = {k: v * 2 if v.is_floating_point() else v for k, v in checkpoint['model'].items()}
        paths.append(str(tmp_path / f'ema-{epoch}.pth.tar'))
        torch.save(checkpoint, paths[-1])
    code, out, err = call(script('avg_checkpoints'), 'avg_checkpoints.py', [
        '--checkpoints', *paths, '--use-ema', '--output', str(tmp_path / 'avg-ema.pth')], capsys)
    assert code == 0, err
    averaged = load(tmp_path / 'avg-ema.pth')['model']
    first, second = (load(p)['model'] for p in paths)
    torch.testing.assert_close(averaged['fc.weight'], first['fc.weight'] + second['fc.weight'])
    code, out, err = call(script('clean_checkpoint'), 'clean_checkpoint.py', [
        '--checkpoint', paths[0], '--use-ema', '--safetensors', '--no-hash', '--output', str(tmp_path / 'r26')],
        capsys)
    assert code == 0, err
    from safetensors.torch import load_file
    released = load_file(str(tmp_path / 'r26.safetensors'))
    assert torch.equal(released['fc.weight'], 2 * first['fc.weight'])


def test_dy_mobilenetv3_takes_its_class_count_from_the_file(tmp_path):
    source = timm.create_model('dy_mobilenetv3_small_100', num_classes=4).eval()
    torch.save({'model': source.state_dict(), 'model_ema': None}, tmp_path / 'dy.pth.tar')
    model = timm.create_model('dy_mobilenetv3_small_100', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'dy.pth.tar'))).eval()
    assert model.num_classes == 4
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
