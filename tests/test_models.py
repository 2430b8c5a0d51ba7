"""timm registration of the DDF-ResNets: creation, cfgs, features, parameter counts, checkpoints."""
import pytest
import timm
import torch

import ddfnet  # noqa: F401  (registers the models)
from ddfnet import DDFPack

MODELS = {  # name -> (layers, kernel_combine)
    'ddf_resnet26': ((2, 2, 2, 2), 'mul'), 'ddf_resnet50': ((3, 4, 6, 3), 'mul'),
    'ddf_resnet101': ((3, 4, 23, 3), 'mul'), 'ddf_resnet152': ((3, 8, 36, 3), 'mul'),
    'ddf_mul_resnet50': ((3, 4, 6, 3), 'mul'), 'ddf_mul_resnet101': ((3, 4, 23, 3), 'mul'),
    'ddf_mul_resnet152': ((3, 8, 36, 3), 'mul'), 'ddf_add_resnet50': ((3, 4, 6, 3), 'add'),
    'ddf_add_resnet101': ((3, 4, 23, 3), 'add'), 'ddf_add_resnet152': ((3, 8, 36, 3), 'add'),
}


def test_every_model_is_registered():
    # The single-branch ablations are tested in test_ablation_models.py.
    assert set(timm.list_models('ddf*')) == set(MODELS) | {'ddf_spatial_resnet50', 'ddf_channel_resnet50'}


@pytest.mark.parametrize('name', sorted(MODELS))
def test_forward_backward_small_resolution(name):
    layers, combine = MODELS[name]
    model = timm.create_model(name, num_classes=7, drop_path_rate=0.1)
    packs = [m for m in model.modules() if isinstance(m, DDFPack)]
    # DDF replaces conv2 in every block of all four stages, nothing else.
    assert len(packs) == sum(layers)
    assert all(p.kernel_combine == combine and p.kernel_size == 3 for p in packs)
    assert all(isinstance(getattr(model, f'layer{i + 1}')[j].conv2, DDFPack)
               for i, n in enumerate(layers) for j in range(n))
    assert [p.stride for p in packs if p.stride != 1] == [2, 2, 2]  # first block of stages 2-4
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('name', sorted(MODELS))
def test_pretrained_cfg(name):
    cfg = timm.create_model(name).pretrained_cfg
    assert cfg['interpolation'] == 'bicubic'
    assert cfg['crop_pct'] == 0.875
    assert cfg['first_conv'] == 'conv1' and cfg['classifier'] == 'fc'
    assert cfg['input_size'] == (3, 224, 224)
    assert 'arXiv:2104.14107' in cfg['paper_ids']


def test_features_only():
    model = timm.create_model('ddf_resnet50', features_only=True, out_indices=(0, 1, 2, 3, 4))
    assert model.feature_info.channels() == [64, 256, 512, 1024, 2048]
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [64, 256, 512, 1024, 2048]
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]


@pytest.mark.parametrize('name, params_m', (('ddf_resnet50', 16.84), ('ddf_resnet101', 28.15),
                                            ('ddf_add_resnet50', 16.84), ('ddf_mul_resnet101', 28.15)))
def test_parameter_counts(name, params_m):
    model = timm.create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params_m


def test_state_dict_keys_follow_the_original_release():
    ddf_keys = set(timm.create_model('ddf_mul_resnet50').state_dict())
    resnet_keys = set(timm.create_model('resnet50').state_dict())
    conv2 = {k for k in resnet_keys if k.endswith('.conv2.weight')}
    added = {f'{c[:-len("weight")]}{suffix}' for c in conv2 for suffix in (
        'spatial_branch.0.weight', 'spatial_branch.0.bias', 'channel_branch.1.weight', 'channel_branch.1.bias',
        'channel_branch.3.weight', 'channel_branch.3.bias', 'channel_branch.4.std')}
    assert ddf_keys == (resnet_keys - conv2) | added


