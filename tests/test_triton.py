"""The Triton kernels (ddfnet.ops.triton_ddf) against the float64 reference: the four outputs, both combines,
both layouts, float32/16, bfloat16 (and float64), k 1-9, dilation 1-3, stride 1-3, odd sizes, batch 0 and 1,
every autotune configuration and the autotuned path, non-contiguous inputs, determinism.

Each case runs on a device, its first parameter id: 'interpreter' (CPU tensors under triton's interpreter, on
every machine) or 'cuda' (CUDA tensors, the kernels compiled for the GPU; marked cuda, so
scripts/gpu_check.sh runs them, and skipped without a GPU). On CUDA the grid runs one case per
(combine, layout, dtype), each with a fixed configuration in turn: every configuration is a compilation
per (k, combine, dtype, layout), so autotuning each case would compile four times as much.
Slow: the interpreter takes about a second per small case (k = 9 several).
"""
import functools
import importlib
import inspect
import itertools
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip('triton')
from support import backends  # noqa: E402
from support.backends import NAMES, TOLERANCES, dtype_id, every_other, inputs, run, transposed  # noqa: E402

from ddfnet.ops import triton_ddf  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.triton]


DEVICES = ('interpreter', 'cuda')


def on(device, *values, id=None):
    """A parameter set that runs on ``device`` (the cuda ones marked cuda), its id led by the device."""
    return pytest.param(device, *values, marks=[pytest.mark.cuda] if device == 'cuda' else [],
                        id='-'.join(filter(None, (device, id))))


def every_device(*cases):
    """Parametrize values: each case (a tuple of values; none: the device alone) on each device."""
    def name(value):
        if isinstance(value, tuple):
            return 'x'.join(map(str, value))
        return dtype_id(value) if isinstance(value, torch.dtype) else str(value)
    return [on(device, *case, id='-'.join(map(name, case))) for device in DEVICES for case in cases or [()]]


@pytest.fixture(scope='module')
def device(request):
    """The torch device the kernels run on, with ddfnet.ops._triton_kernels (re)imported for it: under
    triton's interpreter for 'interpreter', compiled for 'cuda'. TRITON_INTERPRET is read as @triton.jit
    decorates the kernels, when the module is (re)imported; set for that moment only, so nothing else in this
    process or its children is interpreted."""
    if request.param == 'cuda' and not torch.cuda.is_available():
        pytest.skip('needs a CUDA device')
    with pytest.MonkeyPatch.context() as patch:
        if request.param == 'interpreter':
            patch.setenv('TRITON_INTERPRET', '1')
        else:
            patch.delenv('TRITON_INTERPRET', raising=False)
        module = importlib.import_module('ddfnet.ops._triton_kernels')
        importlib.reload(module)
    triton_ddf._kernels.cache_clear()
    yield 'cpu' if request.param == 'interpreter' else 'cuda'
    importlib.reload(module)
    triton_ddf._kernels.cache_clear()


def ops(config=None):
    return SimpleNamespace(ddf=functools.partial(triton_ddf.forward, config=config),
                           ddf_backward=functools.partial(triton_ddf.backward, config=config))


# The first configuration: what CPU tensors run unless told otherwise, and on CUDA one compilation per
# specialisation instead of autotuning's four (test_autotuned_path autotunes).
OPS = ops(0)
# The interpreter rounds float32 to bfloat16 by truncation (a GPU rounds to nearest): one unit in the last place.
INTERPRETER_TOLERANCES = {**TOLERANCES, torch.bfloat16: (2 ** -7, 1e-5)}


def check(ops, x, *args):
    tolerances = INTERPRETER_TOLERANCES if x.device.type == 'cpu' else TOLERANCES
    return backends.check(ops, x, *args, tol=tolerances[x.dtype])
# Odd sizes; 19 channels: a full and a partial block. One sample (the interpreter's time is per program); the
# other tests have two.
SHAPES = {'nchw': (1, 5, 11, 9), 'nhwc': (1, 19, 9, 7)}
LOW = (torch.float32, torch.float16, torch.bfloat16)
# (k, dilation, stride): each value of each several times, k = 3 and 5 with every dilation and stride.
TAPS = [(1, 1, 1), (1, 2, 3), (3, 1, 1), (3, 2, 2), (3, 3, 3), (5, 1, 3), (5, 2, 1), (5, 3, 2), (7, 3, 1),
        (7, 1, 2), (9, 2, 3), (9, 1, 1)]
# Under the interpreter each (combine, layout, dtype) twice, each (k, dilation, stride) twice, with different
# partners; on CUDA the first half, case n with configuration n mod 4 (the interpreter's: the first).
COMBOS = list(itertools.product(('mul', 'add'), ('nchw', 'nhwc'), LOW))
GRID = [on(device, combine, k, dilation, stride, layout, dtype, n % len(triton_ddf.CONFIGS['forward']),
           id=f'{combine}-k{k}-d{dilation}-s{stride}-{layout}-{dtype_id(dtype)}')
        for device, shifts in (('interpreter', (0, 5)), ('cuda', (0,))) for shift in shifts
        for n, (combine, layout, dtype) in enumerate(COMBOS) for k, dilation, stride in [TAPS[(n + shift) % len(TAPS)]]]


@pytest.mark.parametrize('device, combine, k, dilation, stride, layout, dtype, config', GRID, indirect=['device'])
def test_matches_reference(device, combine, k, dilation, stride, layout, dtype, config):
    x, cf, sf, grad = inputs(device, SHAPES[layout], k, stride, dtype, layout)
    out = check(ops(config if device == 'cuda' else None), x, cf, sf, grad, k, dilation, stride, combine)[0]
    fmt = torch.channels_last if layout == 'nhwc' else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize('device, combine', every_device(('mul',), ('add',)), indirect=['device'])
