"""Photo-sized JPEGs for timing input pipelines where no real data is at hand: the demo dataset's drawings
upscaled (bicubic) to ImageNet's typical 500x375, with mild pixel noise so they compress like textured
photos rather than flat drawings (about 55 KB each at quality 90; ImageNet averages ~110 KB)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .demo import CLASSES, render


def write_sample_jpegs(root: str, count: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> str:
    """Write ``count`` JPEGs of ``size`` (width, height) as an ImageFolder split ``root/train/<class>/``
    (classes round-robin) and return ``root``; the same arguments always give the same files."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        label = index % len(CLASSES)
        folder = os.path.join(root, 'train', CLASSES[label])
        os.makedirs(folder, exist_ok=True)
        image = Image.fromarray(render(label, rng)).resize(size, Image.Resampling.BICUBIC)
        noisy = np.asarray(image, np.float32) + rng.normal(0, 6, (size[1], size[0], 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(os.path.join(folder, f'{index:06d}.jpg'),
                                                                       quality=90)
    return root
