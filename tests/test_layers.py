"""FilterNorm, DDFPack and DDFUpPack: math, shapes, names, state_dict round trips, gradients."""
import math
import re

import pytest
import torch
from torch import nn

import ddfnet
from ddfnet import DDFPack, DDFUpPack, FilterNorm

RELEASED_DDFPACK_KEYS = {
    'spatial_branch.0.weight', 'spatial_branch.0.bias', 'channel_branch.1.weight', 'channel_branch.1.bias',
    'channel_branch.3.weight', 'channel_branch.3.bias', 'channel_branch.4.std',
}


def _tap_stats(x, groups, taps):
    grouped = x.unflatten(1, (groups, taps))
    return grouped.mean(dim=2), grouped.std(dim=2)


def test_filter_norm_spatial_normalises_each_pixel_per_head():
    norm = FilterNorm(2, 3, 'spatial', nonlinearity='relu')
    assert norm.std is None and not list(norm.parameters())
    out = norm(torch.randn(2, 18, 5, 4, dtype=torch.float64) * 7 + 3)
    mean, std = _tap_stats(out, 2, 9)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-12, rtol=0)
    torch.testing.assert_close(std, torch.full_like(std, math.sqrt(2) / 3))


def test_filter_norm_channel_uses_learned_std():
    torch.manual_seed(0)
    norm = FilterNorm(4, 3, 'channel', nonlinearity='relu', running_std=True).double()
    assert norm.std.shape == (36,)
    # randn * gain / k: check the scale of the initialisation loosely, the shape exactly.
    assert 0.1 < norm.std.std().item() < 1.0
    x = torch.randn(2, 36, 1, 1, dtype=torch.float64)
    out = norm(x)
    grouped = x.view(2, 4, 9)
    normed = (grouped - grouped.mean(2, keepdim=True)) / (grouped.std(2, keepdim=True) + 1e-10)
    torch.testing.assert_close(out, (normed.view(2, 36) * norm.std).view(2, 36, 1, 1))


@pytest.mark.parametrize('dtype', (torch.float16, torch.bfloat16))
def test_filter_norm_low_precision_keeps_dtype_and_stays_finite(dtype):
    norm = FilterNorm(1, 3, 'spatial')
    x = torch.randn(2, 9, 4, 4).to(dtype)
    x[:, :, 0, 0] = 0.5  # nine equal taps: std 0, the epsilon must not underflow
    out = norm(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), norm(x.float()), rtol=1e-2, atol=1e-2)


def test_filter_norm_rejects_bad_arguments():
    with pytest.raises(ValueError, match='filter_type'):
        FilterNorm(1, 3, 'pixel')
    with pytest.raises(ValueError, match='kernel_size'):
        FilterNorm(1, 1, 'spatial')


def test_ddfpack_names_match_released_checkpoints():
    assert set(DDFPack(16).state_dict()) == RELEASED_DDFPACK_KEYS
    pack = DDFPack(20, se_ratio=0.2)
    assert pack.channel_branch[1].out_channels == 4
    assert pack.channel_branch[3].out_channels == 20 * 9
    assert pack.spatial_branch[0].out_channels == 9


@pytest.mark.parametrize('stride, hw, out_hw', ((1, (9, 7), (9, 7)), (2, (9, 7), (5, 4)), (2, (8, 8), (4, 4))))
@pytest.mark.parametrize('combine', ('mul', 'add'))
def test_ddfpack_matches_its_definition(stride, hw, out_hw, combine):
    torch.manual_seed(0)
    pack = DDFPack(8, kernel_size=3, stride=stride, kernel_combine=combine).double()
    x = torch.randn(2, 8, *hw, dtype=torch.float64)
    out = pack(x)
    assert out.shape == (2, 8, *out_hw)
    channel = pack.channel_branch(x).view(2, 8, 3, 3)
    spatial = pack.spatial_branch(x)
    torch.testing.assert_close(out, ddfnet.ddf(x, channel, spatial, 3, 1, stride, combine))


def test_ddfpack_heads_split_channels():
    torch.manual_seed(0)
    pack = DDFPack(8, head=2, dilation=2).double()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    out = pack(x)
    channel = pack.channel_branch(x).view(2, 8, 3, 3)
    spatial = pack.spatial_branch(x)
    assert spatial.shape == (2, 18, 6, 6)
    for g in range(2):
        cs = slice(4 * g, 4 * g + 4)
        expected = ddfnet.ddf(x[:, cs], channel[:, cs], spatial[:, 9 * g:9 * g + 9], 3, 2, 1)
        torch.testing.assert_close(out[:, cs], expected)


