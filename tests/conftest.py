"""Fixtures shared by the training tests."""
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
