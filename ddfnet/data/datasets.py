"""Opening dataset splits with clear errors for missing or malformed data folders."""
from __future__ import annotations

import os

from timm.data import create_dataset

from ..cli import UserError
from .demo import ensure_demo_dataset
from .images import READ_EXTENSIONS, FolderImages, check_folder_split
from .shards import check_layout, is_shards, read_info, resolve_split


def resolve_data_root(dataset: str, data_dir: str | None, demo_per_class: int = 256) -> str:
    """The folder to read ``dataset`` from; for ``'demo'`` the generated dataset (cache: ``data_dir``)."""
    if dataset == 'demo':
        return ensure_demo_dataset(data_dir, demo_per_class)
    if not data_dir:
        raise UserError('no data: give --data-dir (or data_dir in the config)')
    if not os.path.isdir(data_dir) and not dataset:  # timm's own datasets (torch/..., hfds/...) may download
        raise UserError(f'data dir {data_dir} does not exist')
    return data_dir


# timm's folder datasets accept these names for a split (and silently read the root itself otherwise).
_SYNONYMS = (('train', 'training'), ('val', 'valid', 'validation', 'eval', 'evaluation'))


def _has_split_folder(root: str, split: str) -> bool:
    names = next((group for group in _SYNONYMS if split in group), (split,))
    return any(os.path.isdir(os.path.join(root, name)) for name in (split, *names))


def class_count(dataset) -> int | None:
    """The number of classes of a timm dataset (folder readers) or a torchvision one, if it says."""
    source = getattr(dataset, 'reader', dataset)  # timm wraps folders in a reader; torch/* datasets are bare
    shards_info = getattr(source, 'info', None)  # timm's wds reader keeps _info.json, where make_shards says
    if isinstance(shards_info, dict) and isinstance(shards_info.get('num_classes'), int):
        return shards_info['num_classes']
    return len(getattr(source, 'class_to_idx', None) or {}) or None


def class_names(dataset) -> list[str] | None:
    """The class names of a timm folder dataset or a torchvision one in label order, if it has them."""
    source = getattr(dataset, 'reader', dataset)
    shards_info = getattr(source, 'info', None)  # timm's wds reader: make_shards lists the names in _info.json
    if isinstance(shards_info, dict) and isinstance(shards_info.get('classes'), list):
        return [str(name) for name in shards_info['classes']] or None
    mapping = getattr(source, 'class_to_idx', None) or {}
    if sorted(mapping.values()) != list(range(len(mapping))):  # not a plain 0..N-1 labelling
        return None
    names = [''] * len(mapping)
    for name, index in mapping.items():
        names[index] = str(name)
    return names or None


def create_split(dataset: str, root: str, split: str, is_training: bool, batch_size: int = 1,
                 world_size: int = 1, workers: int = 0):
    """timm's ``create_dataset`` for one split; a missing or empty split raises :class:`UserError`.

    For WebDataset shards (``wds/NAME``) ``world_size`` and ``workers`` (per rank) say how the epoch will be
    split, and a shard layout on which timm's reader would repeat or skip images is a :class:`UserError`.

    An image folder is read as :class:`~ddfnet.data.images.FolderImages` (more formats, 16-bit greys,
    unreadable files reported) after :func:`~ddfnet.data.images.check_folder_split`; the notes to say
    once (files not read, by extension) are in the dataset's ``notes``.
    """
    if not dataset and os.path.isdir(root) and not _has_split_folder(root, split):
        names = next((group for group in _SYNONYMS if split in group), (split,))
        raise UserError(f"no '{split}' folder in data dir {root} (expected {root}/<folder>/<class>/<image> with "
                        f"<folder> one of {', '.join(names)})")
    if is_shards(dataset):
        try:
            import webdataset  # noqa: F401  (timm's reader needs it; its own message asks for a git install)
        except ImportError:
            raise UserError(f"--dataset {dataset} needs the webdataset package: pip install 'ddfnet[wds]'") from None
        split = resolve_split(read_info(root), split, root)
    folder = not dataset and os.path.isdir(root)
    extra = {'input_key': ';'.join(READ_EXTENSIONS)} if folder else {}  # the extensions timm's reader lists
    try:
        data = create_dataset(dataset, root=root, split=split, is_training=is_training, batch_size=batch_size,
                              **extra)
    except (OSError, RuntimeError, AssertionError, ValueError) as e:
        raise UserError(f"cannot open split '{split}' of {root}: {str(e).strip() or e.__class__.__name__}") from None
    if len(data) == 0:
        raise UserError(f"split '{split}' of {root} holds no images")
    notes: list[str] = []
    reader = getattr(data, 'reader', None)
    if folder and hasattr(reader, 'samples'):
        notes = check_folder_split(reader.root, reader.samples, is_training)
        data = FolderImages(reader, is_training)
    if is_shards(dataset):
        check_layout(data, world_size, workers, batch_size, is_training)
    data.notes = notes
    return data


def default_workers() -> int:
    """Default data loading processes: 4, or fewer on a machine with fewer cores available to this process
    (more would only compete for them; torch's DataLoader warns about it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return max(1, min(4, cores))
