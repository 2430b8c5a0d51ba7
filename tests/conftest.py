"""Fixtures shared by the training tests, and the test tiers.

The tiers: ``make test`` runs ``pytest -m "not slow"`` (the fast tier, before every commit: a few minutes on
2 cores, no network), ``make test-all`` everything. A test is slow when it carries the ``slow`` mark: a file's
``pytestmark = pytest.mark.slow``, a test's ``@pytest.mark.slow``, or a parameter's marks (the emulated CUDA
kernels' cases: ``support.backends.params``), each with its reason beside it; a new test is fast unless it
says otherwise. Measured with ``pytest --durations=0`` on the 2-core machine. Helpers live in ``support/``.
"""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Runs inside the test process use one intra-op thread, like the subprocesses the tests start: on a
    busy 2-core machine two threads spin at barriers, and bitwise comparisons need equal thread counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """A demo-dataset cache folder per test module (generated on first use)."""
    return str(tmp_path_factory.mktemp('demo-cache'))


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """train.py run in the test process points the root logger at that test's captured stdout; a later test
    would then log into a closed stream ("--- Logging error ---" on its stderr). Put the root logger back."""
    import logging
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level
