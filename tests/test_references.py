"""Docs and comments name only what exists: every repository path (``scripts/inference.py``,
``ddfnet/ops/autograd.py``, ``ops/checks.py`` inside the package), every ``ddfnet.`` dotted name and every
function written as ``name()`` or with a Sphinx role, in every tracked text file. A file moved or a function
renamed without its references fails here, with the file and the stale name."""
from __future__ import annotations

import ast
import builtins
import glob
import importlib
import itertools
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {'.py', '.md', '.cpp', '.cu', '.cuh', '.h', '.cc', '.sh', '.yaml', '.toml', '.txt'}

# A repository path: one of the top-level folders, then a path (``{a,b}`` brace alternatives allowed).
PATH = re.compile(r'(?<![\w./-])((?:\.\./)*(?:ddfnet|scripts|tests|csrc|configs|docs|\.ci)/[\w./{},*-]*[\w}*])')
# A path inside the package or csrc, written from there: ``ops/checks.py``, ``cuda/ddf_cuda.cu``.
SUBPATH = re.compile(r'(?<![\w./-])((?:ops|layers|models|training|utils|data|export|cpu|cuda|support)/[\w/]+'
                     r'\.(?:py|cpp|cu|cuh|h|cc))\b')
# A dotted name in the package: ``ddfnet.ops.register_all``. Quoted ones are strings (ONNX metadata keys).
DOTTED = re.compile(r'''(?<![\w.'"])(ddfnet(?:\.\w+)+)''')
# A call written in backticks, ``name()`` / ``mod.name(x, y)``, or a Sphinx role, :func:`~mod.name`.
CALL = re.compile(r'`((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)\([^`()]*\)`')
ROLE = re.compile(r':(?:func|meth|class|mod|data|attr):`~?((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)`')
# A function named with its file: ``ddfnet/ops/checks.py:check_ddf_args``.
FILE_FUNCTION = re.compile(r'((?:ddfnet|scripts|tests)/[\w/]+\.py):(\w+)')
# A Markdown link to a file of the repository, with or without an #anchor.
LINK = re.compile(r'\]\((?!https?:|mailto:)([^)#\s]*)(?:#([^)\s]+))?\)')
# Where a bare name from elsewhere may come from (``softmax()``, ``convert()``, ``kaiming_normal_()``).
FOREIGN = ('torch', 'torch.nn.functional', 'torch.nn.init', 'math', 'PIL.Image.Image', 'timm')


def tracked_files() -> list[Path]:
    try:
        names = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip('not a git checkout')
    files = [ROOT / n for n in names if (ROOT / n).is_file()]
    return [f for f in files if f.suffix in TEXT_SUFFIXES or f.name in ('Makefile', 'run')]


def expand_braces(path: str) -> list[str]:
    parts = re.split(r'\{([^{}]*)\}', path)
    choices = [[p] if i % 2 == 0 else p.split(',') for i, p in enumerate(parts)]
    return [''.join(c) for c in itertools.product(*choices)]


def is_template(match: re.Match, text: str) -> bool:
    """A path built in code or a pattern (``f'scripts/{name}.py'``, ``tests/test_<subject>.py``): a ``{field}``
    without alternatives, or a field right after."""
    return text[match.end():match.end() + 1] in ('{', '<') or any(',' not in b for b in re.findall(r'\{([^{}]*)\}', match[1]))


def path_exists(path: str, source: Path) -> bool:
    """A path named in ``source``: from the repository root or from ``source``'s folder (only from there
    for ``../``); a script may be named without its ``.py``; a trailing '.' ends the sentence."""
    path = path.rstrip('.')
    bases = (source.parent,) if path.startswith('../') else (ROOT, source.parent)
    return all(any(glob.glob(str(base / p), recursive=True) if '*' in p else (base / p).exists() or (base / f'{p}.py').exists()
                   for p in (one, one.rstrip('/')) for base in bases) for one in expand_braces(path))


