"""Datasets for ``train.py`` / ``validate.py``: timm's datasets plus the embedded demo dataset."""
from .datasets import class_count, class_names, create_split, resolve_data_root
from .demo import CLASSES as DEMO_CLASSES
from .demo import ensure_demo_dataset

__all__ = ['class_count', 'class_names', 'create_split', 'resolve_data_root', 'ensure_demo_dataset', 'DEMO_CLASSES']
