"""WebDataset shards for ``--dataset wds/NAME``: writing them from an ImageFolder, and checking that timm's
``wds/`` reader will give every image exactly once per epoch on a given number of ranks and workers.

A shard is a plain tar file; sample ``KEY`` is the members ``KEY.cls`` (the class index as text, the
ImageFolder's own index), ``KEY.jpg``/``.png``/``.webp`` (the original file's bytes, not re-encoded, except
formats timm's reader does not decode (``.bmp``, ``.tif``, ``.gif``) and 16-bit greys, which are written as
8-bit PNG by :func:`~ddfnet.data.images.to_rgb`) and ``KEY.json`` (``{"filename": "<class>/<file>"}``).
``_info.json`` lists per split the shard files and their sample counts, the layout timm's reader expects,
the files left out, plus the class names and count. Every image is decoded once before anything is written,
so a broken file is found by name (and refused, or left out and listed) instead of packed.

How timm's reader (timm 1.0) splits an epoch: it deals the shards round-robin to the ``ranks x workers``
readers (training: in an order shuffled by a seed common to all of them and the epoch), and when training
(or evaluating on more than one rank) cuts or repeats each reader's stream to ``ceil(N / readers)``
samples, rounded up to a whole number of batches when training. So each image is read once per epoch only
when every reader's shards hold exactly that many samples; :func:`layout_error` says when they do not.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from typing import Sequence

import numpy as np
from PIL import Image

from ..cli import UserError
from ..utils.io import atomic_write_text
from .images import READ_EXTENSIONS, check_folder_split, image_problem, is_sixteen_bit, to_rgb

INFO_FILE = '_info.json'
IMAGE_KEYS = {'.jpg': 'jpg', '.jpeg': 'jpg', '.png': 'png', '.webp': 'webp'}  # what timm's reader decodes
# timm's folder datasets accept these names for a split; shards answer to them as well.
SPLIT_SYNONYMS = (('train', 'training'), ('val', 'valid', 'validation', 'eval', 'evaluation'))


class BrokenImages(UserError):
    """Images that do not decode; ``files`` holds (path, reason) of each."""

    def __init__(self, message: str, files: list[tuple[str, str]]):
        super().__init__(message)
        self.files = files


def is_shards(dataset: str) -> bool:
    """Whether ``--dataset`` names WebDataset shards (timm's ``wds/`` prefix)."""
    return dataset.startswith('wds/')


def read_info(root: str) -> dict:
    """The ``_info.json`` of the shard folder ``root``; a missing or malformed file raises :class:`UserError`."""
    path = os.path.join(root, INFO_FILE)
    try:
        with open(path, encoding='utf-8') as f:
            info = json.load(f)
    except FileNotFoundError:
        raise UserError(f'no {INFO_FILE} in {root}: not a shard folder (write one with scripts/make_shards.py)') from None
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read {path}: {e}') from None
    if not isinstance(info, dict) or not isinstance(info.get('splits'), dict):
        raise UserError(f"{path} has no 'splits' mapping")
    return info


def resolve_split(info: dict, split: str, root: str) -> str:
    """The name under which ``info`` holds ``split`` (``validation`` finds ``val``, as for folders)."""
    names = next((group for group in SPLIT_SYNONYMS if split in group), (split,))
    for name in (split, *names):
        if name in info['splits']:
            return name
    raise UserError(f"no split '{split}' in {os.path.join(root, INFO_FILE)} (it has: {', '.join(info['splits'])})")


def layout_error(shard_lengths: Sequence[int], world_size: int, workers: int, batch_size: int,
                 is_training: bool) -> str | None:
    """Why timm's reader would not read each of these shards' images exactly once per epoch on
    ``world_size`` ranks with ``workers`` loader processes each (None: it does)."""
    readers = world_size * max(1, workers)  # zero workers: the main process reads
    total = sum(shard_lengths)
    if not is_training and world_size == 1:
        return None  # single-process evaluation reads every shard to its end, whatever the layout
    per_reader = -(-total // readers)
    if is_training:
        per_reader = -(-per_reader // batch_size) * batch_size
    where = (f'{len(shard_lengths)} shards of {total} images for {world_size} rank(s) x {max(1, workers)} '
             f'reader(s) = {readers}')
    if readers == 1:
        if total == per_reader:
            return None
        return (f'{where}: {total} images are not a whole number of batches of {batch_size}, so timm would '
                f'repeat {per_reader - total} of them every epoch')
    if is_training:  # any shard order is possible: only equal shards dealt evenly add up everywhere
        if len(set(shard_lengths)) == 1 and len(shard_lengths) % readers == 0 and total // readers == per_reader:
            return None
    else:  # evaluation deals the shards in their listed order
        if all(sum(shard_lengths[r::readers]) == per_reader for r in range(readers)):
            return None
    need = ('every shard must hold the same number of images, the shard count must be a multiple of '
            f'{readers}' + (f' and each reader\'s share a multiple of --batch-size {batch_size}' if is_training else ''))
    return (f'{where}: {need} (timm cuts or repeats each reader\'s stream to {per_reader} images, so some would '
            'be read twice or not at all); rewrite the shards (scripts/make_shards.py --shard-size, '
            '--drop-remainder) or change --workers / --batch-size')


def check_layout(dataset, world_size: int, workers: int, batch_size: int, is_training: bool) -> None:
    """Raise :class:`UserError` unless timm's ``wds/`` ``dataset`` reads each image once per epoch."""
    split = dataset.reader.split_info
    message = layout_error(split.shard_lengths, world_size, workers, batch_size, is_training)
    if message:
        raise UserError(f"split '{split.name}': {message}")


def folder_samples(root: str, split: str) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """(path, class index) of every image of ``root/split`` and its class-to-index map, as timm's folder
    dataset (what ``train.py`` trains on without shards) sees them."""
    from timm.data.readers.reader_image_folder import ReaderImageFolder

    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UserError(f'no split folder {folder}')
    try:
        reader = ReaderImageFolder(folder, input_key=';'.join(READ_EXTENSIONS))
    except RuntimeError:  # timm's "Found 0 images"
        raise UserError(f'{folder} holds no images') from None
    check_folder_split(folder, reader.samples, is_training=False)
    return [(str(path), int(target)) for path, target in reader.samples], dict(reader.class_to_idx)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size, member.mtime, member.mode = len(data), 0, 0o644  # fixed metadata: identical input, identical shards
    tar.addfile(member, io.BytesIO(data))


def _shard_image(path: str) -> tuple[str, bytes]:
    """The member suffix and bytes of the image file ``path`` in a shard: its own bytes when timm's reader
    decodes them as they are, else an 8-bit PNG (other formats, 16-bit greys)."""
    with open(path, 'rb') as f:
        data = f.read()
    suffix = IMAGE_KEYS.get(os.path.splitext(path)[1].lower())
    if suffix == 'jpg':  # JPEG has no 16-bit greys: no need to look inside
        return suffix, data
    with Image.open(io.BytesIO(data)) as image:
        if suffix is not None and not is_sixteen_bit(image):
            return suffix, data
        buffer = io.BytesIO()
        to_rgb(image).save(buffer, format='PNG')
    return 'png', buffer.getvalue()


def _write_shard(path: str, samples: Sequence[tuple[str, int]], first_index: int, folder: str) -> None:
    with tarfile.open(path, 'w', format=tarfile.USTAR_FORMAT) as tar:
        for index, (image_path, target) in enumerate(samples, first_index):
            key = f'{index:08d}'  # no dots: webdataset splits a member name at its first dot
            suffix, image = _shard_image(image_path)
            _add_member(tar, f'{key}.cls', str(target).encode())
            _add_member(tar, f'{key}.{suffix}', image)
            _add_member(tar, f'{key}.json', json.dumps({'filename': os.path.relpath(image_path, folder)}).encode())


def write_shards(source: str, output: str, splits: Sequence[str], shard_size: int, seed: int = 0,
                 drop_remainder: bool = False, shard_count_multiple: int = 1, force: bool = False,
                 skip_broken: bool = False) -> dict:
    """Write ``splits`` of the ImageFolder ``source`` as WebDataset shards of ``shard_size`` images into
    the folder ``output`` (``SPLIT-000000.tar``, ... and ``_info.json``); returns the info written.

    Images are shuffled with ``seed`` (timm's reader shuffles shards and a buffer of samples, which mixes
    classes only if the shards already do). ``drop_remainder`` leaves out the last ``N % shard_size``
    images of each split so all shards are equal (their names are listed in the info), and with
    ``shard_count_multiple`` K whole shards more, so the shard count is a multiple of K. The folder appears
    whole or not at all: it is built under a temporary name and renamed; an existing ``output`` is replaced
    only with ``force``. Images that do not decode raise :class:`BrokenImages` (naming each) before anything
    is written, or with ``skip_broken`` are left out and listed in the split's ``broken`` entry.
    """
    if shard_size < 1 or shard_count_multiple < 1:
        raise UserError(f'--shard-size and --shard-count-multiple must be at least 1, not {shard_size}, '
                        f'{shard_count_multiple}')
    if shard_count_multiple > 1 and not drop_remainder:
        raise UserError('--shard-count-multiple leaves images out: it needs --drop-remainder')
    keep_multiple = shard_size * shard_count_multiple if drop_remainder else 1
    if os.path.exists(output) and not force:
        raise UserError(f'{output} already exists: pick another output folder, or replace it with --force')
    if not splits:
        raise UserError('no splits to write')
    listed = {split: folder_samples(source, split) for split in splits}  # every check before any write
    broken: dict[str, list[tuple[str, str]]] = {}
    for split, (samples, classes) in listed.items():
        problems = [(path, image_problem(path)) for path, _ in samples]
        broken[split] = [(path, reason) for path, reason in problems if reason]
        listed[split] = ([s for s, (_, reason) in zip(samples, problems) if not reason], classes)
    every_broken = [item for split in splits for item in broken[split]]
    if every_broken and not skip_broken:
        path, reason = every_broken[0]
        raise BrokenImages(f'{len(every_broken)} image file(s) do not decode (the first: {path}: {reason}); '
                           'fix or remove them, or leave them out with --skip-broken (listed in _info.json)',
                           every_broken)
    class_to_idx = listed[splits[0]][1]
    for split, (samples, classes) in listed.items():
        if classes != class_to_idx:
            raise UserError(f"split '{split}' has other classes than '{splits[0]}': class indices would disagree")
        if len(samples) < keep_multiple:
            raise UserError(f"split '{split}' has {len(samples)} images, fewer than {keep_multiple // shard_size} "
                            f'shard(s) of {shard_size}')
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f'.{os.path.basename(output)}.partial-', dir=parent)
    os.chmod(partial, 0o755)  # mkdtemp's 0o700 would survive the rename
    info = {'name': os.path.basename(os.path.abspath(output)), 'num_classes': len(class_to_idx),
            'classes': sorted(class_to_idx, key=class_to_idx.get), 'splits': {}}
    try:
        for split, (samples, _) in listed.items():
            folder = os.path.join(source, split)
            order = np.random.default_rng(seed).permutation(len(samples))
            samples = [samples[i] for i in order]
            kept = len(samples) - len(samples) % keep_multiple
            filenames, lengths = [], []
            for shard, start in enumerate(range(0, kept, shard_size)):
                chunk = samples[start:min(start + shard_size, kept)]
                filenames.append(f'{split}-{shard:06d}.tar')
                lengths.append(len(chunk))
                _write_shard(os.path.join(partial, filenames[-1]), chunk, start, folder)
            info['splits'][split] = {'name': split, 'num_samples': kept, 'filenames': filenames,
                                     'shard_lengths': lengths,
                                     'left_out': [os.path.relpath(p, folder) for p, _ in samples[kept:]],
                                     'broken': [{'file': os.path.relpath(p, folder), 'reason': reason}
                                                for p, reason in broken[split]]}
        atomic_write_text(json.dumps(info, indent=1) + '\n', os.path.join(partial, INFO_FILE))
        if os.path.exists(output):  # --force: swap the folders, then delete the old one
            old = tempfile.mkdtemp(prefix=f'.{os.path.basename(output)}.old-', dir=parent)
            os.rename(output, os.path.join(old, 'data'))
            os.rename(partial, output)
            shutil.rmtree(old)
        else:
            os.rename(partial, output)
    finally:
        if os.path.exists(partial):
            shutil.rmtree(partial)
    return info
