"""JPEG draft decoding for the training crop: decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, through
PIL's ``Image.draft``) when the random-resized crop would shrink the region anyway.

The crop box and interpolation are drawn exactly as timm's ``RandomResizedCropAndInterpolation`` draws them
(the same calls on the same generator, in full-resolution coordinates), so the augmentation's distribution
of boxes and sizes is unchanged; only the pixels come from a reduced decode. A reduction is used only when
the box still holds at least the output's pixels in both directions at that scale, so the final resize
remains a downscale (by 1x to 2x) and no detail the output could show is lost.
"""
from __future__ import annotations

import random

from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

_PIL_FILTERS = {InterpolationMode.NEAREST: Image.Resampling.NEAREST, InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
                InterpolationMode.BICUBIC: Image.Resampling.BICUBIC, InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
                InterpolationMode.BOX: Image.Resampling.BOX, InterpolationMode.HAMMING: Image.Resampling.HAMMING}


def draft_scale(box_height: int, box_width: int, out_height: int, out_width: int) -> int:
    """The largest JPEG reduction (8, 4, 2, else 1) at which a ``box_height x box_width`` crop still holds
    ``out_height x out_width`` pixels."""
    return next((s for s in (8, 4, 2) if box_height >= s * out_height and box_width >= s * out_width), 1)


class DraftRandomResizedCrop(RandomResizedCropAndInterpolation):
    """timm's random-resized crop (same parameters, same random draws) that decodes a not yet loaded JPEG at
    the reduced scale :func:`draft_scale` allows; other images, and loaded ones, are cropped as timm does.
    Returns RGB images (the dataset hands over files undecoded, see :func:`enable_jpeg_draft`)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        i, j, h, w = self.get_params(img, self.scale, self.ratio)  # full-resolution coordinates, as timm
        interpolation = (random.choice(self.interpolation) if isinstance(self.interpolation, (tuple, list))
                         else self.interpolation)
        scale = draft_scale(h, w, *self.size) if img.format == 'JPEG' and img.tile else 1
        if scale > 1:
            full_width = img.width
            drafted = img.draft('RGB', (img.width // scale, img.height // scale))
            if drafted is not None:
                reduction = full_width / drafted[1][2]  # what libjpeg applies; the box in reduced pixels:
                box = (j / reduction, i / reduction, (j + w) / reduction, (i + h) / reduction)
                return img.convert('RGB').resize(self.size[::-1], _PIL_FILTERS[interpolation], box=box)
        return F.resized_crop(img.convert('RGB'), i, j, h, w, self.size, interpolation)


def enable_jpeg_draft(dataset) -> None:
    """Make a timm image-folder ``dataset`` whose transform starts with timm's random-resized crop (a training
    pipeline) decode JPEGs through :class:`DraftRandomResizedCrop`: the dataset passes files undecoded and
    the crop decodes them. Raises ``ValueError`` for any other dataset or pipeline (WebDataset shards are
    decoded by timm's reader before any transform)."""
    transforms = getattr(getattr(dataset, 'transform', None), 'transforms', None)
    if not hasattr(dataset, 'input_img_mode') or not hasattr(dataset, '__getitem__'):
        raise ValueError('JPEG draft decoding needs an image-folder dataset (shards are decoded by the reader)')
    if not transforms or type(transforms[0]) is not RandomResizedCropAndInterpolation:
        raise ValueError("JPEG draft decoding applies to a training pipeline that starts with timm's "
                         'random-resized crop')
    crop = transforms[0]
    draft = DraftRandomResizedCrop(crop.size, scale=crop.scale, ratio=crop.ratio)
    draft.interpolation = crop.interpolation
    transforms[0] = draft
    dataset.input_img_mode = None  # the crop decodes (and converts to RGB)