def test_model_init_leaves_filter_generation_deliberate():
    model = timm.create_model('ddf_resnet50')
    pack = model.layer3[0].conv2
    # timm's kaiming fan_out init reaches the generating convs; std keeps its randn * gain / k init.
    fan_out = pack.spatial_branch[0].out_channels
    assert abs(pack.spatial_branch[0].weight.std().item() - (2 / fan_out) ** 0.5) < 0.05
    assert 0.1 < pack.channel_branch[4].std.std().item() < 1.0
    assert torch.count_nonzero(model.layer1[0].bn3.weight) == 0  # zero_init_last still applies


@pytest.mark.parametrize('wrap, suffix', (
    (lambda sd: sd, '.pth'),
    (lambda sd: {'state_dict': sd, 'epoch': 3}, '.pth.tar'),
    (lambda sd: {'state_dict_ema': sd, 'state_dict': {k: torch.zeros_like(v) for k, v in sd.items()}}, '.pth.tar'),
    (lambda sd: {f'module.{k}': v for k, v in sd.items()}, '.pth'),
))
def test_load_local_checkpoint(tmp_path, wrap, suffix):
    torch.manual_seed(0)
    source = timm.create_model('ddf_mul_resnet50').eval()
    path = tmp_path / f'ddf_mul_resnet50{suffix}'
    torch.save(wrap(source.state_dict()), path)
    model = timm.create_model('ddf_mul_resnet50', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_load_local_checkpoint_with_new_head(tmp_path):
    source = timm.create_model('ddf_add_resnet50')
    path = tmp_path / 'w.pth'
    torch.save(source.state_dict(), path)
    with pytest.warns(UserWarning, match='has a 1000-class classifier and the model 10 classes: fc is re-initialised'):
        model = timm.create_model('ddf_add_resnet50', pretrained=True, num_classes=10,
                                  pretrained_cfg_overlay=dict(file=str(path)))
    assert model.fc.out_features == 10
    torch.testing.assert_close(model.layer2[0].conv2.channel_branch[4].std,
                               source.layer2[0].conv2.channel_branch[4].std)


def test_pretrained_without_file_is_an_error():
    with pytest.raises(ValueError, match='pretrained_cfg_overlay=dict\\(file='):
        timm.create_model('ddf_resnet50', pretrained=True)


def test_block_args_extend_kernel_combine():
    model = timm.create_model('ddf_add_resnet50', block_args=dict(se_ratio=0.25))
    assert model.layer1[0].conv2.kernel_combine == 'add'
    assert model.layer1[0].conv2.channel_branch[1].out_channels == 16


@pytest.mark.slow  # inductor compile
def test_torch_compile_fullgraph_resnet_inductor():
    # A one-block-per-stage DDF-ResNet keeps inductor's C++ codegen to ~30 s on a 2-core CI machine.
    torch.manual_seed(0)
    model = timm.create_model('ddf_resnet26', num_classes=5, layers=(1, 1, 1, 1))
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    got = torch.compile(model, fullgraph=True)(x)
    got.sum().backward()
    got_grad = model.layer2[0].conv2.spatial_branch[0].weight.grad.clone()
    model.zero_grad()
    want = model(x)
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_grad, model.layer2[0].conv2.spatial_branch[0].weight.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.slow  # inductor compile
def test_torch_compile_fullgraph_under_autocast():
    # aot_eager traces what inductor would see (dynamo graph, fake kernels, AOT autograd) in seconds.
    model = timm.create_model('ddf_resnet26', num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = torch.compile(model, fullgraph=True, backend='aot_eager')(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model.layer1[0].conv2.channel_branch[4].std.grad is not None


def test_output_stride_dilates_the_ddf_layers():
    model = timm.create_model('ddf_resnet26', output_stride=16, features_only=True)
    assert [f.shape[-1] for f in model(torch.randn(1, 3, 64, 64))] == [32, 16, 8, 4, 4]
    assert [(b.conv2.stride, b.conv2.dilation) for b in model.layer4] == [(1, 1), (1, 2)]
