"""Reading image files the way users have them: more formats, 16-bit greys, broken files reported by name.

- :data:`READ_EXTENSIONS`: timm's folder reader lists ``.png/.jpg/.jpeg`` only; Pillow reads these as well,
  so a split of ``.bmp`` or ``.tif`` files trains instead of being "empty".
- :func:`to_rgb`: Pillow's ``convert('RGB')`` clips a 16-bit grey image (mode ``I;16``) at 255, so a mid
  grey comes out nearly white; here it is scaled by its 16-bit range.
- :class:`FolderImages`: timm's ``ImageDataset`` decoding with :func:`to_rgb`; a file that cannot be read is
  written to an :class:`UnreadableLog` (data loader workers are other processes: the log is a file they
  append to) and skipped when training, or left out of the score when evaluating (target -1, which
  :func:`ddfnet.training.engine.evaluate` ignores), never silently replaced by another image.
- :func:`check_folder_split`: a folder split whose images are not at ``SPLIT/<class>/<image>``.
"""
from __future__ import annotations

import json
import os
import tempfile
import weakref
from collections import Counter

import numpy as np
from PIL import Image
from timm.data import ImageDataset

from ..cli import UserError, first_line

READ_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.gif')
_SIXTEEN_BIT = ('I;16', 'I;16L', 'I;16B', 'I;16N')


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB; a 16-bit grey (``I;16*``; ``I`` from a PNG, whose greys are at most 16-bit)
    scaled by its 16-bit range. Another ``I`` image (32-bit integers) is converted as Pillow does when its
    values fit 8 bits; otherwise it has no known scale: ValueError."""
    if is_sixteen_bit(image):
        values = np.asarray(image).astype(np.float64)
        grey = np.round(np.clip(values, 0, 65535) * (255 / 65535)).astype(np.uint8)
        return Image.fromarray(grey).convert('RGB')
    if image.mode == 'I':
        low, high = image.getextrema()
        if low < 0 or high > 255:
            raise ValueError(f'32-bit integer image with values {low}..{high}: no known range to scale to 8 bits')
    return image.convert('RGB')


def open_rgb(file) -> Image.Image:
    """Open and decode an image file (path or binary file object) as 8-bit RGB (see :func:`to_rgb`)."""
    with Image.open(file) as image:
        return to_rgb(image)  # convert decodes the pixels, so a truncated file fails here, not later


def image_problem(path: str) -> str | None:
    """Why the image file ``path`` cannot be read (None: it decodes). A JPEG is decoded at reduced scale
    (all of its data is still read, so truncation shows), which makes checking a large folder cheaper."""
    try:
        with Image.open(path) as image:
            image.draft('RGB', (1, 1))
            to_rgb(image)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return first_line(e)
    return None


def is_sixteen_bit(image: Image.Image) -> bool:
    """Whether ``image`` is a 16-bit grey that Pillow's own ``convert('RGB')`` would clip (see :func:`to_rgb`)."""
    return image.mode in _SIXTEEN_BIT or (image.mode == 'I' and image.format == 'PNG')


class UnreadableLog:
    """Files that could not be read, reported from any process (one JSON line each in a temporary file)
    and collected in the main one. Pickles as its path, so data loader workers append to the same file."""

    def __init__(self):
        fd, self.path = tempfile.mkstemp(prefix='ddfnet-unreadable-', suffix='.jsonl')
        os.close(fd)
        self._offset = 0
        self.seen: set[str] = set()  # paths already named (in this process)
        weakref.finalize(self, _remove_file, self.path, os.getpid())

    def report(self, path: str, reason: str) -> None:
        # one small O_APPEND write per line: lines from several workers do not interleave
        with open(self.path, 'a', encoding='utf-8') as f:
            f.write(json.dumps([path, reason]) + '\n')

    def collect(self) -> list[tuple[str, str]]:
        """(path, reason) reported since the last call, each path once."""
        with open(self.path, encoding='utf-8') as f:
            f.seek(self._offset)
            text = f.read()
        complete = text[:text.rfind('\n') + 1]  # a worker may be writing the last line right now
        self._offset += len(complete.encode('utf-8'))
        found = dict(tuple(json.loads(line)) for line in complete.splitlines())
        return list(found.items())


def _remove_file(path: str, owner: int) -> None:
    if os.getpid() != owner:  # a forked child inherits the finalizer: the file is the parent's
        return
    try:
        os.remove(path)
    except OSError:
        pass


def report_unreadable(dataset, say, what: str) -> int:
    """Name (through ``say``, e.g. a logger's warning) the files of ``dataset`` found unreadable since the last
    call and not named before, then their count; returns the count (0: nothing said)."""
    log = getattr(dataset, 'unreadable', None)
    if log is None:
        return 0
    found = log.collect()
    for path, reason in found:
        if path not in log.seen:
            say(f'unreadable image {path}: {reason}')
            log.seen.add(path)
    if found:
        say(f'{what}: {len(found)} unreadable image file(s) '
            + ('skipped' if getattr(dataset, 'is_training', False) else 'left out of the score'))
    return len(found)


