"""File helpers: writes that never leave a truncated file behind, the scripts' output-file checks and results
files."""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import IO, Any, Callable

import yaml

from ..cli import UserError

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


def write_results(results: dict[str, Any], path: str) -> None:
    """A results record (validate.py, onnx_validate.py) as JSON (``.json``, replacing the file), or as a row
    added to a CSV table (``.csv``: several checkpoints into one table). A CSV whose header lacks some of
    the record's columns is rewritten with the union of both (old rows blank in the new ones), so no value
    of either is dropped. Written atomically in both cases."""
    if not path.endswith('.csv'):
        atomic_write_text(json.dumps(results, indent=2) + '\n', path)
        return
    rows: list[dict[str, Any]] = []
    columns = list(results)
    if os.path.exists(path):
        with open(path, newline='', encoding='utf-8') as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = list(reader.fieldnames or []) + [c for c in results if c not in (reader.fieldnames or [])]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator='\n')
    writer.writeheader()
    writer.writerows([*rows, results])
    atomic_write_text(buffer.getvalue(), path)


def extension_build_dir(name: str) -> Path:
    """Build folder of the just-in-time extension `name`: under ``$TORCH_EXTENSIONS_DIR`` when set (as for
    torch's own JIT builds; clusters point it at a local disk), else torch's default cache, one folder per
    torch/Python version so that switching environments never loads a stale binary."""
    import torch
    from torch.utils import cpp_extension

    root = os.environ.get('TORCH_EXTENSIONS_DIR') or cpp_extension.get_default_build_root()
    tag = f'ddfnet-torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}'.replace('+', '_')
    path = Path(root) / tag / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_output_file(path: str, force: bool = False, append: bool = False) -> str:
    """Before any work: ``path`` can be written (its folder exists and is writable, it is not a folder) and
    holds nothing that would be lost (an existing file is replaced only with ``force``; with ``append`` an
    existing file is fine, as the caller adds to it). Raises :class:`UserError` in one line."""
    if os.path.isdir(path):
        raise UserError(f'{path} is a folder, not a file name')
    if os.path.exists(path) and not (force or append):
        raise UserError(f'{path} exists: pass --force to replace it')
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f'cannot write {path}: the folder {folder} does not exist')
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f'cannot write {path}: the folder {folder} is not writable')
    return path
