"""scripts/gpu_check.sh --dry-run: the GPU call's test selection is exactly the CUDA cases (the Triton kernels'
among them), the parts' caps fit its budget, every other part runs on the CPU (tiny problems; the Triton
kernels' timing under triton's interpreter), the summary names each with its status, and results.tar.gz holds
what each part produced; bad arguments are one line."""
import json
import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree

import pytest
import torch

from support.runner import ROOT

SCRIPT = ROOT / 'scripts' / 'gpu_check.sh'
PARTS = ('environment', 'build', 'test_cuda', 'op_layers', 'train_native', 'train_reference', 'train_compare',
         'model_50', 'compile_50', 'profile', 'op_paper')


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


@pytest.mark.slow  # scripts/gpu_check.sh --dry-run: every part, ~2.5 min
def test_dry_run(dry_run):
    """One test reads the dry run: under pytest-xdist a module fixture runs once per worker, and two workers
    would each make the 2.5-minute run."""
    result, out = dry_run
    check_every_part_ran(result, out)
    check_results(out)
    check_the_gpu_calls_selection_is_exactly_the_cuda_cases(out)
    check_benchmark_and_training_results(out)


def check_every_part_ran(result, out):
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = (out / 'summary.txt').read_text()
    assert result.stdout.endswith(summary)  # printed last
    statuses = {line.split()[0]: line.split(None, 1)[1] for line in summary.splitlines() if line.split()
                and line.split()[0] in PARTS}
    assert list(statuses) == list(PARTS)
    assert all(status.startswith('ok') for status in statuses.values()), statuses
    assert sorted(os.listdir(out)) == ['results', 'results.tar.gz', 'summary.txt']  # a GPU call returns few files


def check_results(out):
    results = out / 'results'
    for part in PARTS:
        assert (results / f'{part}.log').is_file(), part
    caps = re.search(r'caps add up to (\d+) s of the GPU call\'s (\d+) s budget', (results / 'environment.log').read_text())
    assert caps and 0 < int(caps[1]) <= int(caps[2]) <= 540  # 9 minutes, the build included
    suite = ElementTree.parse(results / 'test_cuda.xml').getroot().find('testsuite')
    assert int(suite.get('tests')) > 0 and int(suite.get('failures')) == int(suite.get('errors')) == 0
    assert int(suite.get('skipped')) == 0


def check_the_gpu_calls_selection_is_exactly_the_cuda_cases(out):
    results = out / 'results'
    selected = [line.strip() for line in (results / 'test_cuda_selection.txt').read_text().splitlines() if '::' in line]
    every = [line.strip() for line in (results / 'test_cuda_all.txt').read_text().splitlines() if '::' in line]
    # Read independently of the script: the grid's cases carry their backend as a parameter id.
    def backend(node):
        ids = set(node.partition('[')[2].rstrip(']').split('-'))
        return next((b for b in ('cpu', 'cuda', 'emu') if b in ids), None)
    assert {backend(n) for n in selected} <= {'cuda', 'cpu', None}
    assert all(n.startswith('tests/test_cuda.py::') for n in selected if backend(n) != 'cuda')
    assert not [n for n in selected if backend(n) == 'emu']
    assert sorted(n for n in every if backend(n) == 'cuda') == sorted(n for n in selected if backend(n) == 'cuda')
    assert len([n for n in selected if n.startswith('tests/test_kernels.py::')]) > 1000
    # The Triton kernels on CUDA tensors: every test of test_triton.py that runs them, none interpreted.
    triton = {n.partition('[')[0] for n in selected if n.startswith('tests/test_triton.py::')}
    assert triton and triton == {n.partition('[')[0] for n in every
                                 if n.startswith('tests/test_triton.py::') and '[' in n}
    assert not [n for n in selected if 'interpreter' in n]
    assert re.search(r'selected \d+ of \d+ collected', (results / 'test_cuda.log').read_text())


def check_benchmark_and_training_results(out):
    results = out / 'results'
    rows = [json.loads(line) for line in (results / 'op_layers.jsonl').read_text().splitlines()]
    # The peak bandwidth comes from the device: none on the CPU, so no % of it.
    assert {r['stride'] for r in rows} == {1, 2} and all(r['layers'] for r in rows)
    assert all(r['peak_gbps'] is None and r['peak_source'] == 'unknown' and r['ddf_pct_peak'] is None for r in rows)
    assert all(r['implementation'] == 'native' for r in rows)
    # The Triton kernels beside them (interpreted here), the first call apart, no % of an unknown peak.
    assert all(r['triton_ms'] > 0 and r['triton_first_call_ms'] > 0 and r['triton_gbps'] is not None
               and r['triton_pct_peak'] is None for r in rows)
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


@pytest.mark.slow  # starts Python twice (~15 s)
@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the call on a machine without a GPU')
def test_without_a_gpu_the_call_stops_after_the_environment_part(tmp_path):
    # The call would otherwise spend its minutes building and timing the reference path.
    result = gpu_check(tmp_path / 'out', timeout=300)
    assert result.returncode == 1
    summary = (tmp_path / 'out' / 'summary.txt').read_text()
    assert 'STOPPED: gpu_check: no visible GPU (torch.cuda.is_available() is False' in summary, summary
    statuses = {line.split()[0]: line.split(None, 1)[1] for line in summary.splitlines() if line.split()
                and line.split()[0] in PARTS}
    assert list(statuses) == list(PARTS)
    assert statuses['environment'].startswith('failed')
    assert all(s.startswith('skipped (environment failed)') for p, s in statuses.items() if p != 'environment')


@pytest.mark.parametrize('counts, passes', [
    (dict(tests=3), True),
    (dict(tests=3, skipped=1), False),  # a CUDA test that skips on the GPU machine is a lost check
    (dict(tests=3, failures=1), False),
    (dict(tests=0), False),  # nothing selected ran
])
def test_the_cuda_test_part_fails_on_a_skip_a_failure_or_no_test(tmp_path, counts, passes):
    skip = '<skipped message="needs a CUDA device"/>'
    suite = ''.join(f'<testcase classname="t" name="c{i}">{skip if i < counts.get("skipped", 0) else ""}</testcase>'
                    for i in range(counts['tests']))
    attributes = ' '.join(f'{k}="{counts.get(k, 0)}"' for k in ('tests', 'failures', 'errors', 'skipped'))
    (tmp_path / 'junit.xml').write_text(f'<testsuites><testsuite name="pytest" {attributes}>{suite}</testsuite></testsuites>')
    # The script's own function, run alone.
    function = re.search(r'^junit_verdict\(\) \{\n.*?^\}\n', SCRIPT.read_text(), re.M | re.S)[0]
    result = subprocess.run(['bash', '-c', f'{function}\njunit_verdict "$1"', 'bash', str(tmp_path / 'junit.xml')],
                            capture_output=True, text=True, env={**os.environ, 'PY': sys.executable})
    assert (result.returncode == 0) == passes, result.stdout + result.stderr
