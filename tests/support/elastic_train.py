"""train.py with test-only hooks, for the torchrun tests (tests/test_elastic.py): ``torchrun ...
tests/support/elastic_train.py TRAIN_ARGS``.

- Every rank saves the weights it evaluates to ``$DDFNET_TEST_DUMP/rank<RANK>.pt`` (the last one: the
  final weights, after the BatchNorm reduce), so the tests can compare ranks bitwise.
- ``DDFNET_TEST_KILL=RANK:EPOCH:BATCH`` makes that rank SIGKILL itself just before it loads batch BATCH of
  epoch EPOCH, in the first attempt only (torchrun's ``TORCHELASTIC_RESTART_COUNT`` 0): a kill at a
  chosen point in the middle of an epoch, without racing a clock.
- ``DDFNET_TEST_PAUSE=EPOCH:BATCH`` makes every rank wait before batch BATCH of epoch EPOCH, after
  creating ``$DDFNET_TEST_DUMP/paused-rank<RANK>``, until a SIGTERM has arrived (train.py's handler then
  restores the default one): the recovery checkpoint is then written after that very batch.
"""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for support.*
from support.runner import ROOT, load_script, script_path  # noqa: E402

sys.path.insert(0, str(ROOT))
sys.argv[0] = str(script_path('train'))
train = load_script('train')

import torch  # noqa: E402  (after train.py, which sets up the import path)

rank = os.environ.get('RANK', '0')
real_evaluate, real_train_one_epoch = train.evaluate, train.train_one_epoch


def dumping_evaluate(model, *args, **kwargs):
    torch.save(model.state_dict(), os.path.join(os.environ['DDFNET_TEST_DUMP'], f'rank{rank}.pt'))
    return real_evaluate(model, *args, **kwargs)


class HookedLoader:
    """``loader``, but ``hook()`` runs before batch ``at`` is handed out."""

    def __init__(self, loader, at: int, hook):
        self.loader, self.at, self.hook = loader, at, hook

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for index, batch in enumerate(self.loader):
            if index == self.at:
                self.hook()
            yield batch


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def pause_until_sigterm():
    open(os.path.join(os.environ['DDFNET_TEST_DUMP'], f'paused-rank{rank}'), 'w').close()
    deadline = time.monotonic() + 120
    while signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL and time.monotonic() < deadline:
        time.sleep(0.05)


def hooked_train_one_epoch(model, loader, *args, **kwargs):
    state = args[3]  # train_one_epoch(model, loader, optimizer, loss_fn, args, state, ...)
    if os.environ.get('DDFNET_TEST_KILL') and os.environ.get('TORCHELASTIC_RESTART_COUNT') == '0':
        kill_rank, kill_epoch, kill_batch = os.environ['DDFNET_TEST_KILL'].split(':')
        if (rank, state.epoch) == (kill_rank, int(kill_epoch)):
            loader = HookedLoader(loader, int(kill_batch), die)
    if os.environ.get('DDFNET_TEST_PAUSE'):
        pause_epoch, pause_batch = map(int, os.environ['DDFNET_TEST_PAUSE'].split(':'))
        if state.epoch == pause_epoch and state.step == 0:
            loader = HookedLoader(loader, pause_batch, pause_until_sigterm)
    return real_train_one_epoch(model, loader, *args, **kwargs)


if os.environ.get('DDFNET_TEST_DUMP'):
    train.evaluate = dumping_evaluate
train.train_one_epoch = hooked_train_one_epoch
train.run_main(lambda: train.main(sys.argv[1:]), 'train.py')
