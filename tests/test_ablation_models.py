"""The DyConv models and the DDF ablation models: structure against timm's static models, forward and
backward, cfgs, parameter counts, checkpoints; the single-branch DDF layer against its definition."""
import argparse

import pytest
import timm
import torch
import torch.nn.functional as F

import ddfnet  # noqa: F401  (registers the models)
from ddfnet import DDFPack, DynamicConv2d
from ddfnet.layers import DDFBranchPack
from ddfnet.training import run_epoch_hooks

NEW_MODELS = {  # name -> (static timm counterpart, params in millions)
    'dy_resnet18': ('resnet18', 44.934), 'dy_resnet50': ('resnet50', 59.828),
    'dy_mobilenetv3_small_100': ('mobilenetv3_small_100', 4.378),
    'ddf_spatial_resnet50': ('resnet50', 14.274), 'ddf_channel_resnet50': ('resnet50', 16.81),
}
DYNAMIC_CONVS = {  # which of the static model's convs are dynamic
    'dy_resnet18': lambda name: name.startswith('layer') and name.endswith(('conv1', 'conv2')),
    'dy_resnet50': lambda name: name.startswith('layer') and name.endswith('conv2'),
    'dy_mobilenetv3_small_100': lambda name: name.startswith('blocks.') and '.se.' not in name,
}


def test_registered():
    assert set(timm.list_models('dy_*')) == {'dy_resnet18', 'dy_resnet50', 'dy_mobilenetv3_small_100'}
    assert {'ddf_spatial_resnet50', 'ddf_channel_resnet50'} <= set(timm.list_models('ddf*'))


@pytest.mark.parametrize('name', sorted(DYNAMIC_CONVS))
def test_dynamic_convs_replace_exactly_the_chosen_static_convs(name):
    static = {n: m for n, m in timm.create_model(NEW_MODELS[name][0]).named_modules()
              if isinstance(m, torch.nn.Conv2d)}
    model = timm.create_model(name)
    dynamic = {n: m for n, m in model.named_modules() if isinstance(m, DynamicConv2d)}
    plain = {n for n, m in model.named_modules() if type(m) is torch.nn.Conv2d and '.attention.' not in n}
    assert set(dynamic) == {n for n in static if DYNAMIC_CONVS[name](n)} and dynamic
    assert plain == set(static) - set(dynamic)
    for n, m in dynamic.items():
        conv = static[n]
        assert m.weight.shape[1:] == conv.weight.shape and m.num_kernels == 4
        assert (m.stride, m.padding, m.dilation, m.groups) == \
            (conv.stride, conv.padding, conv.dilation, conv.groups)


@pytest.mark.slow  # forward+backward of each ablation model, 8-20 s each
@pytest.mark.parametrize('name', sorted(NEW_MODELS))
def test_forward_backward_small(name):
    torch.manual_seed(0)
    model = timm.create_model(name, drop_rate=0.1)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(NEW_MODELS[name][1], abs=1e-3)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1000)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('name', sorted(NEW_MODELS))
def test_pretrained_cfg(name):
    cfg = timm.create_model(name).pretrained_cfg
    static = timm.create_model(NEW_MODELS[name][0]).pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224) and cfg['crop_pct'] == 0.875 and cfg['num_classes'] == 1000
    assert (cfg['first_conv'], cfg['classifier']) == (static['first_conv'], static['classifier'])
    if name.startswith('dy_'):
        assert cfg['paper_ids'] == 'arXiv:1912.03458' and cfg['interpolation'] == 'bilinear'
    else:
        assert cfg['paper_ids'] == 'arXiv:2104.14107' and cfg['interpolation'] == 'bicubic'


@pytest.mark.parametrize('name, channels', (('dy_resnet18', [64, 64, 128, 256, 512]),
                                            ('dy_mobilenetv3_small_100', [16, 16, 24, 48, 576])))
def test_features_only(name, channels):
    model = timm.create_model(name, features_only=True)
    assert model.feature_info.channels() == channels
    assert [f.shape[1] for f in model(torch.randn(1, 3, 64, 64))] == channels
    assert any(isinstance(m, DynamicConv2d) for m in model.modules())


@pytest.mark.parametrize('name', ('dy_resnet18', 'dy_mobilenetv3_small_100', 'ddf_channel_resnet50'))
def test_local_checkpoint_round_trip(tmp_path, name):
    torch.manual_seed(0)
    source = timm.create_model(name).eval()
    run_epoch_hooks(source, 3, argparse.Namespace())  # T = 30 - 29 * 3 / 10, kept by the checkpoint
    path = tmp_path / 'weights.pth'
    torch.save(source.state_dict(), path)
    with pytest.raises(ValueError, match='pretrained_cfg_overlay'):
        timm.create_model(name, pretrained=True)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    temperatures = [float(m.temperature) for m in model.modules() if isinstance(m, DynamicConv2d)]
    assert bool(temperatures) == name.startswith('dy_')
    assert temperatures == pytest.approx([21.3] * len(temperatures))


