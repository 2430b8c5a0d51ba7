"""ONNX export (ddfnet/export/onnx.py, scripts/onnx_*.py): standard operators only, and onnxruntime agrees
with PyTorch's eval output (relative error max|ort - torch| / max|torch| <= 1e-4) for the op's cases, the
layers, every registered model family, at batch 1 and 3 and, with dynamic_size, at a second H/W; the export
script refuses bad input, and an export it cannot honour or that fails its forward check leaves no file.

Many small cases share one exported model (one output each) to keep the exports, which dominate the cost,
few; whole models are exported one by one.
"""
import json
import os
import warnings
from pathlib import Path

import onnx
import pytest
import timm
import torch
from torch import nn

from support.runner import call, load_script

import ddfnet
from ddfnet.cli import run_main
from ddfnet.export import (STANDARD_DOMAINS, OnnxRuntimeModel, ddf_standard_ops, export_onnx, onnx_translation_table,
                           onnxruntime_relative_error)
from ddfnet.layers import DDFBranchPack
from ddfnet.ops import ddf_forward_reference, output_size

pytestmark = pytest.mark.slow  # ONNX exports of every model family and the op grid, onnxruntime parity

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
# The op's cases: every kernel size 1/3/5/7 x dilation 1/2 x stride 1/2 x 'mul'/'add'.
OP_CASES = [(k, d, s, c) for k in (1, 3, 5, 7) for d in (1, 2) for s in (1, 2) for c in ('mul', 'add')]


@pytest.fixture(autouse=True)
def _seed_and_quiet():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        # The TorchScript exporter and torch.jit.trace announce their deprecation on every call.
        warnings.filterwarnings('ignore', category=DeprecationWarning)
        warnings.filterwarnings('ignore', category=FutureWarning)
        yield


class OpProbe(nn.Module):
    """``ddfnet.ddf`` with filters computed from the input (so the op is all the module holds)."""

    def __init__(self, channels, kernel_size, dilation, stride, kernel_combine):
        super().__init__()
        self.args = (kernel_size, dilation, stride, kernel_combine)
        self.channel = nn.Parameter(torch.randn(channels, kernel_size, kernel_size))
        self.spatial = nn.Conv2d(channels, kernel_size ** 2, 1, stride=stride)

    def forward(self, x):
        channel_filter = x.mean(dim=(2, 3))[:, :, None, None] * self.channel + self.channel
        return ddfnet.ddf(x, channel_filter, self.spatial(x), *self.args)


class Cases(nn.Module):
    """Several modules applied to one input, one output each."""

    def __init__(self, *cases):
        super().__init__()
        self.cases = nn.ModuleList(cases)

    def forward(self, x):
        return tuple(case(x) for case in self.cases)


def assert_parity(model, path, inputs, names=None):
    errors = onnxruntime_relative_error(model, path, inputs)
    names = names or [str(i) for i in range(len(errors))]
    bad = {n: e for n, e in zip(names, errors) if not e <= TOLERANCE}
    assert not bad, f'onnxruntime vs PyTorch relative error > {TOLERANCE} at {tuple(inputs.shape)}: {bad}'
    return len(errors)


def domains(path):
    model = onnx.load(str(path))
    return {n.domain for n in model.graph.node} | {f.domain for f in model.functions}, {n.op_type for n in model.graph.node}


def test_standard_ops_formulation_matches_the_reference():
    for k, d, s, c in OP_CASES:
        for height, width in ((9, 11), (4, 3)):  # odd sizes, and one smaller than the dilated kernel
            x = torch.randn(3, 4, height, width)
            channel_filter = torch.randn(3, 4, k, k)
            spatial_filter = torch.randn(3, k * k, output_size(height, s), output_size(width, s))
            expected = ddf_forward_reference(x, channel_filter, spatial_filter, k, d, s, c)
            got = ddf_standard_ops(x, channel_filter, spatial_filter, k, d, s, c)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f'k={k} d={d} s={s} {c}')
    with pytest.raises(ValueError, match='spatial_filter must have shape'):
        ddf_standard_ops(x, channel_filter, spatial_filter[:, :, 1:], k, d, s, c)


