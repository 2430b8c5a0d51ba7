"""Object detection data in COCO format: a checked folder reader, and an embedded generated set.

A COCO-format folder holds, per split, an annotation file (COCO's ``images``, ``annotations`` with ``bbox``
as [x, y, width, height] in pixels, ``categories``) and the images it names: ``<split>/annotations.json``
with ``<split>/images/``, or COCO 2017's own layout. The reader checks the whole file when it opens it, so a
bad annotation (a box outside its image by more than a pixel, an unknown category or image id, a category id
below 1, a missing image file) is one ValueError naming it, before any training starts. Boxes are clipped to
their image; those left empty (COCO 2017 has a few of zero height) are left out of the targets, with a
warning.

The generated set ("detection-demo") places one to three of the classification demo's shapes, each in its
own colour, at random non-overlapping positions on a textured background; each shape's box is its drawn
extent. Like the other demo data it is a pure function of (split, index), written once, atomically.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .demo import _mask, default_cache_dir, write_once

__all__ = ['CATEGORIES', 'CocoDetectionFolder', 'coco_scores', 'coco_split_paths', 'collate_detection', 'ensure_detection_demo',
           'render_detection_scene']

VERSION = 1  # bump when the drawing changes, so stale caches are not reused
CATEGORIES = ('circle', 'square', 'triangle', 'ring', 'cross')  # COCO category ids 1..5


def render_detection_scene(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, list[list[float]], list[int]]:
    """One image: (size, size, 3) uint8, the shapes' boxes as [x0, y0, x1, y1] pixels and their category ids."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    background = rng.uniform(0, 1, 3)
    image = background + rng.uniform(-0.2, 0.2, 3) * (x[..., None] / size - 0.5)
    boxes: list[list[float]] = []
    labels: list[int] = []
    for _ in range(rng.integers(1, 4)):
        for _attempt in range(20):  # rejection sampling: shapes do not overlap, so every box is fully visible
            radius = rng.uniform(0.1, 0.2) * size
            cx, cy = rng.uniform(radius, size - radius, 2)
            turn = rng.uniform(0, 2 * np.pi)
            label = int(rng.integers(len(CATEGORIES)))
            u = ((x - cx) * np.cos(turn) + (y - cy) * np.sin(turn)) / size
            v = (-(x - cx) * np.sin(turn) + (y - cy) * np.cos(turn)) / size
            mask = _mask(CATEGORIES[label], u, v, r=radius / size, period=0.2)
            rows, cols = np.nonzero(mask)
            if rows.size < 16:
                continue
            box = [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                colour = rng.uniform(0, 1, 3)
                while np.abs(colour - background).sum() < 0.6:  # keep the shape visible
                    colour = rng.uniform(0, 1, 3)
                image[mask] = colour
                boxes.append(box)
                labels.append(label + 1)
                break
    image = image + rng.normal(0, 0.04, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), boxes, labels


def ensure_detection_demo(cache_dir: str | None = None, train: int = 256, val: int = 64, size: int = 128) -> str:
    """Path of the generated COCO-format folder (``train`` and ``val`` images of ``size`` x ``size``), written
    on first use."""
    root = os.path.join(cache_dir or default_cache_dir(), f'detection-demo-v{VERSION}-{train}x{val}-{size}px')

    def fill(partial: str) -> None:
        for split_id, (split, count) in enumerate((('train', train), ('val', val))):
            os.makedirs(os.path.join(partial, split, 'images'))
            images, annotations = [], []
            for index in range(count):
                image, boxes, labels = render_detection_scene(np.random.default_rng([VERSION, split_id, index]), size)
                name = f'{index:05d}.png'
                Image.fromarray(image).save(os.path.join(partial, split, 'images', name))
                images.append({'id': index + 1, 'file_name': name, 'width': size, 'height': size})
                for (x0, y0, x1, y1), label in zip(boxes, labels):
                    annotations.append({'id': len(annotations) + 1, 'image_id': index + 1, 'category_id': label,
                                        'bbox': [x0, y0, x1 - x0, y1 - y0], 'area': (x1 - x0) * (y1 - y0),
                                        'iscrowd': 0})
            categories = [{'id': i + 1, 'name': name} for i, name in enumerate(CATEGORIES)]
            with open(os.path.join(partial, split, 'annotations.json'), 'w') as f:
                json.dump({'images': images, 'annotations': annotations, 'categories': categories}, f)

    return write_once(root, fill)


# How far (pixels) a box may reach past its image's edge: rounding in annotation tools; such boxes are clipped.
_EDGE = 1.0


def _checked_annotations(path: str, data: Any, image_dir: str) -> tuple[list[dict], dict[Any, list], list]:
    """The images of COCO file ``path``, the boxes ([x0, y0, x1, y1] clipped to the image) and category ids
    of their non-crowd annotations by image id, and the ids of annotations left out for an empty box; one
    ValueError for the first problem."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ('images', 'annotations',
                                                                                      'categories')):
        raise ValueError(f'{path}: not a COCO annotation file (needs lists images, annotations, categories)')
    categories = {c.get('id') for c in data['categories']}
    for category in categories:  # the detectors' label 0 is the background
        if not (isinstance(category, int) and not isinstance(category, bool) and category >= 1):
            raise ValueError(f'{path}: category ids must be integers >= 1 (0 is the background), got {category!r}')
    images = {}
    for image in data['images']:
        if not {'id', 'file_name', 'width', 'height'} <= set(image):
            raise ValueError(f'{path}: image entry {image} lacks id, file_name, width or height')
        if not os.path.isfile(os.path.join(image_dir, image['file_name'])):
            raise ValueError(f"{path}: image {image['id']} file {image['file_name']} is not in {image_dir}")
        images[image['id']] = image
    by_image: dict[Any, list] = {i: [] for i in images}
    empty = []
    for ann in data['annotations']:
        name = f"{path}: annotation {ann.get('id')}"
        image = images.get(ann.get('image_id'))
        if image is None:
            raise ValueError(f"{name} names image {ann.get('image_id')}, which the file does not list")
        if ann.get('category_id') not in categories:
            raise ValueError(f"{name} has category {ann.get('category_id')}, not one of {sorted(categories)}")
        bbox = ann.get('bbox')
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(n, (int, float)) for n in bbox)):
            raise ValueError(f'{name}: bbox must be [x, y, width, height], got {bbox}')
        x, y, w, h = bbox
        width, height = image['width'], image['height']
        if w < 0 or h < 0 or x < -_EDGE or y < -_EDGE or x + w > width + _EDGE or y + h > height + _EDGE:
            raise ValueError(f"{name}: box {bbox} (x, y, width, height) is negative or outside its image "
                             f"{image['file_name']} of {width}x{height}")
        box = [max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)]
        if box[2] <= box[0] or box[3] <= box[1]:  # COCO 2017 has a few boxes of zero height
            empty.append(ann.get('id'))
        elif not ann.get('iscrowd', 0):
            by_image[image['id']].append((box, ann['category_id']))
    return list(images.values()), by_image, empty


def coco_split_paths(root: str, split: str) -> tuple[str, str]:
    """(annotation file, image folder) of ``split`` under ``root``: ``<split>/annotations.json`` and
    ``<split>/images/`` (the generated set's layout), or COCO 2017's ``annotations/instances_<split>2017.json``
    and ``<split>2017/``; a ValueError naming both when neither is there."""
    layouts = [(os.path.join(root, split, 'annotations.json'), os.path.join(root, split, 'images')),
               (os.path.join(root, 'annotations', f'instances_{split}2017.json'), os.path.join(root, f'{split}2017'))]
    for annotation_file, image_dir in layouts:
        if os.path.isfile(annotation_file) and os.path.isdir(image_dir):
            return annotation_file, image_dir
    raise ValueError(f"{root} has no COCO-format '{split}' split: neither {split}/annotations.json with {split}/images/ "
                     f"nor annotations/instances_{split}2017.json with {split}2017/")


class CocoDetectionFolder(Dataset):
    """``(image, target)`` pairs of a COCO-format split (:func:`coco_split_paths`) as torchvision's detectors take them: image a (3, H, W)
    float tensor in [0, 1]; target ``boxes`` (N, 4) [x0, y0, x1, y1], ``labels`` (N,) category ids and
    ``image_id``. Crowd annotations are left out. The annotation file is checked when the folder is opened.
    ``hflip``: mirror each image (and its boxes) left-right with probability 1/2, torchvision's detection
    training augmentation."""

    def __init__(self, root: str, split: str, hflip: bool = False):
        path, self.image_dir = coco_split_paths(root, split)
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f'{path}: not valid JSON ({e})') from None
        self.annotation_file = path
        self.hflip = hflip
        self.images, self.boxes, self.empty_boxes = _checked_annotations(path, data, self.image_dir)
        if self.empty_boxes:  # left out of the targets (torchvision's detectors refuse empty boxes), as
            # torchvision's detection reference and MMDetection do
            warnings.warn(f'{path}: {len(self.empty_boxes)} annotations with an empty box (e.g. annotation '
                          f'{self.empty_boxes[0]}) are left out of the training targets', stacklevel=2)
        self.categories = {c['id']: c.get('name', str(c['id'])) for c in data['categories']}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        info = self.images[index]
        with Image.open(os.path.join(self.image_dir, info['file_name'])) as image:
            pixels = np.asarray(image.convert('RGB'), dtype=np.float32) / 255
        if pixels.shape[:2] != (info['height'], info['width']):
            raise ValueError(f"{info['file_name']} is {pixels.shape[1]}x{pixels.shape[0]}, its annotation file says "
                             f"{info['width']}x{info['height']}")
        boxes = torch.tensor([box for box, _ in self.boxes[info['id']]], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([category for _, category in self.boxes[info['id']]], dtype=torch.int64)
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            boxes = torch.stack([info['width'] - boxes[:, 2], boxes[:, 1], info['width'] - boxes[:, 0], boxes[:, 3]], 1)
        return (image,
                {'boxes': boxes, 'labels': labels, 'image_id': torch.tensor(info['id'])})


def collate_detection(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """A DataLoader ``collate_fn`` for detection: images and targets as lists (their sizes may differ)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def coco_scores(annotation_file: str, detections: list[dict[str, Any]]) -> dict[str, float]:
    """COCO box AP (percent) of ``detections`` against ``annotation_file``, computed by pycocotools'
    ``COCOeval``: ``map`` (AP at IoU 0.5:0.95, the COCO metric), ``map50``, ``map75``, ``map_small``,
    ``map_medium``, ``map_large`` (-1 where the set has no object of that size).

    ``detections`` are COCO results: ``image_id``, ``category_id``, ``bbox`` [x, y, width, height] and
    ``score``. Every image of the file counts, detected or not; no detections at all score 0 everywhere.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError('COCO scoring needs pycocotools: pip install "ddfnet[detection]"') from None
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and the table
        truth = COCO(annotation_file)
        if not detections:  # COCO.loadRes rejects an empty list
            return dict.fromkeys(_AP_NAMES, 0.0)
        evaluation = COCOeval(truth, truth.loadRes(detections), 'bbox')
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: round(100 * float(v), 3) if v >= 0 else -1.0 for name, v in zip(_AP_NAMES, evaluation.stats)}


_AP_NAMES = ('map', 'map50', 'map75', 'map_small', 'map_medium', 'map_large')  # COCOeval.stats[:6]
