"""scripts/gpu_check.sh --dry-run: every part of the GPU call runs on the CPU (tiny problems), the summary names
each with its status, and results.tar.gz holds what each part produced; bad arguments are one line."""
import json
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree

import pytest

from support.runner import ROOT

SCRIPT = ROOT / 'scripts' / 'gpu_check.sh'
PARTS = ('environment', 'build', 'test_cuda', 'op_layers', 'op_paper', 'train_native', 'train_reference',
         'train_compare', 'model_50', 'compile_50', 'profile', 'model_101', 'compile_101')
SKIPPED_IN_DRY_RUN = {'model_101', 'compile_101'}  # the same small models as the _50 parts


def gpu_check(out, *args, timeout=900):
    env = {**os.environ, 'OUT': str(out), 'PYTHON': sys.executable, 'OMP_NUM_THREADS': '1'}
    return subprocess.run(['bash', str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('gpu_check')
    result = gpu_check(out, '--dry-run')
    with tarfile.open(out / 'results.tar.gz') as tar:
        tar.extractall(out / 'results', filter='data')
    return result, out


@pytest.mark.slow  # scripts/gpu_check.sh --dry-run: every part, ~2 min
def test_dry_run_runs_every_part(dry_run):
    result, out = dry_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = (out / 'summary.txt').read_text()
    assert result.stdout.endswith(summary)  # printed last
    statuses = {line.split()[0]: line.split(None, 1)[1] for line in summary.splitlines() if line.split()
                and line.split()[0] in PARTS}
    assert list(statuses) == list(PARTS)
    for part, status in statuses.items():
        assert status.startswith('skipped (dry run)' if part in SKIPPED_IN_DRY_RUN else 'ok'), (part, status)
    assert sorted(os.listdir(out)) == ['results', 'results.tar.gz', 'summary.txt']  # a GPU call returns few files


@pytest.mark.slow  # reads the dry run above
def test_dry_run_results(dry_run):
    _, out = dry_run
    results = out / 'results'
    for part in set(PARTS) - SKIPPED_IN_DRY_RUN:
        assert (results / f'{part}.log').is_file(), part
    suite = ElementTree.parse(results / 'test_cuda.xml').getroot().find('testsuite')
    assert int(suite.get('tests')) > 0 and int(suite.get('failures')) == int(suite.get('errors')) == 0
    rows = [json.loads(line) for line in (results / 'op_layers.jsonl').read_text().splitlines()]
    assert {r['stride'] for r in rows} == {1, 2} and all(r['layers'] and r['peak_gbps'] == 4800 for r in rows)
    assert all(r['implementation'] == 'native' and r['ddf_pct_peak'] is not None for r in rows)
    compare = json.loads((results / 'train_compare.json').read_text())
    assert len(compare['native']) == 8 and len(compare['reference']) == 4 and all(compare['checks'].values())
    assert 'ddfnet::ddf' in (results / 'profile_train_step.txt').read_text()
    for part in ('model_50', 'compile_50'):
        rows = [json.loads(line) for line in (results / f'{part}.jsonl').read_text().splitlines()]
        assert {(r['model'], r['mode']) for r in rows} == {(m, mode) for m in ('ddf_resnet26', 'resnet18')
                                                            for mode in ('train', 'infer')}
        assert {r['compile'] for r in rows} == ({'eager'} if part == 'compile_50' else {None})


@pytest.mark.parametrize('args, message', [
    (['--budget', 'soon'], "--budget must be a whole number of seconds >= 30, got 'soon'"),
    (['--gpu'], "unknown argument '--gpu' (use --dry-run, --budget SECONDS)"),
])
def test_bad_arguments_are_one_line_and_write_nothing(tmp_path, args, message):
    result = gpu_check(tmp_path / 'out', *args, timeout=60)
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr.strip().splitlines() == [f'gpu_check.sh: error: {message}']
    assert not (tmp_path / 'out').exists()