def test_graphs_holding_the_op_translate_with_both_exporters(tmp_path):
    """The onnxscript translation (an ExportedProgram given to the dynamo exporter) and the TorchScript
    symbolic registered by ``import ddfnet`` (a traced module), over all the op's cases."""
    model = Cases(*(OpProbe(4, *case) for case in OP_CASES)).eval()
    x = torch.randn(3, 4, 9, 11)
    names = [f'k{k} d{d} s{s} {c}' for k, d, s, c in OP_CASES]
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        assert any(n.target == torch.ops.ddfnet.ddf.default for n in program.graph.nodes)
        # optimize=False: the onnxscript optimizer's rewrite rules take minutes on these ~900 nodes, and the
        # translation is what is tested here (export_onnx's tests below run the optimizer).
        torch.onnx.export(program, f=str(tmp_path / 'dynamo.onnx'), custom_translation_table=onnx_translation_table(),
                          verbose=False, optimize=False)
        traced = torch.jit.trace(model, (x,))
        assert 'ddfnet::ddf' in str(traced.inlined_graph)
        torch.onnx.export(traced, (x,), str(tmp_path / 'torchscript.onnx'), dynamo=False)
    for name in ('dynamo', 'torchscript'):
        found, ops = domains(tmp_path / f'{name}.onnx')
        assert found <= set(STANDARD_DOMAINS) and {'Pad', 'Slice', 'ReduceSum'} <= ops, (name, found, ops)
        assert assert_parity(model, tmp_path / f'{name}.onnx', x, names) == len(OP_CASES)


def layer_cases(channels):
    """(name, module) for the layers' cases: DDFPack / DDFUpPack 'mul' and 'add', kernel sizes 3/5/7,
    dilation 1/2, stride 1/2, heads, the ablation branches, DynamicConv2d in all aggregations, the op with k=1."""
    return [
        ('DDFPack mul k3 s2', ddfnet.DDFPack(channels, 3, stride=2)),
        ('DDFPack add k5 d2', ddfnet.DDFPack(channels, 5, dilation=2, kernel_combine='add')),
        ('DDFPack mul k7 s2 d2 head2', ddfnet.DDFPack(channels, 7, stride=2, dilation=2, head=2)),
        ('DDFPack add k3 s2 d2', ddfnet.DDFPack(channels, 3, stride=2, dilation=2, kernel_combine='add')),
        ('DDFUpPack mul k3', ddfnet.DDFUpPack(channels, 3)),
        ('DDFUpPack add k5 d2', ddfnet.DDFUpPack(channels, 5, dilation=2, kernel_combine='add')),
        ('DDFBranchPack spatial', DDFBranchPack(channels, 3, stride=2, branch='spatial')),
        ('DDFBranchPack channel', DDFBranchPack(channels, 3, branch='channel')),
        ('ddf k1 s2 add', OpProbe(channels, 1, 1, 2, 'add')),
        ('ddf k7 d2 mul', OpProbe(channels, 7, 2, 1, 'mul')),
        ('DynamicConv2d k1', ddfnet.DynamicConv2d(channels, 6, 1)),
        ('DynamicConv2d k3 s2 kernels', ddfnet.DynamicConv2d(channels, 6, 3, stride=2, padding=1, aggregation='kernels')),
        ('DynamicConv2d k5 d2 depth-wise', ddfnet.DynamicConv2d(channels, channels, 5, padding=4, dilation=2,
                                                                 groups=channels)),
        ('DynamicConv2d k7 s2 groups2 outputs', ddfnet.DynamicConv2d(channels, 6, 7, stride=2, padding=3, groups=2,
                                                                      aggregation='outputs')),
    ]


def test_export_onnx_layers_match_onnxruntime_at_batch_1_and_3(tmp_path):
    names, modules = zip(*layer_cases(6))
    model = Cases(*modules).train()
    path = tmp_path / 'layers.onnx'
    export_onnx(model, torch.randn(3, 6, 9, 11), path, metadata={'note': 'layers'})
    assert model.training  # restored
    found, _ = domains(path)
    assert found <= set(STANDARD_DOMAINS), found
    assert onnx.load(str(path)).metadata_props[0].value == 'layers'
    checked = sum(assert_parity(model, path, torch.randn(batch, 6, 9, 11), list(names)) for batch in (1, 3))
    assert checked == 2 * len(names)


