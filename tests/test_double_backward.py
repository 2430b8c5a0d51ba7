"""Every way autograd reaches the DDF op: gradients of gradients (any order), forward mode, torch.func
transforms and vmap, on the op itself and on the layers built on it.

The oracles are float64 finite differences (gradcheck / gradgradcheck), the naive loop implementation
(plain torch ops, which every transform supports) and the reference implementation run in a subprocess
with DDFNET_FORCE_REFERENCE=1.
"""
import json
import subprocess
import sys

import pytest
import torch
from support.gradient_penalty import gradient_penalty_grads
from support.oracles import naive_ddf, random_inputs
from support.runner import repo_env
from torch.func import functional_call, grad, hessian, jvp, vmap

import ddfnet
from ddfnet.layers import DDFBranchPack

COMBINES = ('mul', 'add')
# Odd sizes throughout; stride 2 on an odd size gives the rounded-up output extent.
GRID = [(k, d, s) for k in (1, 3, 5) for d in (1, 2) for s in (1, 2)]


def _op(k, d, s, combine):
    return lambda *t: ddfnet.ddf(*t, k, d, s, combine)


@pytest.mark.parametrize('combine', COMBINES)
@pytest.mark.parametrize('k, dilation, stride', GRID)
def test_gradgradcheck(combine, k, dilation, stride):
    # fast_mode checks random projections of the second-order Jacobians (one vector per input), which
    # keeps the 24 cases cheap; the slow mode runs on a few cases below.
    inputs = random_inputs(2, 3, 7, 5, k, stride, requires_grad=True)
    assert torch.autograd.gradgradcheck(_op(k, dilation, stride, combine), inputs, fast_mode=True,
                                        check_fwd_over_rev=True)


@pytest.mark.parametrize('combine', COMBINES)
@pytest.mark.parametrize('k, dilation, stride', ((3, 1, 1), (3, 2, 2), (5, 1, 2)))
def test_gradgradcheck_full_jacobian(combine, k, dilation, stride):
    inputs = random_inputs(1, 2, 5, 3, k, stride, requires_grad=True)
    assert torch.autograd.gradgradcheck(_op(k, dilation, stride, combine), inputs)


@pytest.mark.parametrize('combine', COMBINES)
def test_double_backward_gradients_are_not_zero_and_match_naive(combine):
    # The bug this file exists for: create_graph=True, then .backward(), gave all-zero gradients.
    x, cf, sf = random_inputs(2, 3, 7, 5, 3, 2, requires_grad=True)

    def penalty(fn):
        out = fn(x, cf, sf, 3, 1, 2, combine)
        grads = torch.autograd.grad(out.square().sum(), (x, cf, sf), create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), (x, cf, sf))

    got, want = penalty(ddfnet.ddf), penalty(naive_ddf)
    for g, w in zip(got, want):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('combine', COMBINES)
def test_third_order(combine):
    grad_output = torch.randn(2, 3, 4, 3, dtype=torch.float64)

    def first_derivatives(*t):
        out = ddfnet.ddf(*t, 3, 1, 2, combine)
        return torch.autograd.grad(out, t, grad_output, create_graph=True)

    inputs = random_inputs(2, 3, 7, 5, 3, 2, requires_grad=True)
    assert torch.autograd.gradgradcheck(first_derivatives, inputs, fast_mode=True)


