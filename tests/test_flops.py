"""scripts/count_flops.py: one JSON line per model with the published figures."""
import json

import pytest

from support.runner import run_script

pytestmark = pytest.mark.slow  # scripts/count_flops.py as a subprocess per case


def _run(*args):
    return run_script('scripts/count_flops', *args)


@pytest.mark.parametrize('model, params_m, gmacs', (
    ('resnet50', (25.55, 25.57), (4.08, 4.12)),
    ('ddf_resnet50', (16.84, 16.85), (2.27, 2.30)),
    ('ddf_resnet101', (28.14, 28.15), (4.03, 4.09)),
))
def test_count_flops_prints_expected_figures(model, params_m, gmacs):
    proc = _run('--model', model)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result['model'] == model and result['img_size'] == 224
    assert params_m[0] <= result['params_m'] <= params_m[1]
    assert gmacs[0] <= result['gmacs'] <= gmacs[1]
    assert abs(sum(result['by_op'].values()) - result['gmacs']) < 1e-3
    assert abs(sum(result['by_module'].values()) - result['gmacs']) < 1e-3
    assert set(result['by_module']) == {'conv1', 'layer1', 'layer2', 'layer3', 'layer4', 'fc'}
    if model.startswith('ddf'):
        assert result['by_op']['ddf_op'] > 0  # the op is counted, not zero


def test_count_flops_img_size_scales():
    small = json.loads(_run('--model', 'ddf_resnet26', '--img-size', '112').stdout)
    large = json.loads(_run('--model', 'ddf_resnet26', '--img-size', '224').stdout)
    assert small['img_size'] == 112
    # Convs scale with the pixel count; the channel branches' pooled 1x1 convs and the fc do not.
    assert 3.5 < large['gmacs'] / small['gmacs'] < 4.05


@pytest.mark.parametrize('args', (('--model', 'no_such_model'), ('--model', 'resnet50', '--img-size', '0')))
def test_count_flops_bad_arguments_fail_cleanly(args):
    proc = _run(*args)
    assert proc.returncode != 0
    assert proc.stdout == ''
    assert 'error:' in proc.stderr and 'Traceback' not in proc.stderr


def test_count_flops_dyconv_in_the_papers_order():
    # 'kernels' is the DyConv paper's way of counting: one conv per layer plus the kernel mixing.
    proc = _run('--model', 'dy_resnet18', '--dyconv-aggregation', 'kernels')
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result['dyconv_aggregation'] == 'kernels'
    assert result['params_m'] == 44.934 and result['gmacs'] == pytest.approx(1.858, abs=2e-3)
    dyconv = result['dyconv']
    assert dyconv['attention'] > 0 and dyconv['aggregation'] > 0
    assert abs(sum(result['by_op'].values()) - result['gmacs']) < 1e-3
    assert sum(dyconv.values()) < result['gmacs']


@pytest.mark.parametrize('name, params_m, gmacs, batch_size', (
    # DyConv models as they run on batches ('auto': stages 3-4 mix outputs, so their convs run K=4 times)
    ('dy_resnet18', 44.934, 4.246, 2), ('dy_resnet50', 59.828, 7.215, 2),
    ('dy_mobilenetv3_small_100', 4.378, 0.079, 2),
    # and on a single image, which mixes kernels everywhere: the paper's order
    ('dy_resnet18', 44.934, 1.858, 1), ('dy_resnet50', 59.828, 4.135, 1), ('dy_mobilenetv3_small_100', 4.378, 0.059, 1),
    ('ddf_spatial_resnet50', 14.274, 2.271, 1), ('ddf_channel_resnet50', 16.81, 2.261, 1),
))
def test_new_model_counts_pinned(name, params_m, gmacs, batch_size):
    import timm

    import ddfnet  # noqa: F401
    from ddfnet.models import count_macs
    result = count_macs(timm.create_model(name), batch_size=batch_size)
    assert result['params_m'] == params_m and result['gmacs'] == pytest.approx(gmacs, abs=2e-3)
    assert ('dyconv' in result) == name.startswith('dy_')
    if name.startswith('ddf'):
        assert result['by_op']['ddf_op'] == pytest.approx(0.0186, abs=1e-4)  # the same op as ddf_resnet50


def test_dyconv_counts_split_into_static_conv_attention_and_mixing():
    import timm

    import ddfnet  # noqa: F401
    from ddfnet import DynamicConv2d
    from ddfnet.models import count_macs
    static = count_macs(timm.create_model('resnet18'), img_size=64)
    counts = {}
    for aggregation in ('kernels', 'outputs'):
        model = timm.create_model('dy_resnet18')
        for m in model.modules():
            if isinstance(m, DynamicConv2d):
                m.aggregation = aggregation
        counts[aggregation] = count_macs(model, img_size=64, batch_size=2)
    kernels, outputs = counts['kernels'], counts['outputs']
    # Kernel mixing runs the static network's convs once; output mixing runs each dynamic conv K=4 times.
    dynamic_convs = kernels['dyconv']['conv']
    assert kernels['gmacs'] - kernels['dyconv']['attention'] - kernels['dyconv']['aggregation'] == \
        pytest.approx(static['gmacs'], abs=2e-4)
    assert outputs['dyconv']['conv'] == pytest.approx(4 * dynamic_convs, rel=1e-3)
    assert kernels['dyconv']['attention'] == outputs['dyconv']['attention']


def test_count_flops_bad_dyconv_aggregation():
    proc = _run('--model', 'dy_resnet18', '--dyconv-aggregation', 'grouped')
    assert proc.returncode != 0 and 'invalid choice' in proc.stderr and 'Traceback' not in proc.stderr
    proc = _run('--model', 'dy_resnet18', '--batch-size', '0')
    assert proc.returncode != 0 and '--batch-size must be positive' in proc.stderr and 'Traceback' not in proc.stderr


def test_count_fpn_flops_gives_ddf_ups_extra_cost_at_the_papers_size():
    proc = run_script('scripts/count_fpn_flops')
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result['img_size'] == [800, 1333] and result['padded_size'] == [800, 1344]
    # Worked by hand: 3 DDF-Up layers (on P3-P5: 100x168, 50x84, 25x42 pixels) of 4 branches each; per branch
    # and low-resolution pixel a 3x3 depth-wise and a 1x1 conv (256 channels -> 9 taps) and the op (1.5 MACs
    # per tap and channel), per branch and layer the channel branch's pooled 1x1 convs (256 -> 51 -> 256 * 9).
    pixels, branches, channels, taps = 100 * 168 + 50 * 84 + 25 * 42, 4, 256, 9
    conv = pixels * branches * 2 * channels * taps + 3 * branches * (channels * 51 + 51 * channels * taps)
    op = pixels * branches * 1.5 * channels * taps
    assert result['extra_by_op']['conv'] == pytest.approx(conv / 1e9, abs=1e-4)
    assert result['extra_by_op']['ddf_op'] == pytest.approx(op / 1e9, abs=1e-4)
    assert result['extra_gmacs'] == pytest.approx((conv + op) / 1e9, abs=2e-3)
    assert result['fpn_gmacs']['ddf'] - result['fpn_gmacs']['nearest'] == pytest.approx(result['extra_gmacs'], abs=1e-3)


def test_count_fpn_flops_refuses_bad_sizes_in_one_line():
    proc = run_script('scripts/count_fpn_flops', '--img-size', '16', '800')
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr.strip().splitlines()[-1].endswith('--img-size must be at least 32 32, got 16 800')