def test_export_onnx_dynamic_size_runs_at_a_second_height_and_width(tmp_path):
    # A few layers only: with dynamic H and W, torch.export's symbolic shapes make each node cost more.
    names, modules = zip(*[case for case in layer_cases(6) if case[0] in (
        'DDFPack mul k3 s2', 'DDFUpPack add k5 d2', 'ddf k1 s2 add', 'DynamicConv2d k3 s2 kernels')])
    model = Cases(*modules)
    path = tmp_path / 'dynamic.onnx'
    export_onnx(model, torch.randn(1, 6, 9, 11), path, dynamic_size=True)
    dims = [d.dim_param for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] and dims[2] and dims[3]  # named, i.e. dynamic
    for shape in ((1, 6, 9, 11), (3, 6, 12, 7)):
        assert_parity(model, path, torch.randn(shape), list(names))


def test_plain_torch_onnx_export_works_with_both_exporters(tmp_path):
    """``torch.onnx.export(model, ...)`` as users call it, dynamo (the default) and TorchScript."""
    model = nn.Sequential(ddfnet.DDFPack(5, 3, stride=2), ddfnet.DynamicConv2d(5, 5, 3, padding=1)).eval()
    x = torch.randn(2, 5, 9, 11)
    torch.onnx.export(model, (x,), str(tmp_path / 'dynamo.onnx'), verbose=False)
    torch.onnx.export(model, (x,), str(tmp_path / 'torchscript.onnx'), dynamo=False)
    for name in ('dynamo', 'torchscript'):
        found, _ = domains(tmp_path / f'{name}.onnx')
        assert found <= set(STANDARD_DOMAINS), (name, found)
        assert_parity(model, tmp_path / f'{name}.onnx', x)


# Every registered model family, at 32x32 and one block per stage where the family allows it.
FAMILIES = {
    'ddf_resnet26': dict(layers=[1, 1, 1, 1]),                  # ddf_resnet*/ddf_mul_resnet*: 'mul'
    'ddf_add_resnet50': dict(layers=[1, 1, 1, 1]),
    'ddf_spatial_resnet50': dict(layers=[1, 1, 1, 1]),
    'ddf_channel_resnet50': dict(layers=[1, 1, 1, 1]),
    'dy_resnet18': dict(layers=[1, 1, 1, 1]),
    'dy_resnet50': dict(layers=[1, 1, 1, 1]),
    'dy_mobilenetv3_small_100': {},
}


def test_the_families_cover_every_registered_model():
    registered = set(timm.list_models('ddf_*') + timm.list_models('dy_*'))
    families = {name.rstrip('0123456789').replace('_mul_', '_') for name in registered}
    assert families <= {name.rstrip('0123456789') for name in FAMILIES}, families


# One export per family: a failure names its family, and the exports spread over the test workers.
@pytest.mark.parametrize('name', FAMILIES)
def test_every_model_family_matches_onnxruntime(tmp_path, name):
    model = timm.create_model(name, num_classes=10, **FAMILIES[name])
    path = tmp_path / f'{name}.onnx'
    export_onnx(model, torch.randn(2, 3, 32, 32), path)
    for batch in (1, 3):
        assert_parity(model, path, torch.randn(batch, 3, 32, 32), [name])


def test_export_onnx_refuses_bad_input_and_keeps_existing_files(tmp_path):
    model = ddfnet.DDFPack(5)
    existing = tmp_path / 'model.onnx'
    existing.write_bytes(b'keep me')
    x = torch.randn(1, 5, 5, 5)
    with pytest.raises(FileExistsError, match='overwrite=True'):
        export_onnx(model, x, existing)
    assert existing.read_bytes() == b'keep me'
    with pytest.raises(FileNotFoundError, match='does not exist'):
        export_onnx(model, x, tmp_path / 'missing' / 'model.onnx')
    with pytest.raises(IsADirectoryError):
        export_onnx(model, x, tmp_path)
    with pytest.raises(TypeError, match='torch.nn.Module'):
        export_onnx(lambda t: t, x, tmp_path / 'f.onnx')
    with pytest.raises(ValueError, match=r'\(B, C, H, W\)'):
        export_onnx(model, x[0], tmp_path / 'f.onnx')
    export_onnx(model, x, existing, overwrite=True)  # batch 1 still exports a dynamic batch
    assert existing.read_bytes() != b'keep me'
    assert_parity(model, existing, torch.randn(2, 5, 5, 5))
    assert not [p for p in os.listdir(tmp_path) if p.endswith('.partial')]


def _script(name):
    return load_script(f'scripts/{name}')


