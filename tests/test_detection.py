"""The DDF-Up FPN and the Faster R-CNN builders (ddfnet/models/detection.py): torchvision's FPN interface
(names, shapes, odd sizes; with nearest upsampling its exact numbers and weights), torchvision's detection
API in train and eval mode, classifier checkpoints loading into the backbone, and one-line errors.

Cost: detectors run on 64-96 pixel images; the DDF-ResNet backbone has one block per stage.
"""
from collections import OrderedDict

import pytest
import timm
import torch
from torchvision.models import resnet50
from torchvision.models.detection import RetinaNet, fasterrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ddfnet import DDFUpPack
from ddfnet.models import (BackboneWithDDFUpFPN, DDFUpFeaturePyramidNetwork, fasterrcnn_ddf_resnet50_ddfup_fpn,
                           fasterrcnn_resnet50_ddfup_fpn)

SMALL = dict(min_size=64, max_size=96)
ONE_BLOCK = dict(backbone_kwargs=dict(layers=(1, 1, 1, 1)))
LOSSES = {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}


def features(batch=2, sizes=((17, 15), (9, 8), (5, 4), (3, 2)), channels=(8, 16, 24, 32)):
    """Backbone-like features whose sides are ceil(n / 2) apart, as odd input sizes give."""
    return OrderedDict((f'feat{i}', torch.randn(batch, c, *s)) for i, (c, s) in enumerate(zip(channels, sizes)))


def images_and_targets():
    images = [torch.rand(3, 70, 90), torch.rand(3, 64, 67)]
    targets = [dict(boxes=torch.tensor([[5.0, 5.0, 40.0, 40.0], [50.0, 10.0, 80.0, 60.0]]), labels=torch.tensor([3, 1])),
               dict(boxes=torch.tensor([[1.0, 2.0, 30.0, 50.0]]), labels=torch.tensor([2]))]
    return images, targets


@pytest.mark.parametrize('upsample', ['ddf', 'nearest'])
def test_fpn_gives_torchvision_names_and_shapes_at_odd_sizes(upsample):
    torch.manual_seed(0)
    x = features()
    ours = DDFUpFeaturePyramidNetwork([8, 16, 24, 32], 12, extra_blocks=LastLevelMaxPool(), upsample=upsample)
    reference = FeaturePyramidNetwork([8, 16, 24, 32], 12, extra_blocks=LastLevelMaxPool())
    got, expected = ours(x), reference(x)
    assert list(got) == list(expected) == ['feat0', 'feat1', 'feat2', 'feat3', 'pool']
    assert [v.shape for v in got.values()] == [v.shape for v in expected.values()]


def test_nearest_fpn_is_torchvision_fpn_with_its_weights():
    torch.manual_seed(0)
    reference = FeaturePyramidNetwork([8, 16, 24, 32], 12, extra_blocks=LastLevelP6P7(12, 12))
    ours = DDFUpFeaturePyramidNetwork([8, 16, 24, 32], 12, extra_blocks=LastLevelP6P7(12, 12), upsample='nearest')
    ours.load_state_dict(reference.state_dict())  # strict: the same parameters under the same names
    x = features()
    for got, expected in zip(ours(x).values(), reference(x).values(), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_ddf_fpn_upsamples_with_ddf_up_and_trains_it():
    torch.manual_seed(0)
    ours = DDFUpFeaturePyramidNetwork([8, 16, 24, 32], 12)
    nearest = DDFUpFeaturePyramidNetwork([8, 16, 24, 32], 12, upsample='nearest')
    assert len(ours.upsample_blocks) == 3 and all(isinstance(b, DDFUpPack) for b in ours.upsample_blocks)
    # The DDF-Up FPN holds torchvision's FPN plus the upsampling blocks, and differs from it only by them.
    assert ours.load_state_dict(nearest.state_dict(), strict=False).missing_keys == \
        [k for k in ours.state_dict() if k.startswith('upsample_blocks.')]
    x = features()
    got = ours(x)
    assert not torch.allclose(got['feat0'], nearest(x)['feat0'])
    torch.testing.assert_close(got['feat3'], nearest(x)['feat3'])  # the coarsest level is not upsampled
    got['feat0'].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.upsample_blocks.parameters())


