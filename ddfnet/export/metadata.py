"""The data config an exported ONNX file carries, so that it can be scored without the model's cfg.

``scripts/onnx_export.py`` writes it into the file's ``metadata_props``; ``scripts/onnx_validate.py``
reads its defaults from there.
"""
from __future__ import annotations

import json
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

METADATA_KEY = 'ddfnet.data_config'
CLASS_NAMES_KEY = 'ddfnet.class_names'  # the training run's classes: onnx_validate.py matches labels by name
# What a file without the key is scored with: timm's ImageNet evaluation defaults.
DEFAULT_DATA_CONFIG = dict(input_size=(3, 224, 224), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                           crop_pct=0.875, interpolation='bicubic', model=None, dynamic_size=False)


def data_config_metadata(data_config: dict[str, Any], model: str, dynamic_size: bool,
                         class_names: list[str] | None = None) -> dict[str, str]:
    """The ``metadata`` entries for :func:`ddfnet.export_onnx`: ``data_config`` with the model's name, and the
    class names when the checkpoint has them."""
    metadata = {METADATA_KEY: json.dumps(dict(data_config, model=model, dynamic_size=dynamic_size))}
    if class_names:
        metadata[CLASS_NAMES_KEY] = json.dumps(list(class_names))
    return metadata


def read_data_config(metadata: dict[str, str]) -> dict[str, Any]:
    """The data config stored in an ONNX file's metadata, over :data:`DEFAULT_DATA_CONFIG`."""
    return dict(DEFAULT_DATA_CONFIG, **json.loads(metadata.get(METADATA_KEY, '{}')))


def read_class_names(metadata: dict[str, str]) -> list[str] | None:
    """The class names stored in an ONNX file's metadata (None when the exported checkpoint had none)."""
    return json.loads(metadata[CLASS_NAMES_KEY]) if CLASS_NAMES_KEY in metadata else None