def _run(module, prog, argv):
    """Run a script's main like its __main__ does; return the exit status (0 when it returns)."""
    try:
        run_main(lambda: module.main(argv), prog)
    except SystemExit as e:
        return e.code
    return 0


@pytest.mark.parametrize('argv, message', [
    (['{out}', '--model', 'no_such_model'], "unknown model 'no_such_model'"),
    (['{out}', '--model', 'ddf_resnet26', '--checkpoint', '{tmp}/missing.pth'], 'no checkpoint file'),
    (['{tmp}/no/such/folder.onnx', '--model', 'ddf_resnet26'], 'does not exist'),
    (['{existing}', '--model', 'ddf_resnet26'], 'exists: pass --force to replace it'),
])
def test_onnx_export_script_refuses_bad_input_in_one_line(argv, message, tmp_path, capsys):
    existing = tmp_path / 'existing.onnx'
    existing.write_bytes(b'keep me')
    argv = [a.format(out=tmp_path / 'out.onnx', tmp=tmp_path, existing=existing) for a in argv]
    assert _run(_script('onnx_export'), 'onnx_export.py', argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('onnx_export.py: error: ') and message in err and err.count('\n') == 1, err
    assert existing.read_bytes() == b'keep me' and not (tmp_path / 'out.onnx').exists()


def test_export_then_onnx_validate_scores_like_validate_py(tmp_path, data_dir, capsys):
    """A checkpoint exported by onnx_export.py (--check-forward) and scored by onnx_validate.py gives
    validate.py's top-1 / top-5 / loss on the same images."""
    from ddfnet.data import resolve_data_root
    root = resolve_data_root('demo', data_dir, 8)  # 8 classes, 2 validation images each
    kwargs = ['--model', 'ddf_resnet26', '--model-kwargs', '{layers: [1, 1, 1, 1]}', '--img-size', '32']
    checkpoint = tmp_path / 'weights.pth'
    torch.save(timm.create_model('ddf_resnet26', num_classes=8, layers=[1, 1, 1, 1]).state_dict(), checkpoint)
    out = tmp_path / 'model.onnx'
    assert _run(_script('onnx_export'), 'onnx_export.py',
                [str(out), *kwargs, '--checkpoint', str(checkpoint), '--check-forward']) == 0
    assert 'max relative error' in capsys.readouterr().out
    assert _run(load_script('validate'), 'validate.py', [*kwargs, '--checkpoint', str(checkpoint), '--data-dir', root, '--device', 'cpu',
                                        '--workers', '0', '--results-file', str(tmp_path / 'torch.json')]) == 0
    assert _run(_script('onnx_validate'), 'onnx_validate.py',
                [root, '--onnx-input', str(out), '--workers', '0', '--results-file', str(tmp_path / 'onnx.json')]) == 0
    printed = capsys.readouterr().out
    assert 'ddf_resnet26: top-1' in printed and 'onnxruntime' in printed
    expected, got = (json.loads((tmp_path / f'{n}.json').read_text()) for n in ('torch', 'onnx'))
    assert got['images'] == expected['images'] == 16
    assert (got['top1'], got['top5'], got['img_size']) == (expected['top1'], expected['top5'], 32)
    assert got['loss'] == pytest.approx(expected['loss'], rel=1e-4)
    # A fixed-size file refuses another size in one line.
    assert _run(_script('onnx_validate'), 'onnx_validate.py', [root, '--onnx-input', str(out), '--img-size', '64']) == 2
    assert 'takes 32x32 images' in capsys.readouterr().err
    assert OnnxRuntimeModel(out).metadata['ddfnet.data_config']


def test_readme_export_example_runs(tmp_path, monkeypatch):
    import re
    block = next(b for b in re.findall(r'```python\n(.*?)```', (ROOT / 'README.md').read_text(), re.S)
                 if 'export_onnx' in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, 'README.md', 'exec'), namespace)
    model = namespace['model']
    for name in ('model.onnx', 'plain.onnx'):
        found, _ = domains(tmp_path / name)
        assert found <= set(STANDARD_DOMAINS)
    assert_parity(model, tmp_path / 'model.onnx', torch.randn(2, 3, 48, 40))  # dynamic_size=True
    assert_parity(model, tmp_path / 'plain.onnx', torch.randn(2, 3, 64, 64))


