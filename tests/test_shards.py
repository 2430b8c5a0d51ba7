"""WebDataset shards (``--dataset wds/NAME``): scripts/make_shards.py writes them from an ImageFolder, timm's
``wds/`` reader gives every image exactly once per epoch across ranks and workers (or train.py refuses the
layout), and the demo model trains from shards as from the folder."""
import csv
import json
import os
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ddfnet.cli import UserError, run_main
from ddfnet.data import create_split, ensure_demo_dataset
from ddfnet.data.shards import layout_error, write_shards
from support.runner import load_script
from support.tiny_run import tiny_args

pytest.importorskip('webdataset')
pytestmark = [pytest.mark.slow,  # writes WebDataset shards and trains from them
              pytest.mark.usefixtures('one_thread')]
CLASSES, PER_CLASS = ('ant', 'bee', 'cat'), 16  # 48 numbered images


@pytest.fixture(scope='module')
def numbered(tmp_path_factory):
    """An ImageFolder whose image i is a 4x4 PNG with pixel (0, 0) = (i % 256, i // 256, 0), so a sample
    read back from a shard names the file it came from; returns (root, {image number: class index})."""
    root = tmp_path_factory.mktemp('numbered')
    labels = {}
    for label, name in enumerate(CLASSES):
        os.makedirs(root / 'train' / name)
        os.makedirs(root / 'val' / name)
        for j in range(PER_CLASS):
            i = label * PER_CLASS + j
            pixels = np.zeros((4, 4, 3), np.uint8)
            pixels[0, 0] = (i % 256, i // 256, 0)
            Image.fromarray(pixels).save(root / 'train' / name / f'{j:03d}.png')
            if j < 2:
                Image.fromarray(pixels).save(root / 'val' / name / f'{j:03d}.png')
            labels[i] = label
    return root, labels


def number(image) -> int:
    pixel = np.asarray(image)[0, 0]
    return int(pixel[0]) + 256 * int(pixel[1])


def read_epoch(root, epoch, world_size, workers, batch_size, is_training=True):
    """(image number, class) of every sample each rank reads in ``epoch``, through timm's reader with
    ``workers`` DataLoader processes per rank. Ranks are simulated by setting the reader's rank and world size,
    which it otherwise takes from torch.distributed."""
    seen = []
    for rank in range(world_size):
        dataset = create_split('wds/numbered', str(root), 'train' if is_training else 'val', is_training, batch_size,
                               world_size=world_size, workers=workers)
        dataset.reader.dist_rank, dataset.reader.dist_num_replicas = rank, world_size
        dataset.transform = number
        dataset.set_loader_cfg(num_workers=workers)
        dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, drop_last=is_training)
        assert len(loader) == len(dataset) // batch_size if is_training else True
        seen.append([(int(i), int(t)) for images, targets in loader for i, t in zip(images, targets)])
    return seen


def test_each_image_once_per_epoch_across_ranks_and_workers(numbered, tmp_path):
    source, labels = numbered
    info = write_shards(str(source), str(tmp_path / 'shards'), ['train', 'val'], shard_size=6)
    assert info['splits']['train']['shard_lengths'] == [6] * 8 and info['num_classes'] == 3
    orders = []
    for epoch in (0, 1):
        ranks = read_epoch(tmp_path / 'shards', epoch, world_size=2, workers=2, batch_size=3)  # 4 readers x 2 shards
        assert [len(r) for r in ranks] == [24, 24]  # equal steps on both ranks: DDP does not hang
        everything = ranks[0] + ranks[1]
        assert sorted(everything) == sorted(labels.items())  # each image once, with its folder class index
        orders.append(everything)
    assert orders[0] != orders[1]  # set_epoch reshuffles
    val = read_epoch(tmp_path / 'shards', 0, world_size=1, workers=2, batch_size=4, is_training=False)[0]
    assert sorted(val) == sorted((i, t) for i, t in labels.items() if i % PER_CLASS < 2)


