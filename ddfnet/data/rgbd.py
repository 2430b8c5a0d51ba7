"""RGB-D pairs for guided depth upsampling: a folder reader, and an embedded generated set.

A folder of pairs holds ``<split>/rgb/<name>.png`` (8-bit RGB) and ``<split>/depth/<name>.png`` (16-bit,
millimetres, as NYU Depth v2 exports are usually written) with the same names and sizes. The generated set
("rgbd-demo") is such a folder of drawn scenes: a slanted background plane and a few of the demo's shapes
in front of it at their own depths, so every depth edge is an image edge; stripes painted on the background
add image edges with no depth edge behind them, which a guided upsampler must learn to ignore. Like the
classification demo it is a pure function of (split, index), written once to a cache folder, atomically.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .demo import _mask, default_cache_dir, write_once

__all__ = ['RGBDFolder', 'ensure_rgbd_demo', 'render_scene', 'center_sample']

VERSION = 1  # bump when the drawing changes, so stale caches are not reused
SHAPES = ('circle', 'square', 'triangle', 'ring', 'cross')


def render_scene(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (size, size, 3) uint8 RGB and (size, size) float32 depth in metres (about 0.7-5 m)."""
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    depth = 3.5 + rng.uniform(-1, 1) * (x - 0.5) + rng.uniform(0.5, 1.5) * (y - 0.5)  # a slanted floor/wall
    colour = np.broadcast_to(rng.uniform(0, 1, 3), (size, size, 3)).copy()
    # Texture edges with no depth edge behind them.
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.15, 0.4)
    stripes = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period) > 0
    colour[stripes] = np.clip(colour[stripes] + rng.uniform(-0.35, 0.35, 3), 0, 1)
    # Objects in front of the background, drawn far to near so that nearer ones cover farther ones.
    for distance in np.sort(rng.uniform(1.0, depth.min() - 0.3, rng.integers(2, 5)))[::-1]:
        cx, cy, turn = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0, 2 * np.pi)
        u = (x - cx) * np.cos(turn) + (y - cy) * np.sin(turn)
        v = -(x - cx) * np.sin(turn) + (y - cy) * np.cos(turn)
        mask = _mask(SHAPES[rng.integers(len(SHAPES))], u, v, r=rng.uniform(0.12, 0.28), period=0.2)
        depth = np.where(mask, distance + rng.uniform(-0.3, 0.3) * u, depth)  # slanted too
        colour[mask] = rng.uniform(0, 1, 3)
    image = colour + rng.normal(0, 0.03, colour.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), depth.astype(np.float32)


def ensure_rgbd_demo(cache_dir: str | None = None, train: int = 512, val: int = 64, size: int = 64) -> str:
    """Path of the generated RGB-D folder (``train`` and ``val`` pairs of ``size`` x ``size``), written on
    first use."""
    root = os.path.join(cache_dir or default_cache_dir(), f'rgbd-demo-v{VERSION}-{train}x{val}-{size}px')

    def fill(partial: str) -> None:
        for split_id, (split, count) in enumerate((('train', train), ('val', val))):
            for kind in ('rgb', 'depth'):
                os.makedirs(os.path.join(partial, split, kind))
            for index in range(count):
                rgb, depth = render_scene(np.random.default_rng([VERSION, split_id, index]), size)
                Image.fromarray(rgb).save(os.path.join(partial, split, 'rgb', f'{index:05d}.png'))
                millimetres = Image.fromarray((depth * 1000).round().astype(np.uint16))  # a 16-bit PNG
                millimetres.save(os.path.join(partial, split, 'depth', f'{index:05d}.png'))

    return write_once(root, fill)


class RGBDFolder(Dataset):
    """``(rgb, depth)`` pairs of ``root/<split>``: rgb a (3, H, W) float tensor in [0, 1], depth (1, H, W) in
    metres. Both are cropped to a multiple of ``multiple`` (the upsampling factor: low-resolution depth is
    sampled from whole blocks). Names without their pair, or pairs of different sizes, raise ValueError."""

    def __init__(self, root: str, split: str, multiple: int = 1):
        folder = os.path.join(root, split)
        rgb_dir, depth_dir = os.path.join(folder, 'rgb'), os.path.join(folder, 'depth')
        if not (os.path.isdir(rgb_dir) and os.path.isdir(depth_dir)):
            raise ValueError(f'{folder} needs rgb/ and depth/ folders of PNG files with the same names')
        rgb = {os.path.splitext(n)[0] for n in os.listdir(rgb_dir) if n.endswith('.png')}
        depth = {os.path.splitext(n)[0] for n in os.listdir(depth_dir) if n.endswith('.png')}
        if rgb != depth or not rgb:
            unpaired = sorted(rgb ^ depth)
            raise ValueError(f'{folder}: ' + (f'{len(unpaired)} images without their pair (e.g. {unpaired[0]}.png)'
                                              if unpaired else 'no PNG pairs in rgb/ and depth/'))
        self.rgb_dir, self.depth_dir, self.multiple = rgb_dir, depth_dir, multiple
        self.names = sorted(rgb)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        name = self.names[index]
        with Image.open(os.path.join(self.rgb_dir, f'{name}.png')) as image:
            rgb = np.asarray(image.convert('RGB'), dtype=np.float32) / 255
        with Image.open(os.path.join(self.depth_dir, f'{name}.png')) as image:
            depth = np.asarray(image, dtype=np.float32) / 1000
        if depth.ndim != 2 or depth.shape != rgb.shape[:2]:
            raise ValueError(f'{name}.png: depth {depth.shape} and rgb {rgb.shape[:2]} must be one-channel and of '
                             'one size')
        height, width = (n - n % self.multiple for n in depth.shape)
        return (torch.from_numpy(rgb[:height, :width]).permute(2, 0, 1).contiguous(),
                torch.from_numpy(depth[None, :height, :width].copy()))


def center_sample(depth: torch.Tensor, factor: int) -> torch.Tensor:
    """Low-resolution depth by PAC's 'center' sampling: the pixel at the centre of each factor x factor block."""
    return depth[..., factor // 2::factor, factor // 2::factor]
