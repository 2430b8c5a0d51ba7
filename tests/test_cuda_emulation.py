"""The CUDA emulation itself (tests/support/cuda_emulation): each of its checks fires, shared memory starts
poisoned, both modes compute the same bits, the user build never compiles it, and the sanitizer builds run
the kernels clean. The kernels' grid on the emulation is in test_kernels.py ('emu'). All slow: the emulation
is an extension built on first use (minutes)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from support import cuda_emulation
from support.backends import check, inputs, require
from support.oracles import random_inputs
from support.runner import TESTS, repo_env, script_path

from ddfnet.ops import _native

pytestmark = pytest.mark.slow


@pytest.fixture
def emu():
    require('emu')
    module = cuda_emulation.load('plain')
    yield module
    module.set_mode('fibers')


# selftest kernel -> the failure it must raise (support/cuda_emulation/csrc/module.cc)
FAULTS = {
    'shuffle_mask': r'mask 0xffff; only the full-warp mask',
    'shuffle_partial_warp': r'this warp has 16 threads',
    'shuffle_divergent': r'divergent shuffle: thread \(16, 0, 0\) is at the shuffle at line \d+, other lanes',
    'shuffle_exited_lane': r'divergent shuffle: thread \(7, 0, 0\) exited while other lanes',
    'shuffle_vs_syncthreads': r'deadlock: no thread of the block can continue',
    'syncthreads_exited': r'exited while other threads wait at __syncthreads',
    'syncthreads_two_sites': r'waits at __syncthreads line \d+ while other threads wait at __syncthreads line',
    'block_too_large': r'block dimension 0 over its limit 1024',
    'block_z_too_large': r'block dimension 2 over its limit 64',
    'grid_zero': r'invalid configuration',
    'grid_y_too_large': r'grid dimension 1 over its limit 65535',
    'dynamic_shared_too_large': r'dynamic shared memory over the per-block limit',
    'shared_too_large': r"53248 bytes with 'big', over the 49152-byte limit",
    'shared_write_past_end': r"shared array 'small' \(128 bytes\) was written past its end",
}


# Threads mode: which lane reaches the fault first depends on the OS scheduler (the message does not).
THREADS_MODE = {
    'shuffle_divergent': r'divergent shuffle: thread \(\d+, 0, 0\) is at the shuffle at line \d+, other lanes',
    'shuffle_exited_lane': r'divergent shuffle: thread \((7|39), 0, 0\) exited while other lanes',
}


@pytest.mark.parametrize('mode', ('fibers', 'threads'))
@pytest.mark.parametrize('name', FAULTS)
def test_each_check_raises(emu, name, mode):
    emu.set_mode(mode)
    expected = THREADS_MODE.get(name, FAULTS[name]) if mode == 'threads' else FAULTS[name]
    with pytest.raises(RuntimeError, match=expected):
        emu.selftest(name)


@pytest.mark.parametrize('mode', ('fibers', 'threads'))
def test_correct_reduction_and_poisoned_shared_memory(emu, mode):
    emu.set_mode(mode)
    torch.testing.assert_close(emu.selftest('block_sum'), torch.arange(1024.).view(4, 256).sum(1))
    out = emu.selftest('shared_unwritten')  # thread 29 reads the slot thread 30 never wrote
    assert out[29].isnan() and not out[:29].isnan().any() and not out[30:].isnan().any()
    if mode == 'fibers':  # without its __syncthreads thread 0 reads the later warps' slots before they are written
        assert emu.selftest('block_sum_no_barrier').isnan().all()


def test_modes_agree_bit_for_bit(emu):
    # Threads mode runs the blocks' threads concurrently; the results must not depend on it.
    results = {}
    for mode in ('fibers', 'threads'):
        emu.set_mode(mode)
        got = []
        for layout in ('nchw', 'nhwc'):
            x, cf, sf, grad = random_inputs(2, 37, 9, 7, 3, 1, dtype=torch.float32, memory_format=layout,
                                            grad_output=True)
            got += [torch.ops.ddfnet_emu.ddf(x, cf, sf, 3, 1, 1, 'mul'),
                    *torch.ops.ddfnet_emu.ddf_backward(grad, x, cf, sf, 3, 1, 1, 'mul')]
        results[mode] = got
    for a, b in zip(results['fibers'], results['threads']):
        assert torch.equal(a, b)


@pytest.mark.parametrize('layout', ('nchw', 'nhwc'))
@pytest.mark.parametrize('shape, k, dilation, stride', (((2, 20, 40, 40), 3, 1, 1), ((1, 40, 33, 31), 9, 1, 2),
                                                        ((1, 64, 30, 30), 5, 2, 1), ((3, 19, 23, 21), 7, 1, 2)))
def test_many_grid_stride_iterations(emu, shape, k, dilation, stride, layout):
    # Grids sized for a 1-SM GPU (at most 32 blocks): every kernel's grid-stride / block-item loop runs
    # many times, and the reductions split, on shapes small enough for the emulation.
    emu.set_multiprocessors(1)
    try:
        check(torch.ops.ddfnet_emu, *inputs('emu', shape, k, stride, layout=layout), k, dilation, stride, 'mul',
              tol=(1e-4, 1e-3))
    finally:
        emu.set_multiprocessors(cuda_emulation.H200_MULTIPROCESSORS)


def test_emulation_errors_reach_python_as_errors(emu):
    x, cf, sf = random_inputs(2, 3, 5, 5, 3)
    with pytest.raises(ValueError, match='kernel_size must be a positive odd int'):
        torch.ops.ddfnet_emu.ddf(x, cf, sf, 2, 1, 1, 'mul')
    with pytest.raises(ValueError, match='variant must be one of'):
        cuda_emulation.load('msan')


def expanded(*shape):
    """A zero tensor of any shape that takes no memory (every stride 0)."""
    return torch.zeros(1).expand(*shape)


@pytest.mark.parametrize('b, c, h, w, k, message', [
    (2 ** 31, 1, 1, 1, 3, "batch size and channels must be below 2\\^31"),
    (1, 2 ** 31, 1, 1, 3, "batch size and channels must be below 2\\^31"),
    (1, 1, 1, 1, 46341, 'kernel_size must be at most 46339'),
    (1, 1, 2 ** 30, 1, 3, 'height and width must be below 2\\^30'),
])
def test_sizes_beyond_the_kernels_index_limits_raise_before_allocating(emu, b, c, h, w, k, message):
    # The kernels index pixels, channels, samples and taps in 32 bits; the entry points refuse larger
    # inputs before allocating anything (the output of a 2^31-sample batch would take 8 GB here).
    x, cf, sf = expanded(b, c, h, w), expanded(b, c, k, k), expanded(b, k * k, h, w)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ddfnet_emu.ddf(x, cf, sf, k, 1, 1, 'mul')
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ddfnet_emu.ddf_backward(expanded(b, c, h, w), x, cf, sf, k, 1, 1, 'mul')


def test_user_build_never_compiles_the_emulation():
    cpp, cuda = _native._sources()
    assert cpp and cuda and not [p for p in cpp + cuda if 'emulation' in p]
    assert all('emulation' in p or p.endswith('ddf_checks.cpp') for p in cuda_emulation.sources())


def run_python(args, variant=None, timeout=3000):
    """Python on `args` with the repository importable, under a sanitizer variant's runtime if given."""
    env = repo_env(cuda_emulation.sanitizer_env(variant) if variant else None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


def run_sanitized(variant):
    return run_python([str(TESTS / 'support' / 'emu_sanitized.py'), variant], variant)


# Each builds its own variant (minutes on a small machine): `make test-all` and `make test-sanitizers` set
# the variable.
needs_sanitizer_run = pytest.mark.skipif(os.environ.get('DDFNET_TEST_SANITIZERS') != '1',
                                         reason='set DDFNET_TEST_SANITIZERS=1 (make test-sanitizers)')


@needs_sanitizer_run
@pytest.mark.parametrize('variant', ('asan', 'tsan'))
def test_sanitizers_find_nothing(variant):
    result = run_sanitized(variant)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for report in ('ERROR: AddressSanitizer', 'runtime error:', 'WARNING: ThreadSanitizer'):
        assert report not in output, output[-6000:]
    assert ' 0 mismatches' in result.stdout


RACE = """
import torch
from support import cuda_emulation
emu = cuda_emulation.load('tsan')
emu.selftest('block_sum')
print('block_sum: clean', flush=True)
emu.selftest('block_sum_no_barrier')
print('block_sum_no_barrier: not reported', flush=True)
"""


@needs_sanitizer_run
def test_thread_sanitizer_sees_a_missing_syncthreads():
    # Only __syncthreads orders the threads' shared-memory accesses for ThreadSanitizer: the runtime's own
    # locking at shuffles and exits must not hide the race of a reduction without its barrier.
    result = run_python(['-c', RACE], 'tsan')
    output = result.stdout + result.stderr
    assert 'block_sum: clean' in result.stdout and 'not reported' not in result.stdout, output[-6000:]
    assert result.returncode == 66 and 'WARNING: ThreadSanitizer: data race' in output, output[-6000:]
    assert 'block_sum_kernel' in output, output[-6000:]


TRAFFIC = """
import json, sys
import torch
from support import cuda_emulation
emu = cuda_emulation.load('traffic')
report = {}
for name in ('copy_coalesced', 'copy_strided'):
    emu.traffic_start()
    out = emu.selftest(name)
    report[name] = (emu.traffic_stop(), out.tolist())
print(json.dumps(report))
"""


def test_traffic_model_counts_requests_and_sectors():
    # 256 threads copy one float each: 8 warp requests per side; coalesced, a warp's 128 bytes are 4 sectors,
    # with every 8th float read each lane's load touches its own sector (efficiency 1/8).
    result = run_python(['-c', TRAFFIC], timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.splitlines()[-1])
    for name, load_sectors, step in (('copy_coalesced', 32, 1), ('copy_strided', 256, 8)):
        (launch,), out = report[name]
        assert out == [float(i * step) for i in range(256)]
        assert (launch['kernel'], launch['grid'], launch['block']) == ('copy_kernel', 1, 256)
        assert (launch['load_requests'], launch['load_bytes'], launch['load_distinct_bytes']) == (8, 1024, 1024)
        assert launch['load_sectors'] == load_sectors
        assert (launch['store_requests'], launch['store_bytes'], launch['store_sectors'],
                launch['store_distinct_bytes']) == (8, 1024, 32, 1024)


def test_emulated_traffic_script_prints_each_kernel():
    result = run_python([str(script_path('scripts/benchmarks/emulated_traffic')), '--shapes', '1x32x12x12',
                         '--dtypes', 'fp32'], timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
    kernels = {r['kernel'] for r in rows}
    # One forward and one backward, both layouts: every kernel of the op shows up (the sum-of-partials pass
    # joins the filter-gradient reductions of the spatial filter).
    assert kernels == {f'{k}_{fmt}_kernel' for k in ('forward', 'grad_input', 'grad_cf', 'grad_sf')
                       for fmt in ('nchw', 'nhwc')} | {'sum_partials_kernel'}, kernels
    for r in rows:
        # eff may exceed 1 (lanes sharing bytes, a broadcast) but is never 0; no kernel touches more
        # distinct bytes than it requests.
        assert r['efficiency'] > 0 and 0 < r['distinct'] <= r['requested'] and r['ratio'] > 0, r
