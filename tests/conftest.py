"""Fixtures shared by the training tests, and the test tiers.

The tiers: ``make test`` runs ``pytest -m "not slow"`` (the fast tier, before every commit: a few minutes on
2 cores, no network), ``make test-all`` everything. A test is slow when it carries the ``slow`` mark: a file's
``pytestmark = pytest.mark.slow``, a test's ``@pytest.mark.slow``, or a parameter's marks (the emulated CUDA
kernels' cases: ``support.backends.params``), each with its reason beside it; a new test is fast unless it
says otherwise. Measured with ``pytest --durations=0`` on the 2-core machine. Helpers live in ``support/``.
"""
import socket

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


_LOCAL = ('127.0.0.1', '::1', 'localhost', '0.0.0.0', '')


@pytest.fixture(autouse=True)
def _fast_tier_is_offline(request, monkeypatch):
    """A test of the fast tier (not marked slow) may not reach the network: ``make test`` runs offline. Its
    connections and name lookups to anything but this machine raise, and the Hugging Face hub (timm's
    pretrained weights) is told to stay offline in it and the processes it starts."""
    if request.node.get_closest_marker('slow'):
        yield
        return
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')

    def refuse(host):
        raise ConnectionRefusedError(f'the fast tier is offline: {request.node.nodeid} tried to reach {host!r} '
                                     '(mark the test slow if it needs the network)')

    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL:
            refuse(address[0])
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in _LOCAL and host is not None:
            refuse(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, 'connect', connect)
    monkeypatch.setattr(socket, 'getaddrinfo', getaddrinfo)
    yield
