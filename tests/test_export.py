"""FX, TorchScript, torch.export and torch.compile of every ddfnet model and layer, checked against eager.

Cost: models are built at reduced depth (one block per stage) where the architecture is otherwise the
same, inputs are 32x32, and compile uses the 'aot_eager' backend (graph capture and AOT autograd without
code generation; test_models.py covers inductor). Export runs on every registered name; FX features,
TorchScript and compile on one model per distinct reduced architecture, and a test checks that every
other name reduces to one of those.
"""
import io

import pytest
import timm
import torch
from timm.layers import set_scriptable
from timm.models import model_entrypoint
from torchvision.models.feature_extraction import create_feature_extractor

import ddfnet  # noqa: F401  (registers the models)
from ddfnet import DDFPack, DDFUpPack, DynamicConv2d, FilterNorm
from ddfnet.layers import DDFBranchPack

pytestmark = pytest.mark.slow  # torch.export, FX, TorchScript and torch.compile of every model family

ONE_BLOCK_PER_STAGE = {'ddfnet.models.ddf_resnet': dict(layers=(1, 1, 1, 1)),
                       'ddfnet.models.dy_resnet': dict(layers=(1, 1, 1, 1))}
NOT_REDUCED = {'ddfnet.models.dy_mobilenetv3'}
# One model per distinct reduced architecture ('mul', 'add', each single branch, both DyConv blocks,
# the MobileNet).
REPRESENTATIVES = ['ddf_resnet26', 'ddf_add_resnet50', 'ddf_spatial_resnet50', 'ddf_channel_resnet50',
                   'dy_resnet18', 'dy_resnet50', 'dy_mobilenetv3_small_100']
MODELS = sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith('ddfnet.'))


def small_model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **ONE_BLOCK_PER_STAGE.get(model_entrypoint(name).__module__, {}), **kwargs)


def test_every_model_reduces_to_a_representative():
    # A new model family must say how it reduces (or that it does not).
    assert all(model_entrypoint(n).__module__ in set(ONE_BLOCK_PER_STAGE) | NOT_REDUCED for n in MODELS)
    architectures = {repr(small_model(name)) for name in REPRESENTATIVES}
    assert len(architectures) == len(REPRESENTATIVES)
    assert [n for n in MODELS if repr(small_model(n)) not in architectures] == []


@pytest.mark.parametrize('name', MODELS)
def test_export_dynamic_batch_save_load(name):
    model = small_model(name).eval()
    batch = torch.export.Dim('batch', min=1, max=64)
    exported = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes={'x': {0: batch}})
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    with torch.no_grad():
        for size in (1, 3):  # neither is the example batch; 1 is DyConv's special case
            x = torch.randn(size, 3, 32, 32)
            torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize('name', REPRESENTATIVES)
def test_fx_feature_extraction_matches_eager(name):
    model = small_model(name).eval()
    nodes = [info['module'] for info in model.feature_info]
    # torchvision's plain tracer: no timm leaf list, so the DDF and DyConv layers are traced through.
    extractor = create_feature_extractor(model, return_nodes=nodes + ['fc' if hasattr(model, 'fc') else 'classifier'])
    eager = {}
    for node in nodes:  # registered after tracing, which would call them with proxies
        model.get_submodule(node).register_forward_hook(lambda m, i, out, node=node: eager.__setitem__(node, out))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        eager = dict(eager)
        traced = extractor(x)
        for node in nodes:
            torch.testing.assert_close(traced[node], eager[node])
        torch.testing.assert_close(list(traced.values())[-1], logits)
        fx_features = small_model(name, features_only=True, feature_cls='fx').eval()
        hook_features = small_model(name, features_only=True).eval()
        # Same weights whatever the wrapper (the FX one nests the network in graph_module).
        assert not fx_features.graph_module.load_state_dict(hook_features.state_dict(), strict=False).missing_keys
        for got, expected in zip(fx_features(x), hook_features(x), strict=True):
            torch.testing.assert_close(got, expected)


def test_ddfpack_traces_through_to_the_op():
    for layer in (DDFPack(8, stride=2, head=2), DDFBranchPack(8, branch='spatial'),
                  DDFBranchPack(8, stride=2, branch='channel', se_ratio=0.5)):
        traced = torch.fx.symbolic_trace(layer)
        assert torch.ops.ddfnet.ddf in [node.target for node in traced.graph.nodes]
        for size in (1, 3):
            x = torch.randn(size, 8, 9, 7)
            torch.testing.assert_close(traced(x), layer(x))


@pytest.mark.parametrize('name', REPRESENTATIVES)
def test_torchscript_model_matches_eager(name):
    with set_scriptable(True):
        model = small_model(name).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def _scripted_round_trip(layer: torch.nn.Module) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(layer), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def test_torchscript_layers_match_eager_and_save():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 7)
    layers = [FilterNorm(8, 3, 'channel', running_std=True), FilterNorm(2, 3, 'spatial'),
              DDFPack(8, stride=2, head=2, kernel_combine='add'), DDFBranchPack(8, stride=2, branch='channel'),
              DDFBranchPack(8, branch='spatial'), DDFUpPack(8, scale_factor=2),
              DynamicConv2d(8, 6, 3, padding=1, aggregation='kernels'),
              DynamicConv2d(8, 6, 3, stride=2, groups=2, aggregation='outputs')]
    for layer in layers:
        inputs = (torch.randn(2, layer.in_channels * 9, 5, 5),) if isinstance(layer, FilterNorm) else (x,)
        scripted = _scripted_round_trip(layer.eval())
        torch.testing.assert_close(scripted(*inputs), layer(*inputs))
    guided = DDFUpPack(8, joint_channels=3).eval()
    guidance = torch.randn(2, 3, 9, 7)
    torch.testing.assert_close(_scripted_round_trip(guided)(x, guidance), guided(x, guidance))
    with pytest.raises(torch.jit.Error, match=r'guidance must have shape \(B, 3, H, W\)'):
        torch.jit.script(guided)(x, x)