class FolderImages(ImageDataset):
    """timm's ``ImageDataset`` over ``reader`` (an image-folder reader), decoding with :func:`open_rgb`.

    An unreadable file is written to ``self.unreadable``; when training the next file is used instead (as
    timm does, at most ``_max_retries`` in a row), when evaluating the sample is a black image with target
    -1, which the evaluation leaves out.
    """

    def __init__(self, reader, is_training: bool, transform=None, target_transform=None):
        super().__init__(getattr(reader, 'root', ''), reader=reader, transform=transform,
                         target_transform=target_transform)
        self.is_training = is_training
        self.unreadable = UnreadableLog()

    def __getitem__(self, index):
        for _ in range(self._max_retries):
            path = self.reader.filename(index, absolute=True)
            try:
                file, target = self.reader[index][:2]
                with file:
                    image = open_rgb(file)
                break
            except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
                self.unreadable.report(path, first_line(e))
                if not self.is_training:
                    image, target = Image.new('RGB', (32, 32)), -1
                    break
                index = (index + 1) % len(self.reader)
        else:
            raise RuntimeError(f'{self._max_retries} unreadable images in a row (the last: {path}); see the log')
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def check_folder_split(folder: str, samples: list, is_training: bool) -> list[str]:
    """Raise :class:`UserError` for a folder split whose images are not all at ``FOLDER/<class>/<image>``
    (timm would label them by their innermost folder's name) or, for training, that holds fewer than two
    classes; returns notes to say once (files of other types that are not read, counted per extension)."""
    nested, loose, classes = [], [], set()
    prefix = os.path.join(folder, '')
    for path, _ in samples:  # timm's paths start with the folder: slicing is much cheaper than relpath
        parts = (path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, folder)).split(os.sep)
        if len(parts) == 1:
            loose.append(parts[0])
        elif len(parts) > 2:
            nested.append(parts)
        else:
            classes.add(parts[0])
    if nested:
        tops = sorted({p[0] for p in nested})
        inner = sorted({'/'.join(p[1:-1]) for p in nested})
        example = '/'.join(nested[0])
        if not classes:
            holding = ', '.join(i + '/' for i in inner[:3]) + (' ...' if len(inner) > 3 else '')
            raise UserError(f'{folder}: every class folder holds only sub-folders ({len(tops)} folder(s) such as '
                            f'{tops[0]}/, holding {holding}; e.g. {example}): expected {folder}/<class>/<image>; '
                            'move the images up into their class folders')
        raise UserError(f'{folder}: {len(nested)} image(s) in sub-folders of class folders (e.g. {example}): they '
                        f'would be labelled by the sub-folder name ({inner[0]}), not the class; move them into their '
                        'class folder')
    if loose:
        raise UserError(f'{folder}: {len(loose)} image(s) directly in the split folder (e.g. {loose[0]}), not in a '
                        f'class folder: expected {folder}/<class>/<image>')
    if is_training and len(classes) < 2:
        raise UserError(f'{folder}: a training split needs at least 2 classes, found {len(classes)} '
                        f'({", ".join(sorted(classes))}): expected {folder}/<class>/<image> for each class')
    return _other_files_note(folder)


def _other_files_note(folder: str) -> list[str]:
    """A note counting the files under ``folder`` that are not read (not an image extension), per extension."""
    counts: Counter = Counter()
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        for name in files:
            extension = os.path.splitext(name)[1].lower()
            if not name.startswith('.') and extension not in READ_EXTENSIONS:
                counts[extension or '(no extension)'] += 1
    if not counts:
        return []
    listed = ', '.join(f'{n} {ext}' for ext, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return [f'{folder}: ignored {sum(counts.values())} file(s) that are not images it reads ({listed}; it reads '
            f'{" ".join(READ_EXTENSIONS)})']


def data_path(positional: str | None, option: str | None) -> str | None:
    """The data to read, given as timm's positional ``DATA`` or as ``--data-dir``: the positional one wins,
    as it is always the command line's, where ``--data-dir`` may come from a ``--config`` file."""
    return positional or option


# The interpolations timm's evaluation transforms take ('random' is a training-only augmentation).
EVAL_INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos')


def check_image_options(img_size: int | None = None, crop_pct: float | None = None,
                        interpolation: str | None = None) -> None:
    """Range-check ``--img-size`` (at least 1), ``--crop-pct`` (in (0, 1]: above 1 the centre crop is larger
    than the resized image and torchvision pads it with black) and ``--interpolation`` (an evaluation
    interpolation, '' for the model's), so that a bad value is one line before any work, not a library
    traceback or every image reported unreadable. None (and '') means not given."""
    if img_size is not None and img_size < 1:
        raise UserError(f'--img-size must be at least 1, not {img_size}')
    if crop_pct is not None and crop_pct <= 0:
        raise UserError(f'--crop-pct must be positive, not {crop_pct}')
    if crop_pct is not None and crop_pct > 1:
        raise UserError(f'--crop-pct must be at most 1 (the crop cannot be larger than the resized image), '
                        f'not {crop_pct}')
    if interpolation and interpolation not in EVAL_INTERPOLATIONS:
        raise UserError(f'--interpolation {interpolation!r}: use one of {", ".join(EVAL_INTERPOLATIONS)}')
