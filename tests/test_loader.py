"""Input pipeline: JPEG draft decoding keeps timm's random-resized-crop distribution (the same boxes, sizes and
interpolations from the same draws, nearly the same pixels), and scripts/benchmark_loader.py measures the
pipelines and suggests --workers."""
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile
from timm.data import create_dataset, create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation

from support.runner import ROOT, load_script, run_script


def _benchmark_loader():
    """scripts/benchmark_loader.py, which holds the JPEG draft decoding and sample JPEGs it measures."""
    return load_script('scripts/benchmark_loader')


_bench = _benchmark_loader()
DraftRandomResizedCrop, draft_scale = _bench.DraftRandomResizedCrop, _bench.draft_scale
enable_jpeg_draft, write_sample_jpegs = _bench.enable_jpeg_draft, _bench.write_sample_jpegs

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def jpegs(tmp_path_factory):
    return write_sample_jpegs(str(tmp_path_factory.mktemp('jpegs')), 16)


def test_draft_scale_keeps_the_crop_at_least_the_output_size():
    assert draft_scale(375, 500, 224, 224) == 1  # ImageNet-sized photos at 224: never reduced
    assert draft_scale(300, 400, 128, 128) == 2 and draft_scale(1000, 1100, 128, 128) == 4
    assert draft_scale(1100, 1100, 128, 128) == 8 and draft_scale(255, 1100, 128, 128) == 1


@pytest.mark.parametrize('size', [64, 224])
def test_draft_crop_draws_what_timm_draws_and_nearly_the_same_pixels(jpegs, size, monkeypatch):
    """Per image and seed, timm's crop and the draft crop draw the same box and interpolation (so the box
    and size distribution is timm's); the pixels differ by well under one grey level on average."""
    files = sorted(str(p) for p in Path(jpegs).rglob('*.jpg'))
    boxes, scales = [], []
    original_params = RandomResizedCropAndInterpolation.get_params
    monkeypatch.setattr(RandomResizedCropAndInterpolation, 'get_params',
                        staticmethod(lambda img, scale, ratio: boxes.append(original_params(img, scale, ratio))
                                     or boxes[-1]))
    original_draft = JpegImageFile.draft
    monkeypatch.setattr(JpegImageFile, 'draft', lambda self, mode, s: scales.append(self.width // s[0])
                        or original_draft(self, mode, s))
    timm_crop = RandomResizedCropAndInterpolation(size, interpolation='random')
    draft_crop = DraftRandomResizedCrop(size, interpolation='random')
    differences = []
    for repeat in range(3):
        for k, path in enumerate(files):
            random.seed(1000 * repeat + k)
            expected = np.asarray(timm_crop(Image.open(path).convert('RGB')), np.float32)
            expected_state = random.getstate()
            random.seed(1000 * repeat + k)
            got = np.asarray(draft_crop(Image.open(path)), np.float32)
            assert random.getstate() == expected_state  # the same draws, interpolation included
            assert boxes[-1] == boxes[-2] and got.shape == expected.shape == (size, size, 3)
            differences.append(np.abs(got - expected).mean())
    if size == 224:
        assert scales == [] and max(differences) == 0  # no reduction: exactly timm's pixels
    else:
        assert len(scales) > len(files) and set(scales) <= {2, 4, 8}  # most 500x375 crops decode reduced
        assert np.mean(differences) < 1.5 and max(differences) < 4, differences


def test_enable_jpeg_draft_on_a_training_folder_only(jpegs, tmp_path):
    dataset = create_dataset('', root=f'{jpegs}/train')
    with pytest.raises(ValueError, match="starts with timm's random-resized crop"):
        enable_jpeg_draft(dataset)  # no transform yet
    dataset.transform = create_transform(64, is_training=True, auto_augment='rand-m7-mstd0.5-inc1', re_prob=0.4)
    enable_jpeg_draft(dataset)
    assert isinstance(dataset.transform.transforms[0], DraftRandomResizedCrop) and dataset.input_img_mode is None
    assert dataset[0][0].shape == (3, 64, 64)
    dataset.transform = create_transform(64, is_training=False)
    with pytest.raises(ValueError):
        enable_jpeg_draft(dataset)


@pytest.mark.slow  # a subprocess
def test_benchmark_loader_measures_and_suggests_workers(tmp_path):
    out = tmp_path / 'rows.jsonl'
    proc = run_script('scripts/benchmark_loader', '--config', ROOT / 'configs' / 'ddf_resnet50_in1k.yaml',
                      '--sample-jpegs', '8', '--images', '8', '--batch-size', '4', '--workers', '1', '--repeats', '1',
                      '--model', 'resnet18', '--img-size', '64', '--model-batch', '1', '--jpeg-draft', '--json', out,
                      cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r['stage'], r['workers']) for r in rows if 'workers' in r and r['stage'] != 'suggestion'] == [
        ('decode', 1), ('train', 0), ('train_jpeg_draft', 0), ('train', 1), ('eval', 0), ('eval', 1)]
    assert all(r['images_per_sec'] > 0 for r in rows if r['stage'] != 'suggestion')
    model, suggestion = rows[-2], rows[-1]
    assert model['stage'] == 'model_train_step' and suggestion['stage'] == 'suggestion'
    per_worker = max(r['images_per_sec_per_worker'] for r in rows if r['stage'] == 'train' and r['workers'])
    assert suggestion['workers'] == -(-model['images_per_sec'] // per_worker)
    assert f'needs --workers {suggestion["workers"]}' in proc.stdout
    bad = run_script('scripts/benchmark_loader', '--workers', '0', cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith('benchmark_loader.py: error: ') and len(
        bad.stderr.splitlines()) == 1
