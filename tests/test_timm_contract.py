"""timm's own model tests against every model ddfnet registers: the contract timm's tools rely on.

The test file is not ours and is not copied into this repository: it is read from the sdist of the
installed timm version on the package index (``pip download``), cached under ``$DDFNET_CACHE`` (default
``~/.cache/ddfnet``), and run in a subprocess with ``TORCH_BACKEND=ddfnet`` (timm's test module imports
that module before listing models) and a ``-k`` expression built from timm's registry, so a model
registered tomorrow is covered at once. A failed download fails the test with pip's reason: CI must not
pass by skipping it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import timm
from timm.models import model_entrypoint

import ddfnet
from ddfnet.data.demo import default_cache_dir

TIMM_TEST_FILE = 'tests/test_models.py'


def ddfnet_model_names() -> list[str]:
    """Every model name registered with timm by a ddfnet module (read from timm's registry)."""
    return sorted(name for name in timm.list_models() if model_entrypoint(name).__module__.startswith('ddfnet.'))


def keyword_expression(ours: list[str], all_names: list[str]) -> str:
    """A pytest ``-k`` expression selecting the tests of exactly ``ours``.

    ``-k`` matches substrings, so timm models whose names contain one of ours (none today) are excluded
    by name: ``not ddf_resnet50x`` cannot deselect a test id that holds ``ddf_resnet50`` itself.
    """
    others = sorted(n for n in set(all_names) - set(ours) if any(name in n for name in ours))
    expression = '(' + ' or '.join(ours) + ')'
    return expression + (' and not (' + ' or '.join(others) + ')' if others else '')


def _timm_sdist() -> Path:
    version = timm.__version__
    folder = Path(default_cache_dir()) / 'timm-sdist'
    sdist = folder / f'timm-{version}.tar.gz'
    if sdist.is_file():
        return sdist
    folder.mkdir(parents=True, exist_ok=True)
    download = folder / f'download-{os.getpid()}'
    result = subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:',
                             '--disable-pip-version-check', '-d', str(download), f'timm=={version}'],
                            capture_output=True, text=True, timeout=600)
    fetched = sorted(download.glob('timm-*.tar.gz'))
    if result.returncode != 0 or not fetched:
        pytest.fail(f'cannot fetch the sdist of timm=={version} from the package index, so timm\'s model '
                    f'tests cannot run (pip exit status {result.returncode}):\n{result.stderr[-2000:]}')
    fetched[0].replace(sdist)  # a rename: a concurrent run sees the whole file or none
    for leftover in download.iterdir():
        leftover.unlink()
    download.rmdir()
    return sdist


def _extract_test_file(sdist: Path, folder: Path) -> Path:
    with tarfile.open(sdist) as archive:
        member = next((m for m in archive.getmembers() if m.isfile() and m.name.split('/', 1)[-1] == TIMM_TEST_FILE),
                      None)
        if member is None:
            pytest.fail(f'{sdist.name} holds no {TIMM_TEST_FILE}')
        target = folder / 'test_timm_models.py'
        target.write_bytes(archive.extractfile(member).read())
    (folder / 'pytest.ini').write_text('[pytest]\n')  # no configuration from the folders above
    return target


def _model_of(test_id: str, ours: list[str]) -> str | None:
    # Test ids are 'test_x[1-ddf_resnet50]' or 'test_model_default_cfgs[1-ddf_resnet50.in1k]'.
    params = test_id.partition('[')[2].rstrip(']').split('-')
    return next((p.split('.')[0] for p in params if p.split('.')[0] in ours), None)


@pytest.mark.slow  # timm's own model tests, fetched from timm's sdist on the package index (network), ~4 min
def test_timm_model_tests_pass_for_every_ddfnet_model(tmp_path):
    ours = ddfnet_model_names()
    assert len(ours) >= 15, ours
    test_file = _extract_test_file(_timm_sdist(), tmp_path)
    report = tmp_path / 'report.xml'
    env = dict(os.environ, TORCH_BACKEND='ddfnet')
    # The subprocess imports this very ddfnet, installed or not.
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(Path(ddfnet.__file__).parents[1]),
                                                      env.get('PYTHONPATH')]))
    result = subprocess.run([sys.executable, '-m', 'pytest', str(test_file), '-q', '-p', 'no:cacheprovider',
                             '-W', 'ignore::pytest.PytestUnknownMarkWarning', '--junitxml', str(report),
                             '-k', keyword_expression(ours, timm.list_models())],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert report.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    cases = list(ET.parse(report).getroot().iter('testcase'))
    outcome = {f"{case.get('name')}": next((child.tag for child in case
                                            if child.tag in ('failure', 'error', 'skipped')), 'passed')
               for case in cases}
    not_passed = {name: tag for name, tag in outcome.items() if tag != 'passed'}
    assert not not_passed and result.returncode == 0, (
        f'timm suite {len(outcome) - len(not_passed)}/{len(outcome)} passed; not passed: {not_passed}\n'
        + result.stdout[-6000:])
    models = {name: _model_of(name, ours) for name in outcome}
    assert None not in models.values(), [name for name, model in models.items() if model is None]
    # Every model went through every test timm parametrizes over the registry (forward, backward, cfgs,
    # features, TorchScript, FX forward/backward, FX + TorchScript).
    tests_per_model = {model: sorted(n.partition('[')[0] for n, m in models.items() if m == model) for model in ours}
    assert all(tests == tests_per_model[ours[0]] for tests in tests_per_model.values()), tests_per_model
    assert len(tests_per_model[ours[0]]) >= 8, tests_per_model[ours[0]]
    print(f'timm suite {len(outcome)}/{len(outcome)} passed ({len(ours)} models x {len(tests_per_model[ours[0]])} tests)')


def test_keyword_expression_selects_exactly_our_models():
    expression = keyword_expression(['ddf_resnet50', 'dy_resnet18'], ['ddf_resnet50', 'ddf_resnet50d', 'dy_resnet18',
                                                                       'resnet18'])
    assert expression == '(ddf_resnet50 or dy_resnet18) and not (ddf_resnet50d)'
    assert keyword_expression(['a_b'], ['a_b', 'c']) == '(a_b)'


def test_model_names_come_from_the_registry():
    names = ddfnet_model_names()
    assert {'ddf_resnet50', 'ddf_spatial_resnet50', 'dy_mobilenetv3_small_100'} <= set(names)
    assert 'resnet50' not in names and all(n.startswith(('ddf_', 'dy_')) for n in names)