def resolves(dotted: str) -> bool:
    """``a.b.c`` is an importable module, or an attribute chain from one."""
    parts = dotted.split('.')
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module('.'.join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def defined_names(files: list[Path]) -> set[str]:
    """Every function, class, module-level name and parameter of the repository's Python files, and every
    identifier followed by '(' in its C++/CUDA files."""
    names: set[str] = set()
    for f in files:
        if f.suffix == '.py':
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, ast.arg):
                    names.add(node.arg)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    names.add(node.id)
        elif f.suffix in ('.cpp', '.cu', '.cuh', '.h', '.cc'):
            names |= set(re.findall(r'\b(\w+)\s*\(', f.read_text()))
    return names


def function_exists(name: str, defined: set[str]) -> bool:
    if '.' in name:
        return resolves(name) or name.split('.')[-1] in defined and not name.startswith(('ddfnet.', 'torch.', 'timm.'))
    return (name in defined or hasattr(builtins, name)
            or any(resolves(f'{module}.{name}') for module in FOREIGN))


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-'."""
    return {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-')
            for h in re.findall(r'^#+ (.+)$', re.sub(r'```.*?```', '', markdown, flags=re.S), re.M)}


def stale_links(text: str, source: Path) -> list[str]:
    stale = []
    for target, anchor in LINK.findall(text):
        path = (source.parent / target) if target else source
        if not path.exists():
            stale.append(f'link {target}')
        elif anchor and path.suffix == '.md' and anchor not in anchors(path.read_text()):
            stale.append(f'link {target}#{anchor}')
    return stale


def stale_in(text: str, source: Path, defined: set[str]) -> list[str]:
    """The names in ``text`` (the contents of ``source``) that do not exist."""
    stale = [f'path {m[1]}' for m in PATH.finditer(text) if not is_template(m, text) and not path_exists(m[1], source)]
    stale += [f'path {m[1]}' for m in SUBPATH.finditer(text)
              if not any((d / m[1]).exists() for d in (ROOT / 'ddfnet', ROOT / 'csrc', ROOT / 'tests', source.parent))]
    stale += [f'name {m[1]}' for m in DOTTED.finditer(text) if not resolves(m[1])]
    stale += [f'function {m[1]}:{m[2]}' for m in FILE_FUNCTION.finditer(text) if (ROOT / m[1]).is_file()
              and not re.search(rf'^\s*(?:def|class) {m[2]}\b|^{m[2]}\s*=', (ROOT / m[1]).read_text(), re.M)]
    if source.suffix == '.md':
        stale += stale_links(text, source)
    if source.suffix != '.sh':  # shell has `command` substitutions, not calls
        stale += [f'function {m[1]}' for m in itertools.chain(CALL.finditer(text), ROLE.finditer(text))
                  if not function_exists(m[1], defined)]
    return sorted(set(stale))


def test_docs_and_comments_name_only_what_exists():
    files = tracked_files()
    defined = defined_names(files)
    stale = [f'{f.relative_to(ROOT)}: {name}' for f in files if f != Path(__file__).resolve()  # (its probe below)
             for name in stale_in(f.read_text(errors='replace'), f, defined)]
    assert stale == []


def test_stale_references_are_found():
    """The checker itself: a moved file, a renamed function and a missing module are each reported; what
    exists is not."""
    text = ('See `scripts/no_such_tool.py`, `ops/no_such_module.py`, `ddfnet.ops.no_such_function`, '
            '`no_such_function_anywhere()`; and `scripts/inference.py`, `ops/checks.py`, `ddfnet.ops.register_all`, '
            '`register_all()`, :func:`ddfnet.utils.weights.load_weights`, `docs/benchmarks/cpu_infer_{nchw,nhwc}.jsonl`, '
            '`scripts/onnx_*.py`, but `scripts/nothing_*.py`; ddfnet/ops/checks.py:check_ddf_args, '
            'ddfnet/ops/ddf_op.py:check_ddf_args; [ok](../README.md#install), [gone](training.md#nowhere).')
    assert stale_in(text, ROOT / 'docs' / 'probe.md', defined_names(tracked_files())) == [
        'function ddfnet/ops/ddf_op.py:check_ddf_args', 'function no_such_function_anywhere', 'link training.md#nowhere', 'name ddfnet.ops.no_such_function',
        'path ops/no_such_module.py', 'path scripts/no_such_tool.py', 'path scripts/nothing_*.py']