def test_benchmark_onnx_script_times_both_runtimes(tmp_path, capsys):
    module = load_script('scripts/benchmarks/benchmark_onnx')
    out = tmp_path / 'rows.jsonl'
    assert module.main(['--model', 'resnet18', '--batch-size', '2', '--img-size', '32', '--threads', '1',
                        '--warmup', '0', '--rounds', '1', '--json', str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r['runtime'] for r in rows] == ['pytorch', 'onnxruntime']
    assert all(r['min_ms'] > 0 and r['threads'] == 1 for r in rows) and rows[1]['relative_error'] <= TOLERANCE


def _tiny_export_argv(out, *extra):
    return [str(out), '--model', 'dy_resnet18', '--model-kwargs', '{layers: [1, 1, 1, 1]}', '--img-size', '32',
            *extra]


def test_onnx_export_refuses_an_opset_it_cannot_honour_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / 'model.onnx'
    out.write_bytes(b'keep me')
    code, _, err = call(lambda: _script('onnx_export').main(_tiny_export_argv(out, '--opset', '7', '--force')),
                        'onnx_export.py', capsys)
    assert code == 2 and err[-1].startswith('onnx_export.py: error: --opset 7: the exporter cannot convert dy_resnet18 '
                                            'to opset 7 (it produced opset 18); nothing written'), err
    assert out.read_bytes() == b'keep me' and sorted(p.name for p in tmp_path.iterdir()) == ['model.onnx']
    code, _, err = call(lambda: _script('onnx_export').main(_tiny_export_argv(out, '--opset', '99', '--force')),
                        'onnx_export.py', capsys)
    assert code == 2 and err == ['onnx_export.py: error: --opset 99: this onnx package knows opsets 1 to '
                                 f'{__import__("onnx").defs.onnx_opset_version()}']


def test_check_forward_fails_with_status_1_above_the_tolerance_and_removes_the_file(tmp_path, monkeypatch, capsys):
    export = _script('onnx_export')
    monkeypatch.setattr(export, 'TOLERANCE', -1.0)  # any error is too large: the failing branch runs
    out = tmp_path / 'model.onnx'
    code, _, err = call(lambda: export.main(_tiny_export_argv(out, '--check-forward')), 'onnx_export.py', capsys)
    assert code == 1 and 'check forward failed' in '\n'.join(err) and f'{out} not written' in err[-1]
    assert not list(tmp_path.iterdir())


class PyramidLevels(nn.Module):
    """A backbone with FPN whose dict of levels is returned as a tuple (one ONNX output per level)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return tuple(self.backbone(x).values())


def test_ddf_up_fpn_exports_to_standard_operators_and_matches_onnxruntime(tmp_path):
    from torchvision.models import resnet18
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    from ddfnet.models import BackboneWithDDFUpFPN
    body = IntermediateLayerGetter(resnet18(), {f'layer{i + 1}': str(i) for i in range(4)})
    model = PyramidLevels(BackboneWithDDFUpFPN(body, [64, 128, 256, 512], 32, extra_blocks=LastLevelMaxPool()))
    path = tmp_path / 'fpn.onnx'
    export_onnx(model, torch.randn(2, 3, 67, 61), path)  # odd sizes: the upsampled levels are cropped
    found, ops = domains(path)
    assert found <= set(STANDARD_DOMAINS) and 'DepthToSpace' in ops, (found, ops)  # DDF-Up's pixel shuffle
    names = ['0', '1', '2', '3', 'pool']
    assert sum(assert_parity(model, path, torch.randn(batch, 3, 67, 61), names) for batch in (1, 3)) == 10


def test_joint_upsampling_exports_to_standard_operators_and_matches_onnxruntime(tmp_path):
    import onnxruntime

    from ddfnet.models import DDFUpJointUpsamplingNet
    model = DDFUpJointUpsamplingNet(4).eval()
    path = tmp_path / 'joint.onnx'
    low, guide = torch.randn(2, 1, 6, 5), torch.randn(2, 3, 24, 20)
    with torch.no_grad():
        torch.onnx.export(model, (low, guide), str(path), input_names=['depth', 'guide'], verbose=False)
        expected = model(low, guide)
    found, _ = domains(path)
    assert found <= set(STANDARD_DOMAINS), found
    got = onnxruntime.InferenceSession(str(path)).run(None, {'depth': low.numpy(), 'guide': guide.numpy()})[0]
    assert (torch.from_numpy(got) - expected).abs().max() / expected.abs().max() <= TOLERANCE
