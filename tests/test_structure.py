"""The package's layering, read from its source: the op registers itself in one place, imports of ddfnet's
own modules form no cycle, no lower layer imports a higher one, and setup.py can load the native-kernel loader
without ddfnet. The tests' layout: no test file imports another (shared code is in tests/support), and no
test-only code ships in the package; the fast tier is offline. Reads files, imports nothing heavy: fast."""
import ast
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddfnet

PACKAGE = Path(ddfnet.__file__).parent
TESTS = Path(__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports() -> dict[str, set[str]]:
    """ddfnet module -> the ddfnet modules it imports, at module level or inside functions."""
    paths = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == '__init__.py' else name.rpartition('.')[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ''
                if node.level:
                    anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                    base = '.'.join(anchor + ([base] if base else []))
                # 'from . import x' names a submodule when there is one.
                targets |= {f'{base}.{a.name}' if f'{base}.{a.name}' in paths else base for a in node.names}
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return []


def test_ddfnet_imports_have_no_cycle():
    assert _cycle(_imports()) == []


def test_cycle_finder_sees_a_cycle():
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']


def test_no_layer_imports_a_higher_one():
    # The op knows nothing of layers, models, training or export; layers nothing of models and above.
    # cli and utils are the base every part may use: they know nothing of the rest; data and export do not
    # depend on training.
    base = ('ops', 'layers', 'models', 'training', 'export', 'data')
    forbidden = {'ddfnet.cli': base, 'ddfnet.utils': base,
                 'ddfnet.data': ('training', 'export'), 'ddfnet.export': ('training',),
                 'ddfnet.ops': ('layers', 'models', 'training', 'export', 'data'),
                 'ddfnet.layers': ('models', 'training', 'export', 'data'),
                 'ddfnet.models': ('training', 'export', 'data')}
    wrong = [f'{module} -> {target}' for module, targets in _imports().items() for target in targets
             for layer, above in forbidden.items()
             if (module == layer or module.startswith(layer + '.'))
             and any(target == f'ddfnet.{a}' or target.startswith(f'ddfnet.{a}.') for a in above)]
    assert wrong == []


def test_register_all_registers_every_kernel_once():
    try:
        from torch.onnx._internal.torchscript_exporter import registration
    except ImportError:  # older torch (2.4.1 has it here; 2.11 has the path above)
        from torch.onnx._internal import registration

    for key in ('CompositeExplicitAutograd', 'Autograd', 'AutocastCPU', 'AutocastCUDA'):
        assert torch._C._dispatch_has_kernel_for_dispatch_key('ddfnet::ddf', key), key
    assert torch._C._dispatch_has_kernel_for_dispatch_key('ddfnet::ddf_backward', 'Autograd')
    assert registration.registry.is_registered_op('ddfnet::ddf', 13)  # the TorchScript exporter's symbolic
    ddfnet.ops.register_all()  # a second call changes nothing (a second registration would raise)


def test_ddf_scripts_to_the_bare_operator():
    calls = [node.kind() for node in torch.jit.script(ddfnet.ops.ddf).graph.nodes()]
    assert calls == ['ddfnet::ddf']



def test_setup_loads_the_native_module_without_ddfnet(monkeypatch):
    # setup.py runs ddfnet/ops/_native.py by its path before ddfnet is installed (shared compiler flags): its
    # top level may import torch and the standard library only.
    import importlib.util
    import sys

    for name in [n for n in sys.modules if n == 'ddfnet' or n.startswith('ddfnet.')]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of ddfnet now fails
    spec = importlib.util.spec_from_file_location('_ddfnet_native', PACKAGE / 'ops' / '_native.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.cxx_flags()


def test_no_test_file_imports_another():
    wrong = []
    for path in sorted(TESTS.glob('test_*.py')):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or '']
            else:
                continue
            wrong += [f'{path.name} imports {name}' for name in names if name.split('.')[0].startswith('test_')]
    assert wrong == []


def test_the_package_holds_no_test_only_code():
    # The CUDA emulation (its loader and C++) is test support: tests/support/cuda_emulation.
    root = PACKAGE.parent
    files = [p for p in [*PACKAGE.rglob('*'), *(root / 'csrc').rglob('*')] if '__pycache__' not in p.parts]
    assert not [p for p in files if 'emulation' in p.name]


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add((node.module or '').split('.')[0])
    return names


def test_no_package_module_imports_test_support():
    wrong = [f'{p.relative_to(PACKAGE.parent)} imports {name}' for p in sorted(PACKAGE.rglob('*.py'))
             for name in _top_level_imports(p) & {'support', 'tests', 'pytest', 'conftest'}]
    assert wrong == []


def test_no_script_imports_another():
    # Scripts share code through the package; measurement scripts also through benchmark_common beside them.
    root = PACKAGE.parent
    scripts = [root / 'train.py', root / 'validate.py', *sorted((root / 'scripts').rglob('*.py')),
               *sorted((root / 'docs').rglob('*.py'))]
    names = {p.stem for p in scripts} - {'benchmark_common'}
    wrong = [f'{p.relative_to(root)} imports {name}' for p in scripts for name in _top_level_imports(p) & names]
    assert wrong == []


def test_the_fast_tier_is_offline_but_may_use_this_machine():
    # tests/conftest.py: a fast test's connection to another machine raises at once (no timeout to wait
    # out), in-process and for the hub in subprocesses; loopback connections (torchrun's store) work.
    with pytest.raises(ConnectionRefusedError, match='the fast tier is offline'):
        socket.create_connection(('pypi.org', 443), timeout=5)
    with pytest.raises(ConnectionRefusedError, match='the fast tier is offline'):
        socket.socket().connect(('8.8.8.8', 53))
    assert os.environ['HF_HUB_OFFLINE'] == '1'
    with socket.create_server(('127.0.0.1', 0)) as server:
        socket.create_connection(server.getsockname(), timeout=5).close()


@pytest.mark.parametrize('changed, full_install', [('csrc', False), ('setup.py', True), ('pyproject.toml', True)])
def test_make_setup_reinstalls_from_the_index_only_when_the_packaging_changes(tmp_path, changed, full_install):
    # An edit under csrc/ rebuilds the extension offline (make test works without the network); a change
    # of the packaging (dependencies) runs the whole install.
    stamp = tmp_path / '.ddfnet-installed'
    stamp.touch()
    if changed == 'csrc':  # the stamp older than everything, setup.py and pyproject.toml taken as older still
        os.utime(stamp, (0, 0))
        args = ['-o', 'setup.py', '-o', 'pyproject.toml']
    else:
        args = ['-W', changed]
    result = subprocess.run(['make', '-n', 'setup', f'VENV={tmp_path}', *args], cwd=PACKAGE.parent,
                            capture_output=True, text=True, check=True)
    assert ('pip install torch==' in result.stdout) == full_install, result.stdout
    assert ('--no-index' in result.stdout) != full_install, result.stdout


def test_ci_fails_on_a_skip_it_does_not_expect(tmp_path):
    # .ci/run passes the CUDA tests' skips (no GPU there) and fails on any other, e.g. a missing webdataset.
    def junit(*reasons):
        cases = ''.join(f'<testcase classname="tests.test_x" name="t{i}"><skipped type="pytest.skip" '
                        f'message="{reason}"/></testcase>' for i, reason in enumerate(reasons))
        path = tmp_path / 'junit.xml'
        path.write_text(f'<testsuites><testsuite name="pytest">{cases}<testcase classname="a" name="ok"/>'
                        '</testsuite></testsuites>')
        return subprocess.run([sys.executable, str(PACKAGE.parent / '.ci' / 'skips.py'), str(path),
                               'needs a CUDA device'], capture_output=True, text=True)
    assert junit('needs a CUDA device', 'needs a CUDA device').returncode == 0
    result = junit('needs a CUDA device', "could not import 'webdataset': No module named 'webdataset'")
    assert result.returncode == 1
    assert "tests.test_x::t1: could not import 'webdataset'" in result.stderr