@pytest.mark.parametrize('combine', COMBINES)
def test_undefined_incoming_gradients(combine):
    # Only one of ddf_backward's outputs used: the others' gradients arrive as None.
    x, cf, sf = random_inputs(2, 3, 7, 5, 3, 1, requires_grad=True)
    for index in range(3):
        args = tuple(t.detach().requires_grad_() for t in (x, cf, sf))
        n_args = tuple(t.detach().requires_grad_() for t in (x, cf, sf))
        g = torch.autograd.grad(ddfnet.ddf(*args, 3, 1, 1, combine).square().sum(), args, create_graph=True)
        n = torch.autograd.grad(naive_ddf(*n_args, 3, 1, 1, combine).square().sum(), n_args, create_graph=True)
        got = torch.autograd.grad(g[index].sum(), args, allow_unused=True, materialize_grads=True)
        want = torch.autograd.grad(n[index].sum(), n_args, allow_unused=True, materialize_grads=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('combine', COMBINES)
@pytest.mark.parametrize('k, dilation, stride', ((1, 1, 1), (3, 2, 2), (5, 1, 2)))
def test_forward_mode_gradcheck(combine, k, dilation, stride):
    # torch.autograd.forward_ad dual tensors (tangents used to be dropped silently), and vmap over them.
    inputs = random_inputs(2, 3, 7, 5, k, stride, requires_grad=True)
    assert torch.autograd.gradcheck(_op(k, dilation, stride, combine), inputs, check_forward_ad=True,
                                    check_backward_ad=False, check_batched_forward_grad=True, check_batched_grad=False)


@pytest.mark.parametrize('combine', COMBINES)
def test_torch_func_transforms_match_naive(combine):
    x, cf, sf = random_inputs(2, 3, 7, 5, 3, 2)
    tangents = random_inputs(2, 3, 7, 5, 3, 2, seed=1)
    ours, naive = _op(3, 1, 2, combine), (lambda *t: naive_ddf(*t, 3, 1, 2, combine))

    def close(a, b):
        for u, v in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
            assert u.abs().sum() > 0
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)

    close(jvp(ours, (x, cf, sf), tangents), jvp(naive, (x, cf, sf), tangents))
    loss = lambda fn: lambda *t: fn(*t).square().sum()  # noqa: E731
    close(grad(loss(ours), argnums=(0, 1, 2))(x, cf, sf), grad(loss(naive), argnums=(0, 1, 2))(x, cf, sf))
    close(hessian(loss(ours), argnums=1)(x, cf, sf), hessian(loss(naive), argnums=1)(x, cf, sf))
    batch = torch.randn(4, *x.shape, dtype=x.dtype)
    close(vmap(ours, in_dims=(0, None, None))(batch, cf, sf), vmap(naive, in_dims=(0, None, None))(batch, cf, sf))
    per_sample = vmap(grad(loss(ours)), in_dims=(0, None, None))(batch, cf, sf)
    close(per_sample, vmap(grad(loss(naive)), in_dims=(0, None, None))(batch, cf, sf))


# torch.library.register_vmap, which gives the operators their own batching rules, is public from torch 2.5.
HAS_REGISTER_VMAP = hasattr(torch.library, 'register_vmap')


@pytest.mark.skipif(not HAS_REGISTER_VMAP, reason='needs torch >= 2.5 (torch.library.register_vmap)')
@pytest.mark.parametrize('combine', COMBINES)
def test_vmap_of_the_operators_directly(combine):
    # Batching rules of their own (one call on the folded batch, not torch's per-slice loop), for any
    # in_dims, including unbatched and non-leading ones.
    assert torch._C._dispatch_has_kernel_for_dispatch_key('ddfnet::ddf', 'FuncTorchBatched')
    assert torch._C._dispatch_has_kernel_for_dispatch_key('ddfnet::ddf_backward', 'FuncTorchBatched')
    slices = [random_inputs(2, 3, 6, 5, 3, 2, grad_output=True, seed=i) for i in range(3)]
    g, x, cf, sf = (torch.stack([s[i] for s in slices], dim=d) for i, d in ((3, 0), (0, 2), (1, 4), (2, 0)))
    out = vmap(lambda *t: torch.ops.ddfnet.ddf(*t, 3, 1, 2, combine), in_dims=(2, 4, None))(x, cf, sf[0])
    grads = vmap(lambda *t: torch.ops.ddfnet.ddf_backward(*t, 3, 1, 2, combine), in_dims=(0, 2, 4, 0))(g, x, cf, sf)
    for i, (x_i, cf_i, sf_i, g_i) in enumerate(slices):
        torch.testing.assert_close(out[i], naive_ddf(x_i, cf_i, slices[0][2], 3, 1, 2, combine))
        want = torch.ops.ddfnet.ddf_backward(g_i, x_i, cf_i, sf_i, 3, 1, 2, combine)
        for got_grad, want_grad in zip(grads, want):
            torch.testing.assert_close(got_grad[i], want_grad)


