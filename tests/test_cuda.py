"""What the CUDA kernels (csrc/cuda) need a GPU for: agreement across devices, autocast on CUDA, CUDA
graphs. The kernels' grid against the reference is in test_kernels.py (backend 'cuda'; without a GPU the
same sources run there under the CPU emulation, backend 'emu'). Skipped without a GPU; with one, the
native CUDA kernels must be active (a test fails rather than compare the reference with itself)."""
import copy

import pytest
import torch
from support.backends import COMBINES, LAYOUTS, NAMES, TOLERANCES, dtype_id, inputs, params, require, run

import ddfnet
from ddfnet.ops import ddf_forward_reference

# Marked cuda as a whole: scripts/gpu_check.sh selects `-m "cuda and not emu"` (the emulation is not built on
# the GPU machine).
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]


def test_gradient_penalty_cpu_and_cuda_agree():
    require('cuda')
    torch.manual_seed(0)
    layers = {'cpu': ddfnet.DDFPack(10, stride=2, head=2).double()}
    layers['cuda'] = copy.deepcopy(layers['cpu']).to('cuda')
    x = torch.randn(2, 10, 9, 7, dtype=torch.float64)
    for device, layer in layers.items():
        x_ = x.to(device).requires_grad_()
        grad_x, = torch.autograd.grad(layer(x_).square().sum(), x_, create_graph=True)
        grad_x.square().sum().backward()
    for (name, p_cpu), p_cuda in zip(layers['cpu'].named_parameters(), layers['cuda'].parameters()):
        torch.testing.assert_close(p_cuda.grad.cpu(), p_cpu.grad, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize('other', params('cpu', 'emu'))
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('dtype', (torch.float64, torch.float32), ids=dtype_id)
@pytest.mark.parametrize('combine', COMBINES)
def test_cuda_agrees_with_the_cpu_kernel_and_the_emulation(combine, dtype, layout, other):
    # 'emu' runs the same kernel source on the CPU: only floating-point contraction may differ.
    cuda_ops, other_ops = require('cuda'), require(other)
    on_gpu = inputs('cuda', (2, 6, 10, 9), 5, 2, dtype, layout)
    got = run(cuda_ops, *on_gpu, 5, 2, 2, combine)
    want = run(other_ops, *[t.cpu() for t in on_gpu], 5, 2, 2, combine)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=tol, atol=tol, msg=lambda m, name=name: f'{name}: {m}')


def test_autocast_runs_in_half():
    require('cuda')
    x, cf, sf, _ = inputs('cuda', (2, 4, 8, 8), 3, 1)
    with torch.autocast('cuda', dtype=torch.float16):
        out = ddfnet.ddf(x, cf, sf, 3)
    assert out.dtype == torch.float16
    # The values, not only the routing: the float64 reference on the inputs autocast rounded to half.
    want = ddf_forward_reference(*(t.half().double() for t in (x, cf, sf)), 3, 1, 1, 'mul')
    rtol, atol = TOLERANCES[torch.float16]
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol)


def test_mixed_devices_raise():
    require('cuda')
    x, cf, sf, _ = inputs('cuda', (2, 4, 8, 8), 3, 1)
    with pytest.raises(ValueError, match='one device'):
        torch.ops.ddfnet.ddf(x, cf.cpu(), sf, 3, 1, 1, 'mul')


def test_torch_compile_reduce_overhead(monkeypatch):
    # CUDA graphs: the kernels must not synchronise or allocate outside the caching allocator. Inductor
    # falls back to running without graphs (silently, but for a log line) when it cannot record them, so
    # the graph replays are counted.
    require('cuda')
    replays, replay = [], torch.cuda.CUDAGraph.replay

    def counted_replay(graph):
        replays.append(graph)
        return replay(graph)

    monkeypatch.setattr(torch.cuda.CUDAGraph, 'replay', counted_replay)
    torch._dynamo.reset()
    x, cf, sf, _ = inputs('cuda', (2, 8, 12, 10), 3, 1, layout='nhwc')
    args = tuple(t.requires_grad_() for t in (x, cf, sf))

    def loss_fn(x, cf, sf):
        return ddfnet.ddf(x.relu(), cf, sf, 3, 2, 1, 'mul').square().sum()

    want = loss_fn(*args)
    want_grads = torch.autograd.grad(want, args)
    compiled = torch.compile(loss_fn, mode='reduce-overhead')
    for _ in range(3):  # warm-up / recording, then replays of the CUDA graphs
        torch.compiler.cudagraph_mark_step_begin()
        got = compiled(*args)
        got_grads = torch.autograd.grad(got, args)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for name, g, w in zip(NAMES[1:], got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f'{name}: {m}')
    assert replays, 'no CUDA graph was replayed: torch.compile ran the step without CUDA graphs'

