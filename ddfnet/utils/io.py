"""File helpers: writes that never leave a truncated file behind."""
from __future__ import annotations

import os
from typing import IO, Any, Callable

import yaml

TMP_SUFFIX = '.partial'  # of the temporary files atomic writes rename into place


def atomic_write(path: str, write: Callable[[IO], Any], binary: bool = False) -> None:
    """``write(file)`` to a temporary file next to ``path``, flushed to disk, then renamed over ``path``:
    ``path`` is never a truncated file, and the temporary file is removed whatever happens."""
    tmp = f'{path}.{os.getpid()}{TMP_SUFFIX}'
    try:
        with open(tmp, 'wb') if binary else open(tmp, 'w', encoding='utf-8') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(text: str, path: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text))


def write_yaml(config: dict[str, Any], path: str) -> None:
    """Write ``config`` to ``path`` atomically."""
    atomic_write_text(yaml.safe_dump(config, sort_keys=False), path)
