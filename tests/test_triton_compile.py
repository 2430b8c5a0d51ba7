"""Every Triton DDF kernel x autotune configuration compiles for sm_80 and sm_90 without a GPU and without
spills (scripts/benchmarks/triton_resources.py: triton.compile, then cuobjdump's resource usage). Slow: about
200 compilations, a couple of minutes on 2 cores (seconds once triton's cache holds them).
"""
import os

import pytest
from support.runner import load_script, repo_env, run_script

pytest.importorskip('triton')
pytestmark = [pytest.mark.slow, pytest.mark.triton]


def test_every_configuration_compiles_without_spills():
    # A process of its own: this one's kernels may be the interpreter's (tests/test_triton.py).
    env = {k: v for k, v in repo_env().items() if k != 'TRITON_INTERPRET'}
    proc = run_script('scripts/benchmarks/triton_resources.py', env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from ddfnet.ops.triton_ddf import CONFIGS
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    module = load_script('scripts/benchmarks/triton_resources')
    want = sum(map(len, CONFIGS.values())) * len(module.ARCHS) * len(module.DTYPES) * len(module.LAYOUTS)
    assert len(rows) == want, proc.stdout
    for row in rows:
        registers, stack, local = map(int, row[-3:])
        assert 0 < registers <= 255 and stack == 0 and local == 0, row
    assert {row[6] for row in rows} == {'sm_80', 'sm_90'}


def test_resource_usage_reads_cuobjdump(monkeypatch):
    module = load_script('scripts/benchmarks/triton_resources')
    assert os.access(module.cuobjdump(), os.X_OK)
    text = ('Resource usage:\n Common:\n  GLOBAL:0\n Function k:\n'
            '  REG:168 STACK:24 SHARED:0 LOCAL:16 CONSTANT[0]:656 TEXTURE:0 SURFACE:0 SAMPLER:0\n')

    class Done:
        stdout = text
    monkeypatch.setattr(module.subprocess, 'run', lambda *a, **k: Done)
    assert module.resource_usage(b'') == {'registers': 168, 'stack': 24, 'shared': 0, 'local': 16}
