"""The generated detection set and the COCO-format reader (ddfnet/data/detection.py): deterministic images
whose boxes are exactly the drawn shapes, torchvision's target format, and one-line errors for bad files."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ddfnet.data.detection import (CATEGORIES, CocoDetectionFolder, coco_scores, ensure_detection_demo,
                                   render_detection_scene)
from ddfnet.models import fasterrcnn_ddf_resnet50_ddfup_fpn


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    return ensure_detection_demo(str(tmp_path_factory.mktemp('det')), train=6, val=3, size=64)


def test_generated_set_is_deterministic_and_in_coco_format(root, tmp_path):
    again = ensure_detection_demo(str(tmp_path), train=6, val=3, size=64)
    for split in ('train', 'val'):
        for path in sorted(Path(root, split).rglob('*.*')):
            assert path.read_bytes() == (Path(again) / path.relative_to(root)).read_bytes()
    data = json.loads(Path(root, 'train', 'annotations.json').read_text())
    assert [c['name'] for c in data['categories']] == list(CATEGORIES) and len(data['images']) == 6
    assert all(a['area'] == a['bbox'][2] * a['bbox'][3] > 0 for a in data['annotations'])


def test_boxes_are_the_drawn_shapes_extent():
    rng = np.random.default_rng(3)
    image, boxes, labels = render_detection_scene(rng, 96)
    assert boxes and len(boxes) == len(labels) and all(1 <= label <= len(CATEGORIES) for label in labels)
    # The background varies along x only: each column's median over the rows outside every box.
    outside = np.ones(image.shape[:2], bool)
    for x0, y0, x1, y1 in (map(int, b) for b in boxes):
        outside[y0:y1, x0:x1] = False
    background = np.stack([np.median(image[outside[:, col], col], axis=0) for col in range(image.shape[1])])
    shape = np.abs(image.astype(int) - background[None].astype(int)).sum(-1) > 90
    for x0, y0, x1, y1 in (map(int, b) for b in boxes):
        inside = shape[y0:y1, x0:x1]
        # The shape touches all four sides of its box.
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        # and none of it lies on the rows and columns just outside the box.
        assert not (shape[max(y0 - 1, 0), x0:x1].any() and y0 > 0) and not shape[y1:y1 + 1, x0:x1].any()
        assert not (shape[y0:y1, max(x0 - 1, 0)].any() and x0 > 0) and not shape[y0:y1, x1:x1 + 1].any()


def test_reader_gives_torchvisions_targets_and_they_train_a_detector(root):
    dataset = CocoDetectionFolder(root, 'train')
    image, target = dataset[0]
    assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
    assert target['boxes'].shape == (len(target['labels']), 4) and target['image_id'] == 1
    assert (target['boxes'][:, 2:] > target['boxes'][:, :2]).all()
    torch.manual_seed(0)
    model = fasterrcnn_ddf_resnet50_ddfup_fpn(num_classes=len(CATEGORIES) + 1, min_size=64, max_size=64,
                                              backbone_kwargs=dict(layers=(1, 1, 1, 1))).train()
    images, targets = zip(*(dataset[i] for i in range(2)))
    losses = model(list(images), list(targets))
    assert all(torch.isfinite(v) for v in losses.values())


def _write(root, tmp_path, change):
    folder = tmp_path / 'bad'
    shutil.copytree(root, folder)
    path = folder / 'val' / 'annotations.json'
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return str(folder)


def _box_outside(data):
    data['annotations'][0]['bbox'] = [50.0, 10.0, 20.0, 5.0]  # reaches x = 70 in a 64-pixel image


@pytest.mark.parametrize('change, message', [
    (_box_outside, r'annotation 1: box \[50.0, 10.0, 20.0, 5.0\] \(x, y, width, height\) is negative or outside '
                   r'its image 00000.png of 64x64'),
    (lambda d: d['annotations'][0].update(bbox=[1, 2, -1, 5]), r'annotation 1: box \[1, 2, -1, 5\] .* is negative'),
    (lambda d: d['categories'][0].update(id=0), r'category ids must be integers >= 1 \(0 is the background\), got 0'),
    (lambda d: d['annotations'][0].update(category_id=9), r'annotation 1 has category 9, not one of \[1, 2, 3, 4, 5\]'),
    (lambda d: d['annotations'][0].update(image_id=99), 'annotation 1 names image 99, which the file does not list'),
    (lambda d: d['annotations'][0].update(bbox=[1, 2, 3]), r'annotation 1: bbox must be \[x, y, width, height\]'),
    (lambda d: d['images'][0].update(file_name='gone.png'), 'image 1 file gone.png is not in'),
    (lambda d: d.pop('categories'), 'not a COCO annotation file'),
])
def test_bad_annotation_files_are_refused_in_one_line(root, tmp_path, change, message):
    folder = _write(root, tmp_path, change)
    with pytest.raises(ValueError, match=message) as info:
        CocoDetectionFolder(folder, 'val')
    assert '\n' not in str(info.value)


def test_a_size_that_disagrees_with_the_file_is_refused(root, tmp_path):
    folder = _write(root, tmp_path, lambda d: d['images'][0].update(width=80))
    with pytest.raises(ValueError, match='00000.png is 64x64, its annotation file says 80x64'):
        CocoDetectionFolder(folder, 'val')[0]
    with pytest.raises(ValueError, match=r"has no COCO-format 'test' split: neither test/annotations.json .* nor "
                                         r'annotations/instances_test2017.json with test2017/'):
        CocoDetectionFolder(folder, 'test')


def test_coco_2017_layout_and_boxes_a_rounding_error_past_the_edge(root, tmp_path):
    coco = tmp_path / 'coco'
    shutil.copytree(Path(root, 'val', 'images'), coco / 'val2017')
    data = json.loads(Path(root, 'val', 'annotations.json').read_text())
    data['annotations'][0]['bbox'] = [60.0, -0.5, 4.5, 10.0]  # half a pixel past the top and right edges
    (coco / 'annotations').mkdir()
    (coco / 'annotations' / 'instances_val2017.json').write_text(json.dumps(data))
    dataset = CocoDetectionFolder(str(coco), 'val')
    assert dataset.annotation_file == str(coco / 'annotations' / 'instances_val2017.json')
    assert dataset[0][1]['boxes'][0].tolist() == [60.0, 0.0, 64.0, 9.5]  # clipped to the image
    # Boxes of zero height (COCO 2017 has some) or empty once clipped: left out of the targets, with a warning.
    labels = dataset[0][1]['labels']
    data['annotations'][0]['bbox'] = [10.0, 20.0, 5.0, 0.0]
    data['annotations'][1]['bbox'] = [64.2, 3.0, 0.5, 4.0]
    (coco / 'annotations' / 'instances_val2017.json').write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r'2 annotations with an empty box \(e.g. annotation 1\) are left out'):
        dataset = CocoDetectionFolder(str(coco), 'val')
    first_two = [a['image_id'] for a in data['annotations'][:2]]
    kept = sum(len(dataset[i][1]['labels']) for i in range(len(dataset)))
    assert kept == len(data['annotations']) - 2 and dataset.empty_boxes == [1, 2] and first_two[0] == 1
    assert len(dataset[0][1]['labels']) == len(labels) - first_two.count(1)


def test_horizontal_flip_mirrors_image_and_boxes(root):
    plain, flipping = CocoDetectionFolder(root, 'train'), CocoDetectionFolder(root, 'train', hflip=True)
    torch.manual_seed(0)
    flips = 0
    for _ in range(8):
        (image, target), (mirror, moved) = plain[1], flipping[1]
        if torch.equal(mirror, image):
            assert torch.equal(moved['boxes'], target['boxes'])
            continue
        flips += 1
        assert torch.equal(mirror, image.flip(-1))
        x0, y0, x1, y1 = target['boxes'].unbind(1)
        assert torch.equal(moved['boxes'], torch.stack([64 - x1, y0, 64 - x0, y1], 1))
        assert torch.equal(moved['labels'], target['labels'])
    assert 0 < flips < 8


def test_coco_scores_are_pycocotools_box_ap(root):
    dataset = CocoDetectionFolder(root, 'val')
    truth = [(int(t['image_id']), box, int(label)) for _, t in dataset for box, label in zip(t['boxes'].tolist(),
                                                                                             t['labels'].tolist())]

    def results(shift=0.0, label_offset=0):
        return [{'image_id': i, 'category_id': (label - 1 + label_offset) % len(CATEGORIES) + 1,
                 'bbox': [x0 + shift, y0, x1 - x0, y1 - y0], 'score': 0.9} for i, (x0, y0, x1, y1), label in truth]

    perfect = coco_scores(dataset.annotation_file, results())
    assert perfect['map'] == perfect['map50'] == perfect['map75'] == 100.0
    # Boxes shifted by a third of their smallest width: IoU about 0.5, below the stricter thresholds.
    shift = min(x1 - x0 for _, (x0, _, x1, _), _ in truth) / 3
    shifted = coco_scores(dataset.annotation_file, results(shift))
    assert 0 < shifted['map'] < shifted['map50'] <= 100.0 and shifted['map75'] < 100.0
    assert coco_scores(dataset.annotation_file, results(label_offset=1))['map'] == 0.0  # every label wrong
    assert coco_scores(dataset.annotation_file, [])['map'] == 0.0