def test_num_kernels_override():
    model = timm.create_model('dy_resnet18', block_args=dict(num_kernels=2))
    assert model.layer3[1].conv2.weight.shape[0] == 2
    assert timm.create_model('dy_mobilenetv3_small_100', num_kernels=3).blocks[1][0].conv_dw.num_kernels == 3


@pytest.mark.parametrize('name, branch', (('ddf_spatial_resnet50', 'spatial'),
                                          ('ddf_channel_resnet50', 'channel')))
def test_ablation_structure_and_names(name, branch):
    model = timm.create_model(name)
    packs = [m for m in model.modules() if isinstance(m, DDFPack)]
    assert len(packs) == 16 and all(type(p) is DDFBranchPack and p.branch == branch for p in packs)
    keys = set(model.state_dict())
    full = set(timm.create_model('ddf_resnet50').state_dict())
    other = 'channel_branch' if branch == 'spatial' else 'spatial_branch'
    assert keys == {k for k in full if other not in k}  # DDFPack's names, minus the absent branch


def _ones_like_filter_definition(pack, x):
    """Independent definitions: spatial branch = per-pixel filter shared across channels (unfold);
    channel branch = per-sample depth-wise conv."""
    k, s, d = pack.kernel_size, pack.stride, pack.dilation
    b, c, h, w = x.shape
    if pack.branch == 'spatial':
        spatial = pack.spatial_branch(x)                                 # (B, head*k*k, Ho, Wo)
        patches = F.unfold(x, k, dilation=d, padding=d * (k // 2), stride=s)  # (B, C*k*k, Ho*Wo)
        patches = patches.view(b, pack.head, c // pack.head, k * k, -1)
        out = (patches * spatial.view(b, pack.head, 1, k * k, -1)).sum(3)
        return out.reshape(b, c, *spatial.shape[2:])
    channel = pack.channel_branch(x).view(b, c, 1, k, k)
    return torch.cat([F.conv2d(x[i:i + 1], channel[i], stride=s, padding=d * (k // 2), dilation=d, groups=c)
                      for i in range(b)])


@pytest.mark.parametrize('branch, head, stride, dilation', (('spatial', 1, 1, 1), ('spatial', 2, 2, 1),
                                                            ('channel', 1, 2, 2), ('channel', 1, 1, 1)))
def test_branch_pack_equals_its_definition(branch, head, stride, dilation):
    torch.manual_seed(0)
    pack = DDFBranchPack(8, kernel_size=3, stride=stride, dilation=dilation, head=head, branch=branch).double()
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    torch.testing.assert_close(pack(x), _ones_like_filter_definition(pack, x))


def test_branch_pack_errors():
    with pytest.raises(ValueError, match="branch must be 'spatial' or 'channel'"):
        DDFBranchPack(8, branch='both')
    with pytest.raises(ValueError, match='head=2'):
        DDFBranchPack(8, head=2, branch='channel')
    with pytest.raises(ValueError, match="kernel_combine='add' has nothing to combine"):
        timm.create_model('ddf_spatial_resnet50', block_args=dict(kernel_combine='add'))


def test_branch_pack_builds_only_its_branch():
    # se_ratio only concerns the channel branch: 4 channels * 0.2 leaves no hidden unit, which must not
    # stop a spatial-only layer from being built.
    pack = DDFBranchPack(4, branch='spatial')
    assert pack.channel_branch is None and all(n.startswith('spatial_branch.') for n, _ in pack.named_parameters())
    assert pack(torch.randn(1, 4, 5, 5)).shape == (1, 4, 5, 5)


def test_dy_resnet18_config_follows_the_dyconv_paper():
    from pathlib import Path

    from ddfnet.cli import parse_args
    from ddfnet.training.args import train_parser
    path = Path(__file__).resolve().parents[1] / 'configs' / 'dy_resnet18_in1k.yaml'
    args = parse_args(train_parser(), ['--config', str(path)])
    assert (args.model, args.epochs, args.batch_size * 8, args.lr) == ('dy_resnet18', 100, 256, 0.1)
    assert (args.weight_decay, args.drop_rate) == (1e-4, 0.1)
    assert (args.dyconv_temp_start, args.dyconv_temp_end, args.dyconv_temp_epochs) == (30.0, 1.0, 10)


def test_models_doc_lists_every_registered_model():
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / 'docs' / 'models.md').read_text()
    rows = set(re.findall(r'^\| `([a-z0-9_]+)`', text, flags=re.M))
    assert set(timm.list_models('ddf*')) | set(timm.list_models('dy_*')) <= rows