def test_layouts_that_would_repeat_images_are_refused(numbered, tmp_path):
    source, _ = numbered
    write_shards(str(source), str(tmp_path / 'shards'), ['train', 'val'], shard_size=5)  # 10 shards: 9 x 5 + 3
    # What timm would do without the check: repeat some images and skip others.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr('ddfnet.data.datasets.check_layout', lambda *args, **kwargs: None)
        ranks = read_epoch(tmp_path / 'shards', 0, world_size=2, workers=1, batch_size=4)
    counts = Counter(i for rank in ranks for i, _ in rank)
    assert max(counts.values()) > 1 or len(counts) < 48
    with pytest.raises(UserError, match=r"split 'train': 10 shards of 48 images for 2 rank\(s\) x 1 reader\(s\) = 2: "
                       'every shard must hold the same number of images'):
        create_split('wds/numbered', str(tmp_path / 'shards'), 'train', True, 4, world_size=2, workers=1)
    # one process: any layout works for evaluation; training needs whole batches
    create_split('wds/numbered', str(tmp_path / 'shards'), 'val', False, 4, world_size=1, workers=3)
    assert 'would repeat 2 of them' in layout_error([5] * 9 + [3], 1, 0, 10, True)
    assert layout_error([6] * 8, 1, 0, 8, True) is None and layout_error([6] * 8, 4, 2, 3, True) is None
    assert layout_error([6] * 8, 4, 2, 4, True) is not None  # 6 per reader is not a multiple of 4
    assert layout_error([4, 2, 2, 4], 2, 1, 1, False) is None and layout_error([4, 2, 4, 2], 2, 1, 1, False)  # in order


def test_make_shards_cli_refuses_to_overwrite_and_bad_input(numbered, tmp_path, capsys):
    source, _ = numbered
    out = tmp_path / 'out'
    script = load_script('scripts/make_shards')

    def make(*args):  # the script's main in this process (a subprocess would import timm again)
        try:
            run_main(lambda: script.main([str(a) for a in args]), 'make_shards.py')
            code = 0
        except SystemExit as e:
            code = e.code
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)

    failed = make(source, out, '--shard-size', '10', '--drop-remainder')  # 6 validation images
    assert failed.stderr == "make_shards.py: error: split 'val' has 6 images, fewer than 1 shard(s) of 10\n"
    assert not out.exists()
    done = make(source, out, '--shard-size', '10', '--drop-remainder', '--splits', 'train')
    assert done.returncode == 0, done.stderr
    assert 'train: 40 images in 4 shards (10-10 per shard, 8 left out)' in done.stdout
    info = json.loads((out / '_info.json').read_text())
    assert len(info['splits']['train']['left_out']) == 8 and info['classes'] == list(CLASSES)
    before = {p: p.read_bytes() for p in out.iterdir()}
    for args, message in [((source, out), f'{out} already exists'),
                          ((source, tmp_path / 'x', '--splits', 'test'), f'no split folder {source}/test'),
                          ((source, tmp_path / 'x', '--shard-size', '0'), '--shard-size and --shard-count-multiple must'),
                          ((source, tmp_path / 'x', '--shard-count-multiple', '2'), '--shard-count-multiple leaves'),
                          ((tmp_path / 'nowhere', tmp_path / 'x'), f'no source folder {tmp_path}/nowhere')]:
        failed = make(*args)
        lines = failed.stderr.splitlines()
        assert failed.returncode == 2 and len(lines) == 1 and lines[0].startswith(f'make_shards.py: error: {message}')
    assert {p: p.read_bytes() for p in out.iterdir()} == before and not (tmp_path / 'x').exists()
    assert make(source, out, '--shard-size', '5', '--drop-remainder', '--shard-count-multiple', '4', '--splits', 'train',
                '--force').returncode == 0
    assert json.loads((out / '_info.json').read_text())['splits']['train']['shard_lengths'] == [5] * 8  # 48 -> 40
    assert make(source, out, '--shard-size', '48', '--force').returncode == 0
    assert json.loads((out / '_info.json').read_text())['splits']['train']['shard_lengths'] == [48]
    assert sorted(os.listdir(tmp_path)) == ['out']  # no temporary folders left behind