def test_nearest_detector_loads_torchvision_weights_and_computes_the_same():
    torch.manual_seed(0)
    reference = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, box_score_thresh=0.0, **SMALL).eval()
    ours = fasterrcnn_resnet50_ddfup_fpn(upsample='nearest', box_score_thresh=0.0, **SMALL).eval()
    ours.load_state_dict(reference.state_dict())
    images, _ = images_and_targets()
    with torch.no_grad():
        got, expected = ours(images), reference(images)
    assert got[0]['boxes'].shape[0] > 0
    for g, e in zip(got, expected, strict=True):
        assert g.keys() == e.keys() == {'boxes', 'labels', 'scores'}
        for key in g:
            torch.testing.assert_close(g[key], e[key], rtol=0, atol=0)


@pytest.mark.parametrize('build, kwargs', [(fasterrcnn_resnet50_ddfup_fpn, {}),
                                           (fasterrcnn_ddf_resnet50_ddfup_fpn, ONE_BLOCK)])
def test_detectors_follow_torchvisions_detection_api(build, kwargs):
    torch.manual_seed(0)
    model = build(num_classes=5, box_score_thresh=0.0, **kwargs, **SMALL).train()
    images, targets = images_and_targets()
    losses = model(images, targets)
    assert set(losses) == LOSSES and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    upsampling = list(model.backbone.fpn.upsample_blocks.parameters())
    assert upsampling and all(p.grad is not None for p in upsampling)
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and detections[0]['boxes'].shape[0] > 0
    for detection, image in zip(detections, images):
        assert detection.keys() == {'boxes', 'labels', 'scores'}
        boxes = detection['boxes']
        assert boxes.shape[1] == 4 and len(detection['labels']) == len(detection['scores']) == len(boxes)
        assert (boxes[:, 2] <= image.shape[2]).all() and (boxes[:, 3] <= image.shape[1]).all()
        assert ((detection['labels'] >= 1) & (detection['labels'] < 5)).all()


@pytest.mark.parametrize('build', [fasterrcnn_resnet50_ddfup_fpn, fasterrcnn_ddf_resnet50_ddfup_fpn])
def test_builders_take_the_pyramid_width_and_stage_depths(build):
    model = build(num_classes=3, fpn_channels=24, **ONE_BLOCK, **SMALL)
    assert model.backbone.out_channels == 24 and model.rpn.head.conv[0][0].in_channels == 24
    assert all(block.in_channels == 24 for block in model.backbone.fpn.upsample_blocks)
    body = model.backbone.body
    assert [len(getattr(body, f'layer{i}')) for i in range(1, 5)] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match='fpn_channels must be positive, got 0'):
        build(fpn_channels=0, **ONE_BLOCK)


