"""The embedded demo dataset: eight classes of procedurally drawn shapes and textures.

Every image is a pure function of (split, class, index), so the dataset is identical on every machine.
It is written once as an ImageFolder (``train/<class>/*.png``, ``val/<class>/*.png``) to a cache folder
and reused; the folder appears atomically (built under a temporary name, then renamed), so a killed or
concurrent first use never leaves a half-written dataset behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

import numpy as np
from PIL import Image

CLASSES = ('checker', 'circle', 'cross', 'dots', 'ring', 'square', 'stripes', 'triangle')
IMAGE_SIZE = 64
VERSION = 1  # bump when the drawing changes, so stale caches are not reused


def default_cache_dir() -> str:
    """``$DDFNET_CACHE``, else ``~/.cache/ddfnet``."""
    return os.environ.get('DDFNET_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'ddfnet')


def _mask(name: str, u: np.ndarray, v: np.ndarray, r: float, period: float) -> np.ndarray:
    """Foreground mask of class ``name`` in rotated, centred coordinates ``(u, v)`` (image units)."""
    dist = np.hypot(u, v)
    if name == 'circle':
        return dist < r
    if name == 'ring':
        return (dist < r) & (dist > 0.55 * r)
    if name == 'square':
        return np.maximum(abs(u), abs(v)) < 0.8 * r
    if name == 'triangle':  # apex up, base at v = r/2
        return (v > -r) & (v < 0.5 * r) & (abs(u) < (v + r) * 0.58)
    if name == 'cross':
        return ((abs(u) < 0.25 * r) & (abs(v) < r)) | ((abs(v) < 0.25 * r) & (abs(u) < r))
    # textures cover the whole image
    if name == 'stripes':
        return np.sin(2 * np.pi * u / period) > 0
    if name == 'checker':
        return np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period) > 0
    if name == 'dots':
        return np.hypot((u / period) % 1 - 0.5, (v / period) % 1 - 0.5) < 0.25
    raise ValueError(f'unknown demo class {name!r}')


def render(label: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One (size, size, 3) uint8 image of class ``CLASSES[label]``: random colours, position, scale,
    rotation, a background gradient and pixel noise."""
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    background, foreground = rng.uniform(0, 1, (2, 3))
    while np.abs(background - foreground).sum() < 0.6:  # keep the shape visible
        foreground = rng.uniform(0, 1, 3)
    cx, cy = rng.uniform(0.3, 0.7, 2)
    angle = rng.uniform(0, 2 * np.pi)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    mask = _mask(CLASSES[label], u, v, r=rng.uniform(0.15, 0.3), period=rng.uniform(0.12, 0.25))
    gradient = rng.uniform(-0.2, 0.2, 3) * (x[..., None] - 0.5)
    image = np.where(mask[..., None], foreground, background) + gradient + rng.normal(0, 0.06, (size, size, 3))
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def write_once(root: str, fill: Callable[[str], None]) -> str:
    """``root``, written on first use: ``fill(folder)`` writes into a temporary sibling folder that is renamed
    to ``root`` when complete, so an interrupted run leaves nothing half-written and concurrent runs (the
    ranks of a torchrun job) agree on one identical result."""
    if os.path.isdir(root):
        return root
    os.makedirs(os.path.dirname(root), exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f'.{os.path.basename(root)}.partial-', dir=os.path.dirname(root))
    try:
        fill(partial)
        try:
            os.rename(partial, root)
        except OSError:  # another process finished first; its folder is identical
            if not os.path.isdir(root):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return root


def ensure_demo_dataset(cache_dir: str | None = None, per_class: int = 256) -> str:
    """Path of the demo ImageFolder with ``per_class`` training and ``per_class // 4`` validation images per
    class, writing it on first use."""
    root = os.path.join(cache_dir or default_cache_dir(), f'demo-v{VERSION}-{len(CLASSES)}x{per_class}-{IMAGE_SIZE}px')

    def fill(partial: str) -> None:
        for split_id, (split, count) in enumerate((('train', per_class), ('val', max(1, per_class // 4)))):
            for label, name in enumerate(CLASSES):
                folder = os.path.join(partial, split, name)
                os.makedirs(folder)
                for index in range(count):
                    rng = np.random.default_rng([VERSION, split_id, label, index])
                    Image.fromarray(render(label, rng)).save(os.path.join(folder, f'{index:05d}.png'))

    return write_once(root, fill)
