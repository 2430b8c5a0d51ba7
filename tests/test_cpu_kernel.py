"""What only the native CPU kernel (csrc/cpu) has: it is active, its results do not depend on the thread
count, and the forced reference path. Its grid against the reference is in test_kernels.py (backend 'cpu')."""
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.oracles import random_inputs

import ddfnet
from ddfnet.ops.registrations import SCHEMAS

pytestmark = pytest.mark.skipif(os.environ.get('DDFNET_FORCE_REFERENCE', '') not in ('', '0'),
                                reason='the reference path is forced')


def test_native_cpu_kernel_is_active():
    # CI builds the extension ahead of time; a user install JIT-compiles it. Either way CPU must be native.
    assert ddfnet.ops.implementation('cpu') == 'native', ddfnet.ops.registrations.native_unavailable_reason()


def test_python_fallback_schemas_match_the_cpp_ones():
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.ddfnet, name).default._schema) == f'ddfnet::{schema}'


def test_deterministic_and_thread_count_independent():
    x, cf, sf = random_inputs(4, 32, 15, 13, 3, 1, dtype=torch.float32)
    results = []
    threads = torch.get_num_threads()
    try:
        for n, fmt in itertools.product((1, 2, 1), (torch.contiguous_format, torch.channels_last)):
            torch.set_num_threads(n)
            xf = x.contiguous(memory_format=fmt)
            out = torch.ops.ddfnet.ddf(xf, cf, sf, 3, 1, 1, 'mul')
            grads = torch.ops.ddfnet.ddf_backward(torch.ones_like(out), xf, cf, sf, 3, 1, 1, 'mul')
            results.append((fmt, [out, *grads]))
    finally:
        torch.set_num_threads(threads)
    for fmt in (torch.contiguous_format, torch.channels_last):
        runs = [r for f, r in results if f == fmt]
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                assert torch.equal(a, b)


@pytest.mark.slow  # a subprocess
def test_forced_reference_path_in_a_subprocess(tmp_path):
    # DDFNET_FORCE_REFERENCE=1: no native kernels; the schemas come from Python, the reference runs,
    # warns once, passes opcheck, and gives the native kernel's results.
    code = ('import warnings, torch, ddfnet\n'
            'from ddfnet.ops import DDFSlowPathWarning\n'
            'x = torch.randn(2, 3, 7, 6); cf = torch.randn(2, 3, 3, 3); sf = torch.randn(2, 9, 4, 3)\n'
            'with warnings.catch_warnings(record=True) as w:\n'
            '    warnings.simplefilter("always")\n'
            '    out = ddfnet.ddf(x, cf, sf, 3, 1, 2); ddfnet.ddf(x, cf, sf, 3, 1, 2)\n'
            'print(ddfnet.ops.implementation("cpu"), sum(issubclass(i.category, DDFSlowPathWarning) for i in w))\n'
            'torch.library.opcheck(torch.ops.ddfnet.ddf.default, (x.requires_grad_(), cf, sf, 3, 1, 2, "mul"))\n'
            'torch.save((x.detach(), cf, sf, out), "ref.pt")\n')
    env = dict(os.environ, DDFNET_FORCE_REFERENCE='1')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['reference', '1']
    x, cf, sf, out = torch.load(tmp_path / 'ref.pt')
    torch.testing.assert_close(torch.ops.ddfnet.ddf(x, cf, sf, 3, 1, 2, 'mul'), out)


def test_jit_builds_go_under_torch_extensions_dir(tmp_path, monkeypatch):
    # The native kernels' and the emulation's just-in-time builds honour TORCH_EXTENSIONS_DIR as torch's own
    # do (a cluster's local disk; a test that must not share the user's cache).
    from ddfnet.utils.io import extension_build_dir

    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path))
    path = extension_build_dir('ddfnet_native')
    assert path.is_dir() and path.parent.parent == tmp_path and path.parent.name.startswith('ddfnet-torch')
    monkeypatch.delenv('TORCH_EXTENSIONS_DIR')
    from torch.utils import cpp_extension
    assert extension_build_dir('ddfnet_native').parent.parent == Path(cpp_extension.get_default_build_root())
