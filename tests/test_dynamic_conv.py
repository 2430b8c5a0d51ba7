"""DynamicConv2d: the per-sample definition, both aggregation orders, gradients, temperature, memory."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from ddfnet import DynamicConv2d
from ddfnet.layers.dynamic_conv import aggregate_kernels, aggregate_outputs
from ddfnet.training import run_epoch_hooks

CASES = {  # id -> (in, out, constructor kwargs, input H, W)
    '3x3': (6, 8, dict(kernel_size=3, padding=1), 7, 9),
    '3x1-stride-dilation-groups': (6, 4, dict(kernel_size=(3, 1), stride=2, padding=(2, 0), dilation=2, groups=2),
                                   9, 8),
    'depthwise-5x5-stride2': (8, 8, dict(kernel_size=5, stride=2, padding=2, groups=8), 9, 9),
    '1x1-no-bias': (5, 7, dict(kernel_size=1, bias=False), 4, 6),
}


def _layer(case, **kwargs):
    cin, cout, args, h, w = CASES[case]
    torch.manual_seed(0)
    layer = DynamicConv2d(cin, cout, **args, **kwargs).double()
    if layer.bias is not None:
        torch.nn.init.normal_(layer.bias)  # zero at init: make the bias aggregation visible
    return layer, torch.randn(3, cin, h, w, dtype=torch.float64)


def _per_sample_loop(layer, x):
    """The definition: each sample convolved with its own attention-weighted kernel and bias."""
    attention = layer.attention_weights(x)
    outs = []
    for b in range(x.shape[0]):
        weight = (attention[b].view(-1, 1, 1, 1, 1) * layer.weight).sum(0)
        bias = None if layer.bias is None else attention[b] @ layer.bias
        outs.append(F.conv2d(x[b:b + 1], weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outs)


@pytest.mark.parametrize('aggregation', ('auto', 'kernels', 'outputs'))
@pytest.mark.parametrize('case', sorted(CASES))
def test_equals_per_sample_loop(case, aggregation):
    layer, x = _layer(case, aggregation=aggregation)
    want = _per_sample_loop(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
        torch.testing.assert_close(layer(x[:1]), want[:1])  # a single sample ('auto' mixes kernels)
    # With gradients recorded the same function runs under recomputation.
    torch.testing.assert_close(layer(x.requires_grad_()), want)


@pytest.mark.parametrize('aggregate', (aggregate_kernels, aggregate_outputs))
@pytest.mark.parametrize('case', sorted(CASES))
def test_both_orders_equal_the_definition_without_recomputation(case, aggregate):
    # aggregate_kernels alone is the common grouped-conv implementation scripts/benchmarks/benchmark_dyconv.py compares.
    layer, x = _layer(case)
    got = aggregate(x, layer.weight, layer.bias, layer.attention_weights(x), layer.stride, layer.padding,
                    layer.dilation, layer.groups)
    torch.testing.assert_close(got, _per_sample_loop(layer, x))


@pytest.mark.parametrize('case', sorted(CASES))
def test_one_kernel_is_a_plain_conv(case):
    layer, x = _layer(case, num_kernels=1)
    bias = None if layer.bias is None else layer.bias[0]
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight[0], bias, layer.stride, layer.padding,
                                                  layer.dilation, layer.groups))


@pytest.mark.parametrize('aggregation', ('kernels', 'outputs'))
def test_gradients_equal_the_per_sample_loop(aggregation):
    # Gradients through the recomputed aggregation against autograd through the loop of plain convs, for
    # the input and every parameter (kernels, biases, attention), plus a numerical check on the input.
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 6, 3, stride=2, padding=1, groups=2, num_kernels=3, aggregation=aggregation,
                          temperature=2.0).double()
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    grads = []
    for fn in (layer, lambda x: _per_sample_loop(layer, x)):
        layer.zero_grad()
        x.grad = None
        (fn(x) * weights).sum().backward()
        grads.append([x.grad] + [p.grad for p in layer.parameters()])
    assert len(grads[0]) == 7
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)


def test_gradients_reach_every_kernel_and_the_attention():
    layer, x = _layer('3x3')
    x.requires_grad_()
    (layer(x) * torch.randn(3, 8, 7, 9, dtype=torch.float64)).sum().backward()
    assert x.grad.abs().sum() > 0
    for k in range(layer.num_kernels):
        assert layer.weight.grad[k].abs().sum() > 0 and layer.bias.grad[k].abs().sum() > 0
    for name, p in layer.attention.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_orders_agree_on_gradients():
    grads = []
    for aggregation in ('kernels', 'outputs'):
        layer, x = _layer('3x1-stride-dilation-groups', aggregation=aggregation)
        x.requires_grad_()
        layer(x).square().sum().backward()
        grads.append([x.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_auto_picks_the_smaller_intermediate():
    early = DynamicConv2d(64, 64, 3, padding=1)        # 64*9 kernel elements vs 4*56*56 outputs
    late = DynamicConv2d(512, 512, 3, padding=1)       # 512*9 vs 4*7*7
    assert early.resolved_aggregation(torch.empty(2, 64, 56, 56)) == 'kernels'
    assert late.resolved_aggregation(torch.empty(2, 512, 7, 7)) == 'outputs'
    forced = DynamicConv2d(512, 512, 3, aggregation='kernels')
    assert forced.resolved_aggregation(torch.empty(2, 512, 7, 7)) == 'kernels'
    # A single sample's kernel is one static weight: mixing kernels is then the smaller and cheaper order.
    assert late.resolved_aggregation(torch.empty(1, 512, 7, 7)) == 'kernels'
    single = DynamicConv2d(512, 512, 3, aggregation='outputs').resolved_aggregation(torch.empty(1, 512, 7, 7))
    assert single == 'outputs'  # only 'auto' chooses


def _entropy(layer, x):
    p = layer.attention_weights(x)
    return -(p * p.log()).sum(1).mean().item()


def test_temperature_flattens_the_attention():
    layer, x = _layer('3x3')
    with torch.no_grad():
        layer.attention[3].weight.mul_(20)  # make the logits decisive at T=1
    entropies = []
    for t in (0.5, 1.0, 5.0, 30.0, 1e4):
        layer.set_temperature(t)
        entropies.append(_entropy(layer, x))
    assert entropies == sorted(entropies) and entropies[0] < entropies[-1]
    assert entropies[-1] == pytest.approx(math.log(layer.num_kernels), abs=1e-4)  # uniform
    assert entropies[1] < 0.9 * math.log(layer.num_kernels)


@pytest.mark.parametrize('bad', (0, -1.0, float('nan'), float('inf'), '30', None))
def test_bad_temperature(bad):
    with pytest.raises(ValueError, match='temperature'):
        DynamicConv2d(4, 4, 3).set_temperature(bad)


def test_epoch_hook_schedule_survives_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(DynamicConv2d(3, 4, 3, padding=1), torch.nn.ReLU(),  # noqa: E731
                                       DynamicConv2d(4, 4, 1, num_kernels=2))
    model = make()
    args = argparse.Namespace(dyconv_temp_start=30.0, dyconv_temp_end=1.0, dyconv_temp_epochs=10)
    temperatures = lambda m: [float(layer.temperature) for layer in (m[0], m[2])]  # noqa: E731
    run_epoch_hooks(model, 0, args)
    assert temperatures(model) == [30.0, 30.0]
    run_epoch_hooks(model, 4, args)
    assert temperatures(model) == pytest.approx([30 - 29 * 0.4] * 2)
    path = tmp_path / 'checkpoint.pth'
    torch.save({'state_dict': model.state_dict(), 'epoch': 4}, path)
    restored = make()
    assert temperatures(restored) == [1.0, 1.0]
    restored.load_state_dict(torch.load(path, weights_only=True)['state_dict'])
    assert temperatures(restored) == pytest.approx([18.4, 18.4])
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(restored(x), model(x))
    run_epoch_hooks(restored, 10, args)
    run_epoch_hooks(model, 25, args)
    assert temperatures(restored) == temperatures(model) == [1.0, 1.0]


def test_init():
    layer = DynamicConv2d(64, 128, 3, num_kernels=4)
    assert layer.weight.shape == (4, 128, 64, 3, 3) and layer.bias.shape == (4, 128)
    assert torch.count_nonzero(layer.bias) == 0
    for k in range(4):  # each kernel like a conv: Kaiming normal, fan-out = 128 * 9
        assert layer.weight[k].std().item() == pytest.approx(math.sqrt(2 / (128 * 9)), rel=0.05)
    assert layer.attention[1].out_channels == 16 and layer.attention[3].out_channels == 4
    assert DynamicConv2d(3, 8, 3).attention[1].out_channels == 4  # the floor
    assert 'temperature' in layer.state_dict()


def _saved_bytes(fn):
    saved = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


@pytest.mark.parametrize('aggregation', ('auto', 'kernels', 'outputs'))
def test_backward_keeps_no_per_sample_intermediate(aggregation):
    # The common implementation keeps B per-sample kernels per layer for backward; a static conv keeps its
    # input. Ours must keep no more than the static conv (plus the tiny attention).
    torch.manual_seed(0)
    layer = DynamicConv2d(64, 64, 3, padding=1, aggregation=aggregation)
    static = torch.nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(16, 64, 8, 8, requires_grad=True)
    ours = _saved_bytes(lambda: layer(x))
    plain = _saved_bytes(lambda: static(x))
    trick = _saved_bytes(lambda: aggregate_kernels(x, layer.weight, layer.bias, layer.attention_weights(x),
                                                   layer.stride, layer.padding, layer.dilation, layer.groups))
    kernels_bytes = 16 * layer.weight[0].numel() * 4
    assert trick >= kernels_bytes
    assert ours <= plain + 16 * 1024, (ours, plain)


def test_channels_last_and_bfloat16_autocast():
    layer, x = _layer('3x3')
    layer, x = layer.float(), x.float().requires_grad_()
    want = layer(x)
    got = layer(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x, *layer.parameters()], grad_out)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=0.05, atol=0.1)
    # The gradients through the bfloat16 graph: float32 like the parameters, and equal to the float32
    # gradients up to bfloat16's rounding (2**-8 of a value; measured: 0.4% on the convolution's
    # gradients, up to 3% on the attention's, whose bias gradient sums three samples' small terms). A
    # dropped or wrong term is an error of order 1.
    got_grads = torch.autograd.grad(out, [x, *layer.parameters()], grad_out.bfloat16())
    names = ['input', *(name for name, _ in layer.named_parameters())]
    for name, got, want_grad in zip(names, got_grads, want_grads):
        assert got.dtype == torch.float32, name
        error = (got - want_grad).norm() / want_grad.norm()
        assert error < (0.1 if name.startswith('attention') else 0.01), (name, error.item())


@pytest.mark.slow  # inductor compile
def test_torch_compile_fullgraph_training_step():
    layer, x = _layer('depthwise-5x5-stride2')
    layer, x = layer.float(), x.float().requires_grad_()
    got = torch.compile(layer, fullgraph=True, backend='aot_eager')(x)
    got.sum().backward()
    grad = layer.weight.grad.clone()
    layer.zero_grad()
    want = layer(x)
    want.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, layer.weight.grad)


@pytest.mark.parametrize('kwargs, match', (
    (dict(in_channels=6, out_channels=4, kernel_size=3, groups=4), 'groups=4 must divide'),
    (dict(in_channels=4, out_channels=4, kernel_size=3, num_kernels=0), 'num_kernels=0'),
    (dict(in_channels=4, out_channels=4, kernel_size=0), 'kernel_size=0'),
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding=-1), 'padding=-1'),
    (dict(in_channels=4, out_channels=4, kernel_size=3, attention_ratio=0), 'attention_ratio'),
    (dict(in_channels=4, out_channels=4, kernel_size=3, aggregation='grouped'), 'aggregation'),
))
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicConv2d(**kwargs)


def test_bad_input_and_from_conv():
    layer = DynamicConv2d(4, 4, 3)
    with pytest.raises(ValueError, match=r'expected input \(B, 4, H, W\)'):
        layer(torch.randn(2, 3, 8, 8))
    with pytest.raises(TypeError, match='plain nn.Conv2d'):
        DynamicConv2d.from_conv(torch.nn.Conv2d(4, 4, 3, padding='same'))
    conv = torch.nn.Conv2d(8, 16, (3, 5), stride=2, padding=(1, 2), dilation=(1, 2), groups=4, bias=False)
    dynamic = DynamicConv2d.from_conv(conv, num_kernels=2)
    assert (dynamic.kernel_size, dynamic.stride, dynamic.padding, dynamic.dilation, dynamic.groups) == \
        ((3, 5), (2, 2), (1, 2), (1, 2), 4)
    assert dynamic.bias is None and dynamic.weight.shape == (2, 16, 2, 3, 5)
    x = torch.randn(2, 8, 9, 11)
    assert dynamic(x).shape == conv(x).shape


@pytest.mark.parametrize('aggregation', ('kernels', 'outputs'))
def test_double_backward(aggregation):
    # Plain autograd ops under non-reentrant checkpointing: gradients of gradients work (e.g. gradient
    # penalties), unlike a hand-written backward.
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 4, 3, padding=1, num_kernels=2, aggregation=aggregation).double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(layer, (x,), fast_mode=True)


@pytest.mark.slow  # whole DyConv models, 20-30 s each
@pytest.mark.parametrize('name', ['dy_resnet18', 'dy_mobilenetv3_small_100'])
def test_models_convert_to_channels_last(name):
    # Module.to(memory_format=channels_last) converts 5-D tensors too and used to fail on the kernel bank.
    import timm

    import ddfnet  # noqa: F401
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    weight = next(m for m in model.modules() if isinstance(m, DynamicConv2d)).weight
    assert weight.dim() == 5 and weight.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    model.train()
    model(x.contiguous(memory_format=torch.channels_last)).sum().backward()
    assert weight.grad is not None and weight.grad.shape == weight.shape