def test_fpn_drops_into_retinanet():
    torch.manual_seed(0)
    body = timm.create_model('resnet18', features_only=True, out_indices=(2, 3, 4), feature_cls='dict',
                             feature_cfg=dict(out_map=['0', '1', '2']))
    backbone = BackboneWithDDFUpFPN(body, body.feature_info.channels(), 32, extra_blocks=LastLevelP6P7(32, 32))
    anchors = AnchorGenerator(tuple((s,) for s in (16, 32, 64, 128, 256)), ((0.5, 1.0, 2.0),) * 5)
    model = RetinaNet(backbone, num_classes=4, anchor_generator=anchors, **SMALL).train()
    images, targets = images_and_targets()
    losses = model(images, [dict(t, labels=t['labels'].clamp(max=3)) for t in targets])
    assert set(losses) == {'classification', 'bbox_regression'} and all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize('build, classifier, kwargs', [
    (fasterrcnn_resnet50_ddfup_fpn, lambda: resnet50(), {}),
    (fasterrcnn_ddf_resnet50_ddfup_fpn, lambda: timm.create_model('ddf_resnet50', layers=(1, 1, 1, 1)), ONE_BLOCK),
])
def test_a_classifier_checkpoint_loads_into_the_backbone(build, classifier, kwargs, tmp_path):
    torch.manual_seed(0)
    state = classifier().state_dict()
    path = tmp_path / 'classifier.pth'
    torch.save({'state_dict': state, 'epoch': 3}, path)  # a train.py checkpoint; a bare state_dict works too
    model = build(backbone_checkpoint=path, **kwargs, **SMALL)
    body = model.backbone.body.state_dict()
    assert {k for k in state if not k.startswith('fc.') and not k.endswith('num_batches_tracked')} == set(body)
    assert all(torch.equal(body[k], state[k]) for k in body)
    # torchvision's rule for a pretrained backbone: frozen batch norm, the last 3 of 5 stages train.
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.body.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.body.modules())
    trainable = {name.split('.')[0] for name, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {'layer2', 'layer3', 'layer4'}
    all_trainable = build(backbone_checkpoint=path, trainable_backbone_layers=5, **kwargs, **SMALL)
    assert all(p.requires_grad for p in all_trainable.backbone.body.parameters())


def test_a_checkpoint_that_does_not_fit_the_backbone_is_refused_in_one_line(tmp_path):
    path = tmp_path / 'resnet18.pth'
    torch.save(timm.create_model('resnet18').state_dict(), path)
    with pytest.raises(ValueError, match=r'does not fit model fasterrcnn_resnet50_ddfup_fpn backbone: .*shape') as info:
        fasterrcnn_resnet50_ddfup_fpn(backbone_checkpoint=path, **SMALL)
    assert '\n' not in str(info.value)
    with pytest.raises(ValueError, match='no checkpoint file'):
        fasterrcnn_resnet50_ddfup_fpn(backbone_checkpoint=tmp_path / 'missing.pth', **SMALL)


def test_bad_input_is_refused_in_one_line():
    fpn = DDFUpFeaturePyramidNetwork([8, 16, 24, 32], 12)
    x = features()
    with pytest.raises(ValueError, match=r"expected 4 feature maps .*got 3: \['feat0', 'feat1', 'feat2'\]"):
        fpn(OrderedDict(list(x.items())[:3]))
    too_small = OrderedDict(x, feat1=torch.randn(2, 16, 8, 8))  # 17 rows cannot come from 8
    with pytest.raises(ValueError, match='a level of 17x15 needs the next coarser one to be at least half'):
        fpn(too_small)
    with pytest.raises(ValueError, match="upsample must be 'ddf' or 'nearest', got 'bilinear'"):
        DDFUpFeaturePyramidNetwork([8, 16], 12, upsample='bilinear')
    with pytest.raises(ValueError, match='returned_layers must be increasing ResNet stages'):
        fasterrcnn_resnet50_ddfup_fpn(returned_layers=[2, 5])
    with pytest.raises(ValueError, match='trainable_backbone_layers must be in 0..5'):
        fasterrcnn_resnet50_ddfup_fpn(trainable_backbone_layers=6)
    with pytest.raises(ValueError, match='trainable_backbone_layers=3 would freeze randomly initialised stages'):
        fasterrcnn_resnet50_ddfup_fpn(trainable_backbone_layers=3)
    pool = MultiScaleRoIAlign(['p2', 'p3'], 7, 2)
    with pytest.raises(ValueError, match=r"featmap_names \['p2', 'p3'\] name levels the FPN does not output"):
        fasterrcnn_resnet50_ddfup_fpn(box_roi_pool=pool)