def test_vmap_of_the_operators_directly_without_register_vmap_says_which_torch_it_needs(monkeypatch):
    # Before torch 2.5 (no torch.library.register_vmap) an operator called directly under vmap raises,
    # rather than running torch's per-slice loop with its performance warning; ddfnet.ddf still works,
    # through its autograd.Function's rule. Checked on every torch with a stand-in operator.
    from ddfnet.ops.registrations import _register_vmap
    lib = torch.library.Library('ddfnet_vmap_check', 'DEF')
    lib.define('twice(Tensor x) -> Tensor')
    lib.impl('twice', lambda x: x * 2, 'CompositeExplicitAutograd')
    monkeypatch.delattr(torch.library, 'register_vmap', raising=False)
    _register_vmap(lib, 'twice', None)
    pattern = r'torch.ops.{}.{} called directly under vmap needs torch >= 2.5'
    with pytest.raises(RuntimeError, match=pattern.format('ddfnet_vmap_check', 'twice')):
        vmap(torch.ops.ddfnet_vmap_check.twice)(torch.randn(2, 3))
    x, cf, sf, g = random_inputs(2, 3, 6, 5, 3, 2, grad_output=True)
    if not HAS_REGISTER_VMAP:  # the real operators, on such a torch
        for name, args in (('ddf', (x, cf, sf)), ('ddf_backward', (g, x, cf, sf))):
            with pytest.raises(RuntimeError, match=pattern.format('ddfnet', name)):
                vmap(lambda *t: getattr(torch.ops.ddfnet, name)(*t, 3, 1, 2, 'mul'))(*(t[None] for t in args))
    torch.testing.assert_close(vmap(_op(3, 1, 2, 'mul'))(x[None], cf[None], sf[None])[0],
                               naive_ddf(x, cf, sf, 3, 1, 2, 'mul'))


def test_vmap_of_ddf_on_tensors_that_require_grad():
    # vmap outside, plain autograd through it: backward of the vmapped call is the per-slice backward.
    x, cf, sf = random_inputs(2, 3, 6, 5, 3, 2, requires_grad=True)
    batch = torch.stack([x.detach(), 2 * x.detach()]).requires_grad_()
    vmap(_op(3, 1, 2, 'mul'), in_dims=(0, None, None))(batch, cf, sf).square().sum().backward()
    want = []
    for sample in batch.detach().unbind(0):
        sample.requires_grad_()
        want.append(torch.autograd.grad(naive_ddf(sample, cf, sf, 3, 1, 2).square().sum(), (sample, cf, sf)))
    torch.testing.assert_close(batch.grad, torch.stack([w[0] for w in want]))
    torch.testing.assert_close(cf.grad, want[0][1] + want[1][1])
    torch.testing.assert_close(sf.grad, want[0][2] + want[1][2])


def test_vmap_with_a_wrong_per_slice_rank_raises():
    x, cf, sf = random_inputs(2, 3, 6, 5, 3)
    with pytest.raises(ValueError, match='under vmap each tensor must be 4-D per vmapped slice, got 3-D'):
        vmap(_op(3, 1, 1, 'mul'), in_dims=(0, None, None))(x, cf, sf)


def test_direct_op_call_under_torch_func_grad_raises():
    x, cf, sf = random_inputs(1, 2, 5, 5, 3)
    with pytest.raises(RuntimeError, match='called directly under a torch.func transform; call ddfnet.ddf'):
        grad(lambda t: torch.ops.ddfnet.ddf(t, cf, sf, 3, 1, 1, 'mul').sum())(x)


def test_opcheck_backward_operator_with_gradients():
    # ddf_backward now has its own autograd: opcheck checks its registration with inputs that need grad.
    x, cf, sf, grad_output = random_inputs(2, 4, 9, 7, 3, 2, dtype=torch.float32, grad_output=True)
    args = tuple(t.requires_grad_() for t in (grad_output, x, cf, sf))
    torch.library.opcheck(torch.ops.ddfnet.ddf_backward.default, (*args, 3, 1, 2, 'add'))


