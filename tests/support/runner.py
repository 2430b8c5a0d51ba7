"""The one way the tests reach the repository's scripts (train.py, validate.py, scripts/*.py, docs/slurm/*.py):
by a path relative to the repository root, '.py' optional ('train', 'scripts/inference'), either imported
as a fresh module (its ``main`` then runs in the test process, which skips a second start-up of torch and
timm) or run as ``python SCRIPT ...`` in a subprocess."""
from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / 'tests'
_loads = itertools.count()


def script_path(name: str | Path) -> Path:
    """The file of script ``name`` (an absolute path stays as it is); FileNotFoundError when there is none."""
    name = str(name)
    path = ROOT / (name if name.endswith('.py') else f'{name}.py')
    if not path.is_file():
        raise FileNotFoundError(f'no script {name!r} in {ROOT} (looked for {path})')
    return path


def load_script(name: str | Path) -> ModuleType:
    """Script ``name`` imported as a new module, registered in sys.modules under a name of its own
    (``_ddfnet_<file name>_<N>``, as an import would, so that dataclasses and pickling find it), so every call
    gets a fresh copy of its module-level state. A script that fails to load leaves no entry. Its folder
    joins sys.path, as ``python SCRIPT`` puts it there (scripts/benchmarks/ import benchmark_common beside them)."""
    path = script_path(name)
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    module_name = f'_ddfnet_{path.stem}_{next(_loads)}'
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def repo_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment ``base`` (default: this process's) plus ``extra``, with the repository and ``tests/``
    first on PYTHONPATH, so a subprocess imports this checkout's ddfnet whether it is installed or not, and
    the test support (``support.*``)."""
    env = {**(os.environ if base is None else base), **extra}
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT), str(TESTS), env.get('PYTHONPATH')]))
    return env


def script_command(name: str | Path, *args) -> list[str]:
    """``[python, SCRIPT, *args]`` for subprocess.run / Popen (arguments converted with str)."""
    return [sys.executable, str(script_path(name)), *map(str, args)]


def run_script(name: str | Path, *args, **kwargs) -> subprocess.CompletedProcess:
    """``python SCRIPT *args`` to completion; output captured as text unless ``kwargs`` say otherwise."""
    kwargs.setdefault('capture_output', True)
    kwargs.setdefault('text', True)
    return subprocess.run(script_command(name, *args), **kwargs)


def call(main, prog: str, capsys) -> tuple[int, str, list[str]]:
    """(exit status, stdout, stderr lines) of ``main()`` run as a command line runs it (``ddfnet.cli.run_main``:
    one-line errors, exit status 2), in this process."""
    from ddfnet.cli import run_main
    try:
        run_main(main, prog)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def call_main(module: ModuleType, prog: str, argv: list[str], capsys) -> tuple[int, str, list[str]]:
    """:func:`call` of ``module.main(argv)``."""
    return call(lambda: module.main(argv), prog, capsys)
