"""Users' data as it comes: splits with other classes (labels matched by name), messy folders, broken and
16-bit images. Tiny generated folders, a bias-only classifier whose predictions are known in advance."""
import json
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import ddfnet  # noqa: F401
from ddfnet.data import create_split
from ddfnet.data.demo import CLASSES, render
from ddfnet.data.images import open_rgb, report_unreadable
from ddfnet.data.labels import match_labels
from ddfnet.cli import UserError
from support.runner import load_script
from support.tiny_run import tiny_args

MODEL_KWARGS = '{layers: [1, 1, 1, 1]}'


def write_split(root, split, counts, size=16, extension='.png'):
    """``root/split/<class>/<i>.png`` with ``counts[class]`` demo images of each class."""
    for name, count in counts.items():
        folder = os.path.join(root, split, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(count):
            image = render(CLASSES.index(name) if name in CLASSES else 0, np.random.default_rng([i, len(name)]), size)
            Image.fromarray(image).save(os.path.join(folder, f'{i}{extension}'))


def always_predicts(path, class_names, predicted):
    """A checkpoint of train.py's format whose model always answers ``predicted`` (zero classifier weight,
    one large bias), naming ``class_names``."""
    model = timm.create_model('ddf_resnet26', num_classes=len(class_names), layers=[1, 1, 1, 1])
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.bias[class_names.index(predicted)] = 10.0
    torch.save({'model': model.state_dict(), 'class_names': list(class_names)}, path)
    return path


def validate(capsys, checkpoint, data_dir, *extra):
    args = ['--model', 'ddf_resnet26', '--model-kwargs', MODEL_KWARGS, '--checkpoint', str(checkpoint),
            '--data-dir', str(data_dir), '--split', 'val', '--img-size', '32', '--workers', '0', '--device', 'cpu',
            '--results-file', str(data_dir / 'results.json'), *extra]
    load_script('validate').main(args)
    err = capsys.readouterr().err
    return json.loads((data_dir / 'results.json').read_text()), err


MODEL_CLASSES = ['circle', 'cross', 'dots', 'ring']


@pytest.fixture
def lacking_val(tmp_path):
    """A val split without 'circle': its own sorted labels shift every other class down by one."""
    write_split(tmp_path, 'val', {'cross': 3, 'dots': 1, 'ring': 2})
    return tmp_path


def test_validate_matches_labels_by_name(tmp_path, lacking_val, capsys):
    checkpoint = always_predicts(tmp_path / 'ck.pth', MODEL_CLASSES, 'cross')
    results, err = validate(capsys, checkpoint, lacking_val)
    # the 3 'cross' of 6 images, not the 1 'dots' (index 1 of the val folder's own order)
    assert results['top1'] == pytest.approx(50.0)
    assert results['images'] == 6
    assert err.count('circle') == 1 and 'scored on the 3' in err


def test_validate_unknown_class_is_one_line(tmp_path, lacking_val, capsys):
    write_split(lacking_val, 'val', {'square': 1})
    checkpoint = always_predicts(tmp_path / 'ck.pth', MODEL_CLASSES, 'cross')
    with pytest.raises(UserError, match=r"class\(es\) the model was not trained on: square"):
        validate(capsys, checkpoint, lacking_val)
    assert not (lacking_val / 'results.json').exists()


def test_validate_without_class_names_keeps_folder_order(tmp_path, lacking_val, capsys):
    model = timm.create_model('ddf_resnet26', num_classes=4, layers=[1, 1, 1, 1])
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.bias[1] = 10.0
    torch.save(model.state_dict(), tmp_path / 'bare.pth')  # a released state_dict: no names
    results, err = validate(capsys, tmp_path / 'bare.pth', lacking_val)
    assert results['top1'] == pytest.approx(100 / 6, abs=1e-3)  # index 1 of the val folder is 'dots': 1 of 6
    assert err.count('no class names') == 1


def test_train_refuses_a_val_class_it_does_not_train(tmp_path):
    write_split(tmp_path / 'data', 'train', {'circle': 2, 'cross': 2})
    write_split(tmp_path / 'data', 'val', {'circle': 1, 'square': 1})
    args = tiny_args(str(tmp_path / 'data'), tmp_path / 'out', '--dataset', '', epochs=1)
    with pytest.raises(UserError, match="val split 'validation' holds 1 class.*square"):
        load_script('train').main(args)
    assert not (tmp_path / 'out' / 'run').exists()  # refused before anything was written


def test_train_scores_a_val_split_lacking_a_class_by_name(tmp_path):
    """A frozen (lr 0) bias-only model: train.py's val top-1 is the share of the predicted class by name."""
    data = tmp_path / 'data'
    write_split(data, 'train', {name: 2 for name in MODEL_CLASSES})
    write_split(data, 'val', {'cross': 3, 'dots': 1, 'ring': 2})
    weights = always_predicts(tmp_path / 'w.pth', MODEL_CLASSES, 'cross')
    args = tiny_args(str(data), tmp_path / 'out', '--dataset', '', '--pretrained-file', str(weights), '--lr', '0',
                     '--warmup-epochs', '0', '--min-lr', '0', '--warmup-lr', '0', epochs=1)
    load_script('train').main(args)
    summary = (tmp_path / 'out' / 'run' / 'summary.csv').read_text().splitlines()
    row = dict(zip(summary[0].split(','), summary[1].split(',')))
    assert float(row['eval_top1']) == pytest.approx(50.0)
    log = (tmp_path / 'out' / 'run' / 'log.txt').read_text()
    assert log.count('no images of 1 of the model\'s 4 classes (circle)') == 1


def test_match_labels_remaps_targets(tmp_path, lacking_val):
    dataset = create_split('', str(lacking_val), 'val', is_training=False)
    note = match_labels(dataset, MODEL_CLASSES, 'val')
    assert 'circle' in note
    targets = [dataset[i][1] for i in range(len(dataset))]
    assert targets == [1, 1, 1, 2, 3, 3]


# Messy folders


def test_nested_class_folders_are_an_error(tmp_path):
    write_split(tmp_path, 'train', {'circle/batch1': 2, 'cross/batch1': 2})
    with pytest.raises(UserError, match=r'every class folder holds only sub-folders.*circle/.*batch1/'):
        create_split('', str(tmp_path), 'train', is_training=True)


def test_partly_nested_folder_is_an_error(tmp_path):
    write_split(tmp_path, 'train', {'circle': 2, 'cross': 1, 'cross/extra': 1})
    with pytest.raises(UserError, match=r'1 image\(s\) in sub-folders of class folders \(e.g. cross/extra/0.png\)'):
        create_split('', str(tmp_path), 'train', is_training=True)


def test_one_class_training_split_is_an_error(tmp_path):
    write_split(tmp_path, 'train', {'circle': 3})
    with pytest.raises(UserError, match=r'at least 2 classes, found 1 \(circle\)'):
        create_split('', str(tmp_path), 'train', is_training=True)
    assert len(create_split('', str(tmp_path), 'train', is_training=False)) == 3  # a val split may hold one


def test_other_formats_are_read_and_the_rest_counted(tmp_path):
    write_split(tmp_path, 'train', {'circle': 1, 'cross': 1})
    write_split(tmp_path, 'train', {'circle': 1}, extension='.bmp')
    write_split(tmp_path, 'train', {'cross': 1}, extension='.tif')
    write_split(tmp_path, 'train', {'cross': 1}, extension='.webp')
    write_split(tmp_path, 'train', {'cross': 1}, extension='.gif')
    for name in ('a.txt', 'b.txt', 'c.heic'):
        (tmp_path / 'train' / 'circle' / name).write_text('x')
    dataset = create_split('', str(tmp_path), 'train', is_training=True)
    assert len(dataset) == 6
    assert all(dataset[i][0].size == (16, 16) for i in range(6))
    assert dataset.notes == [f'{tmp_path}/train: ignored 3 file(s) that are not images it reads (2 .txt, 1 .heic; '
                             'it reads .jpg .jpeg .png .bmp .tif .tiff .webp .gif)']


def test_sixteen_bit_png_by_its_range(tmp_path):
    path = tmp_path / 'grey16.png'
    Image.fromarray(np.full((8, 8), 126 * 257, dtype=np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith('I')
        assert np.asarray(image.convert('RGB')).mean() > 250  # what Pillow alone gives
    assert np.asarray(open_rgb(path)).mean() == pytest.approx(126, abs=0.5)
    # training and validation read folders the same way
    for name in ('circle', 'cross'):
        os.makedirs(tmp_path / 'train' / name)
        Image.fromarray(np.full((8, 8), 126 * 257, dtype=np.uint16)).save(tmp_path / 'train' / name / 'g.png')
    for is_training in (True, False):
        image, _ = create_split('', str(tmp_path), 'train', is_training=is_training)[0]
        assert image.mode == 'RGB' and np.asarray(image).mean() == pytest.approx(126, abs=0.5)


def broken_split(root):
    write_split(root, 'val', {'circle': 2, 'cross': 2})
    (root / 'val' / 'circle' / 'empty.png').write_bytes(b'')
    good = (root / 'val' / 'cross' / '0.png').read_bytes()
    (root / 'val' / 'cross' / 'truncated.png').write_bytes(good[:len(good) // 2])


def test_unreadable_files_named_once_and_left_out_of_the_score(tmp_path, capsys):
    broken_split(tmp_path)
    checkpoint = always_predicts(tmp_path / 'ck.pth', ['circle', 'cross'], 'cross')
    results, err = validate(capsys, checkpoint, tmp_path)
    assert results['images'] == 4 and results['top1'] == pytest.approx(50.0)  # not the broken two
    named = [line for line in err.splitlines() if line.startswith('validate.py: unreadable image')]
    assert len(named) == 2 and 'empty.png' in named[0] and 'truncated.png: OSError' in named[1]
    assert '2 unreadable image file(s) left out of the score' in err


def test_training_skips_unreadable_files_and_reports_them(tmp_path):
    broken_split(tmp_path)
    dataset = create_split('', str(tmp_path), 'val', is_training=True)
    lines = []
    for _ in range(2):  # two epochs: named once, counted each time
        [dataset[i] for i in range(len(dataset))]
        assert report_unreadable(dataset, lines.append, 'epoch') == 2
    named = [line for line in lines if line.startswith('unreadable image')]
    assert len(named) == 2 and lines.count('epoch: 2 unreadable image file(s) skipped') == 2


def test_inference_split_matches_by_name(tmp_path, lacking_val, capsys):
    write_split(lacking_val, 'val', {'square': 1})
    checkpoint = always_predicts(tmp_path / 'ck.pth', MODEL_CLASSES, 'cross')
    script = load_script('scripts/inference')
    args = ['--model', 'ddf_resnet26', '--model-kwargs', MODEL_KWARGS, '--checkpoint', str(checkpoint),
            '--data-dir', str(lacking_val), '--split', 'val', '--img-size', '32', '--workers', '0', '--device', 'cpu',
            '--topk', '2']
    with pytest.raises(UserError, match='not trained on: square'):
        script.main(args)


# Shards


def make_shards(capsys, *args):
    script = load_script('scripts/make_shards')
    from ddfnet.cli import run_main
    try:
        run_main(lambda: script.main([str(a) for a in args]), 'make_shards.py')
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def shard_members(out, split='val'):
    import tarfile
    members = {}
    for name in json.loads((out / '_info.json').read_text())['splits'][split]['filenames']:
        with tarfile.open(out / name) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return members


def test_make_shards_refuses_broken_images_by_name(tmp_path, capsys):
    broken_split(tmp_path / 'src')
    code, out = make_shards(capsys, tmp_path / 'src', tmp_path / 'out', '--splits', 'val', '--shard-size', '2')
    assert code == 2 and not (tmp_path / 'out').exists()
    lines = out.err.splitlines()
    assert lines[0].startswith('make_shards.py: broken image') and 'empty.png' in lines[0]
    assert 'truncated.png' in lines[1]
    assert lines[2].startswith('make_shards.py: error: 2 image file(s) do not decode') and '--skip-broken' in lines[2]


def test_make_shards_skips_broken_images_and_lists_them(tmp_path, capsys):
    broken_split(tmp_path / 'src')
    code, out = make_shards(capsys, tmp_path / 'src', tmp_path / 'out', '--splits', 'val', '--shard-size', '2',
                            '--skip-broken')
    assert code == 0, out.err
    split = json.loads((tmp_path / 'out' / '_info.json').read_text())['splits']['val']
    assert split['num_samples'] == 4
    assert [entry['file'] for entry in split['broken']] == ['circle/empty.png', 'cross/truncated.png']
    assert 'val: 4 images in 2 shards (2-2 per shard, 2 broken left out)' in out.out


def test_make_shards_stores_sixteen_bit_and_bmp_as_8_bit_png(tmp_path, capsys):
    write_split(tmp_path / 'src', 'val', {'circle': 1})
    write_split(tmp_path / 'src', 'val', {'cross': 1}, extension='.bmp')
    Image.fromarray(np.full((8, 8), 126 * 257, dtype=np.uint16)).save(tmp_path / 'src' / 'val' / 'cross' / 'grey.png')
    code, out = make_shards(capsys, tmp_path / 'src', tmp_path / 'out', '--splits', 'val', '--shard-size', '3')
    assert code == 0, out.err
    members = shard_members(tmp_path / 'out')
    images = {json.loads(members[k.replace('.png', '.json')])['filename']: members[k]
              for k in members if k.endswith('.png')}
    assert sorted(images) == ['circle/0.png', 'cross/0.bmp', 'cross/grey.png']
    assert images['circle/0.png'] == (tmp_path / 'src' / 'val' / 'circle' / '0.png').read_bytes()  # not re-encoded
    import io
    grey = Image.open(io.BytesIO(images['cross/grey.png']))
    assert np.asarray(grey.convert('RGB')).mean() == pytest.approx(126, abs=0.5)


def test_validate_matches_shard_labels_by_name(tmp_path, capsys):
    pytest.importorskip('webdataset')
    write_split(tmp_path / 'src', 'val', {'cross': 3, 'dots': 1, 'ring': 2})
    code, out = make_shards(capsys, tmp_path / 'src', tmp_path / 'wds', '--splits', 'val', '--shard-size', '6')
    assert code == 0, out.err
    checkpoint = always_predicts(tmp_path / 'ck.pth', MODEL_CLASSES, 'cross')
    results, err = validate(capsys, checkpoint, tmp_path / 'wds', '--dataset', 'wds/wds')
    assert results['top1'] == pytest.approx(50.0) and 'circle' in err


def test_train_names_unreadable_files_once_and_counts_them_each_epoch(tmp_path):
    data = tmp_path / 'data'
    write_split(data, 'train', {'circle': 4, 'cross': 4})
    write_split(data, 'val', {'circle': 2, 'cross': 2})
    (data / 'train' / 'cross' / 'empty.png').write_bytes(b'')
    (data / 'train' / 'circle' / 'notes.txt').write_text('not an image')
    # a data loader worker process finds the broken file: the log still names it
    args = tiny_args(str(data), tmp_path / 'out', '--dataset', '', '--workers', '1', '--batch-size', '3', epochs=2)
    load_script('train').main(args)
    log = (tmp_path / 'out' / 'run' / 'log.txt').read_text()
    assert log.count(f'unreadable image {data}/train/cross/empty.png') == 1
    assert log.count('training: 1 unreadable image file(s) skipped') == 2  # epochs 0 and 1
    assert log.count('ignored 1 file(s) that are not images it reads (1 .txt;') == 1


def bias_only_onnx(path, class_names, predicted, store_names):
    """An ONNX classifier (32x32 input) that always answers ``predicted``; ``store_names``: the class names
    in its metadata, as onnx_export.py writes them from a checkpoint that has them."""
    onnx = pytest.importorskip('onnx')
    pytest.importorskip('onnxruntime')

    class BiasOnly(torch.nn.Module):
        def forward(self, x):
            bias = torch.zeros(len(class_names))
            bias[class_names.index(predicted)] = 10.0
            return x.mean(dim=(1, 2, 3))[:, None] * 0 + bias

    torch.onnx.export(BiasOnly(), torch.zeros(2, 3, 32, 32), str(path), dynamo=False, input_names=['x'],
                      dynamic_axes={'x': {0: 'batch'}})
    proto = onnx.load(str(path))
    metadata = {'ddfnet.data_config': json.dumps({'input_size': [3, 32, 32], 'crop_pct': 1.0})}
    if store_names:
        metadata['ddfnet.class_names'] = json.dumps(class_names)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    return path


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # the legacy exporter, for a one-node model
@pytest.mark.parametrize('store_names', [True, False])
def test_onnx_validate_matches_labels_by_name(tmp_path, lacking_val, capsys, store_names):
    model = bias_only_onnx(tmp_path / 'm.onnx', MODEL_CLASSES, 'cross', store_names)
    (tmp_path / 'classes.txt').write_text(''.join(f'{name}\n' for name in MODEL_CLASSES))
    script = load_script('scripts/onnx_validate')
    args = [str(lacking_val), '--onnx-input', str(model), '--split', 'val', '--workers', '0',
            '--results-file', str(tmp_path / 'r.json')]
    script.main(args if store_names else [*args, '--class-map', str(tmp_path / 'classes.txt')])
    assert json.loads((tmp_path / 'r.json').read_text())['top1'] == pytest.approx(50.0)
    assert capsys.readouterr().err.count('circle') == 1
    if not store_names:  # neither stored nor given: the folder's own order, said once
        script.main([*args[:-1], str(tmp_path / 'r2.json')])
        assert json.loads((tmp_path / 'r2.json').read_text())['top1'] == pytest.approx(100 / 6, abs=1e-3)
        assert capsys.readouterr().err.count('no class names') == 1


def test_resume_refuses_a_training_class_the_checkpoint_does_not_know(tmp_path):
    data = tmp_path / 'data'
    write_split(data, 'train', {'circle': 4, 'cross': 4})
    write_split(data, 'val', {'circle': 1, 'cross': 1})
    args = tiny_args(str(data), tmp_path / 'out', '--dataset', '', epochs=1)
    load_script('train').main(args)
    write_split(data, 'train', {'dots': 4})  # a class added between the launches: it has no output
    before = (tmp_path / 'out' / 'run' / 'last.pth.tar').read_bytes()
    with pytest.raises(UserError, match="training split 'train' holds 1 class.*not trained on: dots"):
        load_script('train').main([*args, '--epochs', '2', '--resume', 'auto'])
    assert (tmp_path / 'out' / 'run' / 'last.pth.tar').read_bytes() == before


def test_onnx_export_stores_the_checkpoint_class_names(tmp_path, monkeypatch, capsys):
    """What onnx_validate.py matches labels with (the export itself is tested in test_onnx.py)."""
    checkpoint = always_predicts(tmp_path / 'ck.pth', MODEL_CLASSES, 'cross')
    script = load_script('scripts/onnx_export')
    written = {}

    def export_onnx(model, example, output, metadata, **kwargs):
        written.update(metadata)
        open(output, 'wb').close()

    monkeypatch.setattr(script.ddfnet, 'export_onnx', export_onnx)
    script.main(['--model', 'ddf_resnet26', '--model-kwargs', MODEL_KWARGS, '--checkpoint', str(checkpoint),
                 '--img-size', '32', str(tmp_path / 'm.onnx')])
    assert json.loads(written['ddfnet.class_names']) == MODEL_CLASSES
    from ddfnet.export.metadata import read_class_names  # what onnx_validate.py reads them with
    assert read_class_names(written) == MODEL_CLASSES