def test_torchscript_follows_the_autocast_rule():
    # A scripted model calls torch.ops.ddfnet.ddf directly; the rule registered on the op casts there.
    with set_scriptable(True):
        model = small_model('ddf_resnet26').eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        expected = model(x)
        got = scripted(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected)


def test_op_follows_the_autocast_rule_when_called_directly():
    x, channel_filter, spatial_filter = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 3, 3), torch.randn(2, 9, 5, 5)
    expected = ddfnet.ddf(x.bfloat16(), channel_filter.bfloat16(), spatial_filter.bfloat16())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = torch.ops.ddfnet.ddf(x, channel_filter, spatial_filter.bfloat16(), 3, 1, 1, 'mul')
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match='share one dtype'):  # outside autocast the dtypes must agree
        torch.ops.ddfnet.ddf(x, channel_filter, spatial_filter.bfloat16(), 3, 1, 1, 'mul')


@pytest.mark.parametrize('name', REPRESENTATIVES)
def test_torch_compile_fullgraph_forward_backward(name):
    model = small_model(name, num_classes=5).train()
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend='aot_eager')(x)
    out.square().sum().backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(x)  # BatchNorm statistics moved once more, outputs do not depend on them in train
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for got, param in zip(compiled_grads, model.parameters(), strict=True):
        torch.testing.assert_close(got, param.grad)


# The DDF-Up models: the FPN inside a backbone (what torchvision's detectors and create_feature_extractor trace),
# the detectors as torchvision scripts them, and the joint-upsampling network.

def _fpn_backbone(upsample='ddf'):
    from torchvision.models import resnet18
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    from ddfnet.models import BackboneWithDDFUpFPN
    torch.manual_seed(0)
    body = IntermediateLayerGetter(resnet18(), {f'layer{i + 1}': str(i) for i in range(4)})
    return BackboneWithDDFUpFPN(body, [64, 128, 256, 512], 32, upsample=upsample,
                                extra_blocks=LastLevelMaxPool()).eval()


@pytest.mark.parametrize('upsample', ['ddf', 'nearest'])
def test_ddf_up_fpn_traces_and_scripts_like_eager_at_odd_sizes(upsample):
    model = _fpn_backbone(upsample)
    traced = torch.fx.symbolic_trace(model)  # plain FX: the DDF-Up layers are traced through to the op
    if upsample == 'ddf':
        assert torch.ops.ddfnet.ddf in [node.target for node in traced.graph.nodes]
    scripted = _scripted_round_trip(model)
    for x in (torch.randn(2, 3, 67, 61), torch.randn(1, 3, 64, 64)):
        with torch.no_grad():
            expected = model(x)
            for got in (traced(x), scripted(x)):
                assert list(got) == list(expected) == ['0', '1', '2', '3', 'pool']
                for name in expected:
                    torch.testing.assert_close(got[name], expected[name])


@pytest.mark.filterwarnings('ignore:RCNN always returns a')  # torchvision's note on scripted detectors
@pytest.mark.parametrize('builder', ['fasterrcnn_resnet50_ddfup_fpn', 'fasterrcnn_ddf_resnet50_ddfup_fpn'])
def test_ddf_up_detectors_script_like_torchvisions(builder):
    from ddfnet import models
    torch.manual_seed(0)
    kwargs = dict(backbone_kwargs=dict(layers=(1, 1, 1, 1))) if 'ddf_resnet' in builder else {}
    model = getattr(models, builder)(num_classes=5, min_size=64, max_size=96, box_score_thresh=0.0, **kwargs).eval()
    scripted = torch.jit.script(model)
    images = [torch.rand(3, 70, 90), torch.rand(3, 64, 67)]
    with torch.no_grad():
        _, got = scripted(images)  # a scripted torchvision detector returns (losses, detections)
        expected = model(images)
    assert len(got[0]['boxes']) > 0
    for g, e in zip(got, expected, strict=True):
        for key in ('boxes', 'labels', 'scores'):
            torch.testing.assert_close(g[key], e[key])


def test_joint_upsampling_traces_and_scripts_like_eager():
    from timm.models import create_feature_extractor

    from ddfnet.models import DDFUpJointUpsamplingNet
    torch.manual_seed(0)
    model = DDFUpJointUpsamplingNet(8).eval()
    # timm's tracer, whose leaves (DDFUpPack, the input checks) keep their size checks out of the graph.
    traced = create_feature_extractor(model, return_nodes=['final_branch'])
    scripted = _scripted_round_trip(model)
    for batch in (1, 3):
        low, guide = torch.randn(batch, 1, 5, 4), torch.randn(batch, 3, 40, 32)
        with torch.no_grad():
            expected = model(low, guide)
            torch.testing.assert_close(traced(low, guide)['final_branch'], expected)
            torch.testing.assert_close(scripted(low, guide), expected)
    with pytest.raises(torch.jit.Error, match=r'at x8 the guide must be \(3, 3, 40, 32\) for a 5x4 input'):
        scripted(low, guide[:, :, :-8])
