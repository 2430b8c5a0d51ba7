"""A mid-epoch resume with another --batch-size continues after exactly the images trained, or refuses."""
import signal

import pytest
import torch

from ddfnet.cli import UserError
from ddfnet.training.resume import resume_step
from support.runner import load_script
from support.tiny_run import tiny_args

pytestmark = pytest.mark.usefixtures('one_thread')
IMAGES = 64  # 8 demo classes x 8 images


class StopAfter:
    """train.py's SignalFlag, with a SIGTERM 'arriving' during optimizer step ``steps`` (the loop reads
    ``signum`` once per step)."""

    def __init__(self, steps):
        self.steps, self.reads = steps, 0

    @property
    def signum(self):
        self.reads += 1
        return signal.SIGTERM if self.reads >= self.steps else 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def stopped_run(data_dir, output, monkeypatch, batch_size, steps):
    """A run stopped after ``steps`` batches of ``batch_size`` in epoch 0; returns its arguments."""
    args = tiny_args(data_dir, output, '--batch-size', str(batch_size), epochs=1, warmup=0)
    train = load_script('train')
    monkeypatch.setattr(train, 'SignalFlag', lambda: StopAfter(steps))
    with pytest.raises(SystemExit) as stopped:
        train.main(args)
    assert stopped.value.code == 128 + signal.SIGTERM
    state = torch.load(output / 'run' / 'last.pth.tar', weights_only=True)['state']
    assert (state['epoch'], state['step'], state['loss_images']) == (0, steps, steps * batch_size)
    return args


@pytest.mark.parametrize('before, steps, after, resumed_at', [(8, 4, 16, 2), (16, 1, 8, 2)])
def test_resume_with_another_batch_size_continues_after_the_images_trained(data_dir, tmp_path, monkeypatch, capsys,
                                                                           before, steps, after, resumed_at):
    args = stopped_run(data_dir, tmp_path, monkeypatch, before, steps)
    load_script('train').main([*args, '--batch-size', str(after), '--resume', 'auto'])
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert (f"continuing the epoch after the {steps * before} images per process trained, at batch {resumed_at}"
            in log)
    state = torch.load(tmp_path / 'run' / 'last.pth.tar', weights_only=True)['state']
    # every image of the epoch trained exactly once: the loss is summed over all of them and no more
    assert (state['epoch'], state['loss_images']) == (1, IMAGES)
    assert state['num_updates'] == steps + (IMAGES - steps * before) // after


def test_resume_that_would_split_a_batch_is_refused(data_dir, tmp_path, monkeypatch):
    args = stopped_run(data_dir, tmp_path, monkeypatch, 8, 3)
    before = (tmp_path / 'run' / 'last.pth.tar').read_bytes()
    with pytest.raises(UserError, match=r'--batch-size 16: the checkpoint stopped mid-epoch after 24 images per '
                                        r'process \(3 batches of 8\).*resume with --batch-size 8, or resume from a '
                                        r'checkpoint taken at an epoch boundary'):
        load_script('train').main([*args, '--batch-size', '16', '--resume', 'auto'])
    assert (tmp_path / 'run' / 'last.pth.tar').read_bytes() == before


def test_resume_step_rules():
    assert resume_step(0, 8, 48, 2, 1, 3) == 0  # an epoch boundary carries over to anything
    assert resume_step(5, 8, 8, 1, 1, 8) == 5
    assert resume_step(4, 8, 32, 1, 1, 2) == 1
    with pytest.raises(UserError, match='on 2 process\\(es\\), this run has 1'):
        resume_step(4, 8, 8, 2, 1, 8)
    with pytest.raises(UserError, match='more than this run\'s epoch of 2 batches'):
        resume_step(6, 8, 16, 1, 1, 2)
