"""scripts/benchmark_model.py and scripts/benchmark_op.py run end to end on tiny CPU problems (the figures
themselves belong in docs/benchmarks.md, not in tests) and refuse bad input in one line."""
import json

import pytest

from support.runner import run_script

pytestmark = pytest.mark.slow  # the benchmark scripts as subprocesses, each starting Python with torch and timm

ENV_KEYS = {'device', 'device_name', 'torch', 'threads', 'date'}


def _run(script, *args):
    return run_script(f'scripts/{script}', *args)


def test_benchmark_model_times_models_side_by_side(tmp_path):
    out = tmp_path / 'rows.jsonl'
    proc = _run('benchmark_model.py', '--models', 'ddf_resnet26', 'resnet18', '--batch-size', '2', '--img-size', '32',
                '--warmup', '0', '--rounds', '1', '--mode', 'train', '--json', str(out))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r['model'] for r in rows] == ['ddf_resnet26', 'resnet18']
    assert rows[1]['ratio_to_last'] == 1.0 and all(r['ms_per_batch'] > 0 for r in rows)
    assert all(ENV_KEYS <= r.keys() and r['mode'] == 'train' for r in rows)
    assert proc.stdout.strip().splitlines()[-2:] == out.read_text().strip().splitlines()


def test_benchmark_op_covers_dtypes_formats_and_modes(tmp_path):
    out = tmp_path / 'rows.jsonl'
    proc = _run('benchmark_op.py', '--device', 'cpu', '--shapes', '1x4x9x7', '--dtypes', 'fp32', 'bf16',
                '--warmup', '0', '--rounds', '1', '--json', str(out))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r['dtype'], r['format'], r['mode']) for r in rows} == {
        (d, f, m) for d in ('fp32', 'bf16') for f in ('nchw', 'nhwc') for m in ('forward', 'fwd+bwd')}
    assert all(ENV_KEYS <= r.keys() and r['ddf_ms'] > 0 and r['reference_ms'] > 0 for r in rows)


@pytest.mark.parametrize('script, args, message', [
    ('benchmark_model.py', ['--device', 'meta'], "device 'meta' is not usable"),
    ('benchmark_model.py', ['--models', 'ddf_resnet27'], "unknown model 'ddf_resnet27'"),
    ('benchmark_model.py', ['--models', 'resnet18', '--mode', 'train', '--batch-size', '1', '--img-size', '32'],
     'resnet18 cannot run this input: Expected more than 1 value per channel'),  # BatchNorm on 1x1 features
    ('benchmark_op.py', ['--device', 'meta'], "device 'meta' is not usable"),
    ('benchmark_op.py', ['--shapes', '1x2x3'], 'BxCxHxW'),
])
def test_benchmark_scripts_reject_bad_input(script, args, message):
    proc = _run(script, *args)
    assert proc.returncode == 2 and message in proc.stderr and 'Traceback' not in proc.stderr