def test_float64(device, combine):
    check(OPS, *inputs(device, (1, 3, 7, 6), 3, 2, torch.float64), 3, 2, 2, combine)


@pytest.mark.parametrize('device, config, layout', every_device(
    *itertools.product(range(len(triton_ddf.CONFIGS['forward'])), ('nchw', 'nhwc'))), indirect=['device'])
def test_every_configuration(device, config, layout):
    # Blocks of up to 128 pixels and 64 channels: several tiles along each, each with a remainder.
    x, cf, sf, grad = inputs(device, (1, 70, 15, 11), 3, 1, layout=layout, seed=1)
    check(ops(config), x, cf, sf, grad, 3, 2, 1, 'mul')


@pytest.mark.parametrize('device', every_device(), indirect=True)
def test_autotuned_path(device, monkeypatch):
    # What CUDA tensors run: the autotuner picks, per key, the configuration its benchmark finds fastest; the
    # layouts get separate entries. On CUDA the real benchmark picks; under the interpreter it runs each
    # candidate once and rates the second (16 x 64) fastest.
    if device == 'cpu':
        launch = triton_ddf._launch
        monkeypatch.setattr(triton_ddf, '_launch',
                            lambda *args, on_cuda, **kwargs: launch(*args, **kwargs, on_cuda=True))
        timings = itertools.cycle((3.0, 1.0, 2.0, 4.0))
        for _, tuned in triton_ddf._kernels().values():
            monkeypatch.setattr(tuned, '_do_bench', lambda call, quantiles: (call(), [next(timings)] * 3)[1])
    for _, tuned in triton_ddf._kernels().values():
        tuned.cache.clear()
    for layout in ('nchw', 'nhwc'):
        # The first call tunes (each candidate writes the whole output), the second runs the choice alone.
        for seed in (0, 1):
            check(ops(), *inputs(device, (1, 19, 9, 7), 3, 2, layout=layout, seed=seed), 3, 1, 2, 'mul')
    for name, (_, tuned) in triton_ddf._kernels().items():
        assert len(tuned.cache) == 2, name
        chosen = {(c.kwargs['BLOCK_P'], c.kwargs['BLOCK_C']) for c in tuned.cache.values()}
        assert chosen == ({(16, 64)} if device == 'cpu' else chosen & {c[:2] for c in triton_ddf.CONFIGS[name]}), name


@pytest.mark.parametrize('device, shape', every_device(*[(s,) for s in ((1, 3, 7, 5), (0, 4, 6, 5), (2, 0, 6, 5),
                                                                   (2, 3, 0, 5))]), indirect=['device'])
def test_batch_one_and_empty(device, shape):
    x, cf, sf, grad = inputs(device, shape, 3, 2)
    got = check(OPS, x, cf, sf, grad, 3, 1, 2, 'mul')
    if not x.numel():
        assert not any(t.any() for t in got)


@pytest.mark.parametrize('device, combine', every_device(('mul',), ('add',)), indirect=['device'])
def test_non_contiguous_inputs(device, combine):
    x, cf, sf, grad = inputs(device, (2, 6, 9, 8), 3, 2)
    channels_last_slice = every_other(x, 1, torch.channels_last)
    for case in ((transposed(x), cf, sf, grad),
                 (every_other(x, 1), transposed(cf), every_other(sf, 3), transposed(grad)),
                 (channels_last_slice, every_other(cf, 0), transposed(sf), every_other(grad, 2))):
        assert not all(t.is_contiguous() for t in case)
        check(OPS, *case, 3, 1, 2, combine)


@pytest.mark.parametrize('device, dtype', every_device((torch.float32,), (torch.bfloat16,)), indirect=['device'])
def test_deterministic(device, dtype):
    # Several pixel tiles and channel blocks per sum: two runs agree bit for bit.
    x, cf, sf, grad = inputs(device, (1, 40, 13, 11), 3, 1, dtype, 'nhwc')
    first, second = (run(OPS, x, cf, sf, grad, 3, 2, 1, 'mul') for _ in range(2))
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_no_atomics():
    # Bitwise reproducible on a GPU too: every sum has one program and a fixed order, no atomic adds.
    from ddfnet.ops import _triton_kernels
    assert 'atomic_' not in inspect.getsource(_triton_kernels)


def test_argument_errors():
    x, cf, sf, grad = inputs('cpu', (1, 3, 7, 5), 3, 1)
    with pytest.raises(ValueError, match='spatial_filter must have shape'):
        triton_ddf.forward(x, cf, sf, 3, 1, 2, 'mul')
    with pytest.raises(ValueError, match='grad_output must have shape'):
        triton_ddf.backward(grad[:, :, :-1], x, cf, sf, 3, 1, 1, 'mul')
    with pytest.raises(TypeError, match="grad_output must have the input's dtype"):
        triton_ddf.backward(grad.double(), x, cf, sf, 3, 1, 1, 'mul')


def test_import_needs_no_kernels():
    # import ddfnet leaves the kernels unimported; the module imports (and says so) where triton is absent.
    code = ("import sys; import ddfnet; assert 'ddfnet.ops._triton_kernels' not in sys.modules; "
            "sys.modules['triton'] = None; import ddfnet.ops.triton_ddf as t; assert not t.available()")
    subprocess.run([sys.executable, '-c', code], check=True, env={**os.environ, 'TRITON_INTERPRET': '0'})
    assert triton_ddf.available()