def test_demo_trains_from_shards_like_from_the_folder(data_dir, tmp_path, capsys):
    """Same seed, one short epoch: the same number of images per epoch, top-1 within noise."""
    folder = ensure_demo_dataset(data_dir, 16)  # 128 training, 32 validation images
    write_shards(folder, str(tmp_path / 'demo-wds'), ['train', 'val'], shard_size=32)
    for split in ('train', 'val'):  # the same decoded pixels with the same labels
        contents = []
        for name, root in (('', folder), ('wds/demo', str(tmp_path / 'demo-wds'))):
            data = create_split(name, root, split, split == 'train', 16)
            contents.append(Counter((hash(np.asarray(image).tobytes()), int(label)) for image, label in data))
        assert contents[0] == contents[1] and sum(contents[0].values()) == (128 if split == 'train' else 32)
    train = load_script('train')
    common = ['--epochs', '2', '--batch-size', '16', '--demo-per-class', '16']
    top1, steps = {}, {}
    for name, extra in (('folder', []), ('shards', ['--dataset', 'wds/demo', '--data-dir', str(tmp_path / 'demo-wds'),
                                                    '--val-split', 'validation', '--workers', '2'])):
        argv = tiny_args(data_dir, tmp_path / name, *common, *extra, per_class=16)
        run_main(lambda: train.main(argv), 'train.py')
        log = capsys.readouterr().out
        steps[name] = [line.split('), ')[1] for line in log.splitlines() if 'batches of' in line]
        assert '128 training images' in log
        with open(tmp_path / name / 'run' / 'summary.csv') as f:
            top1[name] = [float(row['eval_top1']) for row in csv.DictReader(f)]
    # the class names travel with the run from shards too (_info.json), for inference.py
    names = [(tmp_path / name / 'run' / 'classes.txt').read_text() for name in ('folder', 'shards')]
    assert names[0] == names[1] and len(names[0].split()) == 8
    assert steps['folder'] == steps['shards'] == [
        '8 batches of 16 images x 1 process(es) per epoch, one optimizer step per batch']
    # 32 validation images: a binomial standard error of ~8 points per run at these accuracies
    # Two epochs of a tiny model on 32 validation images: both are near chance (12.5%) and a run's standard
    # error is ~6-8 points, so the runs differ by well under 30 points unless one path is broken.
    assert abs(top1['folder'][-1] - top1['shards'][-1]) <= 30, top1
    # validate.py reads the shards too, and scores the checkpoint as the run's own evaluation did
    results = tmp_path / 'results.json'
    validate = load_script('validate')
    run_dir = tmp_path / 'shards' / 'run'
    run_main(lambda: validate.main(['--config', str(run_dir / 'args.yaml'), '--checkpoint', str(run_dir / 'last.pth.tar'),
                                    '--results-file', str(results)]), 'validate.py')
    assert json.loads(results.read_text())['top1'] == pytest.approx(top1['shards'][-1], abs=1e-3)


def test_train_refuses_a_repeating_layout_before_writing(data_dir, tmp_path, capsys):
    folder = ensure_demo_dataset(data_dir, 8)  # 64 training images
    write_shards(folder, str(tmp_path / 'wds'), ['train', 'val'], shard_size=24)  # 24 + 24 + 16
    argv = tiny_args(data_dir, tmp_path / 'out', '--dataset', 'wds/demo', '--data-dir', str(tmp_path / 'wds'),
                     '--workers', '2')  # 3 shards for 2 readers
    train = load_script('train')
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: train.main(argv), 'train.py')
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(error) == 1, error
    assert error[0].startswith("train.py: error: split 'train': 3 shards of 64 images for 1 rank(s) x 2 reader(s)")
    assert not (tmp_path / 'out').exists()


def test_missing_info_is_one_line(tmp_path):
    with pytest.raises(UserError, match=f'no _info.json in {tmp_path}: not a shard folder'):
        create_split('wds/x', str(tmp_path), 'train', True)
    (tmp_path / '_info.json').write_text(json.dumps({'splits': {'train': {}}}))
    with pytest.raises(UserError, match=r"no split 'val' in .*_info.json \(it has: train\)"):
        create_split('wds/x', str(tmp_path), 'val', False)


def test_without_webdataset_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'webdataset', None)  # `import webdataset` now raises ImportError
    with pytest.raises(UserError, match=r"--dataset wds/x needs the webdataset package: pip install 'ddfnet\[wds\]'"):
        create_split('wds/x', str(tmp_path), 'train', True)
