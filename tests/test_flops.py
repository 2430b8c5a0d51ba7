"""scripts/count_flops.py: one JSON line per model with the published figures."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'scripts' / 'count_flops.py'


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


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
