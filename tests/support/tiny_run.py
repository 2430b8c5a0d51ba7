"""The arguments of a tiny train.py run, for the training tests."""
from support.runner import ROOT


def tiny_args(data_dir, output, *extra, per_class=8, epochs=3, warmup=1):
    """train.py arguments: a one-block-per-stage DDF-ResNet-26 at 32x32 on ``per_class`` demo images per
    class (8 classes), batch 8, ``epochs`` epochs (a few seconds each), into ``output``/run."""
    return ['--config', str(ROOT / 'configs' / 'demo.yaml'), '--data-dir', data_dir, '--demo-per-class', str(per_class),
            '--model-kwargs', '{layers: [1, 1, 1, 1]}', '--img-size', '32', '--batch-size', '8', '--workers', '0',
            '--device', 'cpu', '--epochs', str(epochs), '--warmup-epochs', str(warmup), '--log-interval', '1',
            '--output', str(output), '--experiment', 'run', *extra]