def _layers():
    torch.manual_seed(0)
    return {'ddf_mul': ddfnet.DDFPack(8, stride=2, head=2), 'ddf_add': ddfnet.DDFPack(8, kernel_combine='add'),
            'spatial': DDFBranchPack(8, branch='spatial'), 'channel': DDFBranchPack(8, branch='channel'),
            'dyconv': ddfnet.DynamicConv2d(8, 4, 3, padding=1)}


@pytest.mark.parametrize('name', ('ddf_mul', 'spatial', 'channel'))
def test_layers_under_torch_func_grad_and_autocast_match_autograd(name):
    """torch.func.grad applies the op's Function above the dispatcher's autocast kernel: the layers' tensors
    (float32 input, bfloat16 filters from the convs) must be cast before it, as plain autograd sees them."""
    layer = _layers()[name]
    x = torch.randn(2, 8, 7, 5)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            return functional_call(layer, p, (x,)).float().square().sum()
    got = grad(loss)(params)
    loss(dict(layer.named_parameters())).backward()
    for key, param in layer.named_parameters():
        torch.testing.assert_close(got[key], param.grad, msg=key)


@pytest.mark.parametrize('name', ('ddf_mul', 'ddf_add', 'spatial', 'channel', 'dyconv'))
def test_layers_under_torch_func(name):
    layer = _layers()[name].double()
    x = torch.randn(2, 8, 7, 5, dtype=torch.float64)
    tangent = torch.randn_like(x)
    _, got = jvp(layer, (x,), (tangent,))
    with torch.no_grad():
        finite_difference = (layer(x + 1e-6 * tangent) - layer(x - 1e-6 * tangent)) / 2e-6
    torch.testing.assert_close(got, finite_difference, rtol=1e-6, atol=1e-6)

    params = {k: v.detach() for k, v in layer.named_parameters()}
    got = grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)
    layer(x).square().sum().backward()
    for key, param in layer.named_parameters():
        torch.testing.assert_close(got[key], param.grad, rtol=1e-10, atol=1e-12, msg=key)

    with torch.no_grad():
        torch.testing.assert_close(vmap(layer)(x[:, None]).squeeze(1), layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.slow  # a subprocess
@pytest.mark.skipif(ddfnet.ops.implementation('cpu') != 'native', reason='needs the native CPU kernel')
def test_gradient_penalty_native_equals_reference():
    native = gradient_penalty_grads()
    env = repo_env(DDFNET_FORCE_REFERENCE='1', OMP_NUM_THREADS='1')
    out = subprocess.run([sys.executable, '-W', 'ignore', '-m', 'support.gradient_penalty'],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    reference = json.loads(out.stdout)
    assert (native.pop('implementation'), reference.pop('implementation')) == ('native', 'reference')
    for name, grads in native.items():
        # (With few channels some SE hidden units are dead after the ReLU, so not every tensor is non-zero.)
        assert sum(torch.tensor(values).abs().sum() for values in grads.values()) > 0, name
        for key, values in grads.items():
            torch.testing.assert_close(torch.tensor(values), torch.tensor(reference[name][key]), rtol=1e-9,
                                       atol=1e-9, msg=lambda m, key=key: f'{name} {key}: {m}')


def test_autocast_float64_next_to_float32_names_the_autocast_rule():
    x, cf, sf = random_inputs(2, 4, 6, 6, 3, dtype=torch.float32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with pytest.raises(TypeError, match='under autocast, float64 tensors keep their dtype .* all float64 or '
                                            'none, got input torch.bfloat16, channel_filter torch.float64'):
            ddfnet.ddf(x, cf.double(), sf, 3)
        assert ddfnet.ddf(x, cf, sf.half(), 3).dtype == torch.bfloat16  # float16 is cast like float32
    with pytest.raises(TypeError, match=r'must share one dtype \(outside autocast\)'):
        ddfnet.ddf(x, cf.double(), sf, 3)