def test_ddfpack_strict_state_dict_round_trip():
    torch.manual_seed(0)
    a, b = DDFPack(16, kernel_combine='add'), DDFPack(16, kernel_combine='add')
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 16, 7, 7)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def _assert_grads(module):
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # The SE convs around the ReLU see no gradient when its few hidden units are all off, which
        # happens for tiny random inputs; everything from the second SE conv's bias on must learn.
        if not re.search(r'channel_branch(\.\d+)?\.(1\.weight|1\.bias|3\.weight)$', name):
            assert p.grad.abs().sum() > 0, name


def test_ddfpack_gradients_reach_every_parameter():
    pack = DDFPack(8)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    pack(x).square().sum().backward()
    assert x.grad.abs().sum() > 0
    _assert_grads(pack)


def test_ddfpack_autocast_cpu():
    pack = DDFPack(8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = pack(torch.randn(2, 8, 6, 6))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize('kwargs, match', (
    (dict(kernel_size=4), 'kernel_size'), (dict(kernel_size=1), 'kernel_size'), (dict(head=3), 'head'),
    (dict(stride=0), 'stride'), (dict(kernel_combine='max'), 'kernel_combine'), (dict(se_ratio=0.01), 'se_ratio'),
))
def test_ddfpack_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DDFPack(8, **kwargs)


@pytest.mark.parametrize('scale', (2, 4))
@pytest.mark.parametrize('combine', ('mul', 'add'))
def test_ddfuppack_shapes_and_gradients(scale, combine):
    torch.manual_seed(0)
    up = DDFUpPack(8, scale_factor=scale, kernel_combine=combine)
    assert len(up.spatial_branch) == len(up.channel_branch) == scale ** 2
    assert isinstance(up.spatial_branch[0][0], nn.Conv2d) and up.spatial_branch[0][0].groups == 8  # depth-wise
    x = torch.randn(2, 8, 5, 7, requires_grad=True)
    out = up(x)
    assert out.shape == (2, 8, 5 * scale, 7 * scale)
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    _assert_grads(up)


def test_ddfuppack_interleaves_branches_by_pixel_shuffle():
    torch.manual_seed(0)
    up = DDFUpPack(5, scale_factor=2).double()
    x = torch.randn(1, 5, 4, 5, dtype=torch.float64)
    out = up(x)
    for dy in range(2):
        for dx in range(2):
            branch = dy * 2 + dx
            channel = up.channel_branch[branch](x).view(1, 5, 3, 3)
            spatial = up.spatial_branch[branch](x)
            torch.testing.assert_close(out[:, :, dy::2, dx::2], ddfnet.ddf(x, channel, spatial, 3))


def test_ddfuppack_joint_guidance():
    torch.manual_seed(0)
    up = DDFUpPack(8, scale_factor=2, joint_channels=3)
    assert up.spatial_branch[0][0].in_channels == 3 and up.spatial_branch[0][0].kernel_size == (1, 1)
    x, guide = torch.randn(2, 8, 6, 6), torch.randn(2, 3, 6, 6, requires_grad=True)
    out = up(x, guide)
    assert out.shape == (2, 8, 12, 12)
    out.sum().backward()
    assert guide.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='pass the guidance'):
        up(x)
    with pytest.raises(ValueError, match=r'guidance must have shape \(B, 3, H, W\)'):
        up(x, torch.randn(2, 3, 5, 6))


def test_ddfuppack_strict_state_dict_round_trip():
    torch.manual_seed(0)
    a, b = DDFUpPack(8, scale_factor=2), DDFUpPack(8, scale_factor=2)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.slow  # torch.export and compile
def test_ddfpack_exports_and_compiles_with_dynamic_shapes():
    torch.manual_seed(0)
    pack = DDFPack(8, stride=2).eval()
    dims = {'x': {2: torch.export.Dim('h', min=3, max=64), 3: torch.export.Dim('w', min=3, max=64)}}
    exported = torch.export.export(pack, (torch.randn(2, 8, 9, 9),), dynamic_shapes=dims).module()
    compiled = torch.compile(pack, fullgraph=True, dynamic=True, backend='aot_eager')
    for hw in ((9, 9), (13, 11), (7, 5)):
        x = torch.randn(2, 8, *hw)
        torch.testing.assert_close(exported(x), pack(x))
        torch.testing.assert_close(compiled(x), pack(x))
