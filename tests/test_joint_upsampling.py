"""The joint-upsampling network (ddfnet/models/joint_upsampling.py): PAC's frame with guided DDF-Up steps at
x2/x4/x8/x16, the bilinear baseline, gradients to every part, and one-line errors for mismatched inputs."""
import pytest
import torch
import torch.nn.functional as F

from ddfnet import DDFUpPack
from ddfnet.models import BilinearJointUpsampling, DDFUpJointUpsamplingNet


def inputs(scale, batch=2, height=6, width=5):
    return torch.randn(batch, 1, height, width), torch.randn(batch, 3, height * scale, width * scale)


@pytest.mark.parametrize('scale', [2, 4, 8, 16])
def test_shapes_and_one_guided_ddf_up_step_per_doubling(scale):
    torch.manual_seed(0)
    model = DDFUpJointUpsamplingNet(scale)
    steps = list(model.upsample_steps)
    assert len(steps) == scale.bit_length() - 1
    assert all(isinstance(s, DDFUpPack) and s.scale_factor == 2 and s.joint_channels == 16 for s in steps)
    assert model.guide_branch[-1].out_channels == 16 * len(steps)
    low, guide = inputs(scale)
    assert model(low, guide).shape == (2, 1, 6 * scale, 5 * scale)
    assert BilinearJointUpsampling(scale)(low, guide).shape == (2, 1, 6 * scale, 5 * scale)


def test_bilinear_baseline_is_bilinear_interpolation():
    low, guide = inputs(4)
    expected = F.interpolate(low, size=(24, 20), mode='bilinear', align_corners=False)
    torch.testing.assert_close(BilinearJointUpsampling(4)(low, guide), expected, rtol=0, atol=0)


def test_every_part_gets_gradients_and_the_guide_steers_the_output():
    torch.manual_seed(0)
    model = DDFUpJointUpsamplingNet(8)
    low, guide = inputs(8)
    out = model(low, guide)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with torch.no_grad():
        assert not torch.allclose(model(low, guide.flip(-1)), out)


def test_residual_learns_a_correction_to_bilinear():
    torch.manual_seed(0)
    model = DDFUpJointUpsamplingNet(4, residual=True)
    torch.nn.init.zeros_(model.final_branch[-1].weight)
    torch.nn.init.zeros_(model.final_branch[-1].bias)
    low, guide = inputs(4)
    torch.testing.assert_close(model(low, guide), BilinearJointUpsampling(4)(low, guide))


@pytest.mark.parametrize('model_class', [DDFUpJointUpsamplingNet, BilinearJointUpsampling])
def test_mismatched_inputs_are_refused_in_one_line(model_class):
    model, name = model_class(4), model_class.__name__
    low, guide = inputs(4)
    for bad_guide in (guide[:, :, :-1], guide[:, :2], guide[:1], F.interpolate(guide, scale_factor=2.0)):
        with pytest.raises(ValueError, match=rf'{name}: at x4 the guide must be \(2, 3, 24, 20\) for a 6x5 input, '
                                             rf'got \(\d+, \d+, \d+, \d+\)$'):
            model(low, bad_guide)
    with pytest.raises(ValueError, match=rf'{name}: the low-resolution input must be \(B, 1, h, w\), got \(2, 3, 6, 5\)'):
        model(low.expand(-1, 3, -1, -1), guide)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r'scale_factor must be one of \(2, 4, 8, 16\), got 3'):
        DDFUpJointUpsamplingNet(3)
    with pytest.raises(ValueError, match='scale_factor must be one of'):
        BilinearJointUpsampling(32)
    with pytest.raises(ValueError, match='channel counts must be >= 1'):
        DDFUpJointUpsamplingNet(4, guide_features_per_step=0)
